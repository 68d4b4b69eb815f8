"""Step caching: skip a step's middle blocks when what goes into them barely changed since the last
step that computed them, and add the change they made then (their cached residual).

Two policies behind one option (``cache="fbcache:0.08"``, a spec string, or a policy object):

    FirstBlockCache(threshold, first=1, last=0)
        run the first ``first`` blocks; if the relative L1 change of their residual (output - input)
        since the last fully computed step is under ``threshold``, skip the middle blocks
        (ParaAttention / diffusers' FirstBlockCache; ``first`` / ``last`` are cache-dit's Fn / Bn)
    TeaCache(threshold, coefficients=None, first=0, last=0)
        accumulate the rescaled relative L1 change of block 0's modulated image input (a polynomial,
        ``coefficients``, fitted to how much the output changes; TeaCache, Liu et al. 2024); skip
        while the sum stays under ``threshold``, reset it when a step computes

In both, the first and the last step always compute, and the last ``last`` blocks always run.

DG-aware, one call: the cache keeps one residual per row of the call's layout, so uncond, cond
and every perturbed branch (DG's fork rows included: their residual is the fork's own, taken from
the row their copy started from) keep their own; the decision is one for the whole batch: skip
only when every row is under the threshold (the largest change decides). A skipped middle still
makes the rows a branch would have added there (as copies), so the output has the same rows.

One graph under ``torch.compile``: the decision is a device tensor and the middle is a
``torch.cond`` (a CUDA conditional node under the ``cudagraphs`` backend; inductor reads its
predicate on the host). Eager, the decision is read once per step (one ``bool`` of a 0-d tensor).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

# TeaCache's polynomials: output change as a function of block 0's modulated-input change.
# FLUX.1: the authors' published fit (TeaCache4FLUX). The others: fitted with
# benchmarks/teacache_fit.py; without a fit, the identity (the input change itself).
TEACACHE_COEFFICIENTS = {
    "flux": (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
}


@dataclass(frozen=True)
class FirstBlockCache:
    threshold: float
    first: int = 1
    last: int = 0

    def __post_init__(self):
        _check(self)
        if self.first < 1:
            raise ValueError("fbcache needs first >= 1: its decision reads the first blocks' residual")

    def start(self, sigmas, family: str | None = None) -> StepCache:
        return StepCache(self, sigmas)


@dataclass(frozen=True)
class TeaCache:
    threshold: float
    coefficients: tuple[float, ...] | None = None  # highest power first (numpy.poly1d's order)
    first: int = 0
    last: int = 0

    def __post_init__(self):
        _check(self)

    def start(self, sigmas, family: str | None = None) -> StepCache:
        coefficients = self.coefficients or TEACACHE_COEFFICIENTS.get(family, (1.0, 0.0))
        return StepCache(replace(self, coefficients=tuple(coefficients)), sigmas)


def _check(policy) -> None:
    if not policy.threshold >= 0 or policy.first < 0 or policy.last < 0:
        raise ValueError(f"a cache needs threshold >= 0 and first, last >= 0, got {policy}")


POLICIES = {"fbcache": FirstBlockCache, "teacache": TeaCache}


def parse(spec):
    """A policy from ``"fbcache:0.08"``, ``"teacache:0.4"``, ``"fbcache:0.1:first=2:last=1"``; a policy
    object (anything with ``start(sigmas, family)``) as is; None (or "none") for no cache."""
    if spec is None or hasattr(spec, "start"):
        return spec
    text = str(spec).strip().lower()
    if text in ("", "none", "off"):
        return None
    m = re.fullmatch(r"(\w+):([0-9.eE+-]+)((?::\w+=\d+)*)", text)
    if m is None or m.group(1) not in POLICIES:
        raise ValueError(f"cache {spec!r}: give POLICY:THRESHOLD[:first=N][:last=N] with POLICY one of "
                         f"{sorted(POLICIES)}, e.g. fbcache:0.08 or teacache:0.4")
    options = dict(part.split("=") for part in m.group(3).split(":") if part)
    unknown = set(options) - {"first", "last"}
    if unknown:
        raise ValueError(f"cache {spec!r}: unknown option(s) {sorted(unknown)}; the options are first= and last=")
    return POLICIES[m.group(1)](float(m.group(2)), **{k: int(v) for k, v in options.items()})


def _relative_change(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The largest over the rows of mean|now - before| / mean|before|, a 0-d float32 tensor."""
    now, before = now.flatten(1).float(), before.flatten(1).float()
    return ((now - before).abs().mean(1) / before.abs().mean(1).clamp_min(1e-12)).amax()


class StepCache:
    """One sampling run's cache state. The sampler calls ``at(sigma)`` before each model call and
    hands the state to it (``model(..., cache=state)``); the row plan (``models.rows``) asks it
    what to do. ``skipped_steps()`` counts the steps whose middle was skipped (one read)."""

    def __init__(self, policy, sigmas):
        self.policy, self.sigmas = policy, [float(s) for s in sigmas]
        self.forced = True  # this call computes everything (the first and last steps)
        self.skip = None  # this call's decision: None (compute) or a 0-d bool device tensor
        self.previous = None  # the probe of the last computed step (FBCache) / of the last step (TeaCache)
        self.accumulated = None  # TeaCache's sum, 0-d float32
        self.residuals = {}  # (first block, end block) -> (row layout, residual per stream)
        self.skips = None  # 0-d int64: steps skipped, counted on the device
        self.head_in = None

    @property
    def reads_input(self) -> bool:
        """Whether the decision needs block 0's modulated input (TeaCache)."""
        return isinstance(self.policy, TeaCache)

    def at(self, sigma: float) -> None:
        self.forced = sigma >= self.sigmas[0] or (len(self.sigmas) > 2 and sigma <= self.sigmas[-2])
        self.skip = None

    def skipped_steps(self) -> int:
        return 0 if self.skips is None else int(self.skips)

    # --- the decision ---------------------------------------------------------------------

    def probe_input(self, probe: torch.Tensor) -> None:
        """TeaCache: block 0's modulated image input of this call."""
        if not isinstance(self.policy, TeaCache):
            return
        before, self.previous = self.previous, probe.detach()
        if self.forced or before is None or before.shape != probe.shape:
            self.accumulated = torch.zeros((), device=probe.device)
            return
        x = _relative_change(probe, before)
        rescaled = sum(c * x ** (len(self.policy.coefficients) - 1 - k) for k, c in enumerate(self.policy.coefficients))
        total = self.accumulated + rescaled
        self.skip = total < self.policy.threshold
        self.accumulated = torch.where(self.skip, total, torch.zeros_like(total))

    def probe_head(self, head_in: tuple, head_out: tuple) -> None:
        """FirstBlockCache: the first blocks' input and output streams of this call."""
        if not isinstance(self.policy, FirstBlockCache):
            return
        residual = torch.cat([(o - i).flatten(1) for i, o in zip(head_in, head_out) if o is not None], 1)
        before = self.previous
        if self.forced or before is None or before.shape != residual.shape:
            self.previous = residual.detach()
            return
        self.skip = _relative_change(residual, before) < self.policy.threshold
        self.previous = torch.where(self.skip, before, residual.detach())  # since the last computed step

    def count(self) -> None:
        if self.skip is not None:
            skipped = self.skip.long()
            self.skips = skipped if self.skips is None else self.skips + skipped
