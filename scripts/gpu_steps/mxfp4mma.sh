# mxfp4mma: the tensor-core MXFP4 kernel (csrc/capi/mxfp4_mma_moe.cu, sixteenth session): the build, its cuda
#   tests (MXMMA_TESTS), then the MXFP4 layer with VLLM_MXFP4_MMA=0 / 1 (MXMMA_LAYER_MODES,
#   MXMMA_LAYER_TOKENS); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
t=${MMA_TIMEOUT:-240}
timeout "$t" python3 -c 'from vllm.platforms import cuda_lib; assert cuda_lib.library() is not None' \
  >"$OUT/mxfp4_mma_build.log" 2>&1; r=$?; tail -3 "$OUT/mxfp4_mma_build.log"; rc=$(( rc || r ))
pytest ${MXMMA_TESTS:-tests/kernels/test_mxfp4_mma_moe.py tests/layers/test_mxfp4_moe_mma_layer.py} \
  >"$OUT/pytest_mxfp4_mma.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_mxfp4_mma.log" | head -20; tail -4 "$OUT/pytest_mxfp4_mma.log"
rc=$(( rc || prc ))
for m in ${MXMMA_LAYER_MODES:-0 1}; do
  VLLM_MXFP4_MMA=$m timeout "$t" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b 120b \
    --tokens ${MXMMA_LAYER_TOKENS:-1 4 16 64 256} --reps 30 --out "$OUT/mxfp4_layer_mma$m.md" \
    >"$OUT/mxfp4_layer_mma$m.log" 2>&1
  r=$?; echo "== MXFP4 layer, VLLM_MXFP4_MMA=$m"; grep "^| \|FAILED\|rror" "$OUT/mxfp4_layer_mma$m.log" | tail -12
  rc=$(( rc || r ))
done
