"""Step caching, measured: steps computed and skipped, time per image and the distance to the
uncached image, for each policy and threshold, with and without DG.

    python benchmarks/cache_quality.py                                  # the shipped tiny model (quality)
    python benchmarks/cache_quality.py --model tiny-shapes-ma           # a tiny folder (the MA model recipe's)
    python benchmarks/cache_quality.py --speed flux.1-dev --speed-layers 4   # random weights, full width: time only

Quality: every image of the uncached run is the reference for the same prompt, seed and guidance;
PSNR (dB, images in [0, 1]) and the largest pixel error over the prompts. Speed (``--speed PRESET``):
random weights at the preset's full width with ``--speed-layers`` blocks, so the decisions are
those of an untrained model: read the time per step computed vs skipped, not the quality. The
TeaCache rows use ``--teacache-coefficients`` (default: fitted here with teacache_fit.py on the
model, for a tiny model; the published FLUX.1 ones for a FLUX.1 preset).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402
import mmdit  # noqa: E402
from mmdit.models.cache import FirstBlockCache, TeaCache  # noqa: E402
from mmdit.samplers import Guidance, sample  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a purple background",
           "a green square on a white background", "a black square on an orange background"]
STATES = []  # every run's cache state, to count its skipped steps


class Counted:
    """A policy whose runs leave their state in STATES."""

    def __init__(self, policy):
        self.policy = policy

    def start(self, sigmas, family=None):
        state = self.policy.start(sigmas, family)
        STATES.append(state)
        return state


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a tiny folder or pipeline (default: the shipped tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fbcache", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--teacache", type=float, nargs="+", default=[0.1, 0.3, 0.6, 1.0])
    p.add_argument("--teacache-coefficients", type=float, nargs="+", default=None)
    p.add_argument("--dg", type=float, default=1.0, help="the DG weight of the with-DG rows")
    p.add_argument("--speed", default=None, help="a preset: time per image with random weights instead")
    p.add_argument("--speed-layers", type=int, default=4)
    p.add_argument("--speed-resolution", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def policies(args, coefficients):
    out = [("none", None)]
    out += [(f"fbcache:{t:g}", FirstBlockCache(t)) for t in args.fbcache]
    out += [(f"teacache:{t:g}", TeaCache(t, coefficients=coefficients)) for t in args.teacache]
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def quality(args) -> dict:
    from teacache_fit import main as fit

    if args.model is None:
        pipe = mmdit.Pipeline.tiny(device=args.device)
    else:
        pipe = mmdit.Pipeline.from_pretrained(args.model, device=args.device)
    if pipe.transformer.ma is None:
        args.dg = 0.0
    coefficients = args.teacache_coefficients or fit(["--seeds", "3"] + ([] if args.model is None else
                                                                         ["--model", args.model]))["coefficients"]
    steps = args.steps or pipe.defaults["steps"]
    rows, reference = [], {}
    for dg in (0.0, args.dg) if args.dg else (0.0,):
        for name, policy in policies(args, coefficients):
            STATES.clear()
            times, images = [], []
            for prompt in PROMPTS:
                for seed in args.seeds:
                    start = time.perf_counter()
                    image = pipe(prompt, steps=steps, dg=dg, seed=seed, output="np",
                                 cache=None if policy is None else Counted(policy))[0]
                    times.append(time.perf_counter() - start)
                    images.append(image)
            if policy is None:
                reference[dg] = images
            skipped = sum(s.skipped_steps() for s in STATES)
            ref = reference[dg]
            row = {"policy": name, "dg": dg, "images": len(images), "steps": steps,
                   "skipped_per_image": skipped / len(images), "s_per_image": statistics.median(times),
                   "psnr_db": min(psnr(a, b) for a, b in zip(images, ref)),
                   "max_pixel_error": max(float(np.abs(a - b).max()) for a, b in zip(images, ref))}
            rows.append(row)
            print(f"{name:16s} dg {dg:g}: {row['skipped_per_image']:4.1f} of {steps} steps skipped, "
                  f"{1e3 * row['s_per_image']:7.1f} ms/image, PSNR >= {row['psnr_db']:5.1f} dB, "
                  f"max pixel error {row['max_pixel_error']:.3f}", flush=True)
    return {"model": args.model or "tiny-shapes (shipped)", "coefficients": coefficients, "rows": rows}


def speed(args) -> dict:
    config = mmdit.preset(args.speed, num_layers=args.speed_layers)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = mmdit.build_transformer(config, device=args.device, dtype=dtype).eval()
    model.ma = mmdit.MASpec(channels=(1,), block=config.total_blocks // 2)
    latent = args.speed_resolution // 8
    inp = common.make_inputs(config, 1, (latent, latent), 64, args.device, dtype)
    cond = {"context": inp.context}
    if inp.pooled is not None:
        cond["pooled"] = inp.pooled
    uncond = {k: v * 0 for k, v in cond.items()}
    steps = args.steps or 8
    sigmas = torch.linspace(1, 0, steps + 1)
    coefficients = args.teacache_coefficients
    rows = []
    for dg in (0.0, args.dg):
        for name, policy in policies(args, coefficients):
            STATES.clear()
            start = time.perf_counter()
            sample(model, inp.x, sigmas, cond, uncond, guide=Guidance(cfg=4.0, dg=dg), guidance=inp.guidance
                   if inp.guidance is None else 3.5, cache=None if policy is None else Counted(policy))
            common.synchronize(args.device)
            seconds = time.perf_counter() - start
            skipped = sum(s.skipped_steps() for s in STATES)
            rows.append({"policy": name, "dg": dg, "steps": steps, "skipped": skipped, "s_per_image": seconds})
            print(f"{name:16s} dg {dg:g}: {skipped} of {steps} steps skipped, {seconds:6.2f} s/image", flush=True)
    return {"preset": args.speed, "layers": args.speed_layers, "resolution": args.speed_resolution, "rows": rows}


def main(argv=None) -> dict:
    args = parse(argv)
    out = {"environment": common.environment(args.device), **(speed(args) if args.speed else quality(args))}
    if args.json:
        common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    common.run_main(main)
