# sidestream: the MoE LoRA deltas in fp32 buffers on a side stream beside the base GEMMs (experts/lora_overlap.py,
#   on by default since the twenty-third session; the buffers overwritten by the per-pair kernels since the
#   twenty-fourth) and the dense one (lora/layers/dense_overlap.py, off: timed slower): their cuda tests and
#   the engine's CUDA-graph tests, then the layer per SIDE_VARIANTS ('|'-separated benchmark flags, e.g.
#   --lora-side-stream 0 / 1, the default),
#   at SIDE_TOKENS, benchmark_moe_int4.py and _mxfp4.py
#   --lora-deltas 0 / 1 (MarlinExperts, UnfusedOAITritonExperts; on since the twenty-fourth session) and
#   decode_switch_ab.py flipping SIDE_SWITCHES (e.g. dense-fused-lora), with
#   LoRA (SIDE_BATCHES, SIDE_AB_TIMEOUT: default 250 s; ~50 s an engine, two per switch plus two; SIDE_AB_MODE
#   --lora-only: the LoRA engines alone, for switches of the LoRA path); SIDE_TIMEOUT
#   per layer benchmark (default 150 s), SIDE_4BIT=0 skips the 4-bit ones; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/lora/test_moe_lora_side_stream.py tests/kernels/test_moe_lora_overwrite.py \
  tests/lora/test_dense_lora_side_stream.py tests/lora/test_mxfp4_moe_lora.py \
  tests/quantization/test_int4_moe_lora.py tests/worker/test_cuda_graphs.py \
  tests/worker/test_lora_graph_layer_set.py tests/lora/test_fused_linear_lora_batch.py \
  tests/lora/test_dense_lora_fused_batch.py tests/lora/test_dense_lora_fused.py \
  >"$OUT/sidestream_pytest.log" 2>&1
prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/sidestream_pytest.log" | head -20; tail -2 "$OUT/sidestream_pytest.log"
rc=$(( rc || prc ))
i=0; IFS='|' read -ra variants <<< "${SIDE_VARIANTS:---lora-side-stream 0|--lora-side-stream 1}"
for v in "${variants[@]}"; do  # e.g. SIDE_VARIANTS="|--lora-side-stream 0"
  i=$((i + 1))
  timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3 gpt-oss mixtral \
    --tokens ${SIDE_TOKENS:-1 4 16 64 128} --ranks 16 --reps 40 --w13-layout fused $v \
    >"$OUT/sidestream_$i.log" 2>&1
  echo "== ${v:-shipped}"; grep "^| [QMg]\|rror" "$OUT/sidestream_$i.log" | cut -d'|' -f2-4,8-10
done
for v in $( [ "${SIDE_4BIT:-1}" = 0 ] || echo 0 1 ); do  # the 4-bit experts' lora_deltas_beside (SIDE_4BIT=0: not)
  timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
    --tokens 1 4 16 64 --reps 30 --lora-deltas $v >"$OUT/sidestream_int4_$v.log" 2>&1
  echo "== int4 --lora-deltas $v"; grep "^| [QM]\|rror" "$OUT/sidestream_int4_$v.log" | tail -10
  timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b \
    --tokens 1 4 16 64 --reps 30 --lora-deltas $v >"$OUT/sidestream_mxfp4_$v.log" 2>&1
  echo "== MXFP4 --lora-deltas $v"; grep "^| g\|rror" "$OUT/sidestream_mxfp4_$v.log" | tail -6
done
timeout "${SIDE_AB_TIMEOUT:-250}" python3 benchmarks/decode_switch_ab.py --batches ${SIDE_BATCHES:-1,16,64,256} \
  --switches ${SIDE_SWITCHES:-moe-lora-side-stream dense-lora-side-stream} ${SIDE_AB_MODE:---lora} \
  --out "$OUT/sidestream_ab.md" \
  >"$OUT/sidestream_ab.log" 2>&1
r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/sidestream_ab.md"; rc=$(( rc || r ))
