# fusions: the thirteenth session's work: programmatic dependent launch (tests/kernels/test_pdl.py's cuda chain),
#   the MoE activation in GEMM1's epilogue (fused_moe_gemm.FUSED_ACTIVATION) and the KV write in the q/k
#   norm + rotary launch (attention.FUSED_KV_WRITE): their cuda tests, the decode step at FUSION_BATCHES
#   (default 1,64) without and with both (--all-fusions), a batch-1 profile with both, and with
#   FUSION_MOE=1 one MoE layer without and with the fused activation (and the cuda runs of the experts
#   writing the MoE output directly, test_workspace_modes.py); timed in the fourteenth session (no gain,
#   both stay off; benchmarks/decode_switch_ab.py times one switch at a time); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
pytest tests/kernels/test_pdl.py tests/kernels/test_fused_moe_gemm_activation.py tests/kernels/test_qk_norm_rope.py \
  tests/layers/test_moe_fused_activation_layer.py tests/layers/test_workspace_modes.py tests/models/test_fused_ops_models.py \
  >"$OUT/pytest_fusions.log" 2>&1
prc=$?; tail -4 "$OUT/pytest_fusions.log"; rc=$(( rc || prc ))
for f in "" "--all-fusions"; do
  tag=$( [ -z "$f" ] && echo base || echo fused )
  timeout "${DECODE_TIMEOUT:-200}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
    --batches ${FUSION_BATCHES:-1,64} --async-scheduling $f --out "$OUT/decode_$tag.md" >"$OUT/decode_$tag.log" 2>&1
  drc=$?; echo "== decode $tag"; grep "^| [0-9]\|Correct\|rror" "$OUT/decode_$tag.log"; rc=$(( rc || drc ))
done
# where batch 1's time goes with every fusion on (PDL off: each kernel's own time)
VLLM_PDL=0 timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
  --batches 1 --modes graphs --steps 4 --top 20 --all-fusions --out "$OUT/profile_fused.md" >"$OUT/profile_fused.log" 2>&1
frc=$?; grep "ops/step\|^| " "$OUT/profile_fused.log" | head -24; rc=$(( rc || frc ))
[ -n "${FUSION_MOE:-}" ] && for fa in 0 1; do
  timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3 \
    --tokens 1 16 256 4096 --fused-activation $fa --out "$OUT/moe_fused_act$fa.md" >"$OUT/moe_fused_act$fa.log" 2>&1
  brc=$?; echo "== MoE layer, fused activation $fa"; grep "^| " "$OUT/moe_fused_act$fa.log" | head -8
  rc=$(( rc || brc ))
done
