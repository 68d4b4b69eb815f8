"""Every benchmark ends on Ctrl-C with one line, status 130 and no partial result file."""
import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
INTERRUPTED = 130
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def main_block(path: Path) -> ast.If:
    tree = ast.parse(path.read_text())
    return next(node for node in tree.body
                if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_each_benchmark_runs_its_main_through_run_main(path):
    """``run_main`` turns KeyboardInterrupt into one line and status 130; a bare ``main()`` prints a traceback."""
    calls = [ast.unparse(node.func) for node in ast.walk(main_block(path)) if isinstance(node, ast.Call)]
    assert any(call.endswith("run_main") for call in calls), f"{path.name}'s __main__ calls {calls}"


def test_the_benchmarks_are_all_checked():
    assert {p.name for p in SCRIPTS} >= {"latency.py", "memory.py", "kernel_speed.py", "cache_quality.py",
                                         "guidance_compare.py", "gpu_check.py", "regional_compile.py"}


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite run as a background job ignores SIGINT


@pytest.mark.slow
def test_ctrl_c_during_a_benchmark_is_one_line_and_leaves_no_result(tmp_path):
    """A real SIGINT once the first row is printed: exit 130, one line on stderr, no JSON (written only
    complete) and no partial file beside it."""
    args = [sys.executable, str(BENCH / "cache_quality.py"), "--seeds", "0", "--steps", "8",
            "--fbcache", "0", "0.1", "0.2", "0.3", "0.4", "--teacache", "0.1", "0.3", "0.6",
            "--json", str(tmp_path / "cq.json")]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    line = ""
    while "steps skipped" not in line and time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"the benchmark ended before it was interrupted: {proc.stderr.read()}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED
    assert err.strip().splitlines() == ["cache_quality.py: interrupted (Ctrl-C)"], err
    assert list(tmp_path.iterdir()) == []
