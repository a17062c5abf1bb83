#!/usr/bin/env bash
# Creates ./.venv (once) with the pinned dependencies and builds megamoe._C in place.
# Safe to run again: it only installs what is missing and rebuilds the extension incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.megamoe-deps
want="$(cat requirements.txt)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The CPU build of torch 2.13.0 (a local file on our machines); GPU nodes keep the torch they have.
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
  "$VPY" -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
# Build (or incrementally rebuild) the C++/CUDA extension next to the sources.
MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py -q build_ext --inplace > .venv/build_ext.log 2>&1 || {
  cat .venv/build_ext.log; echo "megamoe: building the extension failed (log above)" >&2; exit 1; }
"$VPY" -m pip install -q --no-build-isolation --no-deps -e . > /dev/null
