# fused: benchmarks/kernels/benchmark_fused_linear_lora.py --sweep (projection + LoRA in one launch vs
#   F.linear + the LoRA op, 1-256 tokens); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${FUSED_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_fused_linear_lora.py --sweep \
  --out "$OUT/benchmark_fused_linear_lora.md" >"$OUT/benchmark_fused_linear_lora.log" 2>&1
frc=$?; tail -20 "$OUT/benchmark_fused_linear_lora.log"; rc=$(( rc || frc ))
