#!/usr/bin/env bash
# Set up and run the test suite.  Without a GPU, Triton kernels run in the
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and `cuda` tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
echo "test: running pytest (about an hour on 2 CPU cores: ~4000 tests, Triton kernels in its CPU interpreter)"
exec "$PY" -m pytest -q -p no:cacheprovider "$@" tests
