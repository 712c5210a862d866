# lora: benchmarks/kernels/benchmark_lora_linear.py --sweep (dense LoRA tiles) and
#   benchmark_moe_lora_align.py (the MoE LoRA align at decode sizes, and per count / scatter chunk)
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${LORA_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_lora_linear.py --sweep \
  --out "$OUT/benchmark_lora_linear.md" >"$OUT/benchmark_lora_linear.log" 2>&1
lrc=$?; tail -14 "$OUT/benchmark_lora_linear.log"; rc=$(( rc || lrc ))
timeout 100 python3 benchmarks/kernels/benchmark_moe_lora_align.py --chunks 256 512 1024 \
  --out "$OUT/benchmark_moe_lora_align.md" \
  >"$OUT/benchmark_moe_lora_align.log" 2>&1
arc=$?; tail -8 "$OUT/benchmark_moe_lora_align.log"; rc=$(( rc || arc ))
