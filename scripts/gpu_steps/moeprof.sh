# moeprof: benchmarks/kernels/profile_moe_lora.py: the kernels of one MoE layer's base and LoRA calls side by
#   side (Qwen3-30B-A3B and gpt-oss-20b shapes, 16 / 256 / 4096 tokens; MOEPROF_ARGS replaces those
#   options): where the LoRA / base gap comes from; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${MOEPROF_TIMEOUT:-240}" python3 benchmarks/kernels/profile_moe_lora.py \
  ${MOEPROF_ARGS:---shapes qwen3 gpt-oss --tokens 16 256 4096} --out "$OUT/profile_moe_lora.md" \
  >"$OUT/profile_moe_lora.log" 2>&1
mprc=$?; grep "^## \|sum of device" "$OUT/profile_moe_lora.log"; rc=$(( rc || mprc ))
