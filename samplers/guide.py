"""``Guidance``: every guidance setting of a sampling run, in one frozen dataclass.

No torch here: ``mmdit generate`` derives its guidance flags from these fields before it loads
anything. What the settings do to a step is ``guidance.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .. import checks

PERTURBATIONS = ("dg", "slg", "pag")  # the order of their rows after [uncond | cond]


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass(frozen=True)
class APG:
    """Adaptive Projected Guidance (Sadat et al. 2024) in place of plain CFG, as diffusers'
    ``AdaptiveProjectedGuidance``: ``eta`` weighs the part of the update parallel to v_c,
    ``norm_threshold`` caps the update's norm (0: no cap), ``momentum`` (None: off) averages
    the update over model evaluations."""

    eta: float = field(default=1.0, metadata=_help("weight of the update's part parallel to the cond prediction"))
    norm_threshold: float = field(default=15.0, metadata=_help("cap on the update's norm, 0 = none", off=0.0))
    momentum: float | None = field(default=None, metadata=_help("momentum over steps (e.g. -0.5; default none)"))


@dataclass(frozen=True)
class Guidance:
    """Every guidance setting of a sampling run, in one place (``sample(..., guide=Guidance(...))``).

    cfg: the classifier-free scale s (1 = off); ``lam = s - 1`` in the paper's form.
    dg: the Detail Guidance weight w (0 = off).
    slg / slg_layers: Skip Layer Guidance scale (0 = off) and the blocks skipped.
    pag / pag_layers: Perturbed Attention Guidance scale (0 = off) and its blocks.
    *_interval: inclusive (lo, hi) sigma ranges where each term is applied.
    cfg_zero_star: CFG-Zero* (optimized uncond scale; the first step's velocity is zero).
    apg: an APG in place of plain CFG, or None.
    cfg_norm: the CFG velocity rescaled, token by token, to the cond velocity's norm (Qwen-Image's
        "true CFG"; its pipeline's default).

    Each field's metadata is its command-line help (``mmdit generate`` derives its flags from
    these fields): a new term is one field here, its branch below, and nothing else to list.
    """

    cfg: float = field(default=1.0, metadata=_help("classifier-free guidance scale", off=1.0, model_default=True))
    dg: float = field(default=0.0, metadata=_help(
        "Detail Guidance weight; the first use on a checkpoint finds its massive channels and caches them",
        off=0.0, model_default=True))
    slg: float = field(default=0.0, metadata=_help("Skip Layer Guidance scale (SD3.5: 2.5-2.8)", off=0.0))
    slg_layers: tuple[int, ...] = field(default=(), metadata=_help(
        "blocks SLG skips (default: 3 blocks from 30%% of the depth, e.g. 7,8,9 of 24)"))
    pag: float = field(default=0.0, metadata=_help("Perturbed Attention Guidance scale", off=0.0))
    pag_layers: tuple[int, ...] = field(default=(), metadata=_help(
        "blocks whose image attention PAG replaces by the identity (default: block 1)"))
    cfg_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=_help("sigmas where CFG acts (1 = pure noise)"))
    dg_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=_help("sigmas where DG acts"))
    slg_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=_help(
        "sigmas where SLG acts (default: the steps between --slg-start and --slg-stop)"))
    pag_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=_help("sigmas where PAG acts"))
    cfg_zero_star: bool = field(default=False, metadata=_help("CFG-Zero* in place of plain CFG"))
    apg: APG | None = field(default=None, metadata=_help("Adaptive Projected Guidance in place of plain CFG"))
    cfg_norm: bool = field(default=False, metadata=_help(
        "rescale the CFG velocity per token to the cond velocity's norm (Qwen-Image's true CFG)", model_default=True))

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if "off" in f.metadata:
                object.__setattr__(self, f.name, checks.scale(f.name, value, off=f.metadata["off"]))
            elif f.name.endswith("_interval"):
                object.__setattr__(self, f.name, checks.interval(f.name, value))
            elif f.name.endswith("_layers"):
                object.__setattr__(self, f.name, checks.layers(f.name, value))
        for name in ("slg", "pag"):
            if getattr(self, name) != 0.0 and not getattr(self, f"{name}_layers"):
                raise ValueError(f"{name}={getattr(self, name)} needs {name}_layers (the blocks it perturbs), "
                                 f"e.g. {name}_layers={default_layers(name, 24)}")
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


def default_layers(term: str, total: int) -> tuple[int, ...]:
    """The blocks a perturbation acts on when none are given, for a model of ``total`` blocks:
    SLG 3 blocks from 30% of the depth, never the last (SD3.5-medium: 7, 8, 9 of 24, diffusers'
    default); PAG block 1 (diffusers' SD3 PAG default, "blocks.1"), block 0 in a one-block model."""
    if term == "pag":
        return (min(1, total - 1),)
    first = min(round(0.3 * total), max(total - 2, 0))
    return tuple(range(first, min(first + 3, total - 1))) or (first,)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), in plain Python so that a
    compiled step traces it as a constant (normal range; sigmas and scales live there)."""
    m, e = math.frexp(float(value))
    return math.ldexp(round(m * 2 ** 24) / 2 ** 24, e)


def _inside(sigma: float, interval: tuple[float, float]) -> bool:
    return _f32(interval[0]) <= sigma <= _f32(interval[1])
