"""LoRA adapters: apply the files people have, and inject / save trainable ones.

``handle = apply_lora(model, source, scale=1.0, fuse=False)``; source is a ``.safetensors``
path, a PEFT ``save_pretrained`` folder or a state dict, its format read from the keys:

  kohya / BFL   ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight``
                / ``.alpha`` (SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv...``)
  OneTrainer    ``lora_transformer_<diffusers module, . as _>`` + the same suffixes
  LyCORIS       ``lycoris_<module, . as _>`` (SimpleTuner's ``algo=lora``) + the same suffixes
  diffusers     ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_B``
                (alpha from the ``lora_adapter_metadata`` header when there is one)
  PEFT          ``base_model.model.<module>.lora_A.weight``; alpha, rank / alpha patterns and rsLoRA
                from the folder's (or the file's neighbour) ``adapter_config.json``
  ComfyUI       ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (+ ``.alpha``); its
                LoraSave extraction also writes ``.diff`` / ``.diff_b`` (full norm / bias differences)
  LyCORIS LoHa / LoKr  ``lycoris_<module>.hada_w1_a`` ... / ``.lokr_w1`` ...: a full weight difference
  XLabs FLUX    ``double_blocks.0.processor.qkv_lora1.down.weight`` / ``.up.weight``
  BFL Control   FLUX.1 Depth / Canny LoRA: BFL names + lora_A / lora_B, a wider ``img_in``, full q / k norm
                scales: it makes the Depth / Canny model (``lora_control``)
  Qwen-Image    the same, over its own names: kohya / musubi ``lora_unet_transformer_blocks_0_attn_to_q``
                (diffusers' module names too: ``..._img_mlp_gate_layer``), ``lycoris_...``, Lightning's
                unprefixed ``transformer_blocks.0.attn.to_q.lora_down.weight`` + ``.alpha``, DiffSynth /
                PEFT ``...lora_A.default.weight``

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
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_control
from . import lora_formats as formats
from .fp8 import dequantize, quantize, set_module
from .weights import keymaps
from .weights.checkpoint import CheckpointError

# key suffix -> role, longest first
_ROLES = [(".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # PEFT's adapter name (DiffSynth)
          (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
          (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"),
          (".lora_B.bias", "up_bias"), (".lora_up.bias", "up_bias"),  # PEFT lora_bias: scaled as the pair
          (".diff_b", "diff_b"), (".diff", "diff"),  # ComfyUI LoraSave: full differences of biases / weights
          *((f".{t}", t) for t in formats.LYCORIS)]  # LyCORIS LoHa / LoKr: a full weight difference
_XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
          "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}


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


# ---- reading LoRA files --------------------------------------------------------------------

def read(source) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, PEFT / diffusers adapter settings or None, a name for messages). A folder is
    read as PEFT's ``save_pretrained`` output; a file's settings come from its
    ``lora_adapter_metadata`` header, else from an ``adapter_config.json`` beside it."""
    if isinstance(source, Mapping):
        return dict(source), None, "given as a state dict"
    path = Path(source)
    if path.is_dir():
        path = formats.peft_file(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA {path} does not exist (pass a .safetensors file, a PEFT folder or a state dict)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"LoRA {path} is not a readable safetensors file ({e})") from None
    raw = meta.get("lora_adapter_metadata")
    return sd, (json.loads(raw) if raw else formats.peft_config(path)), str(path)


def _linear_names(model: nn.Module) -> set[str]:
    """Names of the Linear-like modules (nn.Linear, FP8Linear, LoRALinear): 2-D weight, in/out features."""
    def linear(m):
        w = getattr(m, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "in_features")
    return {n for n, m in model.named_modules() if linear(m)}


def _holders(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the names of its own parameters, for every module holding some."""
    out = {}
    for n, m in model.named_modules():
        own = [k for k, _ in m.named_parameters(recurse=False)]
        if n and own:
            out[n] = own
    return out


def _alpha_scale(module_key: str, rank: int, alpha: torch.Tensor | None, meta: dict | None) -> float:
    """alpha / rank from the file's ``.alpha``, else from diffusers/PEFT settings, else 1."""
    if alpha is not None:
        return float(alpha.float().reshape(-1)[0]) / rank
    return formats.scale_of(module_key, rank, meta) if meta else 1.0


def _resolve(module_key: str, ours, kohya: dict[str, str], family: str, hidden: int, out_of):
    """(our module name, first row, row count, swap adaLN halves) for a LoRA module key, or None."""
    key = formats.strip(module_key)
    for p in formats.UNDERSCORED:  # underscored names: ours, or diffusers' (mapped below)
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
    hit = next((h for leaf in (".weight", ".scale") if (h := keymaps._match_diffusers(key + leaf, family))), None)
    if hit is None:
        return None
    param, j, n, op = hit
    name = param.rpartition(".")[0]
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


def _kohya_names(holders: dict[str, list[str]], family: str) -> dict[str, str]:
    """kohya's underscored module names -> ours, else diffusers' (resolved through the key map)."""
    kohya = {n.replace(".", "_"): n for n in holders}
    for n, params in holders.items():
        for p in params:
            for theirs in (keymaps._match_ours(f"{n}.{p}", family) or ((),))[0]:
                module = theirs.rpartition(".")[0]
                kohya.setdefault(module.replace(".", "_"), module)
    return kohya


def _low_rank(key: str, parts: dict, name: str, module: nn.Module, rows: int | None, meta,
              wider: int | None = None) -> tuple:
    """(down (r, in) or (r, in*kh*kw), up (rows, r) with alpha / rank in it, alpha / rank) or a
    string saying why the pair does not fit ``module`` (``wider``: its input width once widened)."""
    down, up = parts["down"].float(), parts["up"].float()
    if isinstance(module, nn.Conv2d):  # kohya / LyCORIS / ComfyUI / PEFT: a kernel-sized down, a 1x1 up
        n_in, width = module.in_channels, module.in_channels * math.prod(module.kernel_size)
        down = down.reshape(down.shape[0], -1) if down.dim() == 4 else down
        up = up.reshape(up.shape[0], -1) if up.dim() == 4 and up.shape[2:] == (1, 1) else up
        if module.groups != 1 or module.dilation != (1, 1):
            return f"a LoRA on the grouped or dilated convolution {name}"
    else:
        n_in = width = wider or module.in_features
    rows = rows if rows is not None else (module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)
    if down.dim() != 2 or up.dim() != 2 or down.shape[1] != width or up.shape[0] != rows \
            or up.shape[1] != down.shape[0]:
        return (f"down {tuple(parts['down'].shape)}, up {tuple(parts['up'].shape)} do not fit {name} "
                f"(in {n_in}, {rows} output rows) with one rank")
    mult = _alpha_scale(key, down.shape[0], parts.get("alpha"), meta)
    return down, up * mult, mult


@dataclass
class Plan:
    """What a LoRA file does to a model, checked against it before anything is changed."""

    pairs: dict  # our module -> (down, up) with alpha / rank in ``up``, fp32 (a conv's ``down`` flat)
    diffs: dict[str, torch.Tensor]  # our parameter -> its full difference at strength 1
    where: str  # a name for messages
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # Control LoRA: parameters set to these
    widen: dict[str, int] = field(default_factory=dict)  # Control LoRA: module -> its new input width


def plan(model: nn.Module, source) -> Plan:
    """Read ``source`` against ``model``. Full differences are ComfyUI's ``.diff`` / ``.diff_b``,
    PEFT's ``lora_B.bias`` and LyCORIS LoHa / LoKr layers. Raises one ``CheckpointError`` of at
    most three lines naming what matches nothing or does not fit."""
    sd, meta, where = read(source)
    family, hidden = model.config.family, model.config.hidden_size
    norms, widen = {}, {}
    if lora_control.is_control(sd):  # BFL's Depth / Canny Control LoRA
        sd, norms, widen = lora_control.read(model, sd, where)
    formats.refused(sd, where)
    holders = _holders(model)
    kohya = _kohya_names(holders, family)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    text = []
    for k, t in sd.items():
        if k.startswith(formats.TEXT):
            text.append(k)
            continue
        role = next(((k[:-len(s)], r) for s, r in _ROLES if k.endswith(s)), (k, "unknown"))
        modules.setdefault(role[0], {})[role[1]] = t
    if text:
        warnings.warn(f"{where}: {len(text)} text-encoder LoRA tensors (e.g. {text[0]}) are not applied: "
                      "only the transformer takes LoRA here", stacklevel=3)
    pieces: dict[str, list] = {}
    diffs: dict[str, list] = {}
    problems = formats.Problems(where, family, list(modules))
    linears = _linear_names(model)
    out_of = lambda n: model.get_submodule(n).out_features  # noqa: E731
    for key, parts in modules.items():
        target = None if "unknown" in parts else _resolve(key, holders, kohya, family, hidden, out_of)
        if target is None:
            problems.unmatched.append(key)
            continue
        name, start, rows, swap = target
        module = model.get_submodule(name)
        mult = 1.0
        if "down" in parts or "up" in parts:
            if "down" not in parts or "up" not in parts:
                problems.half.append(key)
                continue
            if not isinstance(module, nn.Conv2d) and name not in linears:
                problems.misfit[key] = f"a LoRA pair on {name}, which is not a Linear or a convolution"
                continue
            pair = _low_rank(key, parts, name, module, rows, meta, widen.get(name))
            if isinstance(pair, str):
                problems.misfit[key] = pair
                continue
            down, up, mult = pair
            pieces.setdefault(name, []).append((start, down, keymaps.split("adaln", up, hidden)[0] if swap else up))
        if any(r in formats.LYCORIS for r in parts):
            delta = formats.lycoris_delta(parts)
            want = (rows or module.weight.shape[0], *module.weight.shape[1:])
            if isinstance(delta, str) or delta.numel() != math.prod(want):
                problems.misfit[key] = delta if isinstance(delta, str) else \
                    f"LoHa / LoKr delta {tuple(delta.shape)} does not fit {name}.weight {tuple(want)}"
                continue
            parts = {**parts, "diff": delta.reshape(want)}
        for role, leaf, scale in (("diff", "weight", 1.0), ("diff_b", "bias", 1.0), ("up_bias", "bias", mult)):
            if role not in parts:
                continue
            if leaf == "weight" and leaf not in holders[name] and "scale" in holders[name]:
                leaf = "scale"  # FLUX's q / k RMSNorm scales (ComfyUI now names them *_norm.weight)
            param = getattr(module, leaf, None)
            want = None if param is None else (param.shape if rows is None else (rows, *param.shape[1:]))
            if want is None or tuple(parts[role].shape) != tuple(want):
                problems.misfit[key] = (f"{role} {tuple(parts[role].shape)} does not fit {name}.{leaf} "
                                        f"({'absent' if want is None else tuple(want)})")
                continue
            t = parts[role].float() * scale
            diffs.setdefault(f"{name}.{leaf}", []).append((start, keymaps.split("adaln", t, hidden)[0] if swap else t))
    if problems:
        problems.raise_()
    if not pieces and not diffs and not norms:
        raise CheckpointError(f"LoRA {where} holds no LoRA tensors (keys: {list(sd)[:formats.SHOWN]}): "
                              "pass a LoRA file")
    if diffs:
        warnings.warn(f"{where}: it holds {sum(len(v) for v in diffs.values())} full differences (ComfyUI .diff / "
                      ".diff_b on norms and biases, LyCORIS LoHa / LoKr, or lora_B.bias); they are added to those "
                      "parameters in place (remove() restores them)", stacklevel=3)
    alphas = any("alpha" in p for p in modules.values())
    if not alphas and not meta and any(k.startswith("base_model.model.") for k in modules):
        warnings.warn(f"{where}: a PEFT adapter without its adapter_config.json (no alpha in the file): applied at "
                      "alpha = rank (scale 1); pass the PEFT folder, or keep adapter_config.json beside the file, to "
                      "use its lora_alpha", stacklevel=3)
    params = dict(model.named_parameters())
    full = {}
    for pname, ps in diffs.items():
        d = torch.zeros(params[pname].shape)
        for start, t in ps:
            d[start:start + t.shape[0]] += t
        full[pname] = d
    pairs = {}
    for name, ps in pieces.items():
        module = model.get_submodule(name)
        out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        pairs[name] = _assemble(out, ps)
    return Plan(pairs, full, where, norms, widen)


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
    above) to ``model``. Several stack. Returns the handle: ``set_scale(s)``, ``remove()``."""
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
