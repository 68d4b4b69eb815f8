#!/usr/bin/env bash
# One prepared run on an (offline) CUDA machine, under 8 minutes:
#   1. GPU tests (bf16 kernels vs fp32 references, eager and torch.compile)
#   2. kernel benchmarks (Triton vs eager / compiled torch references, SD3.5-large and FLUX shapes)
#   3. the latency benchmark (appended by the lead; see the marked place below)
# Installs nothing from the network: only wheels shipped in .whl/, if any.
# Results go to $OUT (or ./out). Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-out}
mkdir -p "$RESULTS"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # mmdit from this checkout
unset MMDIT_KERNELS TRITON_INTERPRET     # CUDA tensors take the compiled Triton path

"$PY" - <<'EOF'
import torch, triton
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"GPU: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}", flush=True)
EOF

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, note failures, carry on
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  [ "$rc" -eq 0 ] || status=1
}

step "gpu tests" 180 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider
step "kernel benchmarks" 180 "$PY" benchmarks/kernel_speed.py --json "$RESULTS/kernels.json"

# ==== latency benchmark: the lead appends it here (budget left: ~100 s) ====
# Ours vs diffusers on the same random weights: SD3.5-medium, SD3.5-large, FLUX.1-dev at full
# width and depth, 1024x1024, bf16; forward, CFG step, CFG+DG step; TFLOP/s and MFU. One process
# for the three (one torch/diffusers import). If it runs out of time, the last preset is cut:
# add "--num-layers N" (printed in its header line). Skipped when diffusers is not installed.
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"; then
  step "latency vs diffusers" 100 "$PY" -u - "$RESULTS" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
import latency
for preset in ("sd3.5-medium", "sd3.5-large", "flux.1-dev"):
    latency.main(["--preset", preset, "--resolution", "1024", "--dtype", "bf16", "--warmup", "1",
                  "--iters", "3", "--json", f"{sys.argv[1]}/latency_{preset}.json"])
    print(flush=True)
PYEOF
else
  echo "=== latency vs diffusers: SKIPPED (diffusers not installed; ship its wheel in .whl/) ==="
fi
# ==== end of latency benchmark ====

exit $status
