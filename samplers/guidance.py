"""CFG, Detail Guidance and the other perturbation guidances, as ONE batched model call per step.

Every branch is rows of one batch (docs/architecture.md, "Massive activations and Detail
Guidance"); the perturbed branches are copies of the cond rows that the model makes where
they start to differ (``mmdit.branches``):

    rows in:   [uncond (B) | cond (B)]                          uncond only when CFG is active
    rows out:  [v_u | v_c | v_dg | v_slg | v_pag]               each perturbed branch only when active

    v = v_u + cfg * (v_c - v_u) + dg * (v_c - v_dg) + slg * (v_c - v_slg) + pag * (v_c - v_pag)

v_dg: MA channels disrupted at block m (the paper's detail-deficient model); v_slg: the cond
rows with ``slg_layers`` skipped (Skip Layer Guidance); v_pag: the cond rows with identity
image attention in ``pag_layers`` (Perturbed Attention Guidance). The CFG part can instead be
CFG-Zero* (``cfg_zero_star``: the uncond prediction scaled by its projection on the cond one)
or APG (``apg``: the CFG update split into parts parallel / orthogonal to v_c, rescaled, with
optional momentum), as diffusers' guiders define them. A term whose sigma lies outside its
(inclusive) interval, or whose scale makes it a no-op, is not computed at all: the batch shrinks.

``cfg_norm`` (Qwen-Image's "true CFG") rescales the CFG part, token by token, to v_c's norm:
``v_cfg * |v_c| / |v_cfg|``, the norms over each token's channels (a token: the p x p latents the
model packs into one, ``token_side``). The perturbation terms are added after it, as to any CFG
variant: the rescaled velocity is the official pipeline's, the base DG departs from, so a DG
weight means the same with or without the rescale, and DG's step away from v_dg is not scaled
back to |v_c| (which would keep only its direction). Without the uncond rows it does nothing.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..branches import Branch, IdentityAttention, SkipLayers
from .guide import Guidance


@dataclass
class GuidanceState:
    """What a guidance keeps between model evaluations of one ``sample()`` (APG's momentum)."""

    momentum: torch.Tensor | None = field(default=None)


def _rows(t: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    """A per-row conditioning tensor expanded to ``batch`` rows (a single row broadcasts)."""
    if t is None:
        return None
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has {t.shape[0]} rows; the latents have {batch} (give 1 or {batch})")


def required_inputs(model) -> tuple[str, ...]:
    """The conditioning inputs ``model`` cannot do without (its ``velocity``'s, or its call's,
    parameters after x and sigma that have no default)."""
    fn = getattr(model, "velocity", None) or getattr(model, "forward", None) or model
    params = list(inspect.signature(fn).parameters.values())[2:]
    return tuple(p.name for p in params if p.default is p.empty and p.name != "rows"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _batch(parts: list[Mapping], key: str, batch: int):
    """One conditioning input of every part, stacked as the call's rows (numbers and None as they
    are; a tuple of tensors, e.g. reference images, element by element)."""
    values = [p[key] for p in parts]
    if isinstance(values[0], tuple):
        return tuple(_batch([{key: v[j]} for v in values], key, batch) for j in range(len(values[0])))
    if not torch.is_tensor(values[0]) or values[0].dim() == 0:
        return values[0]
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"cond and uncond {key} must have the same length to share a batch: "
                         f"{' vs '.join(str(tuple(v.shape)) for v in values)} (pad the shorter, with its mask)")
    return torch.cat([_rows(v, batch, key) for v in values])


def guided_velocity(model: Callable, x: torch.Tensor, sigma: float, cond: Mapping,
                    uncond: Mapping | None, guide: Guidance, guidance: torch.Tensor | float | None = None,
                    state: GuidanceState | None = None, cache=None) -> tuple[torch.Tensor, int]:
    """The guided velocity at one noise level, from one model call.

    x: (B, C, H, W); cond / uncond: the model's conditioning inputs by name, each (B|1, ...)
    (SD3 / FLUX.1: {"context": (B|1, L, Dc), "pooled": (B|1, Dp)}), the same names in both;
    guidance: a guidance-distilled model's guidance value, a number or (B,), copied to every
    branch; state: APG's momentum between calls (one per ``sample()``); cache: the run's step cache
    (``mmdit.models.cache``), handed to the model.
    Returns (v in float32 (B, C, H, W), rows in the call).
    """
    B = x.shape[0]
    use_u, terms = guide.active(sigma, uncond is not None)
    if uncond is not None and set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must hold the same inputs; cond has {sorted(cond)}, "
                         f"uncond {sorted(uncond)}")
    parts = [uncond, cond] if use_u else [cond]
    inputs = {k: _batch(parts, k, B) for k in cond}
    n = len(parts) * B
    if torch.is_tensor(guidance):
        inputs["guidance"] = _rows(guidance.to(device=x.device, dtype=torch.float32).reshape(-1), B,
                                   "guidance").repeat(len(parts))
    elif guidance is not None:
        inputs["guidance"] = torch.full((n,), float(guidance), dtype=torch.float32, device=x.device)
    # the cond rows are the last B: a static slice; the branches' rows come back after row n
    cond_rows = slice(n - B, n)
    if "dg" in terms:
        inputs["fork"] = cond_rows
    others = tuple(Branch(cond_rows, SkipLayers(guide.slg_layers) if t == "slg" else
                          IdentityAttention(guide.pag_layers)) for t in terms if t != "dg")
    if others:
        inputs["branches"] = others
    if cache is not None:
        inputs["cache"] = cache
    sig = torch.full((n,), float(sigma), dtype=torch.float32, device=x.device)
    out = model(x.repeat(len(parts), 1, 1, 1), sig, **inputs).float()
    expected = n + len(terms) * B
    if out.shape[0] != expected:
        raise ValueError(f"the model returned {out.shape[0]} rows for a batch of {n} with "
                         f"{len(terms)} perturbed branches of {B} rows; expected {expected}")
    v_c = out[n - B:n]
    v = _cfg(out[:B], v_c, guide, state) if use_u else v_c
    if use_u and guide.cfg_norm:  # before the perturbation terms: see the module docstring
        v = rescale_per_token(v, v_c, token_side(model))
    for k, t in enumerate(terms):
        v = v + getattr(guide, t) * (v_c - out[n + k * B:n + (k + 1) * B])
    return v, expected


def same_length(cond: Mapping, uncond: Mapping | None) -> tuple[Mapping, Mapping | None]:
    """cond and uncond with their texts brought to one length, so that they share a batch: the
    shorter ``context`` zero-padded at its end and its ``context_mask`` 0 there (the models mask
    padded keys: nothing changes). Only for inputs with a ``context_mask`` (Qwen-Image, Chroma);
    others are returned as they are (``_batch`` then says that they differ)."""
    if uncond is None or "context_mask" not in cond or "context_mask" not in uncond:
        return cond, uncond
    L = max(cond["context"].shape[1], uncond["context"].shape[1])
    return _pad_text(cond, L), _pad_text(uncond, L)


def _pad_text(c: Mapping, L: int) -> Mapping:
    ctx, mask = c["context"], c["context_mask"]  # (B, l, D), (B, l) or None
    if ctx.shape[1] == L:
        return c
    if mask is None:
        mask = torch.ones(ctx.shape[:2], dtype=torch.long, device=ctx.device)
    n = L - ctx.shape[1]
    return {**c, "context": F.pad(ctx, (0, 0, 0, n)), "context_mask": F.pad(mask, (0, n))}


ONE_TOKEN_PER_LATENT = ("flux2", "qwen-image-2.1")  # families whose latents are patchified outside the model


def token_side(model) -> int:
    """The side p of the p x p latents one token of ``model`` holds: its config's ``patch_size``
    (SD3, the tiny model), 1 for FLUX.2 and Qwen-Image 2.1, else 2 (FLUX.1, Chroma, Qwen-Image 1.0)."""
    config = getattr(model, "config", None)
    if getattr(config, "family", None) in ONE_TOKEN_PER_LATENT:
        return 1
    return getattr(config, "patch_size", 2)


def rescale_per_token(v: torch.Tensor, like: torch.Tensor, p: int) -> torch.Tensor:
    """``v * |like| / |v|``, the norms over each token's channels, a token being p x p latents:
    the official Qwen-Image pipeline's ``comb_pred * (cond_norm / noise_norm)`` on its packed latents
    (the 2x2 latents x 16 channels of a token = its 64 packed channels). (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = v.shape
    v, like = v.reshape(B, C, H // p, p, W // p, p), like.reshape(B, C, H // p, p, W // p, p)
    scale = (torch.linalg.vector_norm(like, dim=(1, 3, 5), keepdim=True)
             / torch.linalg.vector_norm(v, dim=(1, 3, 5), keepdim=True))  # (B, 1, h, 1, w, 1)
    return (v * scale).reshape(B, C, H, W)


def _cfg(v_u: torch.Tensor, v_c: torch.Tensor, guide: Guidance, state: GuidanceState | None) -> torch.Tensor:
    """The CFG part: plain, CFG-Zero* or APG (diffusers' guider formulas, non-original form)."""
    s = guide.cfg
    if guide.cfg_zero_star:
        cf, uf = v_c.flatten(1), v_u.flatten(1)
        alpha = (cf * uf).sum(1, keepdim=True) / ((uf * uf).sum(1, keepdim=True) + 1e-8)
        v_u = v_u * alpha.view(-1, *[1] * (v_c.dim() - 1))
        return v_u + s * (v_c - v_u)
    if guide.apg is None:
        return v_u + s * (v_c - v_u)
    apg = guide.apg
    diff = v_c - v_u
    dims = list(range(1, diff.dim()))
    if apg.momentum is not None:
        if state is None:
            raise ValueError("APG with momentum keeps state between steps: pass state=GuidanceState()")
        diff = diff if state.momentum is None else diff + apg.momentum * state.momentum
        state.momentum = diff
    if apg.norm_threshold > 0:
        diff = diff * torch.clamp(apg.norm_threshold / diff.norm(p=2, dim=dims, keepdim=True), max=1.0)
    unit = torch.nn.functional.normalize(v_c.double(), dim=dims)
    parallel = (diff.double() * unit).sum(dim=dims, keepdim=True) * unit
    update = (diff.double() - parallel).to(diff.dtype) + apg.eta * parallel.to(diff.dtype)
    return v_u + s * update
