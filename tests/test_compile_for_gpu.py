"""Every Triton kernel compiles for sm_80 and sm_90 through ptxas, in the configurations the
ops launch at model widths, without spilling registers; no GPU needed. The interpreter tests
check the numbers; this checks that the same code is valid for the real compiler."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles, several processes or subprocesses

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
KERNELS = {f"_{op}_{way}_kernel" for op in ("norm_modulate", "gated_residual", "qk_norm_rope") for way in ("fwd", "bwd")}
ARCHS = (80, 90)


def test_kernels_compile_for_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMDIT_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: ptxas really runs
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for arch in ARCHS]  # one per core
    rows = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines()]

    for arch in ARCHS:
        for dtype in ("bf16", "fp16", "fp32"):
            got = {r["kernel"] for r in rows if r["arch"] == arch and r["dtype"] == dtype}
            assert got == KERNELS, (arch, dtype, sorted(KERNELS - got))
        for kernel, flag in (("_gated_residual_fwd_kernel", "FORK"), ("_qk_norm_rope_bwd_kernel", "ROPE")):
            both = {r["constexprs"][flag] for r in rows if r["arch"] == arch and r["kernel"] == kernel}
            assert both == {False, True}, (arch, kernel, flag)
        widths = {r["constexprs"]["BLOCK_D"] for r in rows if r["arch"] == arch and r["kernel"] == "_norm_modulate_fwd_kernel"}
        assert widths == {128, 2048, 4096}, widths  # D = 80, 1536, 2432 and 3072

    spilled = [(r["arch"], r["kernel"], r["dtype"], r["constexprs"]) for r in rows if r["LOCAL"] > 0]
    assert not spilled, f"register spills to local memory: {spilled}"
    assert all(r["cubin_bytes"] > 0 and 0 < r["REG"] <= 255 for r in rows)
