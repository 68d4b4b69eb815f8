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
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..branches import Branch, IdentityAttention, SkipLayers

PERTURBATIONS = ("dg", "slg", "pag")  # the order of their rows after [uncond | cond]


@dataclass(frozen=True)
class APG:
    """Adaptive Projected Guidance (Sadat et al. 2024) in place of plain CFG, as diffusers'
    ``AdaptiveProjectedGuidance``: ``eta`` weighs the part of the update parallel to v_c,
    ``norm_threshold`` caps the update's norm (0: no cap), ``momentum`` (None: off) averages
    the update over model evaluations."""

    eta: float = 1.0
    norm_threshold: float = 15.0
    momentum: float | None = None


@dataclass(frozen=True)
class Guidance:
    """Scales and sigma intervals of the guidance terms.

    cfg: the classifier-free scale s (1 = off); ``lam = s - 1`` in the paper's form.
    dg: the Detail Guidance weight w (0 = off).
    slg / slg_layers: Skip Layer Guidance scale (0 = off) and the blocks skipped.
    pag / pag_layers: Perturbed Attention Guidance scale (0 = off) and its blocks.
    *_interval: inclusive (lo, hi) sigma ranges where each term is applied.
    cfg_zero_star: CFG-Zero* (optimized uncond scale; the first step's velocity is zero).
    apg: an APG in place of plain CFG, or None.
    """

    cfg: float = 1.0
    dg: float = 0.0
    slg: float = 0.0
    slg_layers: tuple[int, ...] = ()
    pag: float = 0.0
    pag_layers: tuple[int, ...] = ()
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    dg_interval: tuple[float, float] = (0.0, 1.0)
    slg_interval: tuple[float, float] = (0.0, 1.0)
    pag_interval: tuple[float, float] = (0.0, 1.0)
    cfg_zero_star: bool = False
    apg: APG | None = None

    def __post_init__(self):
        for name in ("cfg_interval", "dg_interval", "slg_interval", "pag_interval"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}=({lo}, {hi}): the start must not exceed the stop")
        for name in ("slg", "pag"):
            layers = tuple(int(i) for i in getattr(self, f"{name}_layers"))
            object.__setattr__(self, f"{name}_layers", layers)
            if getattr(self, name) != 0.0 and not layers:
                raise ValueError(f"{name}={getattr(self, name)} needs {name}_layers (the blocks it perturbs), "
                                 f"e.g. {name}_layers=(7, 8, 9)")
        if self.cfg_zero_star and self.apg is not None:
            raise ValueError("cfg_zero_star and apg both replace plain CFG: choose one")

    def active(self, sigma: float, has_uncond: bool) -> tuple[bool, tuple[str, ...]]:
        """(uncond, perturbed branches): which extra branches run at this sigma, the branches
        as names from PERTURBATIONS, in row order.

        Compared in float32, the schedules' precision, so ``(0.2, 0.6)`` includes a float32 0.6.
        """
        sigma = _f32(sigma)
        use_u = has_uncond and self.cfg != 1.0 and _inside(sigma, self.cfg_interval)
        terms = tuple(t for t in PERTURBATIONS
                      if getattr(self, t) != 0.0 and _inside(sigma, getattr(self, f"{t}_interval")))
        return use_u, terms


@dataclass
class GuidanceState:
    """What a guidance keeps between model evaluations of one ``sample()`` (APG's momentum)."""

    momentum: torch.Tensor | None = field(default=None)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), in plain Python so that a
    compiled step traces it as a constant (normal range; sigmas and scales live there)."""
    m, e = math.frexp(float(value))
    return math.ldexp(round(m * 2 ** 24) / 2 ** 24, e)


def _inside(sigma: float, interval: tuple[float, float]) -> bool:
    return _f32(interval[0]) <= sigma <= _f32(interval[1])


def _rows(t: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    """A per-row conditioning tensor expanded to ``batch`` rows (a single row broadcasts)."""
    if t is None:
        return None
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has {t.shape[0]} rows; the latents have {batch} (give 1 or {batch})")


def _check_cond(c: Mapping, name: str) -> None:
    missing = {"context", "pooled"} - set(c)
    if missing:
        raise ValueError(f"{name} needs keys 'context' and 'pooled'; missing {sorted(missing)}")


def guided_velocity(model: Callable, x: torch.Tensor, sigma: float, cond: Mapping,
                    uncond: Mapping | None, guidance: Guidance,
                    flux_guidance: torch.Tensor | float | None = None,
                    state: GuidanceState | None = None) -> tuple[torch.Tensor, int]:
    """The guided velocity at one noise level, from one model call.

    x: (B, C, H, W); cond / uncond: {"context": (B|1, L, Dc), "pooled": (B|1, Dp)};
    flux_guidance: FLUX.1-dev's distilled guidance, a number or (B,), copied to every branch;
    state: APG's momentum between calls (one per ``sample()``).
    Returns (v in float32 (B, C, H, W), rows in the call).
    """
    B = x.shape[0]
    _check_cond(cond, "cond")
    if uncond is not None:
        _check_cond(uncond, "uncond")
    use_u, terms = guidance.active(sigma, uncond is not None)
    parts = [uncond, cond] if use_u else [cond]
    if use_u and uncond["context"].shape[1:] != cond["context"].shape[1:]:
        raise ValueError(f"cond and uncond contexts must have the same length to share a batch: "
                         f"{tuple(cond['context'].shape)} vs {tuple(uncond['context'].shape)}")
    context = torch.cat([_rows(p["context"], B, "context") for p in parts])
    pooled = torch.cat([_rows(p["pooled"], B, "pooled") for p in parts])
    n = len(parts) * B
    g = None
    if torch.is_tensor(flux_guidance):
        g = _rows(flux_guidance.to(device=x.device, dtype=torch.float32).reshape(-1), B, "guidance").repeat(len(parts))
    elif flux_guidance is not None:
        g = torch.full((n,), float(flux_guidance), dtype=torch.float32, device=x.device)
    # the cond rows are the last B: a static slice; the branches' rows come back after row n
    cond_rows = slice(n - B, n)
    kwargs = {"fork": cond_rows} if "dg" in terms else {}
    others = tuple(Branch(cond_rows, SkipLayers(guidance.slg_layers) if t == "slg" else
                          IdentityAttention(guidance.pag_layers)) for t in terms if t != "dg")
    if others:
        kwargs["branches"] = others
    sig = torch.full((n,), float(sigma), dtype=torch.float32, device=x.device)
    out = model(x.repeat(len(parts), 1, 1, 1), sig, context, pooled, guidance=g, **kwargs).float()
    expected = n + len(terms) * B
    if out.shape[0] != expected:
        raise ValueError(f"the model returned {out.shape[0]} rows for a batch of {n} with "
                         f"{len(terms)} perturbed branches of {B} rows; expected {expected}")
    v_c = out[n - B:n]
    v = _cfg(out[:B], v_c, guidance, state) if use_u else v_c
    for k, t in enumerate(terms):
        v = v + getattr(guidance, t) * (v_c - out[n + k * B:n + (k + 1) * B])
    return v, expected


def _cfg(v_u: torch.Tensor, v_c: torch.Tensor, guidance: Guidance, state: GuidanceState | None) -> torch.Tensor:
    """The CFG part: plain, CFG-Zero* or APG (diffusers' guider formulas, non-original form)."""
    s = guidance.cfg
    if guidance.cfg_zero_star:
        cf, uf = v_c.flatten(1), v_u.flatten(1)
        alpha = (cf * uf).sum(1, keepdim=True) / ((uf * uf).sum(1, keepdim=True) + 1e-8)
        v_u = v_u * alpha.view(-1, *[1] * (v_c.dim() - 1))
        return v_u + s * (v_c - v_u)
    if guidance.apg is None:
        return v_u + s * (v_c - v_u)
    apg = guidance.apg
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
