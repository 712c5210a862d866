#!/usr/bin/env bash
# GPU check of the fused decode kernels (issue 10), one command, inside ~8 minutes on an H200:
#   1. pytest: the CUDA tests of the fused RMSNorm / q-k-norm + rotary / router kernels and the
#      split-context decode attention, every architecture with the fused kernels vs its torch path,
#      the graph tests (graphs vs eager tokens), the model parity tests against transformers;
#   2. benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 (the issue's table);
#   3. benchmarks/profile_decode.py at batch 1 and 64 (eager and graphs, with and without LoRA).
# Logs and tables go to $OUT (default ./out).  Usage: bash scripts/gpu_decode_check.sh [tests|bench|profile|all]
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
  timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q -rf -p no:cacheprovider --durations=10 \
    ${TESTS:-tests/kernels/test_rms_norm.py tests/kernels/test_qk_norm_rope.py tests/unit/test_fused_topk.py \
             tests/unit/test_paged_attention_triton.py tests/models/test_fused_ops_models.py \
             tests/models/test_model_parity.py tests/worker/test_cuda_graphs.py} \
    2>&1 | tee "$OUT/pytest_decode.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
    --out "$OUT/benchmark_decode.md" >"$OUT/benchmark_decode.log" 2>&1
  brc=$?
  grep -v " INFO \|^INFO" "$OUT/benchmark_decode.log" | tail -20
  rc=$(( rc || brc ))
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
  timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
    --batches 1,64 --steps 4 --top 20 --out "$OUT/profile_decode.md" >"$OUT/profile_decode.log" 2>&1
  prc=$?
  grep "ops/step" "$OUT/profile_decode.log"
  rc=$(( rc || prc ))
fi
exit $rc
