#!/usr/bin/env bash
# Install the package and what its tests need into the current Python.
#
# - CPU machine: torch is installed first, pinned to a CPU build, so that pip never
#   pulls a multi-GB CUDA build; numpy is kept below 2.4, because Triton 3.6's CPU
#   interpreter (used by the kernel tests) fails on numpy 2.4's array-to-scalar rules.
# - GPU machine (a CUDA build of torch is already installed): nothing is downloaded
#   or replaced; the machine's torch, triton and numpy stay. The package is installed
#   without dependencies or build isolation (both would need a package index), and
#   the test/serve dependencies that are missing are listed.
# A second run with nothing changed skips the install (a stamp in the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*"; }

stamp_dir=$("$PY" -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.vllm-moe-lora-setup"
want=$(cat pyproject.toml setup.py scripts/setup.sh | "$PY" -c 'import hashlib, os, sys; print(hashlib.sha256(sys.stdin.buffer.read() + os.getcwd().encode()).hexdigest())')
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import vllm, torch' 2>/dev/null; then
  say "already installed in $stamp_dir (delete $stamp to force a reinstall)"
  exit 0
fi

torch_kind=$("$PY" - <<'PY' 2>/dev/null || echo none
import sys
import torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if not (2, 11) <= v < (2, 14):
    print("none")
else:
    print("cuda" if torch.version.cuda else "cpu")
PY
)

if [ "$torch_kind" = cuda ]; then
  say "CUDA torch found: installing the package alone (no download, the machine's torch/triton/numpy kept)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  "$PY" - <<'PY'
import importlib.metadata as md
import re

missing = []
for req in md.requires("vllm") or []:
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    print("setup: not installed here (their tests skip): " + ", ".join(sorted(set(missing))) +
          " - with network: pip install -e '.[test]'")
PY
else
  if [ "$torch_kind" = none ]; then
    say "installing torch 2.13.0 (CPU build, ~1.8 GB, about a minute)"
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  say "installing the package with its test dependencies (pyproject.toml [test]; about a minute the first time)"
  "$PY" -m pip install -q -e ".[test]" "numpy>=1.26,<2.4"
fi
echo "$want" > "$stamp"
say "done: $("$PY" -c 'import torch, vllm; print("vllm", vllm.__version__, "| torch", torch.__version__)')"
