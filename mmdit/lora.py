"""LoRA adapters: apply the files people have, and inject / save trainable ones.

``handle = apply_lora(model, source, scale=1.0, fuse=False)``; source is a ``.safetensors``
path, a PEFT ``save_pretrained`` folder or a state dict, in any format ``lora_read`` knows (kohya,
OneTrainer, LyCORIS, diffusers, PEFT, ComfyUI, XLabs, BFL Control, Qwen-Image trainers).

Every LoRA becomes, per Linear of ours, one pair ``down (r, in)``, ``up (out, r)`` with
``delta W = scale * up @ down`` (alpha / rank baked into ``up``). diffusers' separate q / k
/ v (and FLUX ``proj_mlp``) fold into our fused ``qkv`` / ``linear1``: the downs are stacked
and the ups placed block-diagonally on their rows; the 2-chunk adaLN halves are swapped as
in ``weights.keymaps``. A LoRA on a convolution (SD3's patch embedding) is a low-rank conv:
``down`` the kernel at rank r, ``up`` a 1x1 conv. Full differences (``.diff``, ``.diff_b``,
PEFT's ``lora_B.bias``, LoHa / LoKr layers) are added to their parameters in place.

Unfused (default): the Linear is replaced by a ``LoRALinear`` (a conv by a ``LoRAConv2d``)
holding the same parameter objects under the same names (``weight``, ``bias``; fp8
``weight_scale`` too; a GGUF layer's quantized ``weight`` buffer, which only an unfused LoRA can sit
beside) plus ``adapters``, a list of low-rank paths; the scale is a buffer, so
``set_scale`` changes no graph. Fused: the delta is added to the weights and the originals are
kept on the CPU, so ``remove()`` restores them bit-exactly. Keys that match no layer, and rank /
shape mismatches, are one error of at most three lines (``lora_formats.Problems``), raised
before anything is applied; adapters this project does not apply are named
(``lora_formats.refused``).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_control
from .fp8 import dequantize, quantize, set_module
from .lora_read import linear_names, plan
from .weights import keymaps

# ---- modules -------------------------------------------------------------------------------

class Adapter(nn.Module):
    """One low-rank path: ``scale * up(down(x))``; ``scale`` is a 0-dim buffer (no recompiles).
    On a convolution ``down`` is the conv's kernel at rank r (stored flat, (r, in*kh*kw)) and
    ``up`` a 1x1 conv: the same ``up @ down`` delta, reshaped to the kernel."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, trainable: bool = False,
                 conv: nn.Conv2d | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)  # (r, in) or (r, in*kh*kw)
        self.up = nn.Parameter(up, requires_grad=trainable)  # (out, r)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32, device=down.device),
                             persistent=False)
        self.kernel = None if conv is None else (conv.in_channels, *conv.kernel_size)
        self.stride, self.padding = (None, None) if conv is None else (conv.stride, conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            h = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        else:  # (B, in, H, W) -> (B, r, H', W') -> (B, out, H', W')
            h = F.conv2d(x, self.down.to(x.dtype).view(-1, *self.kernel), stride=self.stride, padding=self.padding)
            h = F.conv2d(h, self.up.to(x.dtype)[:, :, None, None])
        return h * self.scale.to(x.dtype)

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32, (out, in) (a conv: (out, in, kh, kw))."""
        d = (self.up.float() @ self.down.float()) * self.scale
        return d if self.kernel is None else d.view(d.shape[0], *self.kernel)


class LoRALinear(nn.Module):
    """A Linear (or ``FP8Linear``) with low-rank adapters beside it. It holds the base module's
    own parameter and buffer objects under the same names, so the state-dict keys of the base
    weights do not change; ``unwrap()`` gives the base module back."""

    def __init__(self, base: nn.Module):
        super().__init__()
        for k, v in vars(base).items():  # in/out_features, matmul, ...
            if not k.startswith("_") and k != "training":
                self.__dict__[k] = v
        self._parameters.update(base._parameters)
        self._buffers.update(base._buffers)
        self._non_persistent_buffers_set = set(base._non_persistent_buffers_set)
        self.__dict__["_base"] = base  # not a submodule: its tensors are ours now
        self.__dict__["_base_forward"] = type(base).forward
        self.adapters = nn.ModuleList()
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(self, x)
        for adapter in self.adapters:
            y = y + adapter(x)
        return y

    def unwrap(self) -> nn.Module:
        base = self._base
        base._parameters.update({k: self._parameters[k] for k in base._parameters})
        base._buffers.update({k: self._buffers[k] for k in base._buffers})
        return base


class LoRAConv2d(LoRALinear):
    """A Conv2d (SD3's patch embedding) with low-rank conv adapters beside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        for adapter in self.adapters:
            y = y + adapter(x)
        return y


def _dense(module: nn.Module) -> torch.Tensor:
    """The module's weight in fp32 (fp8: ``w.float() * weight_scale``, per tensor or per row)."""
    scale = getattr(module, "weight_scale", None)
    return module.weight.detach().float() if scale is None else dequantize(module.weight.detach(), scale, torch.float32)


def _store(module: nn.Module, dense: torch.Tensor) -> None:
    with torch.no_grad():
        if getattr(module, "weight_scale", None) is not None:  # re-quantized with the scales it has (per row or not)
            q, s = quantize(dense, module.weight.dtype, per_row=module.weight_scale.dim() == 1)
            module.weight.copy_(q)
            module.weight_scale.copy_(s)
        else:
            module.weight.copy_(dense.to(module.weight.dtype))


# ---- the handle ----------------------------------------------------------------------------

def _target(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # through torch.compile's wrapper


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16))


class LoRAHandle:
    """What ``apply_lora`` / ``inject_lora`` did to a model: ``set_scale(s)``, ``remove()``.

    Full differences (ComfyUI ``.diff`` / ``.diff_b`` on norms and biases) are small and are
    always added to their parameters in place (the originals kept on the CPU, restored
    bit-exactly), so a handle holding some is ordered like a fused one."""

    def __init__(self, model: nn.Module, pairs: dict, scale: float, fuse: bool, multiplier: dict | None = None,
                 trainable: bool = False, diffs: dict[str, torch.Tensor] | None = None,
                 control: lora_control.Widened | None = None):
        self.model, self.fused, self.scale = _target(model), fuse, float(scale)
        self.control = control  # a Control LoRA's widened img_in and replaced norms, put back on remove()
        self.multiplier = multiplier or {}  # name -> alpha / rank kept outside ``up`` (trainable adapters)
        self.adapters: dict[str, Adapter] = {}
        self.originals: dict[str, dict[str, torch.Tensor]] = {}
        self.diffs = diffs or {}  # our parameter name -> its full difference (fp32)
        self._before_diffs: dict[str, dict[str, torch.Tensor]] = {}
        self._pairs = pairs
        in_place = list(pairs) * fuse + [p.rpartition(".")[0] for p in self.diffs if p.endswith(".weight")]
        qtypes = {n: getattr(self.model.get_submodule(n), "qtype", None) for n in in_place}
        kept = [f"{n} ({q})" for n, q in qtypes.items() if q]
        if kept:  # GGUF blocks can't take a delta without re-quantizing them
            raise ValueError(f"can't add to weights kept quantized from a GGUF file ({', '.join(kept[:3])}"
                             f"{', ...' * (len(kept) > 3)}): apply a LoRA unfused (the default), whose low-rank "
                             "path runs beside each quantized layer; full differences (.diff, LoHa, LoKr) need "
                             "the model in full precision")
        dtype = _model_dtype(self.model)
        for name, (down, up) in pairs.items():
            lin = self.model.get_submodule(name)
            device = lin.weight.device
            conv = lin if lin.weight.dim() == 4 else None
            adapter = Adapter(down.to(device, dtype), up.to(device, dtype), self.scale * self.multiplier.get(name, 1.0),
                              trainable, conv=conv)
            if fuse:
                self.originals[name] = _saved(lin)
                _store(lin, _dense(lin) + adapter.delta())
                self.adapters[name] = adapter
            else:
                if not isinstance(lin, LoRALinear):
                    lin = (LoRAConv2d if conv is not None else LoRALinear)(lin)
                    set_module(self.model, name, lin)
                lin.adapters.append(adapter)
                self.adapters[name] = adapter
        self._add_diffs()
        if self.in_place:
            self.model.__dict__.setdefault("_lora_fused", []).append(self)

    @property
    def in_place(self) -> bool:
        """Whether this handle changed weights in place (fused, or full differences)."""
        return self.fused or bool(self.diffs) or self.control is not None

    def _add_diffs(self) -> None:
        for pname, d in self.diffs.items():
            owner, _, leaf = pname.rpartition(".")
            module = self.model.get_submodule(owner)
            self._before_diffs[pname] = _saved(module) if leaf == "weight" else \
                {leaf: getattr(module, leaf).detach().to("cpu", copy=True)}
            if leaf == "weight":
                _store(module, _dense(module) + self.scale * d.to(module.weight.device))
            else:
                p = getattr(module, leaf)
                with torch.no_grad():
                    p.copy_((p.float() + self.scale * d.to(p.device)).to(p.dtype))

    def _remove_diffs(self) -> None:
        for pname, saved in self._before_diffs.items():
            module = self.model.get_submodule(pname.rpartition(".")[0])
            with torch.no_grad():
                for k, t in saved.items():
                    getattr(module, k).copy_(t)
        self._before_diffs = {}

    def parameters(self):
        """The adapters' down / up parameters (trainable ones from ``inject_lora``)."""
        return [p for a in self.adapters.values() for p in (a.down, a.up)]

    def set_scale(self, scale: float) -> None:
        """Change the strength; unfused: in place, nothing recompiles. Fused: re-merged."""
        if self.in_place and self.model.__dict__.get("_lora_fused", [None])[-1] is not self:
            raise RuntimeError("a fused LoRA (or one with full differences) can be re-scaled only while it is the last "
                               "one fused: remove the later fused ones first (or apply them unfused)")
        self.scale = float(scale)
        self._remove_diffs()
        for name, adapter in self.adapters.items():
            with torch.no_grad():
                adapter.scale.fill_(self.scale * self.multiplier.get(name, 1.0))
            if self.fused:
                lin = self.model.get_submodule(name)
                self._restore(name, lin)
                _store(lin, _dense(lin) + adapter.delta())
        self._add_diffs()

    def _restore(self, name: str, lin: nn.Module) -> None:
        with torch.no_grad():
            for k, t in self.originals[name].items():
                getattr(lin, k).copy_(t)

    def remove(self) -> None:
        """Take the adapters out; the base weights are restored bit-exactly. A second call does nothing."""
        if not self.adapters and not self.diffs and self.control is None:
            return
        if self.in_place:
            stack = self.model.__dict__.get("_lora_fused", [])
            if stack and stack[-1] is not self:
                raise RuntimeError("fused LoRAs (and those with full differences) must be removed in reverse order "
                                   "of applying: remove the later one first")
            stack.pop()
        self._remove_diffs()
        if self.fused:
            for name in self.adapters:
                self._restore(name, self.model.get_submodule(name))
        else:
            for name, adapter in self.adapters.items():
                lin = self.model.get_submodule(name)
                kept = [a for a in lin.adapters if a is not adapter]
                if kept:
                    lin.adapters = nn.ModuleList(kept)
                else:
                    set_module(self.model, name, lin.unwrap())
        if self.control is not None:
            self.control.undo()
        self.adapters, self.diffs, self.control = {}, {}, None


def _saved(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's weight (and fp8 scale), to restore it bit-exactly."""
    return {k: getattr(module, k).detach().to("cpu", copy=True)
            for k in ("weight", "weight_scale") if getattr(module, k, None) is not None}


def apply_lora(model: nn.Module, source, scale: float = 1.0, fuse: bool = False) -> LoRAHandle:
    """Apply a LoRA (a .safetensors path, a PEFT folder or a state dict, any of the formats
    ``lora_read`` knows) to ``model``. Several stack. Returns the handle: ``set_scale(s)``, ``remove()``."""
    p = plan(_target(model), source)
    control = lora_control.Widened(_target(model), p.widen, p.norms) if p.norms or p.widen else None
    return LoRAHandle(model, p.pairs, scale, fuse, diffs=p.diffs, control=control)


# ---- training ------------------------------------------------------------------------------

DEFAULT_TARGETS = ("*_blocks.*",)  # every Linear inside the transformer blocks


def inject_lora(model: nn.Module, rank: int = 16, alpha: float | None = None,
                targets: Iterable[str] = DEFAULT_TARGETS, seed: int = 0) -> LoRAHandle:
    """Trainable LoRA on the Linears whose names match any ``targets`` glob (``fnmatch``, e.g.
    ``"*attn.qkv"``, ``"double_blocks.*"``). ``up`` starts at zero, ``down`` as PEFT does
    (Kaiming-uniform), the output is scaled by ``alpha / rank`` (alpha defaults to rank).
    The model's own parameters are frozen, as PEFT does. Optimize ``handle.parameters()``;
    save with ``save_lora``."""
    model = _target(model)
    model.requires_grad_(False)
    alpha = float(rank if alpha is None else alpha)
    names = sorted(n for n in linear_names(model) if any(fnmatch.fnmatchcase(n, p) for p in targets))
    if not names:
        raise ValueError(f"no Linear of the model matches {list(targets)}; names look like "
                         f"{sorted(linear_names(model))[:4]}")
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in names:
        lin = model.get_submodule(name)
        bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
        pairs[name] = ((torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound,
                       torch.zeros(lin.out_features, rank))
    return LoRAHandle(model, pairs, 1.0, False, {n: alpha / rank for n in names}, trainable=True)


def save_lora(handle: LoRAHandle, path: str | os.PathLike, format: str = "diffusers") -> Path:
    """Write an unfused handle's adapters as a LoRA file: ``"diffusers"`` (PEFT keys
    ``transformer.<diffusers module>.lora_A/B.weight``, q / k / v split back, alpha and rank in
    the ``lora_adapter_metadata`` header) or ``"kohya"`` (``lora_unet_<ours>.lora_down/up.weight``
    + ``.alpha``)."""
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    if handle.fused or not handle.adapters:
        raise ValueError("only an unfused, not removed handle can be saved")
    from safetensors.torch import save_file

    model = handle.model
    family, hidden = model.config.family, model.config.hidden_size
    out, modules, ranks = {}, [], set()
    common = handle.multiplier.get(next(iter(handle.adapters)), 1.0)  # alpha / rank of the file's lora_alpha
    for name, a in handle.adapters.items():
        down, up = a.down.detach().float().cpu(), a.up.detach().float().cpu()
        mult = handle.multiplier.get(name, 1.0)
        rank = down.shape[0]
        ranks.add(rank)
        if format == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            out[key + ".lora_down.weight"] = down.contiguous()
            out[key + ".lora_up.weight"] = up.contiguous()
            out[key + ".alpha"] = torch.tensor(mult * rank)
            continue
        theirs, op = keymaps._match_ours(name + ".weight", family)
        for t, u in zip(theirs, keymaps.split(op, up * (mult / common), hidden)):  # alpha: in the metadata
            module = t[:-len(".weight")]
            modules.append(module)
            out[f"transformer.{module}.lora_A.weight"] = down.clone()
            out[f"transformer.{module}.lora_B.weight"] = u.contiguous().clone()
    meta = {"format": "pt"}
    if format == "diffusers":
        if len(ranks) != 1:
            raise ValueError(f"the diffusers format holds one rank per file; the adapters have {sorted(ranks)}")
        rank = ranks.pop()
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": common * rank,
                                                    "transformer.target_modules": sorted(set(modules))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path
