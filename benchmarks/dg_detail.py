"""Detail Guidance on a tiny-shapes model: high-frequency energy, MA ablation, adherence.

On held-out captions and seeds (dataset seeds no training run draws), for a tiny checkpoint
(default: the shipped ``weights/tiny/``; ``--model FOLDER`` for one written by ``mmdit train``):

  (a) high-frequency energy of the generated images against renders of the same captions:
      the power at spatial frequencies above ``--cutoff`` cycles/pixel (periods under 10 px
      by default), per pixel, from the 2D FFT of each RGB channel;
  (b) the same when the MA channels are zeroed at block m during every step (the paper's
      "detail collapse"), against as many random channels zeroed there (mean over draws);
  (c) its change with DG at several weights, with CFG and without (cond only);
  (d) colour (background, shape), shape and texture adherence, read back with the dataset's
      readers (``shapes.read_colours / read_shapes / read_textures``: right on >= 97% of renders).

The MA channels: the model's stored spec when it has one (``mmdit train`` calibrates it with
the default rule), else the top channel at m. The table's header gives each block's top /
median channel ratio, so a run on a model without massive activations says so. Prints a
table (``--json`` for the numbers); ``--sheet PNG`` writes a contact sheet: a row per prompt,
columns render, CFG, CFG+DG at the first two weights, MA zeroed, random zeroed.

    python benchmarks/dg_detail.py                      # the shipped model, ~1 minute on a CPU
    python benchmarks/dg_detail.py --model out/run1 --n 8 --steps 12 --sheet sheet.png
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402

from mmdit import ma, tiny  # noqa: E402
from mmdit.samplers import Guidance, sample, sd3_sigmas  # noqa: E402
from mmdit.tiny import shapes  # noqa: E402

HELD_OUT_SEED = 987_654_321  # training streams use seed * 1_000_003 + i for small i; this is none of them


def hf_energy(images: torch.Tensor, cutoff: float = 0.1) -> torch.Tensor:
    """(B,) power per pixel at radial frequencies above ``cutoff`` cycles/pixel, images (B, 3, H, W)
    in [-1, 1]; the mean of each channel is removed first (it only sits at frequency 0 anyway)."""
    x = images.float()
    H, W = x.shape[-2:]
    power = torch.fft.rfft2(x - x.mean((-2, -1), keepdim=True), norm="ortho").abs().square()
    f = (torch.fft.fftfreq(H).view(H, 1).square() + torch.fft.rfftfreq(W).view(1, -1).square()).sqrt()
    weight = torch.full_like(f, 2.0)
    weight[:, 0] = 1.0  # rfft2 keeps half the spectrum: count the mirrored columns twice
    if W % 2 == 0:
        weight[:, -1] = 1.0
    return (power * weight * (f > cutoff)).sum((-3, -2, -1)) / (H * W)


def local_hf(images: torch.Tensor, colour: torch.Tensor, background: torch.Tensor) -> tuple[float, float]:
    """Mean high-pass power (x minus its 5x5 box blur, over RGB) inside the shape (its colour's
    pixels, 2 pixels in from the outline) and on the background (the same for its colour):
    texture vs artefacts, since a render's background carries only faint noise."""
    x = images.float()
    high = (x - torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)).square().mean(1)
    cls = shapes.classify(x)
    out = []
    for c in (colour, background):
        m = cls == c.view(-1, 1, 1)
        inner = m.clone()
        for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            inner &= torch.roll(m, (dy, dx), (1, 2))
        out.append(high[inner].mean().item() if inner.any() else float("nan"))
    return out[0], out[1]


@dataclass
class Scores:
    hf: float  # mean hf_energy
    hf_shape: float  # local_hf inside the shape
    hf_background: float  # local_hf on the background
    background: float  # fractions of images right
    colour: float
    shape: float
    texture: float  # over prompts that name a texture (NaN if none does)


def score(images: torch.Tensor, data: shapes.Batch, named: torch.Tensor, cutoff: float) -> Scores:
    bg, col = shapes.read_colours(images)
    shp = shapes.read_shapes(images, data.colour)
    tex = shapes.read_textures(images, data.colour)
    texture = (tex == data.texture)[named].float().mean().item() if named.any() else float("nan")
    return Scores(hf_energy(images, cutoff).mean().item(), *local_hf(images, data.colour, data.background), (bg == data.background).float().mean().item(),
                  (col == data.colour).float().mean().item(), (shp == data.shape).float().mean().item(), texture)


def prompts_for(model: tiny.Tiny, n: int, seed: int = HELD_OUT_SEED):
    """(batch, captions, named): held-out dataset draws and canonical captions for them; the texture
    word is in the caption when the model's vocabulary has it (the first shipped model's has not)."""
    size = model.settings.size
    data = shapes.batch(n, seed, size)
    knows = all(t in model.conditioner.tokenizer.vocab for t in shapes.TEXTURES)
    captions = [shapes.caption(shapes.COLOURS[c], shapes.SHAPES[s], shapes.COLOURS[b], 0,
                               shapes.TEXTURES[t] if knows else None)
                for c, s, b, t in zip(data.colour.tolist(), data.shape.tolist(), data.background.tolist(),
                                      data.texture.tolist())]
    return data, captions, torch.full((n,), knows)


def block_ratios(model: tiny.Tiny, data: shapes.Batch, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) top / median channel of mean |h| over image tokens per block, and (K, D) the magnitudes,
    on the held-out images noised at sigmas 0.9 ... 0.1."""
    g = torch.Generator().manual_seed(0)
    cond = model.conditioner.encode(captions)
    samples = [(s * torch.randn(data.images.shape, generator=g) + (1 - s) * data.images,
                torch.full((len(captions),), s), cond["context"], cond["pooled"]) for s in (0.9, 0.7, 0.5, 0.3, 0.1)]
    table = ma.find_massive(model.transformer, samples, ratio=1.0, top_k=1)
    mag = table.magnitude
    return mag.amax(1) / mag.median(1).values.clamp_min(1e-12), mag


class Disrupted(torch.nn.Module):
    """The transformer with ``spec``'s channels multiplied by its rho at its block, on every row
    and every step (the degraded model DG contrasts with; here sampled on its own)."""

    def __init__(self, transformer, spec: ma.MASpec):
        super().__init__()
        self.transformer, self.spec = transformer, spec

    def forward(self, x, sigma, context, pooled, guidance=None, **kw):
        saved, self.transformer.ma = self.transformer.ma, self.spec
        try:
            return self.transformer(x, sigma, context, pooled, guidance=guidance, disrupt=slice(0, x.shape[0]))
        finally:
            self.transformer.ma = saved


def run(model: tiny.Tiny, *, n: int = 16, steps: int = 16, cfg: float = 4.0, weights=(1.0, 2.0, 4.0),
        random_draws: int = 3, cutoff: float = 0.1, seed: int = 0, block: int | None = None) -> dict:
    """Every setting's Scores on the same held-out prompts and noise; returns a JSON-able dict."""
    data, captions, named = prompts_for(model, n)
    t = model.transformer
    ratios, mag = block_ratios(model, data, captions)
    if t.ma is not None and (block is None or block == t.ma.block):
        spec = ma.MASpec(channels=t.ma.channels, block=t.ma.block)
        source = "the model's stored spec"
    else:
        m = ma.default_block(t.config) if block is None else block
        spec = ma.MASpec(channels=(int(mag[m].argmax()),), block=m)
        source = f"the top channel at block {m}"
    m, k = spec.block, len(spec.channels)
    cond = model.conditioner.encode(captions)
    uncond = model.conditioner.encode([""])
    sigmas = sd3_sigmas(steps, model.settings.shift)
    size = model.settings.size
    noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(n)])
    saved = t.ma
    t.ma = spec

    def gen(net=t, cfg_=1.0, dg=0.0):
        return sample(net, noise.clone(), sigmas, cond, uncond if cfg_ != 1.0 else None,
                      guide=Guidance(cfg=cfg_, dg=dg)).clamp(-1, 1)

    rows, images = [], {}

    def add(name, imgs, **extra):
        images[name] = imgs
        rows.append({"setting": name, **vars(score(imgs, data, named, cutoff)), **extra})

    start = time.perf_counter()
    try:
        add("render", data.images)
        add("cond only", gen())
        for w in weights:
            add(f"DG {w:g}", gen(dg=w))
        add(f"CFG {cfg:g}", gen(cfg_=cfg))
        for w in weights:
            add(f"CFG {cfg:g} + DG {w:g}", gen(cfg_=cfg, dg=w))
        add(f"CFG {cfg:g}, MA zeroed", gen(Disrupted(t, spec), cfg_=cfg))
        top = set(mag[m].topk(min(8, mag.shape[1])).indices.tolist())
        g = torch.Generator().manual_seed(1)
        pool = [c for c in torch.randperm(mag.shape[1], generator=g).tolist() if c not in top]
        draws = [gen(Disrupted(t, ma.MASpec(channels=tuple(pool[i * k:(i + 1) * k]), block=m)), cfg_=cfg)
                 for i in range(random_draws)]
        scored = [vars(score(d, data, named, cutoff)) for d in draws]
        images[f"CFG {cfg:g}, random zeroed"] = draws[0]
        rows.append({"setting": f"CFG {cfg:g}, random zeroed", **{f: sum(s[f] for s in scored) / len(scored)
                                                                  for f in scored[0]}})
    finally:
        t.ma = saved
    ref = rows[0]["hf"]
    for r in rows:
        r["hf_vs_render"] = r["hf"] / ref
    return {"model": model.meta.get("training", {}).get("args", {}).get("out") or "tiny",
            "prompts": n, "steps": steps, "cfg": cfg, "cutoff": cutoff, "texture_words": bool(named.all()),
            "spec": {"channels": list(spec.channels), "block": m, "source": source},
            "ratio_top_over_median": [round(r, 2) for r in ratios.tolist()],
            "wall_s": round(time.perf_counter() - start, 1), "rows": rows, "images": images, "captions": captions}


def table(result: dict) -> str:
    ratios = ", ".join(f"{r:.1f}" for r in result["ratio_top_over_median"])
    spec = result["spec"]
    lines = [f"dg_detail: {result['prompts']} held-out prompts, {result['steps']} steps; top/median channel "
             f"per block: {ratios} (massive: >= 50)",
             f"MA channels {spec['channels']} at block {spec['block']} ({spec['source']}); HF = power per pixel "
             f"above {result['cutoff']} cycles/px; texture words in prompts: {result['texture_words']}",
             "HF shape / HF bg: high-pass power (x - 5x5 blur) inside the shape / on the background",
             f"{'setting':28s} {'HF':>8s} {'HF/render':>9s} {'HF shape':>8s} {'HF bg':>8s} {'bg':>5s} {'colour':>6s} "
             f"{'shape':>5s} {'texture':>7s}"]
    for r in result["rows"]:
        tex = "-" if r["texture"] != r["texture"] else f"{r['texture']:.0%}"
        lines.append(f"{r['setting']:28s} {r['hf']:8.4f} {r['hf_vs_render']:9.2f} {r['hf_shape']:8.4f} "
                     f"{r['hf_background']:8.4f} {r['background']:5.0%} "
                     f"{r['colour']:6.0%} {r['shape']:5.0%} {tex:>7s}")
    lines.append(f"({result['wall_s']:.0f}s)")
    return "\n".join(lines)


def contact_sheet(result: dict, path: str | Path, rows: int = 4, scale: int = 2) -> Path:
    """PNG: a row per prompt (the first ``rows``), columns render, CFG, CFG+DG (first two
    weights), MA zeroed, random zeroed; each image ``scale`` x nearest-upsampled."""
    from PIL import Image

    names = [r["setting"] for r in result["rows"]]
    cfg = [s for s in names if s.startswith("CFG") and "+" not in s and "zeroed" not in s][0]
    cols = ["render", cfg] + [s for s in names if s.startswith(cfg + " + DG")][:2] + \
           [s for s in names if "zeroed" in s]
    tiles = []
    for i in range(min(rows, result["prompts"])):
        row = [tiny.to_uint8(result["images"][c][i:i + 1])[0] for c in cols]
        tiles.append(torch.cat(row, 1))
    grid = torch.cat(tiles, 0).numpy()
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a tiny-model folder (default: the shipped weights/tiny/)")
    p.add_argument("--n", type=int, default=16, help="held-out prompts (one seed each)")
    p.add_argument("--steps", type=int, default=16, help="sampling steps")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale of the CFG rows")
    p.add_argument("--dg", default="1,2,4", help="DG weights, comma-separated")
    p.add_argument("--random-draws", type=int, default=3, help="random channel sets zeroed (the control)")
    p.add_argument("--block", type=int, default=None, help="block m (default: the spec's, else the middle one)")
    p.add_argument("--cutoff", type=float, default=0.1, help="HF cut-off in cycles per pixel")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (then +1 per prompt)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--sheet", default=None, help="write the contact sheet PNG here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny.load_tiny(args.model)
    weights = tuple(float(w) for w in args.dg.split(","))
    result = run(model, n=args.n, steps=args.steps, cfg=args.cfg, weights=weights, random_draws=args.random_draws,
                 cutoff=args.cutoff, seed=args.seed, block=args.block)
    result["model"] = args.model or "shipped weights/tiny"
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=1))
    if args.sheet:
        print(f"wrote {contact_sheet(result, args.sheet)}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
