# int4swap: the int4 GEMM with the operands swapped (UNPACK 4, eleventh session): its cuda tests, the int4 GEMM
#   per unpacking mode at the heuristic's tiles (--sweep-variants-only), then the layer with the decode
#   tiles on UNPACK 3 and on 4 (SWAP_ARGS: shapes and tokens, SWAP_TIMEOUT per run); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/kernels/test_int4_moe_gemm.py >"$OUT/pytest_int4swap.log" 2>&1
src=$?; tail -4 "$OUT/pytest_int4swap.log"; rc=$(( rc || src ))
t=${SWAP_TIMEOUT:-150}
timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --sweep --sweep-variants-only \
  ${SWAP_ARGS:---shapes qwen3 mixtral --tokens 16 64 256} --reps 30 --out "$OUT/int4swap_variants.md" \
  >"$OUT/int4swap_variants.log" 2>&1
r=$?; grep "^| \|Error\|error" "$OUT/int4swap_variants.log" | tail -16; rc=$(( rc || r ))
for u in 4 3; do
  timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --decode-unpack $u \
    ${SWAP_ARGS:---shapes qwen3 mixtral --tokens 16 64 256} --reps 30 --out "$OUT/int4swap_layer_$u.md" \
    >"$OUT/int4swap_layer_$u.log" 2>&1
  r=$?; grep "tokens:\|Error\|error" "$OUT/int4swap_layer_$u.log" | tail -8; rc=$(( rc || r ))
done
