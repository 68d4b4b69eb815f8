#!/usr/bin/env bash
# One prepared run on an (offline) CUDA machine, under 8 minutes on one GPU (the step limits add to 470 s; 670 s with 2 or more):
#   1. GPU tests: bf16 kernels vs fp32 references, eager and torch.compile (inductor with the
#      Triton kernels inside the graph); the CFG+DG step with no host sync, captured as a CUDA graph
#   2. kernel benchmarks (Triton vs eager / compiled torch references, SD3.5-large and FLUX shapes)
#   3. latency vs diffusers, bf16, full-width SD3.5-large and FLUX.1-dev with random weights at
#      1024x1024: CFG and CFG+DG steps, eager / compiled / compiled with CUDA graphs, seconds per
#      image (28 steps), peak memory, MFU. Each mode's table prints as soon as it is measured, so a
#      step cut by its time limit keeps the modes that finished.
#   4. with 2 or more GPUs: FLUX.1-dev (bf16, 1024x1024) over 2 ranks (torchrun, NCCL), branch and
#      sequence parallel: the step vs one rank, the communication share, the error vs one rank
#      (+ 2 x 100 s; skipped with one GPU)
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

step "gpu tests" 100 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider
step "kernel benchmarks" 60 "$PY" benchmarks/kernel_speed.py --warmup 3 --iters 10 --json "$RESULTS/kernels.json"

# Ours vs diffusers on the same random weights; skipped when diffusers is not installed.
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"; then
  for spec in "sd3.5-large 140" "flux.1-dev 170"; do
    set -- $spec
    step "latency $1" "$2" "$PY" -u benchmarks/latency.py --preset "$1" --resolution 1024 --dtype bf16 \
      --cases cfg,cfg_dg --modes eager,compiled,cudagraphs --warmup 1 --iters 3 --steps 28 \
      --json "$RESULTS/latency_$1.json"
  done
else
  echo "=== latency vs diffusers: SKIPPED (diffusers not installed; ship its wheel in .whl/) ==="
fi

# Several GPUs: branch and sequence parallel on 2 ranks (the NCCL path; the CPU tests use gloo).
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${GPUS:-0}" -ge 2 ]; then
  for mode in branch sequence; do
    step "2-GPU $mode parallel" 100 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
      benchmarks/latency.py --parallel "$mode" --preset flux.1-dev --resolution 1024 --dtype bf16 \
      --cfg 3.5 --warmup 2 --iters 5 --json "$RESULTS/latency_parallel_$mode.json"
  done
else
  echo "=== 2-GPU parallel: SKIPPED ($GPUS GPU) ==="
fi

exit $status
