"""The one MA policy: which spec a checkpoint gets, and how it was decided.

``Pipeline`` (DG out of the box), ``mmdit calibrate-ma`` and the tiny model's recipe all call
``find_spec``; ``ensure_spec`` adds the model's own spec and the per-checkpoint cache around it:

    a spec already on the model (set by hand, cached for these files, a tiny folder's own)  -> kept
    an official architecture whose paper channels are massive here (>= ratio x the median)  -> those
    otherwise                                                                               -> calibrated
    (``relaxed``: when no channel reaches the ratio, block m's channels above ``relaxed`` x the
    median, or its top one: a small model may have no massive activations at all)
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .cache import checkpoint_hash, save_spec
from .calibrate import Calibration, find_massive
from .probe import channel_ratios
from .spec import MASpec, default_block, paper_channels


@dataclass
class Found:
    """A spec, one line saying how it was found, and the calibration table behind it (if any)."""

    spec: MASpec
    how: str
    calibration: Calibration | None = None


def find_spec(model: nn.Module, samples: Iterable | Callable[[], Iterable], *, check=None,
              ratio: float | None = 50.0, absolute: float | None = None, top_k: int | None = 8,
              block: int | None = None, rho: float = 0.0, paper: bool = True,
              relaxed: float | None = None, say: Callable[[str], None] | None = None) -> Found:
    """The MA spec for ``model`` by the policy above.

    samples: calibration samples ``(x, sigma, *inputs)`` (see ``find_massive``), or a callable
        that makes them (called only if calibration is needed).
    check: the sample on which the paper's channels are checked (default: the first sample).
    say: told one line before a calibration starts (it runs the samples through the model).
    block: the fork block (default: ``default_block``, or the nearest block with massive
        channels); a given block skips the paper's channels, which are known at the default one.
    """
    m = default_block(model.config) if block is None else block
    hint = paper_channels(model.config) if paper and block is None else None
    why = "no channels are known for this architecture"
    if hint:
        if check is None:
            samples = list(samples() if callable(samples) else samples)
            check = samples[0]
        ratios = channel_ratios(model, check, hint, m)
        if min(ratios) >= ratio:
            return Found(MASpec(channels=hint, block=m, rho=rho),
                         f"the paper's channels {list(hint)} are massive at block {m} of this checkpoint "
                         f"({min(ratios):.0f}x the median channel or more): using them")
        why = f"the paper's channels {list(hint)} are only {min(ratios):.1f}x the median at block {m} here"
    if say is not None:
        say(f"DG: no MA spec for this model and {why}; calibrating (once)...")
    samples = list(samples() if callable(samples) else samples)
    try:
        cal = find_massive(model, samples, ratio=ratio, absolute=absolute, top_k=top_k, block=block, rho=rho)
    except ValueError:
        if relaxed is None:
            raise
        return _relaxed(model, samples, m, ratio, relaxed, rho)
    return Found(cal.spec, f"calibrated the MA channels: {list(cal.spec.channels)} at block {cal.spec.block}", cal)


def _relaxed(model, samples, m: int, ratio, relaxed: float, rho: float) -> Found:
    """Block m's channels above ``relaxed`` x the median (or its top one) when none is massive."""
    cal = find_massive(model, samples, ratio=1.0, top_k=4, block=m, rho=rho)  # block m's top channels
    top = cal.blocks[m]
    flagged = [c for c, r in zip(top.channels, top.ratio) if r >= relaxed]
    spec = MASpec(channels=tuple(flagged or top.channels[:1]), block=m, rho=rho)
    return Found(spec, f"no channel reached {ratio}x the median (no massive activations); the spec holds block "
                       f"{m}'s channels above {relaxed}x (or its top one): {list(spec.channels)}", cal)


def ensure_spec(model: nn.Module, samples: Iterable | Callable[[], Iterable], *, check=None,
                say: Callable[[str], None] | None = None, **rule) -> MASpec:
    """``model.ma``, found now (``find_spec``) if it has none, and cached under the checkpoint's
    content hash when the model came from files; ``say`` gets one line saying what was done
    (default: stderr). Raises one clear error when no spec can be found."""
    if getattr(model, "ma", None) is not None:
        return model.ma
    say = say or _stderr
    try:
        found = find_spec(model, samples, check=check, say=say, **rule)
    except ValueError as e:
        raise ValueError(f"dg needs massive activations, and none were found: {e} Set them with "
                         "pipe.transformer.ma = mmdit.MASpec(channels=..., block=...), or calibrate with "
                         "a looser rule: mmdit calibrate-ma --model MODEL --ratio 10") from None
    model.ma = found.spec
    files = getattr(model, "source_files", None)
    where = f"cached as {save_spec(found.spec, checkpoint_hash(files), calibration=found.calibration)}" if files \
        else "not cached (the model was not loaded from checkpoint files)"
    say(f"DG: {found.how}; {where}")
    return found.spec


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
