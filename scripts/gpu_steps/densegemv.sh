# densegemv: the dense projections' Triton GEMV (ops/dense_gemv.py, twelfth session): its tests, cuBLAS vs GEMV
#   per projection at 1-8 tokens (with the "other reduction" kernel, GEMV_DELAYED, at 1-4), a tile sweep
#   at 1 token, then the decode step up to DENSE_MAX_TOKENS (default 1) at DENSE_BATCHES (default 1,4),
#   with each kernel; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/kernels/test_dense_gemv.py >"$OUT/pytest_densegemv.log" 2>&1
prc=$?; tail -4 "$OUT/pytest_densegemv.log"; rc=$(( rc || prc ))
t=${DENSE_TIMEOUT:-120}
timeout "$t" python3 benchmarks/kernels/benchmark_dense_gemv.py --tokens 1 2 4 8 --reps 50 \
  --out "$OUT/dense_gemv.md" >"$OUT/dense_gemv.log" 2>&1
r=$?; grep "^| \|rror\|off" "$OUT/dense_gemv.log" | tail -30; rc=$(( rc || r ))
timeout "$t" python3 benchmarks/kernels/benchmark_dense_gemv.py --shapes qwen3 mixtral --tokens 1 --sweep \
  --reps 30 --out "$OUT/dense_gemv_sweep.md" >"$OUT/dense_gemv_sweep.log" 2>&1
r=$?; grep "^| \|rror\|off" "$OUT/dense_gemv_sweep.log" | tail -10; rc=$(( rc || r ))
for d in "" --dense-gemv-delayed; do  # the decode step with each GEMV kernel
  timeout "${DECODE_TIMEOUT:-200}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
    --batches ${DENSE_BATCHES:-1,4} --dense-gemv-max-tokens ${DENSE_MAX_TOKENS:-1} $d \
    --out "$OUT/decode_dense_gemv$d.md" >"$OUT/decode_dense_gemv$d.log" 2>&1
  drc=$?; grep "^| [0-9]\|Correct" "$OUT/decode_dense_gemv$d.log"; rc=$(( rc || drc ))
done
