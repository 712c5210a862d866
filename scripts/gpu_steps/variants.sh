# variants: the latest kernel choices: their cuda tests and one A/B each (the per-pair MoE LoRA kernel's
#   tiles at ranks 32-64, WIDE_RANK_PAIR_TILES, new vs before, at 1-16 tokens; the wide per-pair path at
#   rank 64, 16-64 tokens; decided in the ninth session, docs/performance.md);
#   VARIANT_TIMEOUT per benchmark (default 90 s), AB_ONLY=1 skips the tests; only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
# variants still undecided (2026-12-02, eighth session; the earlier ones were decided by the A/Bs in
# docs/performance.md): their cuda tests, then one A/B each
if [ -z "${AB_ONLY:-}" ]; then  # AB_ONLY=1: the A/Bs alone (the tests ran in an earlier call)
  pytest -m cuda tests/kernels/test_fused_moe_lora.py tests/lora/test_fused_moe_lora_layer.py \
    tests/kernels/test_moe_lora_pair_prefetch.py tests/lora/test_lora_linear_token_variant.py \
    >"$OUT/pytest_variants.log" 2>&1
  vrc=$?; tail -8 "$OUT/pytest_variants.log"; rc=$(( rc || vrc ))
fi
t=${VARIANT_TIMEOUT:-90}
run_ab() { local name=$1; shift; timeout "$t" python3 "$@" >"$OUT/$name.log" 2>&1; local r=$?
  grep -v " INFO \|^INFO" "$OUT/$name.log" | tail -25; rc=$(( rc || r )); }
# the per-pair kernel's tiles at ranks 32-64 (moe_lora_config.WIDE_RANK_PAIR_TILES) vs the tiles before, at
# 1-16 tokens; then the wide per-pair path above rank 32 (both decided in the ninth session: tiles on,
# SMALL_BATCH_WIDE_MAX_RANK stays 32; kept as a regression check of those choices)
run_ab ab_pair_tiles_new benchmarks/kernels/benchmark_moe_lora.py --ranks 32 64 --tokens 1 2 4 8 16 \
  --out "$OUT/ab_pair_tiles_new.md"
run_ab ab_pair_tiles_old benchmarks/kernels/benchmark_moe_lora.py --ranks 32 64 --tokens 1 2 4 8 16 \
  --wide-rank-pair-tiles 0 --out "$OUT/ab_pair_tiles_old.md"
run_ab ab_pair_path_r64 benchmarks/kernels/benchmark_moe_lora.py --ranks 64 --tokens 16 32 64 --pair-path-max-rank 64 \
  --out "$OUT/ab_pair_path_r64.md"
