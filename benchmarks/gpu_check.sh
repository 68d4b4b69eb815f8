#!/usr/bin/env bash
# The prepared run on an offline CUDA machine (one H200: under 8 minutes), or a dry run of it here:
#   bash benchmarks/gpu_check.sh             # on the GPU machine; results in $OUT (else ./out)
#   bash benchmarks/gpu_check.sh --dry-run   # every step on the CPU at tiny sizes, under 2 minutes
# The steps, their time limits and results: benchmarks/gpu_check.py. Nothing comes from the network:
# the wheels in .whl/ (made by `bash benchmarks/gpu_wheels.sh` where there is network; diffusers and
# gguf, pure Python) are installed offline into $GPU_CHECK_SITE (default /tmp/site) first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}

if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
  else
    echo "gpu_check.sh: installing .whl/ failed; the steps that need diffusers will say they were skipped" >&2
  fi
else
  echo "gpu_check.sh: no .whl/ here: the steps that need diffusers will be skipped (bash benchmarks/gpu_wheels.sh makes it)"
fi
exec "$PY" -u benchmarks/gpu_check.py "$@"
