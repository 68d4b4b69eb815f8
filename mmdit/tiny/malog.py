"""Massive-activation statistics logged during training: a CSV per run, and its plot.

Every ``--ma-every`` steps ``mmdit train`` runs a fixed probe batch (dataset images noised at
three sigmas) through the live transformer and appends one row per block to
``ma_log.csv`` beside the weights:

    step, block, top_channel, top, median, ratio, second_ratio, kurtosis, loss_avg

top / median: the largest and the median channel of mean |h| over image tokens at the
block's output (``mmdit.ma``'s statistic, read through ``model.taps``; the bar for MAs is ratio >= 50);
kurtosis: E[(h - mean)^4] / var^2 over the D channels of each image token, averaged over
tokens (3 for a Gaussian; one channel of size M among D unit ones gives about D when M is
large). ``plot_log`` draws ratio and kurtosis against step, one line per block.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import shapes

FIELDS = ("step", "block", "top_channel", "top", "median", "ratio", "second_ratio", "kurtosis", "loss_avg")


@dataclass
class ProbeBatch:
    """The fixed probe: ``captions`` and, per sigma, the noised images (n, 3, size, size)."""

    captions: list[str]
    sigmas: tuple[float, ...]
    images: list[torch.Tensor]


def probe_batch(n: int = 8, size: int = shapes.SIZE, sigmas: Sequence[float] = (0.9, 0.5, 0.1),
                seed: int = 4242) -> ProbeBatch:
    """``n`` dataset images noised at each of ``sigmas``, always the same."""
    data = shapes.batch(n, seed, size)
    g = torch.Generator().manual_seed(seed)
    noised = [s * torch.randn(data.images.shape, generator=g) + (1 - s) * data.images for s in sigmas]
    return ProbeBatch(data.captions, tuple(sigmas), noised)


@torch.no_grad()
def block_stats(transformer: nn.Module, conditioner: nn.Module, probe: ProbeBatch) -> list[dict]:
    """Per block: top channel, top and median mean |h| over image tokens, their ratio, the
    second-largest channel's ratio, and the mean per-token kurtosis over channels; the
    captions go through the conditioner as it is now (it trains too)."""
    acc = {k: {"abs": 0.0, "kurt": 0.0, "tokens": 0} for k in range(transformer.config.total_blocks)}

    def tap(k, stream, out, gate, text_len):  # every block's output (model.taps), image tokens only
        if stream == "text":
            return
        h = out[:, text_len:].detach().float() if stream == "joint" else out.detach().float()  # (B, N, D)
        acc[k]["abs"] = acc[k]["abs"] + h.abs().sum((0, 1))
        c = h - h.mean(-1, keepdim=True)
        var = c.square().mean(-1).clamp_min(1e-12)
        acc[k]["kurt"] += (c.pow(4).mean(-1) / var.square()).sum().item()
        acc[k]["tokens"] += h.shape[0] * h.shape[1]

    transformer.taps.append(tap)
    modes = transformer.training, conditioner.training
    transformer.eval(), conditioner.eval()
    device = next(transformer.parameters()).device
    try:
        cond = conditioner.encode(probe.captions)
        for s, x in zip(probe.sigmas, probe.images):
            transformer(x.to(device), torch.full((x.shape[0],), s, device=device), cond["context"], cond["pooled"])
    finally:
        transformer.taps.remove(tap)
        transformer.train(modes[0]), conditioner.train(modes[1])
    rows = []
    for k in acc:
        mag = acc[k]["abs"] / acc[k]["tokens"]  # (D,)
        top2 = mag.topk(2)
        median = mag.median().clamp_min(1e-12).item()
        rows.append({"block": k, "top_channel": int(top2.indices[0]), "top": round(top2.values[0].item(), 4),
                     "median": round(median, 5), "ratio": round(top2.values[0].item() / median, 2),
                     "second_ratio": round(top2.values[1].item() / median, 2),
                     "kurtosis": round(acc[k]["kurt"] / acc[k]["tokens"], 2)})
    return rows


def append_log(path: Path, step: int, rows: list[dict], loss_avg: float | None) -> None:
    """Append one row per block to the CSV at ``path`` (the header when it is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"step": step, **r, "loss_avg": None if loss_avg is None else round(loss_avg, 5)})


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if k not in ("step", "block", "top_channel") else int(v)) if v else None
                 for k, v in row.items()} for row in csv.DictReader(f)]


def summary(path: Path) -> str:
    """The last logged step's ratio and kurtosis per block, and each block's best ratio so far."""
    rows = read_log(path)
    if not rows:
        return f"{path}: empty"
    last = max(r["step"] for r in rows)
    blocks = sorted({r["block"] for r in rows})
    best = {b: max(r["ratio"] for r in rows if r["block"] == b) for b in blocks}
    at = {r["block"]: r for r in rows if r["step"] == last}
    return (f"step {last}: ratio " + " ".join(f"{at[b]['ratio']:.1f}" for b in blocks)
            + "; kurtosis " + " ".join(f"{at[b]['kurtosis']:.1f}" for b in blocks)
            + "; best ratio " + " ".join(f"{best[b]:.1f}" for b in blocks))


def plot_log(path: Path, out: Path | None = None) -> Path | None:
    """ratio and kurtosis vs step, one line per block, to ``out`` (default: the CSV's name
    with .png); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_log(path)
    out = out or Path(path).with_suffix(".png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for b in sorted({r["block"] for r in rows}):
        mine = [r for r in rows if r["block"] == b]
        steps = [r["step"] for r in mine]
        axes[0].plot(steps, [r["ratio"] for r in mine], label=f"block {b}")
        axes[1].plot(steps, [r["kurtosis"] for r in mine], label=f"block {b}")
    axes[0].axhline(50, color="grey", ls="--", lw=0.8)
    axes[0].set(yscale="log", xlabel="step", ylabel="top / median channel, mean |h|",
                title="massive-activation ratio (50: dashed)")
    axes[1].set(yscale="log", xlabel="step", ylabel="kurtosis over channels", title="per-token kurtosis")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
