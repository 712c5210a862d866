# pdl4bit: the int4 / MXFP4 kernels' tests with PDL (PDL_4BIT, on by default since the eighteenth session; the
#   sed that sets it is then a no-op), then benchmark_moe_int4 / _mxfp4 at 1 and 16 tokens; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
sed -i 's/^PDL_4BIT = False/PDL_4BIT = True/' vllm/platforms/pdl.py
pytest tests/kernels/test_int4_gemv.py tests/kernels/test_int4_gemv_rows.py tests/kernels/test_int4_moe_gemm.py \
  tests/kernels/test_mxfp4_gemv.py tests/kernels/test_mxfp4_moe_gemm.py >"$OUT/pytest_pdl4bit.log" 2>&1
prc=$?; tail -4 "$OUT/pytest_pdl4bit.log"; rc=$(( rc || prc ))
timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_int4.py --tokens 1 16 --reps 30 \
  >"$OUT/int4_pdl.log" 2>&1; grep "^| " "$OUT/int4_pdl.log" | tail -8
timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --tokens 1 16 --reps 30 \
  >"$OUT/mxfp4_pdl.log" 2>&1; grep "^| " "$OUT/mxfp4_pdl.log" | tail -8
