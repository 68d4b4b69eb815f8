"""fp8 weights in memory: ``FP8Linear`` keeps a Linear's weight in float8 with an fp32 scale, per
tensor (a scalar) or per output row, ``(out,)``, as BFL's "fp8r" files store them.

``y = x @ (w_fp8 * scale)^T + b`` (per row: ``scale[:, None]``), computed one of two ways:

- ``"scaled_mm"``: x is quantized to fp8 per row (``max|x_row| / max(fp8)``, computed each call) and
  multiplied in fp8 by ``torch._scaled_mm`` with row-wise scales, x's ``(M, 1)`` and the weight's
  ``(1, N)``, both fp32, applied to the fp32 accumulator; fast accumulation, then the bias. On fp8
  tensor cores (CUDA compute capability >= 8.9) this is the fast path: half the bytes of the weight
  read and twice bf16's matmul rate. x's rounding to fp8 costs accuracy (tests/test_fp8.py bounds it).
- ``"dequant"``: ``F.linear(x, (w_fp8.float() * scale).to(x.dtype), b)``: the scale stays fp32, the
  product is rounded once to x's dtype; exact in fp32 and runs on every device. The full-precision
  weight exists only inside one layer's forward.

``"auto"`` (the default) takes ``scaled_mm`` for bf16 / fp16 inputs on a device with fp8 tensor cores
(dimensions multiples of 16), else ``dequant``: fp32 inputs ask for exactness.

The state-dict names stay those of the Linear (``weight``, ``bias``) plus ``weight_scale``
(the ComfyUI name), so a model is swapped from outside: ``quantize_linears(model)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
MATMULS = ("auto", "scaled_mm", "dequant")
FAST_INPUTS = (torch.bfloat16, torch.float16)  # the input dtypes "auto" multiplies in fp8
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


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.float() * scale`` (a per-row scale: ``scale[:, None]``), rounded once to ``dtype``.
    The scale is never rounded to ``dtype`` first: a bf16 scale alone would be off by up to 2^-9."""
    return (weight.float() * _rows(scale).float()).to(dtype)


@torch.compiler.assume_constant_result
def fp8_tensor_cores(device: torch.device) -> bool:
    """Whether ``device`` multiplies fp8 on tensor cores: CUDA with compute capability >= 8.9
    (Ada, Hopper, Blackwell). A constant to torch.compile: no graph break, no guard per call."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def use_scaled_mm(matmul: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The way ``matmul`` ("auto", "scaled_mm", "dequant") multiplies ``x`` by ``weight`` (out, in)."""
    if matmul == "auto":
        return (x.dtype in FAST_INPUTS and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
                and fp8_tensor_cores(x.device))
    return matmul == "scaled_mm"


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale)^T + bias`` multiplied in fp8: x quantized per row, row-wise fp32 scales
    applied to the accumulator by ``torch._scaled_mm``, the output in x's dtype."""
    top = torch.finfo(weight.dtype).max
    N = weight.shape[0]
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / top).clamp(min=1e-12)  # (M, 1) fp32
    x8 = (flat / x_scale).clamp(-top, top).to(weight.dtype)  # (M, K) fp8
    w_scale = scale.float().reshape(1, -1).expand(1, N).contiguous()  # (1, N) fp32, per tensor or per row
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # CUDA's row-wise kernels write bf16
    y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype,
                         use_fast_accum=True).to(x.dtype)  # (M, N)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               matmul: str = "auto") -> torch.Tensor:
    """``x @ (weight * scale)^T + bias`` in x's dtype, the way ``matmul`` says (module docstring)."""
    if use_scaled_mm(matmul, x, weight):
        return scaled_mm_linear(x, weight, scale, bias)
    return F.linear(x, dequantize(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


class FP8Linear(nn.Module):
    """A Linear whose weight is float8 with an fp32 ``weight_scale``, per tensor (a scalar) or, with
    ``per_row``, one per output row (out,); computes in x's dtype, ``matmul`` one of ``MATMULS``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype = FP8, bias_dtype: torch.dtype = torch.float32, matmul: str = "auto",
                 per_row: bool = False):
        super().__init__()
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("weight_scale", torch.ones((out_features,) if per_row else (), dtype=torch.float32,
                                                        device=device))
        self.matmul = matmul

    @classmethod
    def from_linear(cls, linear: nn.Module, dtype: torch.dtype = FP8, matmul: str = "auto") -> FP8Linear:
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
                     matmul: str = "auto") -> list[str]:
    """Swap every Linear but those under ``keep`` for an ``FP8Linear`` (weights quantized per
    tensor; ``matmul`` as FP8Linear's). Returns the names swapped."""
    names = linear_names(model, keep)
    for name in names:
        set_module(model, name, FP8Linear.from_linear(model.get_submodule(name), dtype, matmul))
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
