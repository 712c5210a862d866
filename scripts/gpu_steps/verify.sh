# verify: the cuda tests of the kernels and LoRA paths built without a GPU (int4 GEMVs, MXFP4 GEMV, grammar
#   bitmask kernel, one-pass MoE alignment, LoRA layer set, LoRA mapping buffer) and their benchmarks
#   (int4 --sweep and MXFP4 --variants at 1/16/64 tokens, structured output, align); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
# the not yet GPU-run ones first (2026-12-02: the int4 GEMV files, run first, used up the call's limit;
# test_int4_gemv.py passed, test_int4_gemv_rows.py passed as far as it got)
pytest -m cuda tests/kernels/test_mxfp4_gemv.py tests/structured_output/test_bitmask_kernel.py \
  tests/kernels/test_moe_align_with_lora.py tests/worker tests/engine tests/kernels/test_shipped_tuned_configs.py \
  tests/kernels/test_int4_gemv_rows.py >"$OUT/pytest_verify.log" 2>&1
vrc=$?; tail -15 "$OUT/pytest_verify.log"; rc=$(( rc || vrc ))
timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_int4.py --quick --tokens 1 16 64 --sweep \
  --out "$OUT/verify_int4.md" >"$OUT/verify_int4.log" 2>&1
qrc=$?; grep -v " INFO \|^INFO\|skip {" "$OUT/verify_int4.log" | tail -30; rc=$(( rc || qrc ))
timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --quick --tokens 1 16 64 \
  --variants dot gemv1 gemv2 gemv+split-auto split-auto --out "$OUT/verify_mxfp4.md" >"$OUT/verify_mxfp4.log" 2>&1
mrc=$?; grep -v " INFO \|^INFO" "$OUT/verify_mxfp4.log" | tail -20; rc=$(( rc || mrc ))
timeout 120 python3 benchmarks/benchmark_structured_output.py >"$OUT/verify_structured.log" 2>&1
src=$?; tail -12 "$OUT/verify_structured.log"; rc=$(( rc || src ))
timeout 120 python3 benchmarks/kernels/benchmark_moe_lora_align.py --out "$OUT/verify_align.md" \
  >"$OUT/verify_align.log" 2>&1
arc=$?; tail -20 "$OUT/verify_align.log"; rc=$(( rc || arc ))
