"""Does a tiny-shapes model follow its prompts? Colour and shape adherence, and how much the
caption moves the velocity (a collapsed text path shows as ~0).

    python benchmarks/prompt_adherence.py --model FOLDER [--n 16] [--steps 12] [--cfg 4]

Captions come from the dataset (seed ``--data-seed``, not a training seed); words a model does
not know (texture words, for the first shipped model) are left out of its prompts. Image i
uses noise seed i.
"""
from __future__ import annotations

import argparse

import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402
from mmdit import tiny  # noqa: E402
from mmdit.tiny import shapes


@torch.no_grad()
def text_effect(model: tiny.Tiny, captions: list[str], sigma: float = 0.7) -> tuple[float, float, float]:
    """(mean context-token norm, |v(c0) - v("")| / |v("")|, |v(c0) - v(c1)| / |v("")|) on one noise."""
    cond = model.conditioner.encode(captions[:2] + [""])
    x = torch.randn(1, 3, model.settings.size, model.settings.size, generator=torch.Generator().manual_seed(0))
    v = [model.transformer(x, torch.tensor([sigma]), cond["context"][i:i + 1], cond["pooled"][i:i + 1])
         for i in range(3)]
    ref = v[2].norm().clamp_min(1e-12)
    return (cond["context"][:2].norm(dim=-1).mean().item(), ((v[0] - v[2]).norm() / ref).item(),
            ((v[0] - v[1]).norm() / ref).item())


def run(model: tiny.Tiny, n: int, steps: int, cfg: float, data_seed: int, batch: int = 32) -> dict:
    if n < 2:
        raise ValueError(f"n={n}: at least 2 prompts are needed (two captions' velocities are compared)")
    data = shapes.batch(n, data_seed, model.settings.size)
    known = set(model.conditioner.tokenizer.vocab)
    captions = [" ".join(w for w in c.split() if w.strip(",") in known) for c in data.captions]
    images = torch.cat([tiny.generate(model, captions[i:i + batch], seed=list(range(i, min(i + batch, n))),
                                      steps=steps, cfg=cfg) for i in range(0, n, batch)])
    background, colour = shapes.read_colours(images)
    shape = shapes.read_shapes(images, data.colour)
    norm, cond_vs_uncond, caption_vs_caption = text_effect(model, captions)
    return {"background": (background == data.background).float().mean().item(),
            "shape_colour": (colour == data.colour).float().mean().item(),
            "shape": (shape == data.shape).float().mean().item(),
            "shape_by_kind": {name: (shape[data.shape == k] == k).float().mean().item()
                              for k, name in enumerate(shapes.SHAPES) if (data.shape == k).any()},
            "context_norm": norm, "cond_vs_uncond": cond_vs_uncond, "caption_vs_caption": caption_vs_caption}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a tiny-model folder (default: the shipped weights/tiny/)")
    p.add_argument("--n", type=int, default=16, help="prompts (one image each)")
    p.add_argument("--steps", type=int, default=12, help="sampling steps")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale")
    p.add_argument("--data-seed", type=int, default=777, help="seed of the captions drawn from the dataset")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        r = run(tiny.load_tiny(args.model), args.n, args.steps, args.cfg, args.data_seed)
    except ValueError as e:
        p.error(str(e))
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["shape_by_kind"].items())
    print(f"{args.model or 'shipped'}: {args.n} prompts, {args.steps} steps, cfg {args.cfg:g}: background "
          f"{r['background']:.0%}, shape colour {r['shape_colour']:.0%}, shape {r['shape']:.0%} ({kinds}); "
          f"context norm {r['context_norm']:.3f}, |v_c - v_u| / |v_u| {r['cond_vs_uncond']:.4f}, "
          f"two captions {r['caption_vs_caption']:.4f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
