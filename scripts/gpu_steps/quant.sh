# quant: the 4-bit experts: benchmark_moe_int4.py (--compare-paths: in-register kernel vs dequantise + bf16
#   GEMM; --sweep: tiles and UNPACK modes) and benchmark_moe_mxfp4.py (--compare-paths, --variants); only when named
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
timeout "${QUANT_TIMEOUT:-240}" python3 benchmarks/kernels/benchmark_moe_int4.py --compare-paths --sweep \
  --tokens 1 16 64 256 1024 4096 --reps 30 --out "$OUT/benchmark_moe_int4.md" >"$OUT/benchmark_moe_int4.log" 2>&1
qrc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_moe_int4.log" | tail -40; rc=$(( rc || qrc ))
timeout "${QUANT_TIMEOUT:-240}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --compare-paths \
  --variants split-auto split-2 portable --tokens 1 16 64 256 1024 4096 --reps 30 \
  --out "$OUT/benchmark_moe_mxfp4.md" >"$OUT/benchmark_moe_mxfp4.log" 2>&1
mrc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_moe_mxfp4.log" | tail -40; rc=$(( rc || mrc ))
