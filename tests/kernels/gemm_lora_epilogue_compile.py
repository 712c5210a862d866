"""Compile the grouped GEMM with its LoRA epilogue (``gemm_lora_epilogue.py``) for an H100/H200 (sm_90) without a
GPU: run as a script without TRITON_INTERPRET, by test_gemm_lora_epilogue.py.  Qwen3-30B-A3B's GEMM1 (N 1536,
K 2048, rows = tokens, rank 32: peft's adapters on the fused experts) and GEMM2 (N 2048, K 768, rows = pairs, rank
16), 2048 pairs (256 tokens x top-8), 4 slots, at the heuristic's decode, mid and prefill tiles: no spills and
the shared memory of the plain kernel.  One "ok" line per GEMM and tile; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, _sass, resources, specialise  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _fused_moe_gemm_kernel  # noqa: E402

PAIRS, E, SLOTS, TOP_K = 2048, 128, 4, 8
GEMMS = {"GEMM1": (1536, 2048, 32, TOP_K), "GEMM2": (2048, 768, 16, 1)}  # N, K, rank, top_k_in
TILES = [(16, 128, 128, 1, 4), (32, 128, 128, 8, 4), (128, 256, 64, 8, 8)]  # M, N, K, group, warps


def compile_gemm(gemm: str, bm: int, bn: int, bk: int, group: int, warps: int, epi: bool):
    N, K, R, top_k_in = GEMMS[gemm]
    ptrs = {"a_ptr": "bf16", "w_ptr": "bf16", "out_ptr": "bf16", "bias_ptr": "bf16", "topk_weights_ptr": "fp32",
            "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
    cexp = dict(HAS_BIAS=False, MUL_ROUTED_WEIGHT=True, UPCAST_DOT=False, EVEN_K=True, BLOCK_SIZE_M=bm,
                BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group)
    ints = dict(N=N, K=K, top_k_in=top_k_in, stride_am=K, stride_ak=1, stride_we=N * K, stride_wn=K, stride_wk=1,
                stride_om=N, stride_on=1, stride_be=N, stride_bn=1, num_pid_m=PAIRS, num_pairs=PAIRS)
    if epi:
        ptrs.update(shrunk_ptr="fp32", lora_b_ptr="bf16", slots_ptr="i32")
        cexp.update(LORA_EPI=True, BLOCK_R=R, EXPAND_MODE=1, FP32_PRECISION="tf32x3")
        ints.update(lora_top_k=TOP_K, num_slots=SLOTS, R=R, stride_sp=R, stride_sr=1, stride_lbl=E * N * R,
                    stride_lbe=N * R, stride_lbn=R, stride_lbr=1)
    return triton.compile(specialise(_fused_moe_gemm_kernel, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=warps, num_stages=3))


def main() -> None:
    failed = False
    for gemm, tile in ((g, t) for g in GEMMS for t in TILES):
        plain, epi = compile_gemm(gemm, *tile, epi=False), compile_gemm(gemm, *tile, epi=True)
        (regs, spill), (plain_regs, _) = resources(epi.asm["cubin"]), resources(plain.asm["cubin"])
        problems = []
        if spill:
            problems.append(f"{spill} bytes spilled")
        if epi.metadata.shared != plain.metadata.shared:
            problems.append(f"shared memory {plain.metadata.shared} -> {epi.metadata.shared}")
        print(f"{'FAIL' if problems else 'ok'} {gemm} tiles {tile}: registers {plain_regs} -> {regs}, "
              f"SASS lines {len(_sass(plain.asm['cubin']).splitlines())} -> {len(_sass(epi.asm['cubin']).splitlines())}"
              f"{': ' + '; '.join(problems) if problems else ''}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
