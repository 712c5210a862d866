# w4dequant: the 4-bit dequant path's expansion from the tensor-core words (ops/w4_mma_dequant.py, twentieth
#   session): its cuda tests (both decode orders), then benchmark_w4_dequant.py per order, tile and warps
#   (the "words" order, the default since the twenty-first session); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${W4DQ_TIMEOUT:-300}" python3 -m pytest -q tests/kernels/test_float_round.py tests/kernels/test_int4_mma_moe.py \
  tests/kernels/test_mxfp4_mma_moe.py -k "dequantize or rounding or block_m" >"$OUT/pytest_w4dequant.log" 2>&1
trc=$?; tail -3 "$OUT/pytest_w4dequant.log"; rc=$(( rc || trc ))
timeout "${W4DQ_TIMEOUT:-300}" python3 benchmarks/kernels/benchmark_w4_dequant.py --reps 10 --warps 4 \
  >"$OUT/benchmark_w4_dequant.md" 2>&1
brc=$?; cat "$OUT/benchmark_w4_dequant.md"; rc=$(( rc || brc ))
