# w4flags: variants of the 4-bit tensor-core kernels built with VLLM_CSRC_FLAGS: W4_FLAGS holds them separated by
#   ';' (e.g. "-DW4_SKIP_PAD=0;-DW4_SKIP_PAD=2 -DW4_INT4_FOLD=1"); per variant its build and the kernel
#   and layer tests of both formats (W4_TESTS=0: none), then per GEMM and per layer (W4_LAYERS=0: GEMMs
#   only) for the default build (W4_BASE=0: not) and each variant, at W4_TOKENS (default 64 256)
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
t=${MMA_TIMEOUT:-240}
IFS=';' read -ra w4variants <<< "${W4_FLAGS:-}"
if [ "${W4_TESTS:-1}" = 1 ]; then
  for i in "${!w4variants[@]}"; do
    f="${w4variants[$i]}"
    (export VLLM_CSRC_FLAGS="$f"; pytest tests/kernels/test_int4_mma_moe.py tests/kernels/test_mxfp4_mma_moe.py \
      tests/quantization/test_int4_moe_mma_layer.py tests/layers/test_mxfp4_moe_mma_layer.py >"$OUT/pytest_w4flags_$i.log" 2>&1)
    prc=$?; echo "== tests with $f"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_w4flags_$i.log" | head -20
    tail -2 "$OUT/pytest_w4flags_$i.log"; rc=$(( rc || prc ))
  done
fi
[ "${W4_BASE:-1}" = 1 ] && w4runs=("base" "${!w4variants[@]}") || w4runs=("${!w4variants[@]}")
for v in "${w4runs[@]}"; do
  f=""; [ "$v" = base ] || f="${w4variants[$v]}"
  VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py --tokens ${W4_TOKENS:-64 256} \
    --no-sweep --reps 50 --out "$OUT/w4_int4_gemm_$v.md" >"$OUT/w4_int4_gemm_$v.log" 2>&1
  VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_mxfp4_mma.py --tokens ${W4_TOKENS:-64 256} \
    --no-sweep --reps 50 --out "$OUT/w4_mx_gemm_$v.md" >"$OUT/w4_mx_gemm_$v.log" 2>&1
  if [ "${W4_LAYERS:-1}" = 1 ]; then
    VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
      --tokens ${W4_TOKENS:-64 256} --reps 30 --out "$OUT/w4_int4_layer_$v.md" >"$OUT/w4_int4_layer_$v.log" 2>&1
    VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b 120b \
      --tokens ${W4_TOKENS:-64 256} --reps 30 --out "$OUT/w4_mx_layer_$v.md" >"$OUT/w4_mx_layer_$v.log" 2>&1
  fi
  echo "== $v (${f:-default build})"
  grep -h "^| [QMg]\|FAILED\|rror" "$OUT"/w4_*_"$v".log | tail -24
done
