"""What GGUF weights cost: one forward with each Linear dequantized on the fly vs the same values
held in full precision, and the resident weight bytes.

    python benchmarks/gguf_cost.py --preset sd3.5-medium --num-layers 4 --resolution 384 \\
        --text-len 333 --dtype fp32 --iters 5                           # CPU (latency.py's CPU config)
    python benchmarks/gguf_cost.py --preset flux.1-dev --dtype bf16 --types Q8_0,Q4_0,BF16    # GPU

The model is built from the preset with random weights, saved as bf16 safetensors and written as
a GGUF of each ``--types`` by ``mmdit quantize`` (ComfyUI-GGUF's layout). Each GGUF model (Linear
weights kept as stored, ``mmdit.ggml.GGUFLinear``) is timed against a "dense" copy holding the
very same values as plain ``--dtype`` Linears, so the difference is the per-layer dequantization
alone; calls interleaved after warm-up, median of ``--iters`` (wall and process CPU time). Also:
the time to dequantize every kept weight once (that work's share of a forward), resident weight
bytes (GGUF model / dense copy / the file's tensor bytes), and the output's distance to the
bf16-weight model (the quantization error).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import common
from mmdit import fp8  # noqa: E402  (common puts the checkout on sys.path)
from mmdit.fp8 import set_module
from mmdit.ggml import GGUFLinear
from mmdit.weights.gguf import GGUFCheckpoint
from mmdit.weights.gguf_write import TARGETS, quantize_file
from mmdit.weights.transformer import load_transformer


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--resolution", default="1024", help="image size in pixels, N or HxW (latent = /8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--types", default="Q8_0,Q4_0,BF16", help=f"comma-separated, of {','.join(TARGETS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) both models (inductor)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    args = p.parse_args(argv)
    bad = [t for t in args.types.split(",") if t not in TARGETS]
    if bad:
        raise SystemExit(f"--types: {bad} not in {TARGETS}")
    return args


def random_model(config, seed: int) -> nn.Module:
    """Our model with N(0, 0.02) weights (norm scales 1 + N(0, 0.02)): nothing zero-initialised."""
    import mmdit

    model = mmdit.build_transformer(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g) * 0.02
            t.copy_(noise + 1 if name.endswith(("norm.scale", ".weight")) and t.dim() == 1 else noise)
    return model.eval()


def dense(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with each GGUFLinear replaced by an nn.Linear holding its dequantized weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, GGUFLinear):
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.dequantized(dtype), requires_grad=False)
            if m.bias is not None:
                lin.bias = m.bias
            set_module(model, name, lin)
    return model


def run(args) -> dict:
    config = common.config_from_args(args)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    H, _, W = args.resolution.lower().partition("x")
    H, W = int(H), int(W or H)
    inp = common.make_inputs(config, args.batch, (H // 8, W // 8), common.text_len(args, config), device, dtype)
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    folder = Path(tmp.name if tmp else args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "model-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in random_model(config, args.seed).state_dict().items()},
              str(src))
    base = load_transformer(src, dtype=dtype, device=device, config=config)

    def call(model):
        return lambda: model(inp.x, inp.sigma, inp.context, inp.pooled, guidance=inp.guidance)

    out = {"benchmark": "gguf_cost", **common.environment(device), "preset": args.preset,
           "config": common.config_dict(config), "dtype": str(dtype).removeprefix("torch."), "resolution": [H, W],
           "batch": args.batch, "compile": args.compile, "iters": args.iters, "types": {}}
    with torch.inference_mode():
        want = call(base)()
        for qtype in args.types.split(","):
            path = folder / f"model-{qtype}.gguf"
            quantize_file(src, path, qtype, config=config)
            quant = load_transformer(path, dtype=dtype, device=device, config=config)
            same = dense(load_transformer(path, dtype=dtype, device=device, config=config), dtype)
            kept = [m for m in quant.modules() if isinstance(m, GGUFLinear)]
            runs = {"gguf": quant, "dense": same}
            if args.compile:
                torch._dynamo.reset()
                runs = {k: torch.compile(m, fullgraph=True) for k, m in runs.items()}
            fns = {k: call(m) for k, m in runs.items()}
            fns["dequant only"] = lambda: [m.dequantized(dtype) for m in kept]
            for _ in range(args.warmup):
                for fn in fns.values():
                    fn()
            wall = {k: [] for k in fns}
            cpu = {k: [] for k in fns}
            for i in range(args.iters):
                for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):  # interleaved, order alternating
                    w, c, _ = common.timed(fns[k], device)
                    wall[k].append(w), cpu[k].append(c)
            got = fns["gguf"]()
            ms = {k: common.median_ms(v) for k, v in wall.items()}
            cpu_ms = {k: common.median_ms(v) for k, v in cpu.items()}
            out["types"][qtype] = {
                "gguf_ms": ms["gguf"], "dense_ms": ms["dense"], "dequant_ms": ms["dequant only"],
                "gguf_cpu_ms": cpu_ms["gguf"], "dense_cpu_ms": cpu_ms["dense"],
                "ratio": ms["gguf"] / ms["dense"], "kept_layers": len(kept),
                "gguf_weight_bytes": fp8.weight_bytes(quant), "dense_weight_bytes": fp8.weight_bytes(same),
                "bf16_weight_bytes": sum(t.numel() * 2 for t in base.state_dict().values()),
                "file_tensor_bytes": GGUFCheckpoint(path).tensor_bytes(),
                "max_rel_err_vs_dense": common.rel_err(got, fns["dense"]()),
                "max_rel_err_vs_bf16_weights": common.rel_err(got, want)}
    if tmp:
        tmp.cleanup()
    return out


def report(out: dict) -> str:
    lines = [f"{out['preset']} {out['dtype']} {out['resolution'][0]}x{out['resolution'][1]} batch {out['batch']}"
             f"{' compiled' if out['compile'] else ''} on {out['device']} (torch {out['torch']})",
             f"{'type':<6} {'gguf ms':>9} {'dense ms':>9} {'ratio':>6} {'dequant ms':>11} {'GiB gguf':>9} "
             f"{'/ dense':>8} {'/ file':>7} {'/ bf16':>7} {'err vs bf16':>12}"]
    for q, r in out["types"].items():
        held = r["gguf_weight_bytes"]
        lines.append(f"{q:<6} {r['gguf_ms']:>9.1f} {r['dense_ms']:>9.1f} {r['ratio']:>6.2f} {r['dequant_ms']:>11.1f} "
                     f"{held / 2 ** 30:>9.3f} {held / r['dense_weight_bytes']:>8.3f} "
                     f"{held / r['file_tensor_bytes']:>7.3f} "
                     f"{held / r['bf16_weight_bytes']:>7.3f} {r['max_rel_err_vs_bf16_weights']:>12.2e}")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    out = run(args)
    print(report(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    common.run_main(main)
