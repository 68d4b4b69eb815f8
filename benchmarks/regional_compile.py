"""Whole-model vs regional compilation: compile time and step time in one run, CFG+DG.

    python benchmarks/regional_compile.py                       # SD3.5-medium's 24 blocks, narrowed, CPU
    python benchmarks/regional_compile.py --device cuda --heads 24 --dtype bf16 --json rc.json

For each way (eager, ``compile=True`` = ``CompiledTransformer``, ``compile="regional"`` =
``compiled.compile_regional``): the first CFG+DG step (compile included) and the median of the
next ``--steps`` steps, the same guided step the sampler runs (``samplers.guided_velocity``), and
the largest difference to eager. Random weights from the preset: no checkpoint needed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402
import mmdit  # noqa: E402
from mmdit.compiled import CompiledTransformer, compile_regional  # noqa: E402
from mmdit.samplers import Guidance, guided_velocity  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd3.5-medium")
    p.add_argument("--heads", type=int, default=2, help="narrows the width to heads x head_dim (default 2: CPU)")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than the preset's (a quick check)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    p.add_argument("--size", type=int, default=32, help="latent side (32: a 256px image)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def run(args) -> dict:
    dtype, device = common.DTYPES[args.dtype], torch.device(args.device)
    config = mmdit.preset(args.preset, num_heads=args.heads, **({"num_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    model = mmdit.build_transformer(config, device=device, dtype=dtype).eval()
    model.ma = mmdit.MASpec(channels=(1,), block=config.total_blocks // 2)
    inp = common.make_inputs(config, 1, (args.size, args.size), args.text_len, device, dtype)
    cond = {"context": inp.context[:1], "pooled": inp.pooled[:1]}
    uncond = {"context": inp.context[:1] * 0, "pooled": inp.pooled[:1] * 0}
    guide = Guidance(cfg=4.5, dg=2.0)
    guidance = 3.5 if getattr(config, "guidance_embed", False) else None

    def step(denoiser):
        with torch.inference_mode():
            return guided_velocity(denoiser, inp.x[:1], 0.7, cond, uncond, guide, guidance)[0]

    out = {"environment": common.environment(device), "preset": args.preset, "heads": args.heads,
           "blocks": config.total_blocks, "latent": [args.size, args.size], "text_len": args.text_len, "ways": {}}
    reference = None
    for way in ("eager", "whole", "regional"):
        torch._dynamo.reset()
        denoiser = model
        if way == "whole":
            denoiser = CompiledTransformer(model, cuda_graphs=False, backend=args.backend)
        elif way == "regional":
            compile_regional(model, backend=args.backend)
        first, _, result = common.timed(lambda: step(denoiser), device)
        times = [common.timed(lambda: step(denoiser), device)[0] for _ in range(args.steps)]
        reference = result if reference is None else reference
        out["ways"][way] = {"first_step_s": round(first, 3), "step_ms": round(1e3 * statistics.median(times), 2),
                            "rel_err_vs_eager": common.rel_err(result, reference)}
        print(f"{way:9s} first step {first:7.2f} s   then {1e3 * statistics.median(times):8.1f} ms/step   "
              f"vs eager {out['ways'][way]['rel_err_vs_eager']:.1e}", flush=True)
    if args.json:
        common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    common.run_main(lambda: run(parse()))
