"""Compile every Triton kernel for real GPUs on a machine that has none.

The public ops run forward and backward on CPU tensors at model shapes; each kernel launch
becomes ``JITFunction.warmup`` under a compile-only driver, so Triton specializes, lowers
and runs ptxas exactly as for a CUDA launch (same signature, constexprs and num_warps) and
stops before launching. One JSON line per compiled kernel, with the cubin's registers and
local memory (spills) from cuobjdump. Needs a process without TRITON_INTERPRET:

    python tests/compile_for_gpu.py --arch 80 90
"""
import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.append(str(Path(__file__).resolve().parents[1]))  # mmdit from this checkout unless installed; appended: its kernels/ must not shadow PyPI's

OPS = ("norm_modulate", "gated_residual", "qk_norm_rope")
# (name, D, heads, head_dim, RoPE): the widths the models launch, and an odd one.
SHAPES = [("sd3.5-large", 2432, 38, 64, False), ("flux", 3072, 24, 128, True),
          ("sd3.5-medium", 1536, 24, 64, False), ("odd", 80, 5, 16, True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CompileOnlyDriver:
    """The part of a Triton driver that JITFunction.warmup asks for: a target, no device."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # JITFunction caches per device: one cache per architecture

    def get_current_stream(self, device):
        return 0


class CompileInsteadOfLaunch:
    """Stands in for a kernel in its module: ``kernel[grid](...)`` compiles and records."""

    def __init__(self, fn, records: list):
        self.fn, self.records = fn, records

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            self.records.append((self.fn.__name__, kwargs, kernel))
        return launch


def resource_usage(cubin: bytes) -> dict:
    """{'REG': .., 'LOCAL': .., 'SHARED': ..} of the cubin's one function, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", out)}


def run_ops(D, H, Dh, rope, dtype, N=48, B=3):
    """Forward and backward of each op as a block calls it (strided views, fork rows)."""
    from mmdit.kernels import gated_residual, norm_modulate, qk_norm_rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(dtype).requires_grad_()
    ada = torch.randn(B, 6 * D, generator=g).to(dtype).requires_grad_()  # shift/scale/gate are chunks
    norm_modulate(x, ada[:, :D], ada[:, D:2 * D]).float().sum().backward()
    channels = torch.zeros(D, dtype=torch.bool)
    channels[[1, D - 2]] = True
    for fork in (None, dict(fork_rows=2, channels=channels, rho=torch.tensor([0.0, 0.5]), token_range=(5, N),
                            token_mask=torch.arange(N - 5) % 3 > 0),
                 dict(fork_rows=1, append=False, channels=channels, rho=0.25)):
        gated_residual(x, x * 2, ada[:, 2 * D:3 * D], **(fork or {})).float().sum().backward()
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).to(dtype).requires_grad_()
    q, k, _ = qkv.view(B, N, 3, H, Dh).unbind(2)
    w = torch.ones(Dh, dtype=dtype, requires_grad=True)
    angle = torch.randn(N, Dh // 2, generator=g)
    cos, sin = (angle.cos(), angle.sin()) if rope else (None, None)
    q_out, k_out = qk_norm_rope(q, k, w, w * 2, cos, sin)
    (q_out.float().sum() + k_out.float().sum()).backward()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = p.parse_args(argv)
    if knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

    records = []
    for op in OPS:
        module = importlib.import_module(f"mmdit.kernels.{op}")
        module.use_triton = lambda x: True  # CPU tensors take the Triton path (compile only)
        module.launch = lambda kernel: kernel  # no torch.library wrapper around the stand-in
        for name, obj in vars(module).copy().items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, CompileInsteadOfLaunch(obj, records))

    seen = set()
    for arch in args.arch:
        driver.set_active(CompileOnlyDriver(arch))
        for shape, D, H, Dh, rope in SHAPES:
            for dtype in args.dtypes:
                del records[:]
                run_ops(D, H, Dh, rope, DTYPES[dtype])
                for kernel_name, kwargs, kernel in records:
                    key = (arch, kernel_name, kernel.hash)
                    if key in seen:  # the same specialization again (e.g. q and k)
                        continue
                    seen.add(key)
                    constexprs = {k: v for k, v in kwargs.items() if k != "num_warps"}
                    print(json.dumps(dict(arch=arch, kernel=kernel_name, shape=shape, dtype=dtype,
                                          num_warps=kwargs["num_warps"], constexprs=constexprs,
                                          cubin_bytes=len(kernel.asm["cubin"]),
                                          **resource_usage(kernel.asm["cubin"]))), flush=True)


if __name__ == "__main__":
    main()
