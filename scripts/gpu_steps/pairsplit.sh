# pairsplit: the MoE LoRA small-batch path in two launches (fused_moe_lora.PAIR_KERNEL 2, eighteenth session; on by
#   default at Mixtral-8x7B's widths since the nineteenth):
#   its cuda tests, then benchmark_moe_lora.py (PAIRSPLIT_SHAPES, default mixtral; PAIRSPLIT_TOKENS) with
#   --pair-kernel 0 / 2 / 2 at K ranges of 1024; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/kernels/test_moe_lora_split.py tests/kernels/test_moe_lora_pair_prefetch.py \
  tests/kernels/test_fused_moe_lora.py >"$OUT/pytest_pairsplit.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_pairsplit.log" | head -20; tail -2 "$OUT/pytest_pairsplit.log"
rc=$(( rc || prc ))
for v in "0" "2" "2 --pair-split-width 1024"; do
  timeout "${PAIRSPLIT_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_lora.py --shapes ${PAIRSPLIT_SHAPES:-mixtral} \
    --tokens ${PAIRSPLIT_TOKENS:-1 2 4 8 16} --pair-kernel $v >"$OUT/pairsplit_${v// /_}.log" 2>&1
  echo "== --pair-kernel $v"; grep "^| \|rror" "$OUT/pairsplit_${v// /_}.log" | tail -8
done
for v in 0 2; do  # the int4 Mixtral layer's LoRA takes the same path
  timeout "${PAIRSPLIT_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes mixtral --tokens 1 16 \
    --reps 30 --pair-kernel $v >"$OUT/pairsplit_int4_$v.log" 2>&1
  echo "== int4, --pair-kernel $v"; grep "^| \|rror" "$OUT/pairsplit_int4_$v.log" | tail -3
done
