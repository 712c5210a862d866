#!/usr/bin/env bash
# On a GPU machine (no install step: torch/triton come with the machine):
# run every test, cuda-marked ones included, then the MoE LoRA benchmark.
# With 2+ GPUs the tensor-parallel tests (tests/distributed) run beside the rest.
# Logs and tables go to $OUT (default ./out).  Usage: bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
what=${1:-all}
limit=${TEST_TIMEOUT:-540}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
pytest() { timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@"; }
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  ngpu=$(nvidia-smi -L | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    (pytest tests/distributed >"$OUT/pytest_tp.log" 2>&1; echo "exit $?" >>"$OUT/pytest_tp.log") &
    pytest --durations=15 tests --ignore=tests/distributed 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
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
