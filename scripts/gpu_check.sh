#!/usr/bin/env bash
# On a GPU machine: install the package as it comes (scripts/setup.sh: no download, the machine's
# torch/triton/numpy kept), check that the installed package imports from outside the repository, then run
# the named steps, each a file in scripts/gpu_steps/ whose first comment says what it runs and which
# variables it reads.  `all` (the default) runs tests, bench, lora and decode; the other steps run only when
# named.  `bash scripts/gpu_check.sh help` lists every step; an unknown name stops before the setup.
# Logs and tables go to $OUT (default ./out).  Wheels in .whl/ (gitignored; the device tool's carry) are
# installed first, without dependencies.  Usage: bash scripts/gpu_check.sh [STEP ...]
set -uo pipefail
cd "$(dirname "$0")/.."
# the steps in the order they run, whatever the order they are named in
ORDER="tests bench lora decode quant w4dequant verify variants int4swap fusions pdl4bit int4mma mxfp4mma w4flags
pairsplit sidestream densegemv pending moeprof fused tune"
ALL="tests bench lora decode"
steps=${*:-all}
if [[ " $steps " == *" help "* ]]; then
  for s in $ORDER; do sed -n '/^# (sourced by/q; s/^# \{0,1\}//p' "scripts/gpu_steps/$s.sh"; done
  echo "all: $ALL"
  exit 0
fi
for s in $steps; do
  [[ " $(echo $ORDER) all " == *" $s "* ]] || { echo "gpu_check: unknown step '$s'; the steps: $(echo $ORDER) all" \
    "(bash scripts/gpu_check.sh help)" >&2; exit 2; }
done
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bash scripts/setup.sh 2>&1 | tee "$OUT/setup.log" || exit 1
# an offline GPU machine: wheels carried in .whl/ (e.g. llguidance, compressed-tensors) install without deps
if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tee -a "$OUT/setup.log"; fi
(cd /tmp && python3 -c 'import vllm, torch, triton; print("installed vllm at", vllm.__file__, "| torch", torch.__version__, "| triton", triton.__version__)') | tee -a "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
want() { [[ " $steps " == *" $1 "* || ( " $steps " == *" all "* && " $ALL " == *" $1 "* ) ]]; }
pytest() { timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -v --tb=short -rf -p no:cacheprovider "$@"; }
rc=0
for s in $ORDER; do
  if want "$s"; then
    source "scripts/gpu_steps/$s.sh"
  fi
done
exit $rc
