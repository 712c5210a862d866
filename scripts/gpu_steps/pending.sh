# pending: the switches prepared off until timed, decided in as few calls as possible.  Pending now
#   (thirty-sixth session): dense-lora-concat - PENDING_CONCAT_SWEEP=1 PENDING_SWITCHES=dense-lora-concat
#   PENDING_AB_LORA=--lora-only PENDING_BATCHES=256 PENDING_TESTS=tests/lora/test_dense_lora_concat.py
#   (PENDING_CONCAT_SWEEP: benchmark_dense_concat.py --sweep at PENDING_SWEEP_TOKENS, default 256 1024, then the
#   A/B with its fastest tiles: PENDING_AB_SET, decode_switch_ab.py --set flags, set for every engine).
#   PENDING_SWITCHES names the decode switches to time (benchmarks/decode_variants.py TOGGLES), at PENDING_BATCHES
#   1,16,64,256 without and with LoRA, one round; unset or empty, the A/B and the trace parts say so and run
#   nothing.  Three parts, each skipped with its variable at 0:
#   PENDING_PYTEST - their cuda tests (PENDING_TESTS); PENDING_AB - the decode step flipping each switch alone,
#   without and with LoRA (decode_switch_ab.py --lora: switches of the LoRA path only with it; PENDING_AB_LORA=
#   --lora-only: no engine without LoRA; PENDING_ROUNDS, default 1; PENDING_AB_TIMEOUT default 450 s, ~50 s an
#   engine); PENDING_BENCH (default 0) - the kernel table (benchmark_lora_linear.py --sorted-split;
#   PENDING_BENCH_TIMEOUT, default 100 s); PENDING_TRACE (default 0) - Chrome traces of the decode step at
#   PENDING_TRACE_BATCHES (1,64) with every switch off and flipped (profile_decode.py, 4 engines,
#   PENDING_TRACE_TIMEOUT 150 s a side), read by trace_layers.py into $OUT/layers_*.md: per position in a layer the
#   exposed time with the switches against without.  Then benchmark_decode.py --flip SWITCH ... times the winners
#   together; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
if [ "${PENDING_PYTEST:-1}" != 0 ]; then
  pytest ${PENDING_TESTS:-tests/kernels/test_moe_lora_early_ids.py tests/kernels/test_fused_moe_lora.py \
    tests/lora/test_moe_lora_align_beside.py} \
    >"$OUT/pytest_pending.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_pending.log" | head -20; tail -2 "$OUT/pytest_pending.log"
  rc=$(( rc || prc ))
fi
if [ -z "${PENDING_SWITCHES:-}" ] && [ "${PENDING_AB:-1}${PENDING_TRACE:-0}" != 00 ]; then
  echo "== pending: no switch is pending - PENDING_SWITCHES is unset; the A/B and the traces need it, e.g." \
    "PENDING_SWITCHES='fused-kv-write' (benchmarks/decode_variants.py TOGGLES); nothing timed"
fi
if [ "${PENDING_CONCAT_SWEEP:-0}" != 0 ]; then  # the dense concat shrink's tiles, the fastest set for the A/B
  timeout "${PENDING_SWEEP_TIMEOUT:-120}" python3 benchmarks/kernels/benchmark_dense_concat.py --sweep \
    --tokens ${PENDING_SWEEP_TOKENS:-256 1024} --reps 30 --out "$OUT/dense_concat.md" >"$OUT/dense_concat.log" 2>&1
  r=$?; echo "== dense concat sweep (rc $r)"; grep "^| \|rror\|best overall" "$OUT/dense_concat.log" | tail -40
  rc=$(( rc || r ))
  PENDING_AB_SET="${PENDING_AB_SET:-} $(sed -n 's/^best overall: //p' "$OUT/dense_concat.log")"
fi
if [ "${PENDING_AB:-1}" != 0 ] && [ -n "${PENDING_SWITCHES:-}" ]; then
  timeout "${PENDING_AB_TIMEOUT:-450}" python3 benchmarks/decode_switch_ab.py --batches ${PENDING_BATCHES:-1,16,64,256} \
    --switches $PENDING_SWITCHES ${PENDING_AB_LORA:---lora} \
    --rounds ${PENDING_ROUNDS:-1} ${PENDING_AB_SET:-} \
    --out "$OUT/pending_ab.md" >"$OUT/pending_ab.log" 2>&1
  r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/pending_ab.md"; rc=$(( rc || r ))
fi
if [ "${PENDING_BENCH:-0}" != 0 ]; then
  timeout "${PENDING_BENCH_TIMEOUT:-100}" python3 benchmarks/kernels/benchmark_lora_linear.py --sorted-split --reps 30 \
    --out "$OUT/lora_sorted_split.md" >"$OUT/lora_sorted_split.log" 2>&1
  r=$?; grep "^| \|rror" "$OUT/lora_sorted_split.log" | tail -12; rc=$(( rc || r ))
fi
if [ "${PENDING_TRACE:-0}" != 0 ] && [ -n "${PENDING_SWITCHES:-}" ]; then
  flips=""
  for sw in $PENDING_SWITCHES; do
    flips="$flips --flip $sw"
  done
  for side in off on; do
    timeout "${PENDING_TRACE_TIMEOUT:-150}" python3 benchmarks/profile_decode.py --batches ${PENDING_TRACE_BATCHES:-1,64} \
      --modes graphs --steps 2 --trace-dir "/tmp/pending_trace_$side" $( [ "$side" = on ] && echo "$flips" ) \
      --out "$OUT/pending_profile_$side.md" >"$OUT/pending_profile_$side.log" 2>&1
    r=$?; echo "== traces, switches $side (rc $r)"; rc=$(( rc || r ))
  done
  for f in /tmp/pending_trace_on/*.json; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .json)
    python3 benchmarks/trace_layers.py "$f" --base "/tmp/pending_trace_off/$name.json" --out "$OUT/layers_$name.md" \
      | head -3
  done
fi
