"""CFG, Detail Guidance (DG) and both, as ONE batched model call per step.

The branches are rows of one batch (PAPER.md, DESIGN.md "One denoising step"):

    rows in:   [uncond (B) | cond (B)]                 uncond only when CFG is active
    fork:      [False] * B_u + [True] * B_c             only when DG is active
    rows out:  [v_u (B) | v_c (B) | v_m (B)]            v_m: the cond rows, MA-disrupted at block m

    v = v_u + cfg * (v_c - v_u) + dg * (v_c - v_m)      (CFG only: dg = 0; DG only: v_c + dg * (v_c - v_m))

A branch whose sigma lies outside its (inclusive) interval, or whose scale makes it a
no-op (cfg == 1, no uncond, dg == 0), is not computed at all: the batch shrinks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    """Scales and sigma intervals of the guidance terms.

    cfg: the usual classifier-free scale s (1 = off); ``lam = s - 1`` in PAPER.md's form.
    dg: the Detail Guidance weight w (0 = off).
    cfg_interval, dg_interval: inclusive (lo, hi) sigma ranges where each term is applied.
    """

    cfg: float = 1.0
    dg: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    dg_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        for name in ("cfg_interval", "dg_interval"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}=({lo}, {hi}): the start must not exceed the stop")

    def branches(self, sigma: float, has_uncond: bool) -> tuple[bool, bool]:
        """(uncond, disrupted): which extra branches run at this sigma.

        Compared in float32, the schedules' precision, so ``(0.2, 0.6)`` includes a float32 0.6.
        """
        sigma = _f32(sigma)
        use_u = has_uncond and self.cfg != 1.0 and _inside(sigma, self.cfg_interval)
        use_m = self.dg != 0.0 and _inside(sigma, self.dg_interval)
        return use_u, use_m


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
                    flux_guidance: torch.Tensor | float | None = None) -> tuple[torch.Tensor, int]:
    """The guided velocity at one noise level, from one model call.

    x: (B, C, H, W); cond / uncond: {"context": (B|1, L, Dc), "pooled": (B|1, Dp)};
    flux_guidance: FLUX.1-dev's distilled guidance, a number or (B,), copied to every branch.
    Returns (v in float32 (B, C, H, W), rows in the call).
    """
    B = x.shape[0]
    _check_cond(cond, "cond")
    if uncond is not None:
        _check_cond(uncond, "uncond")
    use_u, use_m = guidance.branches(sigma, uncond is not None)
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
    # the cond rows are the last B: a static slice, their disrupted copies come back after row n
    kwargs = {"fork": slice(n - B, n)} if use_m else {}
    sig = torch.full((n,), float(sigma), dtype=torch.float32, device=x.device)
    out = model(x.repeat(len(parts), 1, 1, 1), sig, context, pooled, guidance=g, **kwargs).float()
    expected = n + (B if use_m else 0)
    if out.shape[0] != expected:
        raise ValueError(f"the model returned {out.shape[0]} rows for a batch of {n} "
                         f"({'with' if use_m else 'without'} {B} forked rows); expected {expected}")
    v_c = out[n - B:n]
    v = v_c
    if use_u:
        v_u = out[:B]
        v = v_u + guidance.cfg * (v_c - v_u)
    if use_m:
        v_m = out[n:]
        v = v + guidance.dg * (v_c - v_m)
    return v, expected
