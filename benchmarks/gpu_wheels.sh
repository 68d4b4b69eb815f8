#!/usr/bin/env bash
# Run where pip can reach an index (a development machine), before a GPU run: puts the pure-Python
# wheels the GPU machine lacks (diffusers 0.42.1, gguf; no dependencies: the machine has torch,
# transformers, numpy, safetensors, huggingface_hub) into the git-ignored .whl/ of this checkout.
# The device run carries .whl/ (run's `carry`), and gpu_check.sh installs it there offline.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --dest .whl "diffusers==0.42.1" "gguf>=0.19"
ls -l .whl
