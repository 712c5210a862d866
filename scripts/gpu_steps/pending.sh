# pending: the switches prepared off until timed, decided in as few calls as possible (twenty-sixth session).
#   PENDING_SWITCHES (default: dense-gemv-lora dense-lora-sorted-split moe-align-one-launch - this session's -
#   and dense-fused-lora moe-lora-sorted-beside moe-lora-side-priority - the twenty-fourth and twenty-fifth's).
#   Three parts, each skipped with its variable at 0: PENDING_PYTEST - their cuda tests (PENDING_TESTS); PENDING_AB -
#   the decode step with LoRA flipping each switch alone (decode_switch_ab.py --lora-only at PENDING_BATCHES,
#   default 1,64,256; PENDING_AB_TIMEOUT default 420 s, ~50 s an engine, one per switch plus one); PENDING_BENCH
#   (default 0) - the kernel tables of this session's three (benchmark_gemv_lora.py, benchmark_lora_linear.py
#   --sorted-split, benchmark_moe_lora_align.py --one-launch; PENDING_BENCH_TIMEOUT each, default 100 s).  Then
#   benchmark_decode.py --flip SWITCH ... times the winners together; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
if [ "${PENDING_PYTEST:-1}" != 0 ]; then
  pytest ${PENDING_TESTS:-tests/lora/test_gemv_lora.py tests/lora/test_dense_lora_gemv.py \
    tests/lora/test_lora_linear_sorted_split.py tests/kernels/test_moe_align_one_launch.py \
    tests/lora/test_moe_lora_side_stream.py tests/lora/test_dense_lora_fused.py tests/lora/test_dense_lora_fused_batch.py \
    tests/lora/test_fused_linear_lora_batch.py} >"$OUT/pytest_pending.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_pending.log" | head -20; tail -2 "$OUT/pytest_pending.log"
  rc=$(( rc || prc ))
fi
if [ "${PENDING_AB:-1}" != 0 ]; then
  timeout "${PENDING_AB_TIMEOUT:-420}" python3 benchmarks/decode_switch_ab.py --batches ${PENDING_BATCHES:-1,64,256} \
    --switches ${PENDING_SWITCHES:-dense-gemv-lora dense-lora-sorted-split moe-align-one-launch dense-fused-lora \
    moe-lora-sorted-beside moe-lora-side-priority} --lora-only --out "$OUT/pending_ab.md" >"$OUT/pending_ab.log" 2>&1
  r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/pending_ab.md"; rc=$(( rc || r ))
fi
if [ "${PENDING_BENCH:-0}" != 0 ]; then
  t=${PENDING_BENCH_TIMEOUT:-100}
  timeout "$t" python3 benchmarks/kernels/benchmark_gemv_lora.py --ranks 16 32 --tokens 1 2 --reps 50 \
    --out "$OUT/gemv_lora.md" >"$OUT/gemv_lora.log" 2>&1
  r=$?; grep "^| \|rror\|off" "$OUT/gemv_lora.log" | tail -30; rc=$(( rc || r ))
  timeout "$t" python3 benchmarks/kernels/benchmark_lora_linear.py --sorted-split --reps 30 \
    --out "$OUT/lora_sorted_split.md" >"$OUT/lora_sorted_split.log" 2>&1
  r=$?; grep "^| \|rror" "$OUT/lora_sorted_split.log" | tail -12; rc=$(( rc || r ))
  timeout "$t" python3 benchmarks/kernels/benchmark_moe_lora_align.py --tokens 1 16 64 256 --one-launch --reps 50 \
    --out "$OUT/align_one_launch.md" >"$OUT/align_one_launch.log" 2>&1
  r=$?; sed -n '/One program/,$p' "$OUT/align_one_launch.log" | grep "^| \|rror"; rc=$(( rc || r ))
fi
