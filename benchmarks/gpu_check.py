"""One prepared run on an offline CUDA machine that comes back with numbers, in under 8 minutes on
one H200; ``--dry-run`` runs every step on the CPU at tiny sizes (under 2 minutes), as the tests do.

    bash benchmarks/gpu_check.sh                        # the GPU machine: .whl/ installed offline, then this
    python benchmarks/gpu_check.py --dry-run --out out  # any machine

Steps, in this order, each in its own process (its own session: a timeout ends all of it) with a
time limit; a step the remaining budget cannot afford is skipped and named:

  smoke             gpu_smoke.py: a FLUX.1 and an SD3.5 model of two blocks under inductor (the fused
                    Triton kernels inside the generated code, no copies made for them) and CUDA graphs,
                    the eager CFG+DG step under set_sync_debug_mode("error")
  rates             device_rates.py: a bf16 8192^3 matmul, fp8 Linears (scaled_mm vs bf16 vs dequant),
                    each SDPA backend at FLUX's and SD3.5-large's head shapes
  gpu tests         pytest -m gpu tests/ (collects without diffusers; the tests that need it skip)
  latency PRESET    latency.py --ours-only: our model alone, random weights from the preset, 1024x1024
                    bf16, a CFG and a CFG+DG step in the modes of LATENCY (compiled = regional)
  vs diffusers P    latency.py: ours and diffusers on the same weights, eager (needs diffusers)
  kernels           kernel_speed.py: the fused kernels vs torch at FLUX and SD3.5-large shapes
  2-GPU ... parallel  latency.py --parallel branch / sequence over 2 ranks (NCCL), FLUX.1-dev: with 2 GPUs

The one-GPU steps' limits (GPU seconds, below) add to 470 s, the budget (the 2-GPU steps run in what is
left): guesses until a GPU run measures them. Results go to
OUT ($OUT, else ./out): gpu_check.json (each step's status, seconds and results, rewritten
atomically after each step and whenever a running step writes new results), gpu_check.log
(everything printed), inductor_code.txt (the smoke step's generated code). Exit status 1 if a step
failed or timed out, 2 without a CUDA device (use --dry-run), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import checkout  # noqa: E402  (no torch in this process: the steps need the memory)
import results  # noqa: E402

BUDGET = 470  # seconds on an H200 for every step: the run has 8 minutes, start and install included
DRY_BUDGET = 120
# preset, latency.py modes, GPU seconds (model build, compiles, warm-up and 2 cases x 3 timed steps per mode)
LATENCY = [("flux.1-dev", "eager,compiled,cudagraphs", 75), ("sd3.5-large", "eager,compiled,cudagraphs", 60),
           ("flux.2-klein-4b", "eager,compiled", 35), ("qwen-image", "eager", 30), ("flux.2-dev", "eager", 30)]
VS_DIFFUSERS = [("flux.1-dev", 25), ("sd3.5-large", 20)]
# the dry run's models: the presets narrowed to 2 heads of 16, 2 blocks
SMALL = ["--num-layers", "2", "--set", "num_heads=2", "--set", "head_dim=16", "--set", "context_dim=24"]
TINY = {"flux.1-dev": ["--set", "axes_dim=(4,6,6)", "--set", "pooled_dim=20"],
        "sd3.5-large": ["--set", "pos_embed_max_size=16", "--set", "pooled_dim=20"],
        "flux.2-klein-4b": [], "flux.2-dev": [], "qwen-image": ["--set", "axes_dim=(8,4,4)"]}


@dataclasses.dataclass
class Step:
    name: str
    limit: float  # seconds allowed
    argv: list
    json: Path | None = None  # where the step writes its results
    needs: str | None = None  # "diffusers" or "2 gpus": skipped without it


def gpu_test_files() -> list[str]:
    """The test files with GPU-marked tests: collecting only these saves the step seconds of imports."""
    return sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def plan(dry: bool, scratch: Path, out: Path) -> list[Step]:
    """The steps of a real run, or of a dry run (CPU, tiny sizes, the same scripts)."""
    py = [sys.executable, "-u"]
    cpu = ["--device", "cpu"] if dry else []
    steps = [
        Step("smoke", 45 if dry else 60, [*py, "benchmarks/gpu_smoke.py", *cpu, "--json", scratch / "smoke.json",
                                          "--code", out / "inductor_code.txt"] + (["--size", "4", "--text-len", "3"] if dry else []),
             scratch / "smoke.json"),
        Step("rates", 15 if dry else 25, [*py, "benchmarks/device_rates.py", *cpu, "--json", scratch / "rates.json"]
             + (["--small", "--warmup", "1", "--iters", "2"] if dry else []), scratch / "rates.json"),
        Step("gpu tests", 30 if dry else 90, [*py, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-q", "-p",
                                              "no:cacheprovider", "--junitxml", scratch / "gpu_tests.xml"],
             scratch / "gpu_tests.xml"),
    ]
    common_args = (["--device", "cpu", "--dtype", "fp32", "--resolution", "128x96", "--text-len", "5", "--warmup", "0",
                    "--iters", "1", "--backend", "aot_eager", "--mm-size", "64"] if dry else
                   ["--device", "cuda", "--dtype", "bf16", "--resolution", "1024", "--warmup", "1", "--iters", "3"])
    for i, (preset, modes, seconds) in enumerate(LATENCY):
        if dry:  # no CUDA graphs on a CPU; one compiled model is enough to check the path
            modes = "eager,compiled" if i == 0 else "eager"
        steps.append(Step(f"latency {preset}", 15 if dry else seconds,
                          [*py, "benchmarks/latency.py", "--preset", preset, "--ours-only", "--cases", "cfg,cfg_dg",
                           "--modes", modes, *common_args, *(SMALL + TINY[preset] if dry else []),
                           "--json", scratch / f"latency_{preset}.json"], scratch / f"latency_{preset}.json"))
    for preset, seconds in VS_DIFFUSERS:
        steps.append(Step(f"vs diffusers {preset}", 15 if dry else seconds,
                          [*py, "benchmarks/latency.py", "--preset", preset, "--cases", "cfg,cfg_dg", "--modes", "eager",
                           *common_args, *(SMALL + TINY[preset] if dry else []),
                           "--json", scratch / f"vs_diffusers_{preset}.json"],
                          scratch / f"vs_diffusers_{preset}.json", needs="diffusers"))
    steps.append(Step("kernels", 15 if dry else 20, [*py, "benchmarks/kernel_speed.py", "--no-compile", "--json",
                                                     scratch / "kernels.json"]
                      + (["--small", "--warmup", "0", "--iters", "1"] if dry else ["--warmup", "3", "--iters", "10"]),
                      scratch / "kernels.json"))
    for mode in ("branch", "sequence"):  # the NCCL path (the CPU tests use gloo): the step vs one rank
        steps.append(Step(f"2-GPU {mode} parallel", 60, [*py, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc-per-node", "2", "benchmarks/latency.py", "--parallel",
                                                        mode, "--preset", "flux.1-dev", "--resolution", "1024",
                                                        "--dtype", "bf16", "--cfg", "3.5", "--warmup", "2", "--iters", "5",
                                                        "--json", scratch / f"parallel_{mode}.json"],
                          scratch / f"parallel_{mode}.json", needs="2 gpus"))
    for s in steps:
        s.argv = [str(a) for a in s.argv]
    return steps


class Log:
    """Lines to stdout and to a file, as they come."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  closed in close()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
            self.file.write(line if line.endswith("\n") else line + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def environment(dry: bool) -> dict:
    """The machine, without creating a CUDA context here (the steps need the memory)."""
    env = {"python": platform.python_version(), "dry_run": dry,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for name in ("torch", "triton", "diffusers", "transformers", "peft", "gguf"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["gpus"] = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    return env


def pytest_summary(path: Path) -> dict:
    """Counts, the failed tests and the skip reasons from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], Counter()
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            if (e := case.find(tag)) is not None:
                failed.append(f"{name}: {(e.get('message') or '').splitlines()[0][:300] if e.get('message') else tag}")
        if (s := case.find("skipped")) is not None:
            skipped[(s.get("message") or "")[:200]] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": dict(skipped)}


def read_result(step: Step) -> dict | None:
    if step.json is None or not step.json.is_file():
        return None
    try:
        return pytest_summary(step.json) if step.json.suffix == ".xml" else json.loads(step.json.read_text())
    except (ValueError, ET.ParseError, AttributeError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the step's whole session (its results so far stay written), then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, limit: float, env: dict, log: Log, on_result) -> str:
    """Run one step to its end or its limit; -> "ok", "failed (exit status N)" or "timed out"."""
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=lambda: [log("  " + line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    start, seen = time.monotonic(), None
    try:
        while proc.poll() is None:
            if time.monotonic() - start > limit:
                stop(proc)
                status = "timed out"
                break
            time.sleep(0.5)
            stamp = step.json.stat().st_mtime_ns if step.json is not None and step.json.is_file() else None
            if stamp != seen:  # a mode measured: into the summary now, in case the whole run is cut
                seen = stamp
                on_result(read_result(step))
        else:
            status = "ok" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
    except KeyboardInterrupt:
        stop(proc)
        raise
    finally:
        reader.join(timeout=5)
    on_result(read_result(step))
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (a check of the check)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out"), help="results folder ($OUT, else ./out)")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for all steps (default {BUDGET}; dry run {DRY_BUDGET})")
    p.add_argument("--only", default=None, help="comma-separated step names to run (the others are skipped)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (DRY_BUDGET if args.dry_run else BUDGET)
    env = {k: v for k, v in os.environ.items() if k not in ("MMDIT_KERNELS", "TRITON_INTERPRET")}
    # mmdit through a link, never the checkout root on the path: its kernels/ would shadow PyPI's kernels
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(checkout.import_folder()), *inherited])
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        # tiny sizes check the paths, not the CPU's speed: one thread, and scalar C++ from inductor
        # (a cold compile of the smoke step's models takes a third less time than with SIMD)
        env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_VEC_ISA_OK="0")
    log = Log(out / "gpu_check.log")
    summary = {"benchmark": "gpu_check", "environment": environment(args.dry_run), "budget_s": budget, "steps": {}}
    json_path = out / "gpu_check.json"
    log(f"gpu_check{' (dry run: CPU, tiny sizes)' if args.dry_run else ''}: {summary['environment']}")
    if not args.dry_run and not summary["environment"].get("gpus"):
        log("gpu_check: no CUDA device here (nvidia-smi lists none); use --dry-run on a CPU")
        return 2
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    started = time.monotonic()
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        for step in plan(args.dry_run, Path(tmp), out):
            record = summary["steps"][step.name] = {"command": " ".join(step.argv), "limit_s": step.limit}
            left = budget - (time.monotonic() - started)
            reason = None
            if args.only and step.name not in args.only.split(","):
                reason = "not in --only"
            elif step.needs == "diffusers" and not has_diffusers:
                reason = "diffusers is not installed (bash benchmarks/gpu_wheels.sh where there is network; carry .whl)"
            elif step.needs == "2 gpus" and (args.dry_run or len(summary["environment"].get("gpus", [])) < 2):
                reason = ("needs 2 CUDA devices (a dry run has none)" if args.dry_run else
                          f"needs 2 CUDA devices, {len(summary['environment'].get('gpus', []))} here")
            elif left < min(step.limit, 10):
                reason = f"out of time ({left:.0f} s of the {budget:.0f} s budget left)"
            if reason:
                record.update(status="skipped", reason=reason)
                log(f"[gpu_check] {step.name}: SKIPPED: {reason}")
                results.write_json(json_path, summary)
                continue
            limit = min(step.limit, left)
            log(f"[gpu_check] {step.name}: running (limit {limit:.0f} s): {record['command']}")

            def on_result(result, record=record):
                if result is not None:
                    record["result"] = result
                    results.write_json(json_path, summary)
            t0 = time.monotonic()
            status = run_step(step, limit, env, log, on_result)
            record.update(status=status, seconds=round(time.monotonic() - t0, 1))
            failed |= status != "ok"
            log(f"[gpu_check] {step.name}: {status.upper() if status != 'ok' else 'ok'} in {record['seconds']} s "
                f"(limit {limit:.0f} s)")
            results.write_json(json_path, summary)
    summary["total_s"] = round(time.monotonic() - started, 1)
    results.write_json(json_path, summary)
    width = max(len(name) for name in summary["steps"])
    log(f"[gpu_check] done in {summary['total_s']} s of {budget:.0f}; results in {json_path}")
    for name, r in summary["steps"].items():
        log(f"  {name:{width}s}  {r['status']:<28s} {r.get('seconds', '-')}")
    log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    results.run_main(main)
