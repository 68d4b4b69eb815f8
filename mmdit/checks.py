"""Checks of user-given settings, shared by ``Pipeline.__call__`` and the ``mmdit`` command.

Each returns the value (normalised) or raises one ``ValueError`` that says what was wrong and
what would work. No torch here: the command checks its arguments before loading anything.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

MAX_STEPS = 1000  # the models were trained on 1000 noise levels; more steps add nothing
SAMPLERS = ("euler", "dpmpp_2m", "heun")  # the solvers in samplers/solvers.py
SCHEDULES = ("default", "beta", "karras", "exponential")  # the sigma spacings in samplers/schedules.py
PARALLEL = ("branch", "sequence", "branch+sequence")  # the multi-rank modes of one image (mmdit.distributed)


def count(name: str, value, low: int = 1, high: int | None = None) -> int:
    """A whole number in ``low..high``."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a whole number {span}, got {value!r}")
    return int(value)


def steps(value) -> int:
    """Sampling steps: 1..MAX_STEPS."""
    return count("steps", value, 1, MAX_STEPS)


def scale(name: str, value, off: float) -> float:
    """A guidance weight: finite and >= 0; ``off`` is the value that turns it off."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 ({off:g} turns it off), got {value!r}")
    return float(value)


def fraction(name: str, value, *, closed_top: bool = True) -> float:
    """A number in [0, 1] (or [0, 1) when ``closed_top`` is False)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or value > 1 or (value == 1 and not closed_top):
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed_top else ')'}, got {value!r}")
    return float(value)


def strength(value) -> float:
    """img2img / inpaint strength: in (0, 1]; 1 starts from pure noise, small keeps the image."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (1 = start from pure noise), got {value!r}")
    return float(value)


def positive(name: str, value) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    """A sigma interval ``(start, stop)`` with 0 <= start <= stop <= 1."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two sigmas (start, stop) in [0, 1], got {value!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"{name} must be two sigmas with 0 <= start <= stop <= 1 (sigma 1 is pure noise), "
                         f"got ({lo:g}, {hi:g})")
    return lo, hi


def layers(name: str, value, total: int | None = None) -> tuple[int, ...]:
    """Block indices: whole numbers >= 0 (and < ``total``, the model's blocks, when known);
    a "7,8,9" string is accepted too (the CLI's form)."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be block numbers like 7,8,9, got {value!r}") from None
    bad = [i for i in out if i < 0 or (total is not None and i >= total)]
    if bad:
        where = f"0..{total - 1} (this model has {total} blocks)" if total is not None else "whole numbers >= 0"
        raise ValueError(f"{name} {bad} outside {where}")
    return out


def seed(value) -> int:
    """A seed for torch.Generator: 0 <= seed < 2**63."""
    return count("seed", value, 0, 2**63 - 1)
