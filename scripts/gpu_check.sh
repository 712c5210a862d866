#!/usr/bin/env bash
# On a GPU machine: install the package as it comes (scripts/setup.sh: no download, the
# machine's torch/triton/numpy kept), check that the installed package imports from
# outside the repository, then run every test, cuda-marked ones included, and the MoE
# LoRA benchmark. With 2+ GPUs the tensor-parallel tests (tests/distributed) run beside the rest.
# Logs and tables go to $OUT (default ./out).
# Usage: bash scripts/gpu_check.sh [tests|bench|all]   (TESTS="path ..." picks a part of the suite)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
limit=${TEST_TIMEOUT:-540}
bash scripts/setup.sh 2>&1 | tee "$OUT/setup.log" || exit 1
(cd /tmp && python3 -c 'import vllm, torch, triton; print("installed vllm at", vllm.__file__, "| torch", torch.__version__, "| triton", triton.__version__)') | tee -a "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
pytest() { timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@"; }
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  ngpu=$(nvidia-smi -L | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    (pytest tests/distributed >"$OUT/pytest_tp.log" 2>&1; echo "exit $?" >>"$OUT/pytest_tp.log") &
    pytest --durations=15 ${TESTS:-tests} --ignore=tests/distributed 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
    rc=${PIPESTATUS[0]}
    wait
    echo "== tensor parallel ($ngpu GPUs) =="; tail -25 "$OUT/pytest_tp.log"
    grep -q "^exit 0" "$OUT/pytest_tp.log" || rc=1
  else
    pytest --durations=15 ${TESTS:-tests} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
    rc=${PIPESTATUS[0]}
  fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/kernels/benchmark_moe_lora.py --out "$OUT/benchmark_moe_lora.md" 2>&1 | tee "$OUT/benchmark.log" | tail -60
  rc=$(( rc || PIPESTATUS[0] ))
fi
exit $rc
