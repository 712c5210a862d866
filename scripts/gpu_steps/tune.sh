# tune: benchmarks/kernels/tune_moe.py on the Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b shapes
#   (bf16 GEMM and MoE LoRA tiles, rank 16, 4 adapters) within TUNE_BUDGET seconds (default 240):
#   tuned files in $OUT/tuned.tgz (unpack into vllm/kernel_configs/tuned/), table $OUT/tune_moe.md;
#   TUNE_ARGS adds tune_moe.py options (e.g. "--tokens 4096 1024" or "--ranks 16 64"; "--w13-layout fused": the w13
#   LoRA as one slice at twice the rank, FusedMoE3DWithLoRA; the engine's Qwen3 / Mixtral layers take the default).
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
budget=${TUNE_BUDGET:-240}
# the budget stops new work cleanly; the timeout only guards against a hang
timeout $(( budget + 120 )) python3 benchmarks/kernels/tune_moe.py --out "$OUT/tuned" --budget-s "$budget" \
  ${TUNE_ARGS:-} >"$OUT/tune_moe.log" 2>&1
trc=$?; cp "$OUT/tuned/tune_moe.md" "$OUT/tune_moe.md" 2>/dev/null
grep -v " INFO \|^INFO" "$OUT/tune_moe.log" | tail -30; ls "$OUT/tuned"; rc=$(( rc || trc ))
# the files' names hold ',' and '=', which a device tool may refuse to copy back: ship them as one archive
# (unpack with: tar xzf tuned.tgz -C vllm/kernel_configs/tuned --exclude=tune_moe.md)
tar czf "$OUT/tuned.tgz" -C "$OUT/tuned" . && rm -rf "$OUT/tuned"
