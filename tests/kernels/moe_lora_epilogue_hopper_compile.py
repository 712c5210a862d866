"""Compile the bf16 grouped expert GEMM with the MoE LoRA expand in its epilogue (``LORA``) for an H100/H200
(sm_90) without a GPU: run as a script without TRITON_INTERPRET, by test_moe_lora_epilogue.py.  At the Hopper
heuristic's tiles from decode to prefill (Qwen3-30B-A3B's GEMM1, rank 32 fused gate_up; its GEMM2, rank 16; two
slices with the activation fused; GEMM1 summing a split shrink's 8 partials): it compiles, spills nothing and fits
in shared memory.  One line per case; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, resources, specialise  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _fused_moe_gemm_kernel  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200


def compile_case(bm: int, bn: int, bk: int, warps: int, *, N: int, K: int, R: int, slices: int, act: int,
                 top_k_in: int, parts: int = 1) -> tuple:
    ptrs = {"a_ptr": "bf16", "w_ptr": "bf16", "out_ptr": "bf16", "bias_ptr": "bf16", "topk_weights_ptr": "fp32",
            "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32",
            "lora_s_ptr": "fp32", "lora_b_ptr": "bf16", "lora_map_ptr": "i32", "lora_enabled_ptr": "i32"}
    n_s = N // slices
    cexp = dict(HAS_BIAS=False, MUL_ROUTED_WEIGHT=top_k_in == 1, UPCAST_DOT=False, EVEN_K=K % bk == 0,
                BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn // 2 if act >= 0 else bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=8,
                FUSED_ACT=act, LORA=True, LORA_SLICES=slices, LORA_BLOCK_R=max(16, R), LORA_EXPAND_MODE=1,
                LORA_UPCAST=False, LORA_FP32_PRECISION="tf32x3", LORA_PARTS=parts)
    ints = dict(N=N // 2 if act >= 0 else N, K=K, top_k_in=top_k_in, stride_am=K, stride_ak=1, stride_we=N * K,
                stride_wn=K, stride_wk=1, stride_om=N, stride_on=1, stride_be=N, stride_bn=1, num_pid_m=64,
                num_pairs=2048, lora_top_k=8, lora_max_loras=4, lora_R=R, lora_n_slice=n_s, lora_col0=0,
                stride_lsk=2048 * R * slices,
                lora_slice_cols=n_s, stride_lss=2048 * R, stride_lsp=R, stride_lsr=1, stride_lbs=4 * 128 * n_s * R,
                stride_lbl=128 * n_s * R, stride_lbe=n_s * R, stride_lbn=R, stride_lbr=1)
    kern = triton.compile(specialise(_fused_moe_gemm_kernel, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=warps, num_stages=3))
    regs, spilled = resources(kern.asm["cubin"])
    return regs, spilled, kern.metadata.shared


def main() -> None:
    # the Hopper heuristic's tiles (fused_moe_gemm._gpu_config) from decode to prefill
    tiles = [(16, 128, 128, 4), (32, 128, 128, 4), (64, 256, 64, 8), (128, 256, 64, 8)]
    gemms = {"w13": dict(N=1536, K=2048, R=32, slices=1, act=-1, top_k_in=8),
             "w2": dict(N=2048, K=768, R=16, slices=1, act=-1, top_k_in=1),
             "w13 2 slices + SiLU": dict(N=1536, K=2048, R=16, slices=2, act=0, top_k_in=8),
             "w13, shrink in 8 partials": dict(N=1536, K=2048, R=32, slices=1, act=-1, top_k_in=8, parts=8)}
    failed = False
    for name, shape in gemms.items():
        for bm, bn, bk, warps in tiles:
            regs, spilled, shared = compile_case(bm, bn, bk, warps, **shape)
            ok = (spilled in (None, 0)) and shared <= SHARED_LIMIT
            failed |= not ok
            print(f"{'ok' if ok else 'FAIL'} {name} {bm}x{bn}x{bk} warps {warps}: {regs} registers, {spilled} "
                  f"spilled, {shared} B shared", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
