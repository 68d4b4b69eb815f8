"""``load_transformer``: any official SD3 / SD3.5 / FLUX.1 transformer checkpoint -> our model.

resolve (hub / local) -> open (mmap) -> detect layout + config -> build on ``meta`` ->
check every key and shape in the checkpoint's own names -> stream tensors in one at a
time (cast per tensor, fp8 upcast), so peak host memory stays near one copy.
"""
from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn

from .. import ma as _ma
from ..config import FluxConfig, SD3Config
from ..models import transformer_for
from . import keymaps
from .checkpoint import Checkpoint, CheckpointError, load_into, mismatches
from .detect import Detected, detect
from .hub import resolve


def load_transformer(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", *,
                     revision: str | None = None, token: str | bool | None = None,
                     config: SD3Config | FluxConfig | dict | None = None,
                     requires_grad: bool = False) -> nn.Module:
    """Load a transformer from a hub repo id, a diffusers folder (or its ``transformer/``), an
    ``*.index.json``, or one ``.safetensors`` file in the original or the diffusers layout.

    ``config``: a full config to use instead of the inferred one, or a dict of overrides
    (e.g. ``{"axes_dim": (8, 28, 28)}`` for a FLUX-like file with head_dim 64).
    ``requires_grad``: False (default) suits inference: no autograd graph is built even
    outside ``torch.no_grad()``; trainers pass True (or call ``model.requires_grad_()``).
    The model comes back in eval mode, with ``model.config``, ``model.detected`` (layout,
    prefix, preset) and ``model.source_files`` (the files read, for content hashing).
    """
    src = resolve(source, revision=revision, token=token)
    ckpt = src.open()
    det = detect(ckpt, src.config_json, config, where=str(src.path))
    with torch.device("meta"):
        model = transformer_for(det.config)
    hidden = det.config.hidden_size
    check_keys(model, ckpt, det, where=str(src.path))
    recipes = keymaps.recipes_for(det.keys, det.layout, det.family, det.prefix)
    thunks = {k: partial(_read, ckpt, r, dtype, hidden) for k, r in recipes.items()}
    shapes = {k: keymaps.combined_shape(r.op, [ckpt.shape(s) for s in r.keys]) for k, r in recipes.items()}
    load_into(model, thunks, shapes, dtype=dtype, device=device, layout=_describe_layout(det))
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


def _read(ckpt: Checkpoint, recipe: keymaps.Recipe, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    def read(name):
        t = ckpt[name]
        # cast each part before combining: float8 has no cat, and it halves the peak for bf16 -> fp32
        return t.to(dtype) if t.dtype.is_floating_point else t
    return keymaps.materialize(recipe, read, hidden)


def _describe_layout(det: Detected) -> str:
    prefix = f", prefix {det.prefix!r}" if det.prefix else ""
    return f"{det.layout}{prefix}, {det.family}, config from {det.config_source}"


def check_keys(model: nn.Module, ckpt: Checkpoint, det: Detected, where: str) -> None:
    """Every tensor the model needs is in the checkpoint with the right shape, and nothing else
    is, all compared in the checkpoint's own names. One error lists every problem."""
    own = model.state_dict()  # meta tensors: names and shapes only
    expected = {k: v.shape for k, v in keymaps.to_layout(
        own, det.layout, det.family, det.config.hidden_size, det.prefix).items()}
    problems = mismatches(expected, {k: ckpt.shape(k) for k in det.keys})
    if problems:
        raise CheckpointError("\n  ".join([
            f"{where} does not match the transformer inferred from it "
            f"(layout: {_describe_layout(det)}; config: {det.config})", *problems,
            "If the inferred config is wrong, pass config=... ; if the file is damaged, download it again."]))
