"""fp8 weights in memory: ``FP8Linear`` keeps a Linear's weight in float8 with a per-tensor scale
(or a per-row one, ``(out,)``, as BFL's "fp8r" files store them).

``y = x @ (w_fp8 * scale)^T + b`` (per row: ``scale[:, None]``). The weight is dequantized per
layer on the fly (``w * scale`` in the input's dtype), which is exact in fp32 and works on every
device; the full-precision weight exists only inside one layer's forward. On CUDA with compute
capability >= 8.9, ``matmul="scaled_mm"`` (opt-in) instead quantizes the input (per tensor; per
token for per-row weight scales) and multiplies in fp8 with ``torch._scaled_mm`` (faster, less exact).

The state-dict names stay those of the Linear (``weight``, ``bias``) plus ``weight_scale``
(the ComfyUI name), so a model is swapped from outside: ``quantize_linears(model)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
# Linears left in full precision: the output projection and its adaLN (BFL / Stability: final_layer;
# Qwen-Image: norm_out, proj_out)
KEEP = ("final_layer.", "norm_out.", "proj_out")


def quantize(w: torch.Tensor, dtype: torch.dtype = FP8, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8, scale) with ``w ~= dequantize(w_fp8, scale)``; scale = max|w| / max(dtype), an fp32
    scalar, or (out,) with ``per_row`` (the max over each row)."""
    top = torch.finfo(dtype).max
    amax = (w.detach().abs().amax(dim=1) if per_row else w.detach().abs().amax()).float()
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    return (w.detach().float() / _rows(scale)).clamp(-top, top).to(dtype), scale


def _rows(scale: torch.Tensor) -> torch.Tensor:
    """A scale shaped to multiply an (out, in) weight: a scalar as is, per-row (out,) as (out, 1)."""
    return scale[:, None] if scale.dim() == 1 else scale


def _scaled_mm_ok(device: torch.device, in_features: int, out_features: int) -> bool:
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and in_features % 16 == 0 and out_features % 16 == 0 and hasattr(torch, "_scaled_mm"))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` (a per-row scale: ``scale[:, None]``) computed in ``dtype``: exactly
    ``weight.float() * scale`` for fp32; for bf16 / fp16 the product is taken in that dtype (as
    ComfyUI does), a third of the memory traffic of going through fp32."""
    return weight.to(dtype) * _rows(scale).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               matmul: str = "dequant") -> torch.Tensor:
    """``x @ (weight * scale)^T + bias`` in x's dtype; ``matmul="scaled_mm"`` on CUDA multiplies in
    fp8 with the input quantized per tensor (scale = max|x| / max(fp8)); with a per-row weight
    scale, per token (torch's row-wise scaled_mm: scales (M, 1) and (1, N), a bf16 product)."""
    bias = None if bias is None else bias.to(x.dtype)
    if matmul == "scaled_mm" and x.is_cuda:
        top = torch.finfo(weight.dtype).max
        flat = x.reshape(-1, x.shape[-1]).float()
        rows = scale.dim() == 1
        x_scale = ((flat.abs().amax(dim=1, keepdim=True) if rows else flat.abs().amax()) / top).clamp(min=1e-12)
        x8 = (flat / x_scale).clamp(-top, top).to(weight.dtype)
        if rows:
            y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=scale[None, :].float(),
                                 out_dtype=torch.bfloat16).to(x.dtype)
            y = y if bias is None else y + bias
        else:
            y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=scale, bias=bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


class FP8Linear(nn.Module):
    """A Linear whose weight is float8 with an fp32 ``weight_scale``, per tensor (a scalar) or, with
    ``per_row``, one per output row (out,); computes in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype = FP8, bias_dtype: torch.dtype = torch.float32, matmul: str = "dequant",
                 per_row: bool = False):
        super().__init__()
        if matmul not in ("dequant", "scaled_mm"):
            raise ValueError(f"matmul must be 'dequant' or 'scaled_mm', got {matmul!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("weight_scale", torch.ones((out_features,) if per_row else (), dtype=torch.float32,
                                                        device=device))
        self.matmul = matmul

    @classmethod
    def from_linear(cls, linear: nn.Module, dtype: torch.dtype = FP8, matmul: str = "dequant") -> FP8Linear:
        """Quantize a Linear (its bias keeps its dtype)."""
        q, scale = quantize(linear.weight, dtype)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=dtype,
                  matmul=matmul)
        out.weight = nn.Parameter(q, requires_grad=False)
        out.weight_scale = scale.to(q.device)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``w_fp8.float() * scale``, cast to ``dtype``."""
        return dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # only attributes, no methods: LoRALinear runs this forward on itself
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.matmul)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight.dtype}, matmul={self.matmul}"
                + (", per-row scale" if self.weight_scale.dim() else ""))


def linear_names(model: nn.Module, keep: tuple[str, ...] = KEEP) -> list[str]:
    """Names of the ``nn.Linear`` modules, except those under the ``keep`` prefixes."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.startswith(keep)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_linears(model: nn.Module, dtype: torch.dtype = FP8, keep: tuple[str, ...] = KEEP,
                     matmul: str = "dequant") -> list[str]:
    """Swap every Linear but those under ``keep`` for an ``FP8Linear`` (weights quantized per
    tensor). ``matmul="auto"`` picks ``scaled_mm`` where it is available (fp8 activations:
    faster, less exact), else ``dequant``. Returns the names swapped."""
    names = linear_names(model, keep)
    for name in names:
        lin = model.get_submodule(name)
        how = matmul
        if how == "auto":
            how = "scaled_mm" if _scaled_mm_ok(lin.weight.device, lin.in_features, lin.out_features) else "dequant"
        set_module(model, name, FP8Linear.from_linear(lin, dtype, how))
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
