# decode: benchmarks/benchmark_decode.py (the engine's decode step at Qwen3-30B-A3B width, 12 layers,
#   eager vs CUDA graphs, without and with LoRA, vs the roofline; prefill rate; DECODE_ARGS adds
#   options, e.g. --async-scheduling) and benchmarks/profile_decode.py at batch 1 and 64
#   (kernels per step, top kernels), and --prefill of 256 x 128 tokens (where goal 3's time goes,
#   with the Python functions that take the eager prefill step's host time: --host-top)
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${DECODE_TIMEOUT:-250}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
  ${DECODE_ARGS:-} --out "$OUT/benchmark_decode.md" >"$OUT/benchmark_decode.log" 2>&1
drc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_decode.log" | tail -22; rc=$(( rc || drc ))
timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
  --batches 1,64 --steps 4 --top 20 --host-top 15 --out "$OUT/profile_decode.md" >"$OUT/profile_decode.log" 2>&1
prc=$?; grep "ops/step" "$OUT/profile_decode.log"; rc=$(( rc || prc ))
timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
  --batches 256 --prefill --modes eager --top 25 --host-top 25 --out "$OUT/profile_prefill.md" >"$OUT/profile_prefill.log" 2>&1
frc=$?; grep "ops/step" "$OUT/profile_prefill.log"; rc=$(( rc || frc ))
