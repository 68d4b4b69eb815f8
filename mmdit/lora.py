"""LoRA adapters: apply the files people have, and inject / save trainable ones.

``handle = apply_lora(model, source, scale=1.0, fuse=False)``; source is a ``.safetensors``
path or a state dict, its format read from the keys:

  kohya / BFL   ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight``
                / ``.alpha`` (SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv...``)
  diffusers     ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_B``
                (alpha from the ``lora_adapter_metadata`` header when there is one)
  ComfyUI       ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (+ ``.alpha``)
  XLabs FLUX    ``double_blocks.0.processor.qkv_lora1.down.weight`` / ``.up.weight``
  Qwen-Image    the same, over its own names: kohya / musubi ``lora_unet_transformer_blocks_0_attn_to_q``
                (diffusers' module names too: ``..._img_mlp_gate_layer``), ``lycoris_...``, Lightning's
                unprefixed ``transformer_blocks.0.attn.to_q.lora_down.weight`` + ``.alpha``, DiffSynth /
                PEFT ``...lora_A.default.weight``

Every LoRA becomes, per Linear of ours, one pair ``down (r, in)``, ``up (out, r)`` with
``delta W = scale * up @ down`` (alpha / rank baked into ``up``). diffusers' separate q / k
/ v (and FLUX ``proj_mlp``) fold into our fused ``qkv`` / ``linear1``: the downs are stacked
and the ups placed block-diagonally on their rows; the 2-chunk adaLN halves are swapped as
in ``weights.keymaps``.

Unfused (default): the Linear is replaced by a ``LoRALinear`` holding the same parameter
objects under the same names (``weight``, ``bias``; fp8 ``weight_scale`` too; a GGUF layer's
quantized ``weight`` buffer, which only an unfused LoRA can sit beside) plus
``adapters``, a list of low-rank paths; the scale is a buffer, so ``set_scale`` changes no
graph. Fused: the delta is added to the weights and the originals are kept on the CPU, so
``remove()`` restores them bit-exactly. Keys that match no layer, and rank / shape
mismatches, are one error naming them, raised before anything is applied.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import dequantize, quantize, set_module
from .weights import keymaps
from .weights.checkpoint import CheckpointError

# key suffix -> role, longest first
_ROLES = [(".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # PEFT's adapter name (DiffSynth)
          (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
          (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha")]
_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
_TEXT = ("lora_te", "text_encoder")
_UNSUPPORTED = [(lambda k: "hada_" in k, "LoHa (LyCORIS)"), (lambda k: "lokr_" in k, "LoKr (LyCORIS)"),
                (lambda k: k.endswith((".dora_scale", "lora_magnitude_vector")), "DoRA"),
                (lambda k: ".lora_mid." in k, "LoCon with a mid (Tucker) tensor"),
                (lambda k: k.endswith((".diff", ".diff_b")), "full weight diffs"),
                (lambda k: k.endswith(("lora_B.bias", "lora_up.bias")), "LoRA with a bias")]
_XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
          "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}


# ---- modules -------------------------------------------------------------------------------

class Adapter(nn.Module):
    """One low-rank path: ``scale * up(down(x))``; ``scale`` is a 0-dim buffer (no recompiles)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, trainable: bool = False):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)  # (r, in)
        self.up = nn.Parameter(up, requires_grad=trainable)  # (out, r)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32, device=down.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return h * self.scale.to(x.dtype)

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32, (out, in)."""
        return (self.up.float() @ self.down.float()) * self.scale


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


# ---- reading LoRA files --------------------------------------------------------------------

def read(source) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, diffusers adapter metadata or None, a name for messages)."""
    if isinstance(source, Mapping):
        return dict(source), None, "the LoRA state dict"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"LoRA {path} does not exist (pass a .safetensors file or a state dict)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"LoRA {path} is not a readable safetensors file ({e})") from None
    raw = meta.get("lora_adapter_metadata")
    return sd, (json.loads(raw) if raw else None), str(path)


def _linear_names(model: nn.Module) -> set[str]:
    """Names of the Linear-like modules (nn.Linear, FP8Linear, LoRALinear): 2-D weight, in/out features."""
    def linear(m):
        w = getattr(m, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "in_features")
    return {n for n, m in model.named_modules() if linear(m)}


def _alpha_scale(module_key: str, rank: int, alpha: torch.Tensor | None, meta: dict | None) -> float:
    """alpha / rank from the file's ``.alpha``, else from diffusers/PEFT metadata, else 1."""
    if alpha is not None:
        return float(alpha.float().reshape(-1)[0]) / rank
    if not meta:
        return 1.0
    cfg = {k.removeprefix("transformer."): v for k, v in meta.items()}
    name = module_key.removeprefix("transformer.")
    r = next((v for p, v in (cfg.get("rank_pattern") or {}).items() if re.fullmatch(rf"(.*\.)?{p}", name)),
             cfg.get("r", rank))
    a = next((v for p, v in (cfg.get("alpha_pattern") or {}).items() if re.fullmatch(rf"(.*\.)?{p}", name)),
             cfg.get("lora_alpha", r))
    return a / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _resolve(module_key: str, ours: set[str], kohya: dict[str, str], family: str, hidden: int, out_of):
    """(our Linear name, first row, row count, swap adaLN halves) for a LoRA module key, or None."""
    key = module_key
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    for p in ("lora_unet_", "lycoris_"):  # underscored names: ours, or diffusers' (mapped below)
        if key.startswith(p):
            key = kohya.get(key[len(p):])
            if key is None:
                return None
            break
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", key)
    if m and m.group(3) in _XLABS:  # XLabs: single-block qkv_lora covers the q, k, v rows of linear1
        name = f"{m.group(1)}.{m.group(2)}.{_XLABS[m.group(3)]}"
        return (name, 0, 3 * hidden if m.group(3) == "qkv_lora" else None, False) if name in ours else None
    if key in ours:
        return key, 0, None, False
    hit = keymaps._match_diffusers(key + ".weight", family)
    if hit is None:
        return None
    weight, j, n, op = hit
    name = weight[:-len(".weight")]
    if name not in ours:
        return None
    if op == "qkv":
        return name, j * out_of(name) // 3, out_of(name) // 3, False
    if op == "gate_up":
        return name, j * out_of(name) // 2, out_of(name) // 2, False
    if op == "qkv_mlp":
        sizes = [hidden, hidden, hidden, out_of(name) - 3 * hidden]
        return name, sum(sizes[:j]), sizes[j], False
    return name, 0, None, op == "adaln" and out_of(name) == 2 * hidden


def plan(model: nn.Module, source) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """Our Linear name -> (down (R, in), up (out, R)) with alpha / rank in ``up``, in fp32.
    Raises one ``CheckpointError`` naming every key that matches nothing and every mismatch."""
    sd, meta, where = read(source)
    family, hidden = model.config.family, model.config.hidden_size
    odd = sorted({what for k in sd for test, what in _UNSUPPORTED if test(k)})
    if odd:
        raise CheckpointError(f"{where} is a {' / '.join(odd)} adapter: only plain LoRA (down/up or A/B pairs, "
                              "optional alpha) is supported")
    ours = _linear_names(model)
    kohya = {n.replace(".", "_"): n for n in ours}  # kohya's underscored module names: ours, else diffusers'
    for n in ours:
        for theirs in (keymaps._match_ours(n + ".weight", family) or ((),))[0]:
            kohya.setdefault(theirs[:-len(".weight")].replace(".", "_"), theirs[:-len(".weight")])
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unmatched, text = [], []
    for k, t in sd.items():
        if k.startswith(_TEXT):
            text.append(k)
            continue
        role = next(((k[:-len(s)], r) for s, r in _ROLES if k.endswith(s)), None)
        if role is None:
            unmatched.append(k)
            continue
        modules.setdefault(role[0], {})[role[1]] = t
    if text:
        warnings.warn(f"{where}: {len(text)} text-encoder LoRA tensors (e.g. {text[0]}) are not applied: "
                      "only the transformer takes LoRA here", stacklevel=3)
    pieces: dict[str, list] = {}
    problems = []
    out_of = lambda n: model.get_submodule(n).out_features  # noqa: E731
    for key, parts in modules.items():
        target = _resolve(key, ours, kohya, family, hidden, out_of)
        if target is None:
            conv = _resolve(key, convs, {n.replace(".", "_"): n for n in convs}, family, hidden, out_of)
            if conv is not None:
                problems.append(f"{key}: a LoRA on the convolution {conv[0]}, which is not supported (Linear only)")
            else:
                unmatched.append(f"{key} ({'/'.join(sorted(parts))})")
            continue
        if "down" not in parts or "up" not in parts:
            problems.append(f"{key}: has {sorted(parts)} but a LoRA needs both down (A) and up (B)")
            continue
        name, start, rows, swap = target
        lin = model.get_submodule(name)
        down, up = parts["down"].float(), parts["up"].float()
        rows = rows if rows is not None else lin.out_features
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != lin.in_features or up.shape[0] != rows \
                or up.shape[1] != down.shape[0]:
            problems.append(f"{key}: down {tuple(down.shape)}, up {tuple(up.shape)} do not fit {name} "
                            f"(in {lin.in_features}, {rows} output rows) with one rank")
            continue
        up = up * _alpha_scale(key, down.shape[0], parts.get("alpha"), meta)
        if swap:
            up = keymaps.split("adaln", up, hidden)[0]
        pieces.setdefault(name, []).append((start, down, up))
    if unmatched:
        problems.insert(0, f"{len(unmatched)} key(s) match no layer of this {family} transformer: "
                           f"{sorted(unmatched)[:8]}{' ...' if len(unmatched) > 8 else ''} (a LoRA for another "
                           "model, or a layout not supported)")
    if not pieces and not problems:
        problems.append(f"no LoRA tensors found (keys: {list(sd)[:5]})")
    if problems:
        raise CheckpointError("\n  ".join([f"LoRA {where} can't be applied; nothing was changed:", *problems]))
    return {name: _assemble(model.get_submodule(name).out_features, ps) for name, ps in pieces.items()}, where


def _assemble(out: int, pieces: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the downs; place each up on its rows and its own rank columns (block-diagonal)."""
    if len(pieces) == 1 and pieces[0][2].shape[0] == out:
        return pieces[0][1], pieces[0][2]
    down = torch.cat([d for _, d, _ in pieces])
    up = down.new_zeros(out, down.shape[0])
    col = 0
    for start, d, u in pieces:
        up[start:start + u.shape[0], col:col + d.shape[0]] = u
        col += d.shape[0]
    return down, up


# ---- the handle ----------------------------------------------------------------------------

def _target(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # through torch.compile's wrapper


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16))


class LoRAHandle:
    """What ``apply_lora`` / ``inject_lora`` did to a model: ``set_scale(s)``, ``remove()``."""

    def __init__(self, model: nn.Module, pairs: dict, scale: float, fuse: bool, multiplier: dict | None = None,
                 trainable: bool = False):
        self.model, self.fused, self.scale = _target(model), fuse, float(scale)
        self.multiplier = multiplier or {}  # name -> alpha / rank kept outside ``up`` (trainable adapters)
        self.adapters: dict[str, Adapter] = {}
        self.originals: dict[str, dict[str, torch.Tensor]] = {}
        self._pairs = pairs
        qtypes = {n: getattr(self.model.get_submodule(n), "qtype", None) for n in pairs}
        kept = [f"{n} ({q})" for n, q in qtypes.items() if q]
        if fuse and kept:  # GGUF blocks can't take a delta without re-quantizing them
            raise ValueError(f"fuse=True can't merge a LoRA into weights kept quantized from a GGUF file "
                             f"({', '.join(kept[:3])}{', ...' * (len(kept) > 3)}); apply it unfused (the default): "
                             "its low-rank path runs beside each quantized layer")
        dtype = _model_dtype(self.model)
        for name, (down, up) in pairs.items():
            lin = self.model.get_submodule(name)
            device = lin.weight.device
            adapter = Adapter(down.to(device, dtype), up.to(device, dtype), self.scale * self.multiplier.get(name, 1.0),
                              trainable)
            if fuse:
                self.originals[name] = {k: getattr(lin, k).detach().to("cpu", copy=True)
                                        for k in ("weight", "weight_scale") if getattr(lin, k, None) is not None}
                _store(lin, _dense(lin) + adapter.delta())
                self.adapters[name] = adapter
            else:
                if not isinstance(lin, LoRALinear):
                    lin = LoRALinear(lin)
                    set_module(self.model, name, lin)
                lin.adapters.append(adapter)
                self.adapters[name] = adapter
        if fuse:
            self.model.__dict__.setdefault("_lora_fused", []).append(self)

    def parameters(self):
        """The adapters' down / up parameters (trainable ones from ``inject_lora``)."""
        return [p for a in self.adapters.values() for p in (a.down, a.up)]

    def set_scale(self, scale: float) -> None:
        """Change the strength; unfused: in place, nothing recompiles. Fused: re-merged."""
        if self.fused and self.model.__dict__.get("_lora_fused", [None])[-1] is not self:
            raise RuntimeError("a fused LoRA can be re-scaled only while it is the last one fused: "
                               "remove the later fused ones first (or apply them unfused)")
        self.scale = float(scale)
        for name, adapter in self.adapters.items():
            with torch.no_grad():
                adapter.scale.fill_(self.scale * self.multiplier.get(name, 1.0))
            if self.fused:
                lin = self.model.get_submodule(name)
                self._restore(name, lin)
                _store(lin, _dense(lin) + adapter.delta())

    def _restore(self, name: str, lin: nn.Module) -> None:
        with torch.no_grad():
            for k, t in self.originals[name].items():
                getattr(lin, k).copy_(t)

    def remove(self) -> None:
        """Take the adapters out; the base weights are restored bit-exactly. A second call does nothing."""
        if not self.adapters:
            return
        if self.fused:
            stack = self.model.__dict__.get("_lora_fused", [])
            if stack and stack[-1] is not self:
                raise RuntimeError("fused LoRAs must be removed in reverse order of fusing: remove the later one first")
            for name in self.adapters:
                self._restore(name, self.model.get_submodule(name))
            stack.pop()
        else:
            for name, adapter in self.adapters.items():
                lin = self.model.get_submodule(name)
                kept = [a for a in lin.adapters if a is not adapter]
                if kept:
                    lin.adapters = nn.ModuleList(kept)
                else:
                    set_module(self.model, name, lin.unwrap())
        self.adapters = {}


def apply_lora(model: nn.Module, source, scale: float = 1.0, fuse: bool = False) -> LoRAHandle:
    """Apply a LoRA (a .safetensors path or a state dict, any of the formats above) to ``model``.
    Several stack. Returns the handle: ``set_scale(s)``, ``remove()``."""
    pairs, _ = plan(_target(model), source)
    return LoRAHandle(model, pairs, scale, fuse)


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
    names = sorted(n for n in _linear_names(model) if any(fnmatch.fnmatchcase(n, p) for p in targets))
    if not names:
        raise ValueError(f"no Linear of the model matches {list(targets)}; names look like "
                         f"{sorted(_linear_names(model))[:4]}")
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
