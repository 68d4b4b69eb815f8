"""What this device does per second: a large matmul, fp8 Linears, and each SDPA backend at the
attention shapes of FLUX and SD3.5-large.

    python benchmarks/device_rates.py --json rates.json            # CUDA, bf16
    python benchmarks/device_rates.py --device cpu --small         # a dry run: tiny shapes, math SDPA only

- mm: a square bf16 ``torch.mm`` (8192 on CUDA): the measured ceiling latency.py's "of mm" column
  divides by, against the datasheet peak (``common.PEAK_TFLOPS``) where the device is listed.
- fp8: FLUX's two widest Linears (3072 -> 12288 and 12288 -> 3072, a CFG batch of 1024x1024 image
  + text tokens) as a bf16 ``F.linear``, and with fp8 weights (``mmdit.fp8``, per-row scales)
  multiplied by ``torch._scaled_mm`` (fp8 activations; eager, and compiled as a compiled model runs
  it: x's quantization fused) and dequantized to bf16: time, TFLOP/s, speed-up over bf16, and the
  error against the fp32 dequantized reference.
- attention: ``F.scaled_dot_product_attention`` under each backend (cuDNN, flash, memory-efficient,
  math: ``torch.nn.attention.sdpa_kernel``) at FLUX's 24 heads x 128 and SD3.5-large's 38 x 64, a
  CFG batch of 2 over 4096 image tokens + 512 (FLUX) or 333 (SD3.5) text tokens; a backend that
  cannot run the shape is recorded with torch's reason. The error is against the math backend in fp32.

Each time is the median of --iters calls after --warmup, CUDA synchronized around each call.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from mmdit import fp8  # noqa: E402  (common puts the checkout on sys.path)
from mmdit.models.attention import SDPA_ORDER  # noqa: E402

# (name, heads, head_dim, text tokens); 4096 image tokens: a 1024x1024 image
ATTENTION = [("flux", 24, 128, 512), ("sd3.5-large", 38, 64, 333)]
SMALL_ATTENTION = [("flux", 2, 16, 8), ("sd3.5-large", 2, 8, 5)]
# FLUX's widest Linears: (in, out); M = a CFG batch of image + text tokens
LINEARS = [("mlp in", 3072, 12288), ("mlp out", 12288, 3072)]
SMALL_LINEARS = [("mlp in", 64, 256), ("mlp out", 256, 64)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run)")
    p.add_argument("--parts", default="mm,fp8,attention", help="comma-separated subset of mm, fp8, attention")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def median_ms(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(common.timed(fn, device)[0] for _ in range(max(iters, 1)))


def matmul(args, device) -> dict:
    n = 256 if args.small else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    with torch.inference_mode():
        ms = median_ms(lambda: torch.mm(a, b), device, args.warmup, args.iters)
    peak = common.peak_tflops(common.device_name(device), dtype) if device.type == "cuda" else None
    out = {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9,
           "datasheet_tflops": peak}
    if peak:
        out["fraction_of_datasheet"] = out["tflops"] / peak
    return out


def fp8_linears(args, device) -> dict:
    """bf16 F.linear vs fp8 weights multiplied in fp8 (scaled_mm) and dequantized (dequant)."""
    dtype = torch.bfloat16
    M = 2 * 64 if args.small else 2 * (4096 + 512)
    g = torch.Generator().manual_seed(1)
    out = {"tokens": M, "dtype": "bfloat16", "layers": {}}
    with torch.inference_mode():
        for name, K, N in SMALL_LINEARS if args.small else LINEARS:
            w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
            x = torch.randn(M, K, generator=g).to(device, dtype)
            q, scale = fp8.quantize(w, per_row=True)
            ref = F.linear(x.float(), q.float() * scale[:, None])
            fused = torch.compile(fp8.fp8_linear, fullgraph=True, dynamic=False,  # x's quantization in one kernel
                                  backend="inductor" if device.type == "cuda" else "aot_eager")
            ways = {"bf16": lambda: F.linear(x, w), "scaled_mm": lambda: fp8.fp8_linear(x, q, scale, None, "scaled_mm"),
                    "scaled_mm compiled": lambda: fused(x, q, scale, None, "scaled_mm"),
                    "dequant": lambda: fp8.fp8_linear(x, q, scale, None, "dequant")}
            r = {}
            for way, fn in ways.items():
                try:
                    ms = median_ms(fn, device, args.warmup, args.iters)
                    r[way] = {"ms": ms, "tflops": 2 * M * K * N / ms / 1e9}
                    if way != "bf16":
                        r[way]["rel_err_vs_fp32_reference"] = common.rel_err(fn(), ref)
                except Exception as e:  # noqa: BLE001  e.g. no fp8 matmul on this device
                    r[way] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            for way in ("scaled_mm", "scaled_mm compiled", "dequant"):
                if "ms" in r[way] and "ms" in r["bf16"]:
                    r[way]["speedup_vs_bf16"] = r["bf16"]["ms"] / r[way]["ms"]
            out["layers"][f"{name} {K}->{N}"] = r
    out["auto_takes_scaled_mm"] = fp8.fp8_tensor_cores(device)
    return out


def attention(args, device) -> dict:
    """Every SDPA backend at each family's head shape (on a CPU: math only)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_img = 16 if args.small else 4096
    backends = SDPA_ORDER if device.type == "cuda" else ("MATH",)
    g = torch.Generator().manual_seed(2)
    out = {"image_tokens": n_img, "batch": 2, "dtype": str(dtype).removeprefix("torch."), "order": list(SDPA_ORDER),
           "shapes": {}}
    with torch.inference_mode():
        for name, heads, dh, n_txt in SMALL_ATTENTION if args.small else ATTENTION:
            L = n_img + n_txt
            q, k, v = (torch.randn(2, heads, L, dh, generator=g).to(device, dtype) for _ in range(3))
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            flops = 4 * 2 * heads * L * L * dh  # QK^T and PV
            r = {"heads": heads, "head_dim": dh, "tokens": L}
            for backend in backends:
                def call(b=getattr(SDPBackend, backend)):
                    with sdpa_kernel(b):
                        return F.scaled_dot_product_attention(q, k, v)
                try:
                    ms = median_ms(call, device, args.warmup, args.iters)
                    r[backend] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp32_math": common.rel_err(call(), ref)}
                except RuntimeError as e:  # torch says why this backend cannot run the shape
                    r[backend] = {"error": str(e).splitlines()[0]}
            timed = {b: r[b]["ms"] for b in backends if "ms" in r[b]}
            if timed:
                r["fastest"] = min(timed, key=timed.get)
            out["shapes"][name] = r
    return out


def report(out: dict) -> str:
    lines = [f"device: {out['device']}; torch {out['torch']}"]
    if "mm" in out:
        m = out["mm"]
        lines.append(f"mm {'x'.join(map(str, m['shape']))} {m['dtype']}: {m['ms']:.3f} ms, {m['tflops']:.4g} TFLOP/s"
                     + (f" ({100 * m['fraction_of_datasheet']:.0f}% of the datasheet's {m['datasheet_tflops']:.0f})"
                        if m.get("datasheet_tflops") else " (no datasheet peak for this device)"))
    if "fp8" in out:
        lines.append(f"fp8 Linears, {out['fp8']['tokens']} tokens (auto takes scaled_mm here: "
                     f"{out['fp8']['auto_takes_scaled_mm']}):")
        for layer, r in out["fp8"]["layers"].items():
            cells = [f"{way} " + (f"{c['ms']:.3f} ms {c['tflops']:.4g} TFLOP/s"
                                  + (f" x{c['speedup_vs_bf16']:.2f} err {c['rel_err_vs_fp32_reference']:.1e}"
                                     if "speedup_vs_bf16" in c else "") if "ms" in c else c["error"])
                     for way, c in r.items()]
            lines.append(f"  {layer}: " + "; ".join(cells))
    if "attention" in out:
        a = out["attention"]
        lines.append(f"SDPA, batch 2, {a['image_tokens']} image tokens + text, {a['dtype']} (our order: {', '.join(a['order'])}):")
        for name, r in a["shapes"].items():
            cells = [f"{b} " + (f"{c['ms']:.3f} ms {c['tflops']:.4g} TFLOP/s err {c['rel_err_vs_fp32_math']:.1e}"
                                if "ms" in c else f"unavailable ({c['error'][:80]})")
                     for b, c in r.items() if isinstance(c, dict)]
            lines.append(f"  {name} ({r['heads']} x {r['head_dim']}, {r['tokens']} tokens): " + "; ".join(cells)
                         + (f"; fastest {r['fastest']}" if "fastest" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    out = {"benchmark": "device_rates", **common.environment(device), "small": args.small}
    parts = {"mm": matmul, "fp8": fp8_linears, "attention": attention}
    for part in args.parts.split(","):
        out[part] = parts[part](args, device)
        if args.json:
            common.write_json(args.json, out)
    print(report(out), flush=True)
    return 0


if __name__ == "__main__":
    common.run_main(main)
