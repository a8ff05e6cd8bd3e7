#!/usr/bin/env bash
# transformers' own GPTQ and AWQ loaders (backend: GPTQModel) reading ptqkit's checkpoints.
# GPTQModel does not install beside the project's pins (7.7 pulls torch 2.14; 7.6 pins numpy 2.2.6),
# so it goes into a venv that sees the system's packages, and only the tests that need it run there.
# Usage: bash tests/interop_gptqmodel.sh [VENV_DIR]   (about 3 minutes to build the venv, 1 to test)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/ptqkit-gptqmodel-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
    # torch pinned so the venv keeps the system's CPU build; no CUDA extensions on a CPU machine
    BUILD_CUDA_EXT=0 "$VENV/bin/pip" install -q gptqmodel==7.6.0 optimum torch==2.13.0
fi
out=$("$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_formats_interop.py \
    -k "transformers_loads_gptq or transformers_loads_awq" -rs 2>&1) || { echo "$out"; exit 1; }
echo "$out"
# a skip here means GPTQModel did not import: that is a failure of this check, not a pass
if grep -q "skipped" <<<"$out"; then echo "GPTQModel tests were skipped in $VENV" >&2; exit 1; fi
