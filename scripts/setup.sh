#!/usr/bin/env bash
# Install the package and what its tests need into the current Python.
# torch is installed first, pinned, so that pip never pulls a multi-GB CUDA
# build on a CPU machine (FACTS.md 7); a machine that already has a torch in
# the supported range keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2, 11) <= v < (2, 14) else 1)' 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
