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
step "kernel benchmarks" 180 "$PY" benchmarks/kernels.py --json "$RESULTS/kernels.json"

# ==== latency benchmark: the lead appends it here (budget left: ~100 s) ====
# ==== end of latency benchmark ====

exit $status
