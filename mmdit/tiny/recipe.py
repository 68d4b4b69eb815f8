"""The recipe of the shipped tiny model: text encoder and transformer trained together.

``mmdit train`` (``python -m mmdit train``) trains the pixel-space model on
``mmdit.tiny.shapes`` with flow matching and caption dropout, calibrates its MA spec and
writes a folder that ``mmdit.tiny.load_tiny`` (and ``mmdit generate --model FOLDER``) reads.
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import ma
from ..train import EMA, checkpoint_blocks, compile_blocks, flow_matching_loss, sample_sigma
from . import malog, shapes
from . import model as tiny


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


def lr_at(step: int, total: int, lr: float, warmup: int, final: float = 0.1, schedule: str = "cosine",
          decay_steps: int = 0) -> float:
    """Linear warm-up, then cosine decay to ``final * lr`` at ``total``, or constant, or "wsd"
    (warm-up, stable, decay): constant, then linear to 0 over the last ``decay_steps``. A constant
    run resumed as wsd with a larger ``total`` is a cool-down from its checkpoint."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "wsd" and step >= total - decay_steps:
        return lr * (total - step) / decay_steps
    if schedule in ("constant", "wsd"):
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))


def calibration_samples(conditioner: tiny.TinyConditioner, n: int = 16,
                        sigmas: Sequence[float] = (0.9, 0.7, 0.5, 0.3, 0.1), seed: int = 12345,
                        size: int = shapes.SIZE):
    """(x_t, sigma, context, pooled) for MA calibration: dataset images noised at ``sigmas``."""
    data = shapes.batch(n, seed, size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = conditioner.encode(data.captions)
    for s in sigmas:
        noise = torch.randn(data.images.shape, generator=g)
        yield s * noise + (1 - s) * data.images, torch.full((n,), s), cond["context"], cond["pooled"]


def calibrate_tiny(transformer: nn.Module, conditioner: tiny.TinyConditioner, ratio: float = 50.0,
                   relaxed: float = 3.0) -> tuple[ma.MASpec, dict]:
    """(MASpec, table) for the tiny model, at the default fork block (the middle one) or, when
    only other blocks have massive channels, the nearest of them (``ma.massive_block``).

    The spec is ``ma.calibrate``'s with the paper-like rule (``ratio`` x the median channel);
    a model this small may have no such channel, and then the ``relaxed`` rule picks the
    outliers (at least the top channel). The table records which rule was used, every block's
    top channels and top/median ratio, and the output change when the spec's channels are
    zeroed vs as many random other channels (the reviewers' control)."""
    c = transformer.config
    samples = list(calibration_samples(conditioner, size=c.patch_size * c.pos_embed_max_size))
    found = ma.find_spec(transformer, samples, ratio=ratio, relaxed=relaxed, paper=False)  # the one MA policy
    spec = found.spec
    table = ma.find_massive(transformer, samples, ratio=1.0, top_k=4)  # every block's top channels, for the record
    mag = table.magnitude  # (K, D)
    median = mag.median(1).values.clamp_min(1e-12)
    info = {"statistic": table.rule["statistic"], "samples": table.samples,
            "median": [round(m, 4) for m in median.tolist()],
            "top_over_median": [round(r, 2) for r in (mag.amax(1) / median).tolist()],
            "top_channels": [b.channels for b in table.blocks],
            "top_magnitude": [[round(m, 3) for m in b.magnitude] for b in table.blocks],
            "rule": found.how}
    g = torch.Generator().manual_seed(0)
    top = table.blocks[spec.block].channels
    control = [c for c in torch.randperm(mag.shape[1], generator=g).tolist() if c not in top][:len(spec.channels)]
    effect, effect_random = zip(*(ma.ablation_effects(transformer, s, [spec.channels, control], spec.block)
                                  for s in samples))
    info["ablation"] = {"sigmas": [round(float(s[1][0]), 2) for s in samples], "spec": [round(e, 4) for e in effect],
                        "random_channels": control, "random": [round(e, 4) for e in effect_random],
                        "statistic": "|v_disrupted - v| / |v| with the channels zeroed at the fork block"}
    return spec, info


def model_overrides(args: argparse.Namespace) -> dict:
    """Transformer config fields from the size flags: --width (hidden size), --heads, --layers,
    --patch, --size, --no-qk-norm. Without --width a head has 32 channels (the shipped model's); with it,
    --heads defaults to width / 64 (at least one head)."""
    over = {}
    if args.layers:
        over["num_layers"] = args.layers
    heads = args.heads or (max(1, args.width // 64) if args.width else None)
    if heads:
        over["num_heads"] = heads
    if args.width:
        if not heads or args.width % heads:
            raise ValueError(f"--width {args.width} must be a multiple of --heads {heads}")
        over["head_dim"] = args.width // heads
    if args.no_qk_norm:
        over["qk_norm"] = False
    if args.size % args.patch:
        raise ValueError(f"--size {args.size} must be a multiple of --patch {args.patch}")
    if args.patch != 4 or args.size != shapes.SIZE:
        over.update(patch_size=args.patch, pos_embed_max_size=args.size // args.patch)
    return over


def param_groups(model: TextToImage, weight_decay: float, text_lr: float | None, lr: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; with ``text_lr`` the text encoder gets its own
    learning rate, as a ``scale`` of the schedule's (0 freezes it)."""
    groups = {}
    for name, p in model.named_parameters():
        text = text_lr is not None and name.startswith("conditioner.")
        decay = p.dim() >= 2 and "embedding" not in name
        group = groups.setdefault((text, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                  "scale": text_lr / lr if text else 1.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename: a run killed mid-write keeps the last one."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> dict:
    """Train the tiny model as ``args`` say; returns a summary (also stored in config.json).

    With ``--checkpoint-every N`` the full state (weights, optimizer, EMA, random generators,
    step) goes to ``OUT/checkpoint.pt`` every N steps and at the last, and the EMA weights to
    a loadable folder ``OUT`` (no MA spec until the end); ``--resume`` continues from it, also
    past the old ``--steps``. With
    ``--ma-every N`` every block's MA statistics go to ``OUT/ma_log.csv`` (``malog``).
    """
    if args.schedule == "wsd" and args.steps <= args.warmup:
        raise ValueError(f"--schedule wsd needs --steps ({args.steps}) above --warmup ({args.warmup})")
    if args.schedule == "wsd" and not 0 < args.decay_steps <= args.steps - args.warmup:
        raise ValueError(f"--schedule wsd needs --decay-steps in 1..{args.steps - args.warmup} "
                         f"(--steps {args.steps} minus --warmup {args.warmup}), got {args.decay_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    transformer, conditioner = tiny.build_tiny(args.seed, transformer=model_overrides(args))
    model = TextToImage(transformer, conditioner).to(args.device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.text_lr, args.lr), lr=args.lr,
                            betas=tuple(args.betas), eps=args.eps)
    ema = EMA(model, args.ema) if args.ema else None
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    first, avg, history, wall_before = 0, None, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no {ckpt_path} (a run with --checkpoint-every writes it)")
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.shadow, ema.updates = state["ema"], state["ema_updates"]
        g.set_state(state["generator"])
        rng.setstate(state["random"])
        first, avg, history, wall_before = state["step"], state["avg"], state["history"], state["wall_s"]
        print(f"resumed {ckpt_path} at step {first}", flush=True)
    if args.checkpointing:
        checkpoint_blocks(transformer)
    if args.compile:
        compile_blocks(transformer)
    data = shapes.stream(args.batch_size, args.seed, args.size, start=first)
    probe = malog.probe_batch(size=args.size) if args.ma_every else None
    n_params = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in conditioner.parameters())
    print(f"tiny model: transformer {n_params / 1e6:.2f}M + text encoder {n_text / 1e6:.2f}M parameters "
          f"(width {transformer.config.hidden_size}, {transformer.config.num_layers} blocks, "
          f"{transformer.config.num_heads} heads, patch {transformer.config.patch_size}, {args.size}px); "
          f"steps {first}..{args.steps} of {args.batch_size}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def checkpoint(step):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(),
                                    "ema": None if ema is None else ema.shadow,
                                    "ema_updates": None if ema is None else ema.updates,
                                    "generator": g.get_state(), "random": rng.getstate(), "step": step,
                                    "avg": avg, "history": history,
                                    "wall_s": wall_before + time.perf_counter() - start})
        snapshot = copy.deepcopy(model)
        if ema is not None:
            ema.copy_to(snapshot)
        tiny.save_tiny(out, snapshot.transformer, snapshot.conditioner, tiny.ImageSettings(size=args.size),
                       meta={"training": {"steps": step, "batch_size": args.batch_size, "seed": args.seed,
                                          "checkpoint": True, "args": _args_json(args)}})

    model.train()
    done = first
    try:
        for step in range(first, args.steps):
            lr = lr_at(step, args.steps, args.lr, args.warmup, schedule=args.schedule, decay_steps=args.decay_steps)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("scale", 1.0)
            batch = next(data)
            ids = conditioner.tokenize(drop_captions(batch.captions, args.caption_dropout, rng))
            x0 = batch.images.to(args.device)
            sigma = sample_sigma(x0.shape[0], mode=args.sigma_mode, mean=args.sigma_mean, std=args.sigma_std,
                                 shift=args.shift, generator=g, device=args.device)
            noise = torch.randn(x0.shape, generator=g).to(args.device)
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(x0, ids, sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update(model)
            done = step + 1
            value = loss.item()
            avg = value if avg is None else 0.95 * avg + 0.05 * value
            if done % args.log_every == 0 or done == args.steps:
                elapsed = time.perf_counter() - start
                history.append([done, round(avg, 5)])
                print(f"step {done}/{args.steps}  loss {value:.4f}  avg {avg:.4f}  "
                      f"{(done - first) / elapsed:.2f} it/s  {wall_before + elapsed:.0f}s", flush=True)
            if args.ma_every and (done % args.ma_every == 0 or done == args.steps):
                malog.append_log(out / "ma_log.csv", done, malog.block_stats(transformer, conditioner, probe), avg)
                print(f"MA {malog.summary(out / 'ma_log.csv')}", flush=True)
            if args.checkpoint_every and (done % args.checkpoint_every == 0 or done == args.steps):
                checkpoint(done)
            if args.ma_every and (done == args.steps or args.checkpoint_every and done % args.checkpoint_every == 0):
                malog.plot_log(out / "ma_log.csv")  # matplotlib is slow to start: at checkpoints and the end only
    except KeyboardInterrupt:  # a resumable checkpoint of the last finished step; the CLI says one line
        if done > first:
            checkpoint(done)
            print(f"interrupted after step {done}: checkpoint saved to {ckpt_path} (the same command with --resume "
                  "continues)", flush=True)
        raise
    wall = wall_before + time.perf_counter() - start
    if ema is not None:
        ema.copy_to(model)
    if args.checkpointing:
        checkpoint_blocks(transformer, enabled=False)
    model.eval()
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "wall_s": round(wall, 1),
               "final_loss_avg": round(avg, 5), "loss_history": history, "args": _args_json(args),
               "torch": torch.__version__}
    return {"model": model, "summary": summary}


def _args_json(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}


def recalibrate(folder: Path) -> None:
    """Calibrate the MAs of a saved tiny model again; only config.json's ``ma`` entries change."""
    loaded = tiny.load_tiny(folder)
    spec, info = calibrate_tiny(loaded.transformer, loaded.conditioner)
    tiny.store_ma(folder, spec, info)
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
    tiny.save_tiny(out, transformer, conditioner, tiny.ImageSettings(size=args.size), ma=spec,
                   meta={"training": summary, "ma_calibration": info})
    print(f"saved {out} ({summary['wall_s']:.0f}s of training, final loss {summary['final_loss_avg']:.4f})")
    return 0
