"""benchmarks/gpu_check.py, the prepared GPU run, checked by its dry run: every step on the CPU at
tiny sizes, each ok or skipped with a reason, its results in the JSON, within the dry budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.append(str(BENCH))  # appended: nothing in benchmarks/ may shadow an installed module

import gpu_check  # noqa: E402  (no torch: the driver only starts the steps)

DIFFUSERS_REL = 1e-4  # ours vs diffusers on the same weights, fp32, tiny: max|a - b| / max|b|


def dry_run(tmp_path, *extra):
    """(exit status, gpu_check.json) of a dry run into tmp_path; the test's own PYTHONPATH (the
    checkout, as the brief runs tests) must not reach the steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(tmp_path), *extra],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3 * gpu_check.DRY_BUDGET)
    assert (tmp_path / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "gpu_check.json").read_text())


def latency_cases(result: dict):
    for mode, m in result["modes"].items():
        assert "error" not in m, (mode, m)
        for case, r in m["results"].items():
            yield mode, case, r


def test_mmdit_through_the_link_not_the_root(tmp_path):
    """mmdit (and mmdit.kernels, from the top-level kernels/) from this checkout, with the root
    off sys.path, so that ``import kernels`` is never the checkout's folder."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import checkout; checkout.import_folder(); "
            "import mmdit, mmdit.kernels, mmdit.weights, mmdit.samplers; "
            "print(mmdit.__file__, mmdit.kernels.__file__, mmdit.weights.__file__, any(p == sys.argv[2] for p in sys.path))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(BENCH), str(ROOT)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert [str(Path(f).resolve()) for f in out[:3]] == [
        str(ROOT / "mmdit" / "__init__.py"), str(ROOT / "kernels" / "__init__.py"), str(ROOT / "weights" / "__init__.py")]
    assert out[3] == "False"


def test_only_one_step_the_others_skipped_with_a_reason(tmp_path):
    proc, out = dry_run(tmp_path, "--only", "rates")
    assert proc.returncode == 0, proc.stdout[-3000:]
    names = [s.name for s in gpu_check.plan(True, tmp_path, tmp_path)]
    assert list(out["steps"]) == names
    for name, r in out["steps"].items():
        if name == "rates":
            assert r["status"] == "ok" and r["result"]["mm"]["tflops"] > 0
        else:
            assert r["status"] == "skipped" and r["reason"] == "not in --only"
    assert "[gpu_check] latency flux.1-dev: SKIPPED: not in --only" in proc.stdout


def test_no_cuda_device_without_dry_run(tmp_path):
    if gpu_check.environment(False).get("gpus"):
        pytest.skip("a CUDA device is here")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use --dry-run" in proc.stdout


@pytest.mark.slow  # 80-100 s on 2 cores: every step, a dozen processes
def test_dry_run_every_step(tmp_path):
    proc, out = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    names = [s.name for s in gpu_check.plan(True, tmp_path, tmp_path)]
    assert list(out["steps"]) == names
    has_diffusers = out["environment"]["diffusers"] is not None
    for name, r in out["steps"].items():
        if name.startswith("vs diffusers") and not has_diffusers:
            assert r["status"] == "skipped" and "diffusers is not installed" in r["reason"]
            continue
        if name.startswith("2-GPU"):
            assert r["status"] == "skipped" and r["reason"] == "needs 2 CUDA devices (a dry run has none)"
            continue
        assert r["status"] == "ok", (name, r)
        assert 0 < r["seconds"] <= r["limit_s"] + 15  # a step past its limit is stopped (SIGINT, then SIGKILL)
        assert f"[gpu_check] {name}: ok in" in proc.stdout
    assert out["total_s"] < gpu_check.DRY_BUDGET

    steps = out["steps"]
    for family, f in steps["smoke"]["result"]["families"].items():
        assert f["ok"] and f["sync_free"] and f["inductor"]["copies_for_kernels"] == [], family
        assert all(n > 0 for n in f["inductor"]["kernel_launches"].values()), family
    rates = steps["rates"]["result"]
    assert rates["mm"]["tflops"] > 0 and rates["attention"]["shapes"]
    tests = steps["gpu tests"]["result"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0  # collected without errors
    for preset, _, _ in gpu_check.LATENCY:
        result = steps[f"latency {preset}"]["result"]
        assert result["ours_only"] and set(result["modes"]) >= {"eager"}
        for mode, case, r in latency_cases(result):
            assert r["ours_ms"] > 0 and r["ours_first_ms"] > 0 and r["tflops_ours"] > 0, (preset, mode, case)
    assert "compiled" in steps["latency flux.1-dev"]["result"]["modes"]
    if has_diffusers:
        for preset, _ in gpu_check.VS_DIFFUSERS:
            for mode, case, r in latency_cases(steps[f"vs diffusers {preset}"]["result"]):
                assert r["ours_ms"] > 0 and r["diffusers_ms"] > 0, (preset, mode, case)
                assert r["max_rel_err"] < DIFFUSERS_REL, (preset, mode, case, r["max_rel_err"])
    assert all(r["ms"] > 0 for r in steps["kernels"]["result"]["rows"])
