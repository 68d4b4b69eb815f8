"""Same prompts and seeds under CFG, CFG+DG, CFG+SLG and CFG+PAG: a contact sheet and detail numbers.

    python benchmarks/guidance_compare.py --out compare.png                 # the shipped tiny model, < 1 min
    python benchmarks/guidance_compare.py --model stabilityai/stable-diffusion-3.5-medium --device cuda \\
        --prompt "a macro photo of a dragonfly" --slg-layers 7,8,9 --pag-layers 12 --out compare.png

Rows: prompt x seed; columns: the guidance methods. Printed (and in --json): each image's
high-frequency energy (power per pixel above 0.1 cycles/pixel, as ``dg_detail.py`` measures
local detail) and each method's mean. Every method is one
model call per step: its perturbed branch is a copy of the cond rows inside that call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402
import mmdit  # noqa: E402
from dg_detail import hf_energy  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a purple background",
           "a green square on a white background"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a pipeline as `mmdit generate --model` takes (default: tiny-shapes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", action="append", default=None, help=f"repeatable (default: {len(PROMPTS)} shapes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's")
    p.add_argument("--dg", type=float, default=2.0)
    p.add_argument("--slg", type=float, default=2.5)
    p.add_argument("--slg-layers", default=None, help="default: 3 blocks from 30%% of the depth, never the last (SD3.5-medium: 7,8,9)")
    p.add_argument("--pag", type=float, default=2.0)
    p.add_argument("--pag-layers", default=None, help="default: the middle block")
    p.add_argument("--out", type=Path, default=Path("guidance_compare.png"))
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def high_frequency_energy(image: np.ndarray) -> float:
    """``dg_detail.hf_energy`` of one (H, W, 3) image in [0, 1]: power per pixel above 0.1
    cycles/pixel, the detail measure of the DG experiments."""
    return float(hf_energy(torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1)[0])


def layers(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return default if text is None else tuple(int(i) for i in text.split(","))


def run(args) -> dict:
    if args.model is None:
        torch.set_num_threads(1)  # a 0.6M-parameter model: thread hand-offs cost more than they save
        pipe = mmdit.Pipeline.tiny(device=args.device)
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipe = mmdit.Pipeline.from_pretrained(args.model, dtype=dtype, device=args.device)
    total = pipe.transformer.config.total_blocks
    slg_layers = common.slg_layers(total, args.slg_layers)
    pag_layers = layers(args.pag_layers, (total // 2,))
    methods = {"CFG": {}, f"CFG+DG {args.dg:g}": dict(dg=args.dg),
               f"CFG+SLG {args.slg:g}": dict(slg=args.slg, slg_layers=slg_layers, slg_interval=(0.0, 1.0)),
               f"CFG+PAG {args.pag:g}": dict(pag=args.pag, pag_layers=pag_layers)}
    prompts = args.prompt or PROMPTS
    images, energy = {}, {}
    for name, kw in methods.items():
        for prompt in prompts:
            for seed in args.seeds:
                image = pipe(prompt, steps=args.steps, cfg=args.cfg, seed=seed, output="np", **kw)[0]
                images[name, prompt, seed] = image
                energy.setdefault(name, []).append(high_frequency_energy(image))
    sheet(images, list(methods), prompts, args.seeds).save(args.out)
    return {"model": args.model or "tiny-shapes (shipped)", "prompts": prompts, "seeds": args.seeds,
            "slg_layers": list(slg_layers), "pag_layers": list(pag_layers), "sheet": str(args.out),
            "high_frequency_energy": energy, "mean": {k: float(np.mean(v)) for k, v in energy.items()}}


def sheet(images: dict, methods: list[str], prompts: list[str], seeds: list[int]):
    """Columns = methods (labelled), rows = (prompt, seed)."""
    from PIL import Image, ImageDraw

    h, w = next(iter(images.values())).shape[:2]
    scale = max(1, 128 // max(h, w))  # small images are magnified so they can be seen
    cell, label = (w * scale, h * scale), 14
    out = Image.new("RGB", (cell[0] * len(methods), label + cell[1] * len(prompts) * len(seeds)), "white")
    draw = ImageDraw.Draw(out)
    for c, name in enumerate(methods):
        draw.text((c * cell[0] + 2, 1), name, fill="black")
        for r, (prompt, seed) in enumerate((p, s) for p in prompts for s in seeds):
            tile = Image.fromarray((images[name, prompt, seed] * 255).round().astype(np.uint8))
            out.paste(tile.resize(cell, Image.NEAREST), (c * cell[0], label + r * cell[1]))
    return out


def main(argv=None):
    args = parse(argv)
    out = run(args)
    print(f"{out['model']}: {len(out['prompts'])} prompts x {len(out['seeds'])} seeds; SLG blocks "
          f"{out['slg_layers']}, PAG blocks {out['pag_layers']}; contact sheet {out['sheet']}")
    print(f"{'method':16s} {'high-frequency energy (mean)':>30s}")
    for name, value in out["mean"].items():
        print(f"{name:16s} {value:30.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    common.run_main(main)
