# denselora: the twenty-sixth session's decode variants, off until timed: the dense LoRA expand in the decode
#   GEMV's epilogue after a split-K shrink at one token (lora/ops/triton_ops/gemv_lora.py, GEMV_LORA), the dense
#   LoRA sorted path as a split-K shrink + expand from 17 tokens (lora_linear_sorted_split.py, SORTED_SPLIT) and
#   the MoE aligns in one program (fused_moe/ops/moe_align_block_size.py, ONE_LAUNCH).  Their cuda tests (ops,
#   LoRA layers, CUDA graph replay, the align suites); the projection with LoRA, separate vs epilogue
#   (benchmark_gemv_lora.py, ranks 16 / 32, 1-2 tokens), the split pair vs the shipped config
#   (benchmark_lora_linear.py --sorted-split, 32-256 tokens) and the aligns (benchmark_moe_lora_align.py
#   --one-launch), after the decode step with LoRA flipping dense-gemv-lora, dense-lora-sorted-split and
#   moe-align-one-launch at DENSELORA_BATCHES (default 1,64,256; DENSELORA_AB_TIMEOUT, default 240 s), which
#   decides (so it runs right after the tests); DENSELORA_TIMEOUT per kernel benchmark, default 100 s; only
#   when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/lora/test_gemv_lora.py tests/lora/test_dense_lora_gemv.py tests/lora/test_lora_linear_sorted_split.py \
  tests/kernels/test_moe_align_one_launch.py >"$OUT/pytest_denselora.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_denselora.log" | head -20; tail -2 "$OUT/pytest_denselora.log"
rc=$(( rc || prc ))
timeout "${DENSELORA_AB_TIMEOUT:-240}" python3 benchmarks/decode_switch_ab.py --batches ${DENSELORA_BATCHES:-1,64,256} \
  --switches dense-gemv-lora dense-lora-sorted-split moe-align-one-launch --lora-only --out "$OUT/denselora_ab.md" \
  >"$OUT/denselora_ab.log" 2>&1
r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/denselora_ab.md"; rc=$(( rc || r ))
timeout "${DENSELORA_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_gemv_lora.py --ranks 16 32 --tokens 1 2 \
  --reps 50 --out "$OUT/gemv_lora.md" >"$OUT/gemv_lora.log" 2>&1
r=$?; grep "^| \|rror\|off" "$OUT/gemv_lora.log" | tail -30; rc=$(( rc || r ))
timeout "${DENSELORA_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_lora_linear.py --sorted-split --reps 30 \
  --out "$OUT/lora_sorted_split.md" >"$OUT/lora_sorted_split.log" 2>&1
r=$?; grep "^| \|rror" "$OUT/lora_sorted_split.log" | tail -12; rc=$(( rc || r ))
timeout "${DENSELORA_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_moe_lora_align.py --tokens 1 16 64 256 \
  --one-launch --reps 50 --out "$OUT/align_one_launch.md" >"$OUT/align_one_launch.log" 2>&1
r=$?; sed -n '/One program/,$p' "$OUT/align_one_launch.log" | grep "^| \|rror"; rc=$(( rc || r ))
