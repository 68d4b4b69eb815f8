"""LoRA files -> a ``Plan``: which of our layers each adapter goes to, as one low-rank pair per
Linear of ours (or a full difference), checked before anything is applied.

``read(source)`` opens a ``.safetensors`` file, a PEFT ``save_pretrained`` folder or a state dict;
``plan(model, source)`` reads the format from the keys:

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
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import lora_control
from . import lora_formats as formats
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


def linear_names(model: nn.Module) -> set[str]:
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
    linears = linear_names(model)
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
