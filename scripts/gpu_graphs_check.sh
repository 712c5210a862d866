#!/usr/bin/env bash
# GPU check of CUDA-graph decode, one command (no install step: torch/triton come with the machine):
#   1. the graph tests (tests/worker: graphs vs eager tokens on every tiny architecture and on the
#      demo model with its adapters, swaps, unloads, padding) and the LoRA engine tests, which now
#      decode through graphs by default;
#   2. benchmarks/benchmark_decode.py at --layers 12 for the Qwen3-30B-A3B width.
# Logs and the table go to $OUT (default ./out).  Usage: bash scripts/gpu_graphs_check.sh [tests|bench|all]
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
  timeout "${TEST_TIMEOUT:-210}" python3 -m pytest -q -rf -p no:cacheprovider --durations=10 \
    ${TESTS:-tests/worker tests/entrypoints/test_llm_lora.py} 2>&1 | tee "$OUT/pytest_graphs.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
    --out "$OUT/benchmark_decode.md" >"$OUT/benchmark_decode.log" 2>&1
  brc=$?
  grep -v " INFO \|^INFO" "$OUT/benchmark_decode.log" | tail -40
  grep "CUDA graphs:" "$OUT/benchmark_decode.log" | head -5
  rc=$(( rc || brc ))
fi
exit $rc
