#!/usr/bin/env bash
# Set-up and entry points on a fresh machine:
#   bash run.sh generate --prompt "a red circle on a blue background"   # the main job
#   bash run.sh test                                                    # the test suite
# The first call creates .venv in the checkout (CPU torch 2.13.0, then this project with its
# test extra). Paths you pass (--output, --model, inspect's file, --out) mean what they mean
# in the folder you call it from: only `test` runs inside the checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

venv="$here/.venv"
stamp="$venv/.mmdit-installed"
want="$(sha256sum < "$here/setup.py" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned: a bare torch range in an empty venv pulls a multi-GB CUDA build.
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q -e "$here[test]"
    echo "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"  # as `activate` would
cmd="${1:-}"
shift || true
case "$cmd" in
    test) cd "$here" && exec "$venv/bin/python" -m pytest -q -n 2 tests "$@" ;;  # the 2 cores of CI, one test each
    generate|inspect|quantize|analyze-ma|calibrate-ma|train) exec "$venv/bin/mmdit" "$cmd" "$@" ;;
    *) echo "usage: bash run.sh test [pytest args] | bash run.sh generate|inspect|quantize|analyze-ma|calibrate-ma|train [args]" >&2; exit 2 ;;
esac
