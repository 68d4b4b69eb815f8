"""Fused Triton kernels vs the eager torch reference and torch.compile of the reference.

    python benchmarks/kernel_speed.py                      # SD3.5-large and FLUX shapes, bf16, CUDA
    python benchmarks/kernel_speed.py --small --no-compile # CPU smoke test (Triton interpreter)

For each kernel, shape and pass (fwd, fwd+bwd): the median time over --iters runs after
--warmup runs (CUDA synchronized), GB/s = bytes the pass must move / time, and the speed-up
of the Triton kernel over each peer. ``--json PATH`` writes every row.
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")
import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import common  # noqa: E402
from mmdit.kernels import gated_residual, norm_modulate, qk_norm_rope  # noqa: E402
from mmdit.kernels.gated_residual import gated_residual_reference  # noqa: E402
from mmdit.kernels.norm_modulate import norm_modulate_reference  # noqa: E402
from mmdit.kernels.qk_norm_rope import qk_norm_rope_reference  # noqa: E402


@dataclass
class Shape:
    name: str
    B: int
    N: int
    D: int
    H: int
    Dh: int
    rope: bool  # FLUX rotates q/k (interleaved RoPE); SD3.x does not


SHAPES = {
    "sd3.5-large": Shape("sd3.5-large", B=3, N=4608, D=2432, H=38, Dh=64, rope=False),
    "flux": Shape("flux", B=3, N=4608, D=3072, H=24, Dh=128, rope=True),
    "small": Shape("small", B=2, N=17, D=40, H=2, Dh=8, rope=True),
}


@dataclass
class Case:
    """fn(*inputs) for each impl; ``fwd_bytes`` / ``bwd_bytes``: minimal HBM traffic."""
    kernel: str
    impls: dict
    inputs: list
    fwd_bytes: int
    bwd_bytes: int


def cases(s: Shape, dtype, device, compiled):
    e = torch.tensor([], dtype=dtype).element_size()
    rand = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    BND = s.B * s.N * s.D
    mod = rand(s.B, 6 * s.D)  # adaLN output: shift/scale/gate are strided chunks of it
    shift, scale, gate = mod[:, :s.D], mod[:, s.D:2 * s.D], mod[:, 2 * s.D:3 * s.D]
    channels = torch.zeros(s.D, dtype=torch.bool, device=device)
    channels[[1, s.D // 2]] = True
    fork = dict(fork_rows=1, channels=channels, rho=0.0)  # the last row forks
    angle = torch.randn(s.N, s.Dh // 2, device=device)
    cos, sin = (angle.cos(), angle.sin()) if s.rope else (None, None)

    def qk(fn):
        def run(qkv, qw, kw):
            q, k, _ = qkv.view(s.B, s.N, 3, s.H, s.Dh).unbind(2)
            return fn(q, k, qw, kw, cos, sin)
        return run

    def with_fork(fn):
        return lambda x, y, g: fn(x, y, g, **fork)

    def impls(triton_fn, ref_fn):
        out = {"triton": triton_fn, "eager": ref_fn}
        if compiled is not None:
            out["compiled"] = compiled(ref_fn)
        return out

    qkv_elems = s.B * s.N * s.H * s.Dh
    rope_bytes = 2 * s.N * s.Dh // 2 * 4 if s.rope else 0
    return [
        Case("norm_modulate", impls(norm_modulate, norm_modulate_reference), [rand(s.B, s.N, s.D), shift, scale],
             fwd_bytes=2 * BND * e, bwd_bytes=3 * BND * e),
        Case("gated_residual", impls(gated_residual, gated_residual_reference),
             [rand(s.B, s.N, s.D), rand(s.B, s.N, s.D), gate], fwd_bytes=3 * BND * e, bwd_bytes=4 * BND * e),
        Case("gated_residual+fork", impls(with_fork(gated_residual), with_fork(gated_residual_reference)),
             [rand(s.B, s.N, s.D), rand(s.B, s.N, s.D), gate],  # one forked row: +N*D written / read back
             fwd_bytes=(3 * BND + BND // s.B) * e, bwd_bytes=(4 * BND + BND // s.B) * e),
        Case("qk_norm_rope" if s.rope else "qk_norm", impls(qk(qk_norm_rope), qk(qk_norm_rope_reference)),
             [rand(s.B, s.N, 3 * s.H * s.Dh), 1 + 0.1 * rand(s.Dh), 1 + 0.1 * rand(s.Dh)],
             fwd_bytes=4 * qkv_elems * e + rope_bytes, bwd_bytes=6 * qkv_elems * e + rope_bytes),
    ]


def median_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    common.synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def passes(fn, inputs, backward):
    """{'fwd': closure, 'fwd+bwd': closure}: the forward under no_grad, then with a backward."""
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    out = {"fwd": fwd}
    if backward:
        leaves = [t.detach().requires_grad_() for t in inputs]
        grads_out = [torch.randn_like(o) for o in _as_tuple(fn(*leaves))]  # also warms the graph up

        def fwd_bwd():
            torch.autograd.grad(_as_tuple(fn(*leaves)), leaves, grads_out)

        out["fwd+bwd"] = fwd_bwd
    return out


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                   help="default: sd3.5-large flux (small with --small)")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    os.environ["MMDIT_KERNELS"] = "triton"  # the public ops take the Triton path, even on CPU

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (["small"] if args.small or device.type == "cpu" else ["sd3.5-large", "flux"])
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 2)
    dtype = common.DTYPES[args.dtype]
    compiled = None if args.no_compile else (lambda fn: torch.compile(fn, dynamic=False))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | median of {iters} after {warmup} warm-up")

    rows = []
    meta = dict(device=name, torch=torch.__version__, dtype=args.dtype, warmup=warmup, iters=iters)
    header = f"{'shape':<12} {'kernel':<20} {'pass':<8} " + " ".join(f"{k:>20}" for k in ("triton", "eager", "compiled"))
    print(header + "   eager/triton  compiled/triton")
    # Every forward first, then fwd+bwd: a run cut short by a time limit keeps the main numbers.
    for pass_name in (["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]):
        for shape in shapes:
            torch.manual_seed(0)
            for case in cases(SHAPES[shape], dtype, device, compiled):
                nbytes = case.fwd_bytes + (case.bwd_bytes if pass_name == "fwd+bwd" else 0)
                ms = {}
                for impl, fn in case.impls.items():
                    ms[impl] = median_ms(passes(fn, case.inputs, pass_name != "fwd")[pass_name], device, warmup, iters)
                    rows.append({"shape": shape, "kernel": case.kernel, "pass": pass_name, "impl": impl,
                                 "ms": ms[impl], "GB/s": nbytes / ms[impl] / 1e6, "bytes": nbytes})
                cells = " ".join(f"{ms[k]:>8.3f} ms {nbytes / ms[k] / 1e6:>6.4g} GB/s" if k in ms else f"{'-':>20}"
                                 for k in ("triton", "eager", "compiled"))
                ratios = "  ".join(f"{ms[k] / ms['triton']:>13.2f}x" if k in ms else f"{'-':>14}"
                                   for k in ("eager", "compiled"))
                print(f"{shape:<12} {case.kernel:<20} {pass_name:<8} {cells} {ratios}", flush=True)
                if args.json:  # rewritten after each row, so a timeout still leaves the rows so far
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    if args.json:
        print(f"wrote {args.json}")

if __name__ == "__main__":
    common.run_main(main)
