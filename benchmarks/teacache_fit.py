"""Fit TeaCache's polynomial for a model: how much the output changes between steps, as a function of
how much block 0's modulated image input changes.

    python benchmarks/teacache_fit.py                          # the shipped tiny model, CPU, seconds
    python benchmarks/teacache_fit.py --model Qwen/Qwen-Image --device cuda --steps 50 --json fit.json

Along full CFG trajectories (every step computed) it records, for each pair of consecutive steps,
x = the relative L1 change of block 0's modulated input (the quantity TeaCache accumulates) and
y = the relative L1 change of the model's output (what skipping a step gets wrong), then fits
y ~ polynomial(x) (degree 4, as TeaCache's authors fit FLUX.1's). The coefficients go to
``TeaCache(threshold, coefficients=...)``, highest power first.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402

import mmdit  # noqa: E402
from mmdit.samplers import Guidance, guided_velocity  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a purple background",
           "a green square on a white background", "a black circle on an orange background"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a pipeline as `mmdit generate --model` takes (default: tiny-shapes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def changes(pipe, prompt: str, seed: int, steps: int) -> list[tuple[float, float]]:
    """(x, y) per pair of consecutive steps of one CFG trajectory (see the module's docstring)."""
    model = pipe.transformer
    C, h, w = pipe.latent_shape(pipe.defaults["size"], pipe.defaults["size"])
    x = torch.randn(1, C, h, w, generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
    cond, uncond = pipe.encode([prompt]), pipe.encode([""])
    sigmas = pipe.sigmas(steps, h, w).tolist()
    guide = Guidance(cfg=pipe.defaults["cfg"])
    probes, outputs = [], []
    first = model.blocks()[0]
    hook = first.register_forward_pre_hook(lambda m, args, kw: probes.append(m.modulated_input(*args[:3])),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                v = guided_velocity(model, x, s, cond, uncond, guide, pipe.defaults.get("guidance"))[0]
                outputs.append(v)
                x = x + (s_next - s) * v
    finally:
        hook.remove()

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()

    return [(rel(probes[i + 1], probes[i]), rel(outputs[i + 1], outputs[i])) for i in range(len(outputs) - 1)]


def main(argv=None) -> dict:
    args = parse(argv)
    pipe = mmdit.Pipeline.tiny(device=args.device) if args.model is None else \
        mmdit.Pipeline.from_pretrained(args.model, device=args.device)
    steps = args.steps or pipe.defaults["steps"]
    pairs = [p for prompt in PROMPTS for seed in args.seeds for p in changes(pipe, prompt, seed, steps)]
    x, y = np.array(pairs).T
    coefficients = np.polyfit(x, y, args.degree).tolist()
    fitted = np.polyval(coefficients, x)
    out = {"model": args.model or "tiny-shapes (shipped)", "steps": steps, "pairs": len(pairs),
           "coefficients": coefficients, "r2": float(1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
           "x_range": [float(x.min()), float(x.max())]}
    print(f"{len(pairs)} step pairs: TeaCache coefficients (highest power first) {coefficients}; R^2 {out['r2']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    common.run_main(main)
