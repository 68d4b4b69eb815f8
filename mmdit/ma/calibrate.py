"""Calibration: which channels are massive, block by block, and the MASpec that disrupts them."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .probe import Probe, unpack
from .spec import MASpec, default_block, spec_to_json


@dataclass
class BlockMA:
    """The MA channels found at one block, strongest first, with the numbers behind them."""

    block: int
    channels: list[int]
    magnitude: list[float]  # mean |h| over image tokens, averaged over the samples
    ratio: list[float]  # magnitude / median channel magnitude of this block
    median: float


@dataclass
class Calibration:
    """What ``find_massive`` found: the spec to use and the per-block table behind it."""

    spec: MASpec
    blocks: list[BlockMA]
    rule: dict  # ratio, absolute, top_k
    samples: int
    magnitude: torch.Tensor = field(repr=False)  # (K, D) mean |h| over image tokens and samples

    def to_json(self) -> dict:
        return {"spec": spec_to_json(self.spec), "rule": self.rule, "samples": self.samples,
                "blocks": [asdict(b) for b in self.blocks]}

    def summary(self) -> str:
        """A per-block table for the terminal (``mmdit calibrate-ma`` prints it)."""
        lines = [f"MA channels by block ({self.samples} rows; rule: {self.rule})", "block  median    channels (x median)"]
        for b in self.blocks:
            found = ", ".join(f"{c} ({r:.0f}x)" for c, r in zip(b.channels, b.ratio)) or "-"
            mark = "  <- fork block m" if b.block == self.spec.block else ""
            lines.append(f"{b.block:5d}  {b.median:8.3g}  {found}{mark}")
        lines.append(f"spec: channels {list(self.spec.channels)}, block {self.spec.block}, rho {self.spec.rho}")
        return "\n".join(lines)


def select_massive(magnitude: torch.Tensor, ratio: float | None = 50.0, absolute: float | None = None,
                   top_k: int | None = 8) -> list[BlockMA]:
    """Flag massive channels per block. magnitude: (K, D), e.g. mean |h| over image tokens.

    Channel c of block k is massive when ``magnitude[k, c] >= ratio * median_c(magnitude[k])``
    (if ratio is set) and ``magnitude[k, c] >= absolute`` (if set). The paper describes MAs
    as ~100x the rest; the default 50 leaves a margin. ``top_k`` caps each block's list.
    """
    if ratio is None and absolute is None:
        raise ValueError("give a ratio-to-median rule, an absolute threshold, or both")
    out = []
    for k, mag in enumerate(magnitude.float()):
        median = mag.median().clamp_min(1e-12)
        ok = torch.ones_like(mag, dtype=torch.bool)
        if ratio is not None:
            ok &= mag >= ratio * median
        if absolute is not None:
            ok &= mag >= absolute
        idx = ok.nonzero().squeeze(1)
        idx = idx[mag[idx].argsort(descending=True)][:top_k]
        out.append(BlockMA(k, idx.tolist(), mag[idx].tolist(), (mag[idx] / median).tolist(), median.item()))
    return out


def massive_block(per_block: Sequence[BlockMA], preferred: int) -> int | None:
    """The fork block when none is given: ``preferred`` (the default block) if it has massive
    channels, else the nearest block that has some (the later one on a tie: the residual stream
    carries a channel forward), else None. A small model may grow its MAs in one block only."""
    flagged = [b.block for b in per_block if b.channels]
    return min(flagged, key=lambda k: (abs(k - preferred), -k)) if flagged else None


@torch.no_grad()
def find_massive(model: nn.Module, samples: Iterable, *, ratio: float | None = 50.0,
                 absolute: float | None = None, top_k: int | None = 8, block: int | None = None,
                 rho: float | Callable = 0.0) -> Calibration:
    """Run ``samples`` through ``model`` with the probe and pick the MA channels of block m.

    samples: iterable of ``(x, sigma, *inputs[, named inputs])`` as the model takes them (all rows
        count as cond; use noisy latents along a sampling trajectory and a few prompts).
    block: the fork block m; the spec's channels are those flagged there by ``select_massive``,
        ranked by magnitude over image tokens. Default: ``default_block``, or the block nearest
        it with massive channels when it has none (``massive_block``).
    """
    m = default_block(model.config) if block is None else block
    if not 0 <= m < model.config.total_blocks:
        raise ValueError(f"block {m} outside 0..{model.config.total_blocks - 1}")
    total, n = None, 0
    with Probe(model) as p:
        for sample in samples:
            x, sigma, inputs = unpack(model, sample)
            model(x, sigma, **inputs)
            rec = p.records.pop()
            s = rec.image_mean.sum(1)  # (K, D)
            total, n = (s if total is None else total + s), n + x.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    magnitude = total / n
    per_block = select_massive(magnitude, ratio, absolute, top_k)
    nearest = massive_block(per_block, m) if block is None else None
    m = m if nearest is None else nearest
    if not per_block[m].channels:
        flagged = [b.block for b in per_block if b.channels]
        best = (magnitude[m].max() / magnitude[m].median().clamp_min(1e-12)).item()
        raise ValueError(f"no massive channel at block {m}: its largest channel is {best:.1f}x the median "
                         f"(rule: ratio {ratio}, absolute {absolute}); blocks with MAs: {flagged or 'none'}. "
                         "Pick another --block, relax the rule, or give channels by hand.")
    spec = MASpec(channels=tuple(per_block[m].channels), block=m, rho=rho)
    rule = {"ratio": ratio, "absolute": absolute, "top_k": top_k, "statistic": "mean |h| over image tokens"}
    return Calibration(spec, per_block, rule, n, magnitude)


def calibrate(model: nn.Module, samples: Iterable, *, ratio: float | None = 50.0,
              absolute: float | None = None, top_k: int | None = 8, block: int | None = None,
              rho: float | Callable = 0.0) -> MASpec:
    """The MASpec for ``model`` from ``samples``; see ``find_massive`` for the table behind it."""
    return find_massive(model, samples, ratio=ratio, absolute=absolute, top_k=top_k, block=block,
                        rho=rho).spec


@torch.no_grad()
def ablation_effects(model: nn.Module, sample, channel_sets, block: int, rho: float = 0.0) -> list[float]:
    """Relative change of the output, ``|v_disrupted - v| / |v|`` (norms over the whole batch),
    when each set of ``channels`` of block ``block`` is multiplied by ``rho``: the reviewers'
    control compares MA channels against as many random non-MA channels. v is computed once."""
    x, sigma, inputs = unpack(model, sample)
    v = model(x, sigma, **inputs).float()
    rows = slice(0, x.shape[0])  # every row
    saved, effects = model.ma, []
    try:
        for channels in channel_sets:
            model.ma = MASpec(channels=tuple(channels), block=block, rho=rho)
            v_d = model(x, sigma, **inputs, disrupt=rows).float()
            effects.append(((v_d - v).norm() / v.norm().clamp_min(1e-12)).item())
    finally:
        model.ma = saved
    return effects


def ablation_effect(model: nn.Module, sample, channels, block: int, rho: float = 0.0) -> float:
    """``ablation_effects`` for one set of channels."""
    return ablation_effects(model, sample, [channels], block, rho)[0]
