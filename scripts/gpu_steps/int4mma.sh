# int4mma: the tensor-core int4 kernel (csrc/capi/int4_mma_moe.cu, fifteenth session): builds the CUDA C++
#   library, its cuda tests (kernel and MarlinExperts layer with VLLM_INT4_MMA=1), the per-GEMM
#   benchmark against the Triton int4 kernels, kernel variants (MMA_FLAG_VARIANTS: comma-separated nvcc
#   flags, e.g. -DINT4_MMA_STAGES=3,-DINT4_MMA_LDSM=0,-DW4_WARPS=4; MMA_VARIANT_SWEEP=1: each with the split /
#   stage sweep; MMA_VARIANT_TESTS=1: the cuda tests under each first), then the int4 layer without and with it
#   (MMA_ARGS: shapes and tokens, MMA_TIMEOUT per run); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
t=${MMA_TIMEOUT:-240}
timeout "$t" python3 -c 'from vllm.platforms import cuda_lib; assert cuda_lib.library() is not None' \
  >"$OUT/int4_mma_build.log" 2>&1; r=$?; tail -3 "$OUT/int4_mma_build.log"; rc=$(( rc || r ))
pytest tests/kernels/test_int4_mma_moe.py tests/quantization/test_int4_moe_mma_layer.py \
  >"$OUT/pytest_int4_mma.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_int4_mma.log" | head -20; tail -4 "$OUT/pytest_int4_mma.log"
rc=$(( rc || prc ))
timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py ${MMA_ARGS:---tokens 1 4 16 64} --reps 50 \
  --out "$OUT/int4_mma.md" >"$OUT/int4_mma.log" 2>&1
r=$?; grep "^| \|FAILED\|rror" "$OUT/int4_mma.log" | tail -20; rc=$(( rc || r ))
IFS=',' read -ra variants <<< "${MMA_FLAG_VARIANTS:-}"  # kernel variants, e.g. -DINT4_MMA_STAGES=3,-DINT4_MMA_LDSM=0
for i in "${!variants[@]}"; do  # each builds its own library (VLLM_CSRC_FLAGS is part of the cache key)
  if [ "${MMA_VARIANT_TESTS:-0}" != 0 ]; then
    VLLM_CSRC_FLAGS="${variants[$i]}" pytest tests/kernels/test_int4_mma_moe.py tests/kernels/test_mxfp4_mma_moe.py \
      >"$OUT/pytest_int4_mma_variant$i.log" 2>&1
    prc=$?; echo "== variant ${variants[$i]}: cuda tests"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_int4_mma_variant$i.log" \
      | head -10; tail -2 "$OUT/pytest_int4_mma_variant$i.log"; rc=$(( rc || prc ))
  fi
  VLLM_CSRC_FLAGS="${variants[$i]}" timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py \
    ${MMA_ARGS:---tokens 1 4 16 64} $( [ "${MMA_VARIANT_SWEEP:-0}" != 0 ] || echo --no-sweep ) --reps 50 \
    --out "$OUT/int4_mma_variant$i.md" \
    >"$OUT/int4_mma_variant$i.log" 2>&1
  r=$?; echo "== variant ${variants[$i]}"; grep "^| \|FAILED\|rror" "$OUT/int4_mma_variant$i.log" | tail -12
  rc=$(( rc || r ))
done
for m in 0 1; do
  VLLM_INT4_MMA=$m timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
    --tokens ${MMA_LAYER_TOKENS:-1 4 16 64} --reps 30 --out "$OUT/int4_layer_mma$m.md" \
    >"$OUT/int4_layer_mma$m.log" 2>&1
  r=$?; echo "== int4 layer, VLLM_INT4_MMA=$m"; grep "^| \|FAILED\|rror" "$OUT/int4_layer_mma$m.log" | tail -12
  rc=$(( rc || r ))
done
