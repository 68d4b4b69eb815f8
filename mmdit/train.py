"""Flow-matching training for the MMDiT transformers, and the recipe of the shipped tiny model.

The pieces work in any trainer (they only need ``model(x, sigma, context, pooled)``):

    x_t = sigma * noise + (1 - sigma) * x0          the rectified-flow path (sigma = 1: pure noise)
    v   = noise - x0                                the velocity the model predicts
    loss = mean (model(x_t, sigma, c) - v)^2        sigma ~ logit-normal (SD3) or uniform, SD3-shifted

``flow_matching_loss`` computes it; ``checkpoint_blocks`` / ``compile_blocks`` wrap each
transformer block from the outside (state-dict keys unchanged); ``EMA`` keeps an average;
``distribute`` wraps a module for DDP or FSDP2. Gradients flow through every fused kernel
(each has an autograd.Function). ``python -m mmdit.train`` (or ``mmdit train``) trains the
tiny pixel-space model on ``mmdit.shapes`` and writes a folder that ``mmdit.tiny.load_tiny`` reads.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ma, shapes, tiny
from .lora import inject_lora, save_lora  # noqa: F401  LoRA training: inject, optimize handle.parameters(), save


# ---------------------------------------------------------------------------------------------
# The objective

def sample_sigma(n: int, *, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 shift: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels (n,) in (0, 1): ``sigmoid(N(mean, std))`` (SD3's logit-normal) or
    ``U(0, 1)``, then SD3's time shift ``s*t / (1 + (s-1)*t)`` (s > 1 favours high noise)."""
    if mode == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif mode == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"sigma mode {mode!r}: use 'logit_normal' or 'uniform'")
    return (shift * t / (1 + (shift - 1) * t)).to(device)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, *,
                       sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, sigma_mode: str = "logit_normal",
                       sigma_std: float = 1.0, shift: float = 1.0, **model_kwargs) -> torch.Tensor:
    """Mean squared velocity error on one batch; x0: (B, C, H, W) clean latents or pixels.

    sigma (B,) and noise (like x0) are drawn from ``generator`` unless given (give them to
    reproduce a step exactly, e.g. across data-parallel ranks); ``model_kwargs`` go to the
    model (FLUX.1-dev: ``guidance=``).
    """
    B = x0.shape[0]
    if sigma is None:
        sigma = sample_sigma(B, mode=sigma_mode, std=sigma_std, shift=shift, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    s = sigma.to(x0.dtype).view(B, *([1] * (x0.dim() - 1)))
    x_t = s * noise + (1 - s) * x0
    v = model(x_t, sigma, context, pooled, **model_kwargs)
    return F.mse_loss(v.float(), (noise - x0).float())


# ---------------------------------------------------------------------------------------------
# Wrapping blocks from the outside (no change to the modules or their state-dict keys)

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of an SD3 or FLUX transformer, in order."""
    return [block for _, _, block in ma.blocks(model)]


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Activation checkpointing per block: each block's activations are recomputed in the
    backward instead of stored. ``enabled=False`` undoes it. Returns ``model``."""
    for block in transformer_blocks(model):
        if "forward" in block.__dict__:  # already wrapped: unwrap first
            del block.forward
        if enabled:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` each block (``nn.Module.compile``: one graph, reused by blocks of the
    same kind); ``options`` go to torch.compile (``backend=``, ``mode=``...). Returns ``model``."""
    for block in transformer_blocks(model):
        block.compile(**options)
    return model


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so an
    early average is not stuck at the initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})


def distribute(module: nn.Module, mode: str = "ddp", blocks: Sequence[nn.Module] = ()) -> nn.Module:
    """Wrap for data parallelism over the default process group (``init_process_group`` first).

    ddp:  ``DistributedDataParallel`` (gradients all-reduced, averaged over ranks), with
          ``find_unused_parameters``: the last SD3 block's text stream is ``pre_only`` and its
          ln_q (SD3.5) gets no gradient.
    fsdp: FSDP2 -- ``fully_shard`` on each of ``blocks``, then on the root module; parameters
          become DTensors sharded on dim 0 (``param.full_tensor()`` gathers one).
    """
    import torch.distributed as dist

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(module.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"distributed mode {mode!r}: use 'ddp' or 'fsdp'")


# ---------------------------------------------------------------------------------------------
# The tiny model: text encoder and transformer trained together

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mmdit train`` / ``python -m mmdit.train``; the defaults are the shipped recipe."""
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write (default: mmdit/weights/tiny/, the shipped model)")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.01, help="on matrices only (default: %(default)s)")
    p.add_argument("--sigma-mode", choices=("logit_normal", "uniform"), default="logit_normal",
                   help="training noise-level distribution (default: %(default)s)")
    p.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal mean (default: %(default)s)")
    p.add_argument("--sigma-std", type=float, default=1.5, help="logit-normal std (default: %(default)s)")
    p.add_argument("--shift", type=float, default=3.0,
                   help="SD3 time shift of the training sigmas; > 1 favours high noise (default: %(default)s)")
    p.add_argument("--caption-dropout", type=float, default=0.12,
                   help="fraction of empty captions, for CFG (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.998,
                   help="EMA decay, 0 = off; the EMA weights are saved (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init, data, noise (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="transformer depth (default: the preset's 4)")
    p.add_argument("--heads", type=int, default=None, help="transformer heads of 32 channels (default: 2)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy machine; default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=25, help="steps between loss lines (default: %(default)s)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the MA calibration after training")
    p.add_argument("--calibrate-only", action="store_true",
                   help="no training: recalibrate the MAs of the model in --out and update its config.json")


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
    """``mmdit train`` / ``python -m mmdit.train``: train, calibrate the MAs, save the folder."""
    if args.calibrate_only:
        recalibrate(args.out or tiny.default_folder())
        return 0
    result = train(args)
    model, summary = result["model"], result["summary"]
    transformer, conditioner = model.transformer.cpu(), model.conditioner.cpu()
    spec, info = None, None
    if not args.no_calibrate:
        spec, info = calibrate_tiny(transformer, conditioner)
        print(f"MA calibration: block {spec.block}, channels {list(spec.channels)} ({info['rule']}); "
              f"top/median per block {info['top_over_median']}", flush=True)
    out = args.out or tiny.default_folder()
    tiny.save_tiny(out, transformer, conditioner, tiny.ImageSettings(), ma=spec,
                   meta={"training": summary, "ma_calibration": info})
    print(f"saved {out} ({summary['wall_s']:.0f}s of training, final loss {summary['final_loss_avg']:.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmdit.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
