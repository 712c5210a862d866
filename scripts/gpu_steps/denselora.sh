# denselora: two dense LoRA decode variants, off until timed (twenty-sixth session): the expand in the decode
#   GEMV's epilogue after a split-K shrink at one token (lora/ops/triton_ops/gemv_lora.py, GEMV_LORA) and the
#   sorted path as a split-K shrink + expand from 17 tokens (lora_linear_sorted_split.py, SORTED_SPLIT).
#   Their cuda tests (ops, LoRA layers, CUDA graph replay); the projection with LoRA, separate vs epilogue
#   (benchmark_gemv_lora.py, ranks 16 / 32, 1-2 tokens) and the split pair vs the shipped config
#   (benchmark_lora_linear.py --sorted-split, 32-256 tokens); then the decode step with LoRA flipping
#   dense-gemv-lora and dense-lora-sorted-split at DENSELORA_BATCHES (default 1,64,256; DENSELORA_AB_TIMEOUT,
#   default 220 s; DENSELORA_TIMEOUT per kernel benchmark, default 100 s); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/lora/test_gemv_lora.py tests/lora/test_dense_lora_gemv.py tests/lora/test_lora_linear_sorted_split.py \
  >"$OUT/pytest_denselora.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_denselora.log" | head -20; tail -2 "$OUT/pytest_denselora.log"
rc=$(( rc || prc ))
timeout "${DENSELORA_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_gemv_lora.py --ranks 16 32 --tokens 1 2 \
  --reps 50 --out "$OUT/gemv_lora.md" >"$OUT/gemv_lora.log" 2>&1
r=$?; grep "^| \|rror\|off" "$OUT/gemv_lora.log" | tail -30; rc=$(( rc || r ))
timeout "${DENSELORA_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_lora_linear.py --sorted-split --reps 30 \
  --out "$OUT/lora_sorted_split.md" >"$OUT/lora_sorted_split.log" 2>&1
r=$?; grep "^| \|rror" "$OUT/lora_sorted_split.log" | tail -12; rc=$(( rc || r ))
timeout "${DENSELORA_AB_TIMEOUT:-220}" python3 benchmarks/decode_switch_ab.py --batches ${DENSELORA_BATCHES:-1,64,256} \
  --switches dense-gemv-lora dense-lora-sorted-split --lora-only --out "$OUT/denselora_ab.md" \
  >"$OUT/denselora_ab.log" 2>&1
r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/denselora_ab.md"; rc=$(( rc || r ))
