# bench: benchmarks/kernels/benchmark_moe_lora.py (one MoE layer, base vs LoRA; BENCH_ARGS adds options,
#   e.g. "--ranks 16 64 --num-loras 4 16")
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/kernels/benchmark_moe_lora.py ${BENCH_ARGS:-} \
  --out "$OUT/benchmark_moe_lora.md" >"$OUT/benchmark_moe_lora.log" 2>&1
brc=$?; tail -40 "$OUT/benchmark_moe_lora.log"; rc=$(( rc || brc ))
