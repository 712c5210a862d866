# gemvlora: the dense LoRA expand in the decode GEMV's epilogue after a split-K shrink (lora/ops/triton_ops/
#   gemv_lora.py, GEMV_LORA off until timed; twenty-sixth session): its cuda tests (op and LoRA layers, CUDA
#   graph replay), the projection with LoRA separate vs epilogue (benchmark_gemv_lora.py, ranks 16 / 32, 1-2
#   tokens), then the decode step with LoRA flipping dense-gemv-lora at GEMVLORA_BATCHES (default 1;
#   GEMVLORA_AB_TIMEOUT, default 200 s); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/lora/test_gemv_lora.py tests/lora/test_dense_lora_gemv.py >"$OUT/pytest_gemvlora.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gemvlora.log" | head -20; tail -2 "$OUT/pytest_gemvlora.log"
rc=$(( rc || prc ))
timeout "${GEMVLORA_TIMEOUT:-120}" python3 benchmarks/kernels/benchmark_gemv_lora.py --ranks 16 32 --tokens 1 2 \
  --reps 50 --out "$OUT/gemv_lora.md" >"$OUT/gemv_lora.log" 2>&1
r=$?; grep "^| \|rror\|off" "$OUT/gemv_lora.log" | tail -30; rc=$(( rc || r ))
timeout "${GEMVLORA_AB_TIMEOUT:-200}" python3 benchmarks/decode_switch_ab.py --batches ${GEMVLORA_BATCHES:-1} \
  --switches dense-gemv-lora --lora-only --out "$OUT/gemvlora_ab.md" >"$OUT/gemvlora_ab.log" 2>&1
r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/gemvlora_ab.md"; rc=$(( rc || r ))
