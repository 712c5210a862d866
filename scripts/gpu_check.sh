#!/usr/bin/env bash
# On a GPU machine (no install step: torch/triton come with the machine):
# run every test, cuda-marked ones included, then the MoE LoRA benchmark.
# Logs and tables go to $OUT (default ./out).  Usage: bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -rf -p no:cacheprovider --durations=15 ${TESTS:-tests} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/kernels/benchmark_moe_lora.py --out "$OUT/benchmark_moe_lora.md" 2>&1 | tee "$OUT/benchmark.log" | tail -60
  rc=$(( rc || PIPESTATUS[0] ))
fi
exit $rc
