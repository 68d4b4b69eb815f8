"""The recipe of the shipped tiny model: text encoder and transformer trained together.

``mmdit train`` (``python -m mmdit train``) trains the pixel-space model on
``mmdit.tiny.shapes`` with flow matching and caption dropout, calibrates its MA spec and
writes a folder that ``mmdit.tiny.load_tiny`` (and ``mmdit generate --model FOLDER``) reads.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import ma
from ..train import EMA, checkpoint_blocks, compile_blocks, flow_matching_loss, sample_sigma
from . import model as tiny
from . import shapes


class TextToImage(nn.Module):
    """Transformer + conditioner as one module whose forward is the loss (what DDP/FSDP wrap)."""

    def __init__(self, transformer: nn.Module, conditioner: tiny.TinyConditioner):
        super().__init__()
        self.transformer, self.conditioner = transformer, conditioner

    def forward(self, x0: torch.Tensor, ids: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond = self.conditioner(ids)
        return flow_matching_loss(self.transformer, x0, cond["context"], cond["pooled"], sigma=sigma, noise=noise)


def drop_captions(captions: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Each caption replaced by "" (the unconditional prompt) with probability ``p``."""
    return ["" if rng.random() < p else c for c in captions]


def lr_at(step: int, total: int, lr: float, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))


def calibration_samples(conditioner: tiny.TinyConditioner, n: int = 16,
                        sigmas: Sequence[float] = (0.9, 0.7, 0.5, 0.3, 0.1), seed: int = 12345):
    """(x_t, sigma, context, pooled) for MA calibration: dataset images noised at ``sigmas``."""
    data = shapes.batch(n, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = conditioner.encode(data.captions)
    for s in sigmas:
        noise = torch.randn(data.images.shape, generator=g)
        yield s * noise + (1 - s) * data.images, torch.full((n,), s), cond["context"], cond["pooled"]


def calibrate_tiny(transformer: nn.Module, conditioner: tiny.TinyConditioner, ratio: float = 50.0,
                   relaxed: float = 3.0) -> tuple[ma.MASpec, dict]:
    """(MASpec, table) for the tiny model, at the default fork block (the middle one).

    The spec is ``ma.calibrate``'s with the paper-like rule (``ratio`` x the median channel);
    a model this small may have no such channel, and then the ``relaxed`` rule picks the
    outliers (at least the top channel). The table records which rule was used, every block's
    top channels and top/median ratio, and the output change when the spec's channels are
    zeroed vs as many random other channels (the reviewers' control)."""
    samples = list(calibration_samples(conditioner))
    table = ma.find_massive(transformer, samples, ratio=1.0, top_k=4)  # every block's top channels
    mag = table.magnitude  # (K, D)
    median = mag.median(1).values.clamp_min(1e-12)
    info = {"statistic": table.rule["statistic"], "samples": table.samples,
            "median": [round(m, 4) for m in median.tolist()],
            "top_over_median": [round(r, 2) for r in (mag.amax(1) / median).tolist()],
            "top_channels": [b.channels for b in table.blocks],
            "top_magnitude": [[round(m, 3) for m in b.magnitude] for b in table.blocks]}
    m = table.spec.block  # the default fork block
    massive = ma.select_massive(mag, ratio=ratio)[m].channels  # ma.calibrate's rule, on the same probe
    if massive:
        spec = ma.MASpec(channels=tuple(massive), block=m)
        info["rule"] = f"{ratio}x median"
    else:
        flagged = [c for c, r in zip(table.blocks[m].channels, mag[m][table.blocks[m].channels] / median[m])
                   if r >= relaxed]
        spec = ma.MASpec(channels=tuple(flagged or table.blocks[m].channels[:1]), block=m)
        info["rule"] = (f"no channel reached {ratio}x the median (no massive activations); "
                        f"the spec holds block {m}'s channels above {relaxed}x (or its top one)")
    g = torch.Generator().manual_seed(0)
    top = table.blocks[spec.block].channels
    control = [c for c in torch.randperm(mag.shape[1], generator=g).tolist() if c not in top][:len(spec.channels)]
    effect, effect_random = zip(*(ma.ablation_effects(transformer, s, [spec.channels, control], spec.block)
                                  for s in samples))
    info["ablation"] = {"sigmas": [round(float(s[1][0]), 2) for s in samples], "spec": [round(e, 4) for e in effect],
                        "random_channels": control, "random": [round(e, 4) for e in effect_random],
                        "statistic": "|v_disrupted - v| / |v| with the channels zeroed at the fork block"}
    return spec, info


def train(args: argparse.Namespace) -> dict:
    """Train the tiny model as ``args`` say; returns a summary (also stored in config.json)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.heads:
        overrides["num_heads"] = args.heads
    transformer, conditioner = tiny.build_tiny(args.seed, transformer=overrides)
    model = TextToImage(transformer, conditioner).to(args.device)
    if args.checkpointing:
        checkpoint_blocks(transformer)
    if args.compile:
        compile_blocks(transformer)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    ema = EMA(model, args.ema) if args.ema else None
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = shapes.stream(args.batch_size, args.seed)
    n_params = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in conditioner.parameters())
    print(f"tiny model: transformer {n_params / 1e6:.2f}M + text encoder {n_text / 1e6:.2f}M parameters; "
          f"{args.steps} steps of {args.batch_size}", flush=True)
    start, avg, history = time.perf_counter(), None, []
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = next(data)
        ids = conditioner.tokenize(drop_captions(batch.captions, args.caption_dropout, rng))
        x0 = batch.images.to(args.device)
        sigma = sample_sigma(x0.shape[0], mode=args.sigma_mode, mean=args.sigma_mean, std=args.sigma_std,
                             shift=args.shift, generator=g, device=args.device)
        noise = torch.randn(x0.shape, generator=g).to(args.device)
        loss = model(x0, ids, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update(model)
        value = loss.item()
        avg = value if avg is None else 0.95 * avg + 0.05 * value
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            history.append([step + 1, round(avg, 5)])
            print(f"step {step + 1}/{args.steps}  loss {value:.4f}  avg {avg:.4f}  "
                  f"{(step + 1) / elapsed:.2f} it/s  {elapsed:.0f}s", flush=True)
    wall = time.perf_counter() - start
    if ema is not None:
        ema.copy_to(model)
    if args.checkpointing:
        checkpoint_blocks(transformer, enabled=False)
    model.eval()
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "wall_s": round(wall, 1),
               "final_loss_avg": round(avg, 5), "loss_history": history,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"},
               "torch": torch.__version__}
    return {"model": model, "summary": summary}


def recalibrate(folder: Path) -> None:
    """Calibrate the MAs of a saved tiny model again; only config.json's ``ma`` entries change."""
    loaded = tiny.load_tiny(folder)
    spec, info = calibrate_tiny(loaded.transformer, loaded.conditioner)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["ma"], config["ma_calibration"] = ma.spec_to_json(spec), info
    path.write_text(json.dumps(config, indent=1) + "\n")
    print(f"MA calibration: block {spec.block}, channels {list(spec.channels)} ({info['rule']}); "
          f"top/median per block {info['top_over_median']}")


def run(args: argparse.Namespace) -> int:
    """``mmdit train``: train, calibrate the MAs, save the folder."""
    if args.calibrate_only:
        recalibrate(args.out)
        return 0
    result = train(args)
    model, summary = result["model"], result["summary"]
    transformer, conditioner = model.transformer.cpu(), model.conditioner.cpu()
    spec, info = None, None
    if not args.no_calibrate:
        spec, info = calibrate_tiny(transformer, conditioner)
        print(f"MA calibration: block {spec.block}, channels {list(spec.channels)} ({info['rule']}); "
              f"top/median per block {info['top_over_median']}", flush=True)
    out = args.out
    tiny.save_tiny(out, transformer, conditioner, tiny.ImageSettings(), ma=spec,
                   meta={"training": summary, "ma_calibration": info})
    print(f"saved {out} ({summary['wall_s']:.0f}s of training, final loss {summary['final_loss_avg']:.4f})")
    return 0
