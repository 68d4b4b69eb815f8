"""``load_transformer``: any official SD3 / SD3.5 / FLUX.1 transformer checkpoint -> our model.

resolve (hub / local) -> open (mmap; ComfyUI scaled fp8 and aliases read through
``formats.Canonical``) -> detect layout + config -> build on ``meta`` -> check every key and
shape in the checkpoint's own names -> stream tensors in one at a time (cast per tensor,
fp8 upcast, or kept in fp8 with ``weight_dtype``), so peak host memory stays near one copy.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import fp8 as _fp8
from .. import ma as _ma
from ..ggml import PLAIN, TYPES, GGUFLinear
from ..models.flux import FluxConfig
from ..models.sd3 import SD3Config
from ..models import transformer_for
from . import keymaps
from .checkpoint import CheckpointError, load_into, mismatches, shard_set
from .detect import Detected, detect
from .formats import Canonical, residue_hints
from .hub import resolve

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SAFETENSORS_FP8 = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # the header's dtype tags


def load_transformer(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", *,
                     revision: str | None = None, token: str | bool | None = None,
                     config: SD3Config | FluxConfig | dict | None = None,
                     weight_dtype: torch.dtype | None = None, requires_grad: bool = False) -> nn.Module:
    """Load a transformer from a hub repo id, a diffusers folder (or its ``transformer/``), an
    ``*.index.json``, or one ``.safetensors`` or ``.gguf`` file in the original or the diffusers layout.

    ``config``: a full config to use instead of the inferred one, or a dict of overrides
    (e.g. ``{"axes_dim": (8, 28, 28)}`` for a FLUX-like file with head_dim 64).
    ``weight_dtype``: ``torch.float8_e4m3fn`` keeps every Linear weight but the final layer's
    (of an fp8 file: those it stores in fp8) in fp8 with a per-tensor scale (the file's, or
    computed at load), computing in ``dtype`` (``mmdit.fp8.FP8Linear``). None: every tensor
    in ``dtype`` (fp8 files, ComfyUI scaled fp8 included, are upcast).
    A ``.gguf`` file keeps its Linear weights as it stores them (``mmdit.ggml.GGUFLinear``,
    dequantized per layer in ``dtype``); its other tensors are dequantized into ``dtype``.
    ``requires_grad``: False (default) suits inference: no autograd graph is built even
    outside ``torch.no_grad()``; trainers pass True (or call ``model.requires_grad_()``).
    The model comes back in eval mode, with ``model.config``, ``model.detected`` (layout,
    prefix, preset) and ``model.source_files`` (the files read, for content hashing).
    """
    if weight_dtype is not None and weight_dtype not in FP8_DTYPES:
        raise ValueError(f"weight_dtype must be None or one of {FP8_DTYPES}, got {weight_dtype}")
    src = resolve(source, revision=revision, token=token)
    ckpt = Canonical(src.open(), str(src.path))
    det = detect(ckpt, src.config_json, config, where=str(src.path))
    with torch.device("meta"):
        model = transformer_for(det.config)
    hidden = det.config.hidden_size
    check_keys(model, ckpt, det, where=str(src.path))
    recipes = keymaps.recipes_for(det.keys, det.layout, det.family, det.prefix)
    thunks = {k: partial(_read, ckpt, r, dtype, hidden) for k, r in recipes.items()}
    shapes = {k: keymaps.combined_shape(r.op, [ckpt.shape(s) for s in r.keys]) for k, r in recipes.items()}
    cast = dtype
    if ckpt.format == "GGUF":
        if weight_dtype is not None:
            raise ValueError(f"{src.path} is a GGUF file: its weights stay as it stores them (quantized); "
                             "weight_dtype applies to safetensors files only")
        cast = keep_quantized(model, ckpt, recipes, thunks, shapes, dtype, hidden)
    elif weight_dtype is not None:
        cast = _keep_fp8(model, ckpt, recipes, thunks, shapes, dtype, weight_dtype, hidden, device)
    load_into(model, thunks, shapes, dtype=cast, device=device, layout=_describe_layout(det))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the model must compute itself: a model-side bug, not the file's
        raise RuntimeError(f"{type(model).__name__} still has tensors on meta after loading: {left[:8]}")
    model.eval().requires_grad_(requires_grad)
    model.detected = det
    model.source_files = [str(f) for f in ckpt.files]
    spec = _ma.spec_for_checkpoint(ckpt.files)  # a calibrated MA spec keyed by the files' content
    if spec is not None:
        model.ma = spec
    return model


def _read(ckpt: Canonical, recipe: keymaps.Recipe, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    def read(name):
        t = ckpt[name]  # scaled fp8: fp8.float() * scale, in fp32
        # cast each part before combining: float8 has no cat, and it halves the peak for bf16 -> fp32
        return t.to(dtype) if t.dtype.is_floating_point else t
    return keymaps.materialize(recipe, read, hidden)


def _keep_fp8(model, ckpt: Canonical, recipes, thunks, shapes, dtype, weight_dtype, hidden, device):
    """Swap the Linears (on meta, all but final_layer) for FP8Linear and make their ``weight`` /
    ``weight_scale`` thunks give fp8 + scale: the file's own when it stores that fp8 tensor as is
    (per-row scales too: BFL fp8r keeps its bytes and its (out,) scales), else quantized per tensor
    from the full-precision read. In an fp8 file, only the layers it stores in fp8 are kept in fp8.
    Returns the per-name cast for load_into."""
    names = _fp8.linear_names(model)
    stored_fp8 = [n for n in names if all(ckpt.dtype(k).startswith("F8") for k in recipes[f"{n}.weight"].keys)]
    if stored_fp8:  # an fp8 file: its author chose which layers are fp8; the rest stay in dtype
        names = stored_fp8
    for name in names:
        lin = model.get_submodule(name)
        key, made = f"{name}.weight", {}
        same = all(ckpt.dtype(k) == _SAFETENSORS_FP8[weight_dtype] for k in recipes[key].keys)  # header only
        rows = same and all(ckpt.per_row(k) for k in recipes[key].keys)
        _fp8.set_module(model, name, _fp8.FP8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                    device="meta", dtype=weight_dtype, bias_dtype=dtype,
                                                    per_row=rows))

        def weight(key=key, made=made, same=same, rows=rows):
            r = recipes[key]
            if rows:  # the file's bytes and its per-row scales, both through the key map's op (q/k/v: cat)
                raws = [ckpt.raw(k) for k in r.keys]
                made["scale"] = keymaps.combine(r.op, [sc for _, sc in raws], hidden)
                return keymaps.combine(r.op, [t.view(torch.uint8) for t, _ in raws], hidden).view(weight_dtype)
            if same:
                raws = [ckpt.raw(k) for k in r.keys]
                scales = [torch.ones(()) if s is None else s for _, s in raws]
                if all(torch.equal(s, scales[0]) for s in scales):
                    made["scale"] = scales[0]  # the file's bytes (diffusers q/k/v parts joined as bytes)
                    return keymaps.combine(r.op, [t.view(torch.uint8) for t, _ in raws], hidden).view(weight_dtype)
            # quantized where the model goes: on a GPU that is much faster than on the host
            q, made["scale"] = _fp8.quantize(_read(ckpt, r, dtype, hidden).to(device), weight_dtype)
            return q

        thunks[key] = weight  # before its scale in the dict: load_into reads in order
        thunks[f"{name}.weight_scale"] = lambda made=made: made.pop("scale")
        shapes[f"{name}.weight_scale"] = (lin.out_features,) if rows else ()
    fp8_names = {f"{n}.weight" for n in names}
    scale_names = {f"{n}.weight_scale" for n in names}
    return lambda k: weight_dtype if k in fp8_names else torch.float32 if k in scale_names else dtype


def _describe_layout(det: Detected) -> str:
    prefix = f", prefix {det.prefix!r}" if det.prefix else ""
    return f"{det.layout}{prefix}, {det.family}, config from {det.config_source}"


def check_keys(model: nn.Module, ckpt: Canonical, det: Detected, where: str) -> None:
    """Every tensor the model needs is in the checkpoint with the right shape, and nothing else
    is, all compared in the checkpoint's own names. One error lists every problem."""
    own = model.state_dict()  # meta tensors: names and shapes only
    expected = {k: v.shape for k, v in keymaps.to_layout(
        own, det.layout, det.family, det.config.hidden_size, det.prefix).items()}
    found = {k: ckpt.shape(k) for k in det.keys}
    problems = mismatches(expected, found)
    if problems:
        unexpected = sorted(set(found) - set(expected))
        files = [Path(f) for f in ckpt.files]
        hints = residue_hints(unexpected)
        if len(files) == 1 and shard_set(files) is not None:
            hints.insert(0, f"{files[0].name} is one shard of a multi-file set: point at the folder or its index.json")
        elif set(expected) - set(found) and not unexpected and not hints:
            hints.append("only keys are missing: a partial shard set (point at the folder or its index.json), or a "
                         "variant of this architecture that the loader does not know")
        hints.append("if the inferred config is wrong, pass config=...")
        raise CheckpointError("\n  ".join([
            f"{where} does not match the transformer inferred from it (layout: {_describe_layout(det)}): {hints[0]}",
            *problems]))


# ---- loading: Linear weights stay as stored ------------------------------------------------

def keep_quantized(model, ckpt, recipes: dict, thunks: dict, shapes: dict, dtype: torch.dtype, hidden: int):
    """Swap each ``nn.Linear`` of ``model`` (on meta) whose weight the GGUF stores in a type other
    than F32 for a ``GGUFLinear`` of that type, and make its ``weight`` thunk give the stored
    blocks (diffusers-layout parts joined row-wise, as bytes: rows are whole blocks). Everything
    else (norms, biases, embeddings, pos_embed, F32 and reshaped weights, and weights whose parts
    differ in type) is dequantized at load into ``dtype``. Returns the per-name cast for
    ``load_into``. On the CPU the kept weights are views of the file's memory map (no copy)."""
    kept = {}
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        key = f"{name}.weight"
        recipe = recipes[key]
        stored = [ckpt.stored(k) for k in recipe.keys]
        types = {s[0] for s in stored if s is not None}
        if None in stored or len(types) != 1 or types == {"F32"}:
            continue
        qtype = types.pop()
        _fp8.set_module(model, name, GGUFLinear(module.in_features, module.out_features, module.bias is not None,
                                           qtype=qtype, device="meta", bias_dtype=dtype))
        thunks[key] = lambda r=recipe: keymaps.combine(r.op, [ckpt.stored(k)[1] for k in r.keys], hidden)
        shapes[key] = TYPES[qtype].stored_shape(tuple(shapes[key]))
        kept[key] = PLAIN.get(qtype, torch.uint8)
    return lambda k: kept.get(k, dtype)
