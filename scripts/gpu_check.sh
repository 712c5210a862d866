#!/usr/bin/env bash
# On a GPU machine: install the package as it comes (scripts/setup.sh: no download, the
# machine's torch/triton/numpy kept), check that the installed package imports from outside
# the repository, then:
#   tests   every test, cuda-marked ones included (TESTS="path ..." picks a part; each test's
#           result is logged as it finishes, so a run cut by TEST_TIMEOUT still shows what passed);
#           with 2+ GPUs the tensor-parallel tests (tests/distributed, NCCL) run beside the rest
#   bench   benchmarks/kernels/benchmark_moe_lora.py (one MoE layer, base vs LoRA; BENCH_ARGS adds options,
#           e.g. "--ranks 16 64 --num-loras 4 16")
#   lora    benchmarks/kernels/benchmark_lora_linear.py --sweep (dense LoRA tiles) and
#           benchmark_moe_lora_align.py (the MoE LoRA align at decode sizes, and per count / scatter chunk)
#   decode  benchmarks/benchmark_decode.py (the engine's decode step at Qwen3-30B-A3B width, 12 layers,
#           eager vs CUDA graphs, without and with LoRA, vs the roofline; prefill rate; DECODE_ARGS adds
#           options, e.g. --async-scheduling) and benchmarks/profile_decode.py at batch 1 and 64
#           (kernels per step, top kernels), and --prefill of 256 x 128 tokens (where goal 3's time goes,
#           with the Python functions that take the eager prefill step's host time: --host-top)
#   tune    benchmarks/kernels/tune_moe.py on the Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b shapes
#           (bf16 GEMM and MoE LoRA tiles, rank 16, 4 adapters) within TUNE_BUDGET seconds (default 240):
#           tuned files in $OUT/tuned.tgz (unpack into vllm/kernel_configs/tuned/), table $OUT/tune_moe.md;
#           TUNE_ARGS adds tune_moe.py options (e.g. "--tokens 4096 1024" or "--ranks 16 64").
#           Only when named (not part of all)
#   quant   the 4-bit experts: benchmark_moe_int4.py (--compare-paths: in-register kernel vs dequantise + bf16
#           GEMM; --sweep: tiles and UNPACK modes) and benchmark_moe_mxfp4.py (--compare-paths, --variants); only when named
#   w4dequant the 4-bit dequant path's expansion from the tensor-core words (ops/w4_mma_dequant.py, twentieth
#           session): its cuda tests (both decode orders), then benchmark_w4_dequant.py per order, tile and warps
#           (the "words" order, the default since the twenty-first session); only when named
#   fused   benchmarks/kernels/benchmark_fused_linear_lora.py --sweep (projection + LoRA in one launch vs
#           F.linear + the LoRA op, 1-256 tokens); only when named
#   verify  the cuda tests of the kernels and LoRA paths built without a GPU (int4 GEMVs, MXFP4 GEMV, grammar
#           bitmask kernel, one-pass MoE alignment, LoRA layer set, LoRA mapping buffer) and their benchmarks
#           (int4 --sweep and MXFP4 --variants at 1/16/64 tokens, structured output, align); only when named
#   variants  the latest kernel choices: their cuda tests and one A/B each (the per-pair MoE LoRA kernel's
#           tiles at ranks 32-64, WIDE_RANK_PAIR_TILES, new vs before, at 1-16 tokens; the wide per-pair path at
#           rank 64, 16-64 tokens; decided in the ninth session, docs/performance.md);
#           VARIANT_TIMEOUT per benchmark (default 90 s), AB_ONLY=1 skips the tests; only when named
#   moeprof benchmarks/kernels/profile_moe_lora.py: the kernels of one MoE layer's base and LoRA calls side by
#           side (Qwen3-30B-A3B and gpt-oss-20b shapes, 16 / 256 / 4096 tokens; MOEPROF_ARGS replaces those
#           options): where the LoRA / base gap comes from; only when named
#   int4swap the int4 GEMM with the operands swapped (UNPACK 4, eleventh session): its cuda tests, the int4 GEMM
#           per unpacking mode at the heuristic's tiles (--sweep-variants-only), then the layer with the decode
#           tiles on UNPACK 3 and on 4 (SWAP_ARGS: shapes and tokens, SWAP_TIMEOUT per run); only when named
#   densegemv the dense projections' Triton GEMV (ops/dense_gemv.py, twelfth session): its tests, cuBLAS vs GEMV
#           per projection at 1-8 tokens (with the "other reduction" kernel, GEMV_DELAYED, at 1-4), a tile sweep
#           at 1 token, then the decode step up to DENSE_MAX_TOKENS (default 1) at DENSE_BATCHES (default 1,4),
#           with each kernel; only when named
#   fusions the thirteenth session's work: programmatic dependent launch (tests/kernels/test_pdl.py's cuda chain),
#           the MoE activation in GEMM1's epilogue (fused_moe_gemm.FUSED_ACTIVATION) and the KV write in the q/k
#           norm + rotary launch (attention.FUSED_KV_WRITE): their cuda tests, the decode step at FUSION_BATCHES
#           (default 1,64) without and with both (--all-fusions), a batch-1 profile with both, and with
#           FUSION_MOE=1 one MoE layer without and with the fused activation (and the cuda runs of the experts
#           writing the MoE output directly, test_workspace_modes.py); timed in the fourteenth session (no gain,
#           both stay off; benchmarks/decode_switch_ab.py times one switch at a time); only when named
#   int4mma the tensor-core int4 kernel (csrc/capi/int4_mma_moe.cu, fifteenth session): builds the CUDA C++
#           library, its cuda tests (kernel and MarlinExperts layer with VLLM_INT4_MMA=1), the per-GEMM
#           benchmark against the Triton int4 kernels, kernel variants (MMA_FLAG_VARIANTS: comma-separated nvcc
#           flags, e.g. -DINT4_MMA_STAGES=3,-DINT4_MMA_LDSM=0), then the int4 layer without and with it
#           (MMA_ARGS: shapes and tokens, MMA_TIMEOUT per run); only when named
#   mxfp4mma the tensor-core MXFP4 kernel (csrc/capi/mxfp4_mma_moe.cu, sixteenth session): the build, its cuda
#           tests (MXMMA_TESTS), then the MXFP4 layer with VLLM_MXFP4_MMA=0 / 1 (MXMMA_LAYER_MODES,
#           MXMMA_LAYER_TOKENS); only when named
#   w4flags variants of the 4-bit tensor-core kernels built with VLLM_CSRC_FLAGS: W4_FLAGS holds them separated by
#           ';' (e.g. "-DW4_SKIP_PAD=0;-DW4_SKIP_PAD=2 -DW4_INT4_FOLD=1"); per variant its build and the kernel
#           and layer tests of both formats (W4_TESTS=0: none), then per GEMM and per layer (W4_LAYERS=0: GEMMs
#           only) for the default build (W4_BASE=0: not) and each variant, at W4_TOKENS (default 64 256)
#   pairsplit the MoE LoRA small-batch path in two launches (fused_moe_lora.PAIR_KERNEL 2, eighteenth session; on by
#           default at Mixtral-8x7B's widths since the nineteenth):
#           its cuda tests, then benchmark_moe_lora.py (PAIRSPLIT_SHAPES, default mixtral; PAIRSPLIT_TOKENS) with
#           --pair-kernel 0 / 2 / 2 at K ranges of 1024; only when named
#   sidestream the MoE LoRA deltas in fp32 buffers on a side stream beside the base GEMMs (experts/lora_overlap.py,
#           on by default since the twenty-third session; the buffers overwritten by the per-pair kernels since the
#           twenty-fourth) and the dense one (lora/layers/dense_overlap.py, off: timed slower): their cuda tests and
#           the engine's CUDA-graph tests, then the layer per SIDE_VARIANTS ('|'-separated benchmark flags, e.g.
#           the untimed --lora-sorted-beside 1 / --lora-side-priority 1; default --lora-side-stream 0 / 1),
#           at SIDE_TOKENS, benchmark_moe_int4.py and _mxfp4.py
#           --lora-deltas 0 / 1 (MarlinExperts, UnfusedOAITritonExperts; on since the twenty-fourth session) and
#           decode_switch_ab.py flipping SIDE_SWITCHES (e.g. moe-lora-sorted-beside dense-fused-lora), with
#           LoRA (SIDE_BATCHES); only when named
#   pdl4bit the int4 / MXFP4 kernels' tests with PDL (PDL_4BIT, on by default since the eighteenth session; the
#           sed that sets it is then a no-op), then benchmark_moe_int4 / _mxfp4 at 1 and 16 tokens; only when named
#   all     tests, bench, lora and decode
# Logs and tables go to $OUT (default ./out). Wheels in .whl/ (gitignored; the device tool's carry) are
# installed first, without dependencies.  Usage: bash scripts/gpu_check.sh [tests|bench|lora|quant|w4dequant|fused|decode|tune|verify|variants|moeprof|int4swap|densegemv|fusions|pdl4bit|int4mma|mxfp4mma|w4flags|pairsplit|sidestream|all]...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}
bash scripts/setup.sh 2>&1 | tee "$OUT/setup.log" || exit 1
# an offline GPU machine: wheels carried in .whl/ (e.g. llguidance, compressed-tensors) install without deps
if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tee -a "$OUT/setup.log"; fi
(cd /tmp && python3 -c 'import vllm, torch, triton; print("installed vllm at", vllm.__file__, "| torch", torch.__version__, "| triton", triton.__version__)') | tee -a "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
want() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
pytest() { timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -v --tb=short -rf -p no:cacheprovider "$@"; }
rc=0
if want tests; then
  ngpu=$(nvidia-smi -L | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    (pytest tests/distributed >"$OUT/pytest_tp.log" 2>&1; echo "exit $?" >>"$OUT/pytest_tp.log") &
    pytest --durations=15 ${TESTS:-tests} --ignore=tests/distributed >"$OUT/pytest_gpu.log" 2>&1
    rc=$?
    wait
    echo "== tensor parallel ($ngpu GPUs) =="; tail -25 "$OUT/pytest_tp.log"
    grep -q "^exit 0" "$OUT/pytest_tp.log" || rc=1
  else
    pytest --durations=15 ${TESTS:-tests} >"$OUT/pytest_gpu.log" 2>&1
    rc=$?
  fi
  grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | grep -v "^FAILED\|^ERROR" | head -20
  tail -25 "$OUT/pytest_gpu.log"
fi
if want bench; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/kernels/benchmark_moe_lora.py ${BENCH_ARGS:-} \
    --out "$OUT/benchmark_moe_lora.md" >"$OUT/benchmark_moe_lora.log" 2>&1
  brc=$?; tail -40 "$OUT/benchmark_moe_lora.log"; rc=$(( rc || brc ))
fi
if want lora; then
  timeout "${LORA_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_lora_linear.py --sweep \
    --out "$OUT/benchmark_lora_linear.md" >"$OUT/benchmark_lora_linear.log" 2>&1
  lrc=$?; tail -14 "$OUT/benchmark_lora_linear.log"; rc=$(( rc || lrc ))
  timeout 100 python3 benchmarks/kernels/benchmark_moe_lora_align.py --chunks 256 512 1024 \
    --out "$OUT/benchmark_moe_lora_align.md" \
    >"$OUT/benchmark_moe_lora_align.log" 2>&1
  arc=$?; tail -8 "$OUT/benchmark_moe_lora_align.log"; rc=$(( rc || arc ))
fi
if want decode; then
  timeout "${DECODE_TIMEOUT:-250}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
    ${DECODE_ARGS:-} --out "$OUT/benchmark_decode.md" >"$OUT/benchmark_decode.log" 2>&1
  drc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_decode.log" | tail -22; rc=$(( rc || drc ))
  timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
    --batches 1,64 --steps 4 --top 20 --host-top 15 --out "$OUT/profile_decode.md" >"$OUT/profile_decode.log" 2>&1
  prc=$?; grep "ops/step" "$OUT/profile_decode.log"; rc=$(( rc || prc ))
  timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decode.py --preset qwen3-30b-a3b --layers 12 \
    --batches 256 --prefill --modes eager --top 25 --host-top 25 --out "$OUT/profile_prefill.md" >"$OUT/profile_prefill.log" 2>&1
  frc=$?; grep "ops/step" "$OUT/profile_prefill.log"; rc=$(( rc || frc ))
fi
if [[ " $steps " == *" quant "* ]]; then
  timeout "${QUANT_TIMEOUT:-240}" python3 benchmarks/kernels/benchmark_moe_int4.py --compare-paths --sweep \
    --tokens 1 16 64 256 1024 4096 --reps 30 --out "$OUT/benchmark_moe_int4.md" >"$OUT/benchmark_moe_int4.log" 2>&1
  qrc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_moe_int4.log" | tail -40; rc=$(( rc || qrc ))
  timeout "${QUANT_TIMEOUT:-240}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --compare-paths \
    --variants split-auto split-2 portable --tokens 1 16 64 256 1024 4096 --reps 30 \
    --out "$OUT/benchmark_moe_mxfp4.md" >"$OUT/benchmark_moe_mxfp4.log" 2>&1
  mrc=$?; grep -v " INFO \|^INFO" "$OUT/benchmark_moe_mxfp4.log" | tail -40; rc=$(( rc || mrc ))
fi
if [[ " $steps " == *" w4dequant "* ]]; then
  timeout "${W4DQ_TIMEOUT:-300}" python3 -m pytest -q tests/kernels/test_float_round.py tests/kernels/test_int4_mma_moe.py \
    tests/kernels/test_mxfp4_mma_moe.py -k "dequantize or rounding or block_m" >"$OUT/pytest_w4dequant.log" 2>&1
  trc=$?; tail -3 "$OUT/pytest_w4dequant.log"; rc=$(( rc || trc ))
  timeout "${W4DQ_TIMEOUT:-300}" python3 benchmarks/kernels/benchmark_w4_dequant.py --reps 10 --warps 4 \
    >"$OUT/benchmark_w4_dequant.md" 2>&1
  brc=$?; cat "$OUT/benchmark_w4_dequant.md"; rc=$(( rc || brc ))
fi
if [[ " $steps " == *" verify "* ]]; then
  # the not yet GPU-run ones first (2026-12-02: the int4 GEMV files, run first, used up the call's limit;
  # test_int4_gemv.py passed, test_int4_gemv_rows.py passed as far as it got)
  pytest -m cuda tests/kernels/test_mxfp4_gemv.py tests/structured_output/test_bitmask_kernel.py \
    tests/kernels/test_moe_align_with_lora.py tests/worker tests/engine tests/kernels/test_shipped_tuned_configs.py \
    tests/kernels/test_int4_gemv_rows.py >"$OUT/pytest_verify.log" 2>&1
  vrc=$?; tail -15 "$OUT/pytest_verify.log"; rc=$(( rc || vrc ))
  timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_int4.py --quick --tokens 1 16 64 --sweep \
    --out "$OUT/verify_int4.md" >"$OUT/verify_int4.log" 2>&1
  qrc=$?; grep -v " INFO \|^INFO\|skip {" "$OUT/verify_int4.log" | tail -30; rc=$(( rc || qrc ))
  timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --quick --tokens 1 16 64 \
    --variants dot gemv1 gemv2 gemv+split-auto split-auto --out "$OUT/verify_mxfp4.md" >"$OUT/verify_mxfp4.log" 2>&1
  mrc=$?; grep -v " INFO \|^INFO" "$OUT/verify_mxfp4.log" | tail -20; rc=$(( rc || mrc ))
  timeout 120 python3 benchmarks/benchmark_structured_output.py >"$OUT/verify_structured.log" 2>&1
  src=$?; tail -12 "$OUT/verify_structured.log"; rc=$(( rc || src ))
  timeout 120 python3 benchmarks/kernels/benchmark_moe_lora_align.py --out "$OUT/verify_align.md" \
    >"$OUT/verify_align.log" 2>&1
  arc=$?; tail -20 "$OUT/verify_align.log"; rc=$(( rc || arc ))
fi
if [[ " $steps " == *" variants "* ]]; then
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
fi
if [[ " $steps " == *" int4swap "* ]]; then
  pytest tests/kernels/test_int4_moe_gemm.py >"$OUT/pytest_int4swap.log" 2>&1
  src=$?; tail -4 "$OUT/pytest_int4swap.log"; rc=$(( rc || src ))
  t=${SWAP_TIMEOUT:-150}
  timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --sweep --sweep-variants-only \
    ${SWAP_ARGS:---shapes qwen3 mixtral --tokens 16 64 256} --reps 30 --out "$OUT/int4swap_variants.md" \
    >"$OUT/int4swap_variants.log" 2>&1
  r=$?; grep "^| \|Error\|error" "$OUT/int4swap_variants.log" | tail -16; rc=$(( rc || r ))
  for u in 4 3; do
    timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --decode-unpack $u \
      ${SWAP_ARGS:---shapes qwen3 mixtral --tokens 16 64 256} --reps 30 --out "$OUT/int4swap_layer_$u.md" \
      >"$OUT/int4swap_layer_$u.log" 2>&1
    r=$?; grep "tokens:\|Error\|error" "$OUT/int4swap_layer_$u.log" | tail -8; rc=$(( rc || r ))
  done
fi
if [[ " $steps " == *" fusions "* ]]; then
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
fi
if [[ " $steps " == *" pdl4bit "* ]]; then
  sed -i 's/^PDL_4BIT = False/PDL_4BIT = True/' vllm/platforms/pdl.py
  pytest tests/kernels/test_int4_gemv.py tests/kernels/test_int4_gemv_rows.py tests/kernels/test_int4_moe_gemm.py \
    tests/kernels/test_mxfp4_gemv.py tests/kernels/test_mxfp4_moe_gemm.py >"$OUT/pytest_pdl4bit.log" 2>&1
  prc=$?; tail -4 "$OUT/pytest_pdl4bit.log"; rc=$(( rc || prc ))
  timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_int4.py --tokens 1 16 --reps 30 \
    >"$OUT/int4_pdl.log" 2>&1; grep "^| " "$OUT/int4_pdl.log" | tail -8
  timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --tokens 1 16 --reps 30 \
    >"$OUT/mxfp4_pdl.log" 2>&1; grep "^| " "$OUT/mxfp4_pdl.log" | tail -8
fi
if [[ " $steps " == *" int4mma "* ]]; then
  t=${MMA_TIMEOUT:-240}
  timeout "$t" python3 -c 'from vllm.platforms import cuda_lib; assert cuda_lib.library() is not None' \
    >"$OUT/int4_mma_build.log" 2>&1; r=$?; tail -3 "$OUT/int4_mma_build.log"; rc=$(( rc || r ))
  pytest tests/kernels/test_int4_mma_moe.py tests/quantization/test_int4_moe_mma_layer.py \
    >"$OUT/pytest_int4_mma.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_int4_mma.log" | head -20; tail -4 "$OUT/pytest_int4_mma.log"
  rc=$(( rc || prc ))
  timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py ${MMA_ARGS:---tokens 1 4 16 64} --reps 50 \
    --out "$OUT/int4_mma.md" >"$OUT/int4_mma.log" 2>&1
  r=$?; grep "^| \|FAILED\|rror" "$OUT/int4_mma.log" | tail -20; rc=$(( rc || r ))
  IFS=',' read -ra variants <<< "${MMA_FLAG_VARIANTS:-}"  # kernel variants, e.g. -DINT4_MMA_STAGES=3,-DINT4_MMA_LDSM=0
  for i in "${!variants[@]}"; do  # each builds its own library (VLLM_CSRC_FLAGS is part of the cache key)
    VLLM_CSRC_FLAGS="${variants[$i]}" timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py \
      ${MMA_ARGS:---tokens 1 4 16 64} --no-sweep --reps 50 --out "$OUT/int4_mma_variant$i.md" \
      >"$OUT/int4_mma_variant$i.log" 2>&1
    r=$?; echo "== variant ${variants[$i]}"; grep "^| \|FAILED\|rror" "$OUT/int4_mma_variant$i.log" | tail -12
    rc=$(( rc || r ))
  done
  for m in 0 1; do
    VLLM_INT4_MMA=$m timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
      --tokens ${MMA_LAYER_TOKENS:-1 4 16 64} --reps 30 --out "$OUT/int4_layer_mma$m.md" \
      >"$OUT/int4_layer_mma$m.log" 2>&1
    r=$?; echo "== int4 layer, VLLM_INT4_MMA=$m"; grep "^| \|FAILED\|rror" "$OUT/int4_layer_mma$m.log" | tail -12
    rc=$(( rc || r ))
  done
fi
if [[ " $steps " == *" mxfp4mma "* ]]; then
  t=${MMA_TIMEOUT:-240}
  timeout "$t" python3 -c 'from vllm.platforms import cuda_lib; assert cuda_lib.library() is not None' \
    >"$OUT/mxfp4_mma_build.log" 2>&1; r=$?; tail -3 "$OUT/mxfp4_mma_build.log"; rc=$(( rc || r ))
  pytest ${MXMMA_TESTS:-tests/kernels/test_mxfp4_mma_moe.py tests/layers/test_mxfp4_moe_mma_layer.py} \
    >"$OUT/pytest_mxfp4_mma.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_mxfp4_mma.log" | head -20; tail -4 "$OUT/pytest_mxfp4_mma.log"
  rc=$(( rc || prc ))
  for m in ${MXMMA_LAYER_MODES:-0 1}; do
    VLLM_MXFP4_MMA=$m timeout "$t" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b 120b \
      --tokens ${MXMMA_LAYER_TOKENS:-1 4 16 64 256} --reps 30 --out "$OUT/mxfp4_layer_mma$m.md" \
      >"$OUT/mxfp4_layer_mma$m.log" 2>&1
    r=$?; echo "== MXFP4 layer, VLLM_MXFP4_MMA=$m"; grep "^| \|FAILED\|rror" "$OUT/mxfp4_layer_mma$m.log" | tail -12
    rc=$(( rc || r ))
  done
fi
if [[ " $steps " == *" w4flags "* ]]; then
  t=${MMA_TIMEOUT:-240}
  IFS=';' read -ra w4variants <<< "${W4_FLAGS:-}"
  if [ "${W4_TESTS:-1}" = 1 ]; then
    for i in "${!w4variants[@]}"; do
      f="${w4variants[$i]}"
      (export VLLM_CSRC_FLAGS="$f"; pytest tests/kernels/test_int4_mma_moe.py tests/kernels/test_mxfp4_mma_moe.py \
        tests/quantization/test_int4_moe_mma_layer.py tests/layers/test_mxfp4_moe_mma_layer.py >"$OUT/pytest_w4flags_$i.log" 2>&1)
      prc=$?; echo "== tests with $f"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_w4flags_$i.log" | head -20
      tail -2 "$OUT/pytest_w4flags_$i.log"; rc=$(( rc || prc ))
    done
  fi
  [ "${W4_BASE:-1}" = 1 ] && w4runs=("base" "${!w4variants[@]}") || w4runs=("${!w4variants[@]}")
  for v in "${w4runs[@]}"; do
    f=""; [ "$v" = base ] || f="${w4variants[$v]}"
    VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_int4_mma.py --tokens ${W4_TOKENS:-64 256} \
      --no-sweep --reps 50 --out "$OUT/w4_int4_gemm_$v.md" >"$OUT/w4_int4_gemm_$v.log" 2>&1
    VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_mxfp4_mma.py --tokens ${W4_TOKENS:-64 256} \
      --no-sweep --reps 50 --out "$OUT/w4_mx_gemm_$v.md" >"$OUT/w4_mx_gemm_$v.log" 2>&1
    if [ "${W4_LAYERS:-1}" = 1 ]; then
      VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
        --tokens ${W4_TOKENS:-64 256} --reps 30 --out "$OUT/w4_int4_layer_$v.md" >"$OUT/w4_int4_layer_$v.log" 2>&1
      VLLM_CSRC_FLAGS="$f" timeout "$t" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b 120b \
        --tokens ${W4_TOKENS:-64 256} --reps 30 --out "$OUT/w4_mx_layer_$v.md" >"$OUT/w4_mx_layer_$v.log" 2>&1
    fi
    echo "== $v (${f:-default build})"
    grep -h "^| [QMg]\|FAILED\|rror" "$OUT"/w4_*_"$v".log | tail -24
  done
fi
if [[ " $steps " == *" pairsplit "* ]]; then
  pytest tests/kernels/test_moe_lora_split.py tests/kernels/test_moe_lora_pair_prefetch.py \
    tests/kernels/test_fused_moe_lora.py >"$OUT/pytest_pairsplit.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest_pairsplit.log" | head -20; tail -2 "$OUT/pytest_pairsplit.log"
  rc=$(( rc || prc ))
  for v in "0" "2" "2 --pair-split-width 1024"; do
    timeout "${PAIRSPLIT_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_lora.py --shapes ${PAIRSPLIT_SHAPES:-mixtral} \
      --tokens ${PAIRSPLIT_TOKENS:-1 2 4 8 16} --pair-kernel $v >"$OUT/pairsplit_${v// /_}.log" 2>&1
    echo "== --pair-kernel $v"; grep "^| \|rror" "$OUT/pairsplit_${v// /_}.log" | tail -8
  done
  for v in 0 2; do  # the int4 Mixtral layer's LoRA takes the same path
    timeout "${PAIRSPLIT_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes mixtral --tokens 1 16 \
      --reps 30 --pair-kernel $v >"$OUT/pairsplit_int4_$v.log" 2>&1
    echo "== int4, --pair-kernel $v"; grep "^| \|rror" "$OUT/pairsplit_int4_$v.log" | tail -3
  done
fi
if [[ " $steps " == *" sidestream "* ]]; then
  pytest tests/lora/test_moe_lora_side_stream.py tests/kernels/test_moe_lora_overwrite.py \
    tests/lora/test_dense_lora_side_stream.py tests/lora/test_mxfp4_moe_lora.py \
    tests/quantization/test_int4_moe_lora.py tests/worker/test_cuda_graphs.py \
    tests/worker/test_lora_graph_layer_set.py tests/lora/test_fused_linear_lora_batch.py \
    tests/lora/test_dense_lora_fused_batch.py tests/lora/test_dense_lora_fused.py \
    >"$OUT/sidestream_pytest.log" 2>&1
  prc=$?; grep -E "^(FAILED|ERROR)" "$OUT/sidestream_pytest.log" | head -20; tail -2 "$OUT/sidestream_pytest.log"
  rc=$(( rc || prc ))
  i=0; IFS='|' read -ra variants <<< "${SIDE_VARIANTS:---lora-side-stream 0|--lora-side-stream 1}"
  for v in "${variants[@]}"; do  # e.g. SIDE_VARIANTS="|--lora-sorted-beside 1|--lora-side-priority 1"
    i=$((i + 1))
    timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3 gpt-oss mixtral \
      --tokens ${SIDE_TOKENS:-1 4 16 64 128} --ranks 16 --reps 40 --w13-layout fused $v \
      >"$OUT/sidestream_$i.log" 2>&1
    echo "== ${v:-shipped}"; grep "^| [QMg]\|rror" "$OUT/sidestream_$i.log" | cut -d'|' -f2-4,8-10
  done
  for v in 0 1; do  # the 4-bit experts' lora_deltas_beside
    timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_int4.py --shapes qwen3 mixtral \
      --tokens 1 4 16 64 --reps 30 --lora-deltas $v >"$OUT/sidestream_int4_$v.log" 2>&1
    echo "== int4 --lora-deltas $v"; grep "^| [QM]\|rror" "$OUT/sidestream_int4_$v.log" | tail -10
    timeout "${SIDE_TIMEOUT:-150}" python3 benchmarks/kernels/benchmark_moe_mxfp4.py --shapes 20b \
      --tokens 1 4 16 64 --reps 30 --lora-deltas $v >"$OUT/sidestream_mxfp4_$v.log" 2>&1
    echo "== MXFP4 --lora-deltas $v"; grep "^| g\|rror" "$OUT/sidestream_mxfp4_$v.log" | tail -6
  done
  timeout "${SIDE_TIMEOUT:-250}" python3 benchmarks/decode_switch_ab.py --batches ${SIDE_BATCHES:-1,16,64,256} \
    --switches ${SIDE_SWITCHES:-moe-lora-side-stream dense-lora-side-stream} --lora --out "$OUT/sidestream_ab.md" \
    >"$OUT/sidestream_ab.log" 2>&1
  r=$?; echo "== decode A/B (rc $r)"; cat "$OUT/sidestream_ab.md"; rc=$(( rc || r ))
fi
if [[ " $steps " == *" densegemv "* ]]; then
  pytest tests/kernels/test_dense_gemv.py >"$OUT/pytest_densegemv.log" 2>&1
  prc=$?; tail -4 "$OUT/pytest_densegemv.log"; rc=$(( rc || prc ))
  t=${DENSE_TIMEOUT:-120}
  timeout "$t" python3 benchmarks/kernels/benchmark_dense_gemv.py --tokens 1 2 4 8 --reps 50 \
    --out "$OUT/dense_gemv.md" >"$OUT/dense_gemv.log" 2>&1
  r=$?; grep "^| \|rror\|off" "$OUT/dense_gemv.log" | tail -30; rc=$(( rc || r ))
  timeout "$t" python3 benchmarks/kernels/benchmark_dense_gemv.py --shapes qwen3 mixtral --tokens 1 --sweep \
    --reps 30 --out "$OUT/dense_gemv_sweep.md" >"$OUT/dense_gemv_sweep.log" 2>&1
  r=$?; grep "^| \|rror\|off" "$OUT/dense_gemv_sweep.log" | tail -10; rc=$(( rc || r ))
  for d in "" --dense-gemv-delayed; do  # the decode step with each GEMV kernel
    timeout "${DECODE_TIMEOUT:-200}" python3 benchmarks/benchmark_decode.py --preset qwen3-30b-a3b --layers 12 \
      --batches ${DENSE_BATCHES:-1,4} --dense-gemv-max-tokens ${DENSE_MAX_TOKENS:-1} $d \
      --out "$OUT/decode_dense_gemv$d.md" >"$OUT/decode_dense_gemv$d.log" 2>&1
    drc=$?; grep "^| [0-9]\|Correct" "$OUT/decode_dense_gemv$d.log"; rc=$(( rc || drc ))
  done
fi
if [[ " $steps " == *" moeprof "* ]]; then
  timeout "${MOEPROF_TIMEOUT:-240}" python3 benchmarks/kernels/profile_moe_lora.py \
    ${MOEPROF_ARGS:---shapes qwen3 gpt-oss --tokens 16 256 4096} --out "$OUT/profile_moe_lora.md" \
    >"$OUT/profile_moe_lora.log" 2>&1
  mprc=$?; grep "^## \|sum of device" "$OUT/profile_moe_lora.log"; rc=$(( rc || mprc ))
fi
if [[ " $steps " == *" fused "* ]]; then
  timeout "${FUSED_TIMEOUT:-200}" python3 benchmarks/kernels/benchmark_fused_linear_lora.py --sweep \
    --out "$OUT/benchmark_fused_linear_lora.md" >"$OUT/benchmark_fused_linear_lora.log" 2>&1
  frc=$?; tail -20 "$OUT/benchmark_fused_linear_lora.log"; rc=$(( rc || frc ))
fi
if [[ " $steps " == *" tune "* ]]; then
  budget=${TUNE_BUDGET:-240}
  # the budget stops new work cleanly; the timeout only guards against a hang
  timeout $(( budget + 120 )) python3 benchmarks/kernels/tune_moe.py --out "$OUT/tuned" --budget-s "$budget" \
    ${TUNE_ARGS:-} >"$OUT/tune_moe.log" 2>&1
  trc=$?; cp "$OUT/tuned/tune_moe.md" "$OUT/tune_moe.md" 2>/dev/null
  grep -v " INFO \|^INFO" "$OUT/tune_moe.log" | tail -30; ls "$OUT/tuned"; rc=$(( rc || trc ))
  # the files' names hold ',' and '=', which a device tool may refuse to copy back: ship them as one archive
  # (unpack with: tar xzf tuned.tgz -C vllm/kernel_configs/tuned --exclude=tune_moe.md)
  tar czf "$OUT/tuned.tgz" -C "$OUT/tuned" . && rm -rf "$OUT/tuned"
fi
exit $rc
