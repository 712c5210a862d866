"""Compile the MoE LoRA expert-block kernel (``_moe_lora_expert_block_kernel.py``) for an H100/H200 (sm_90) without
a GPU: run as a script without TRITON_INTERPRET, by test_moe_lora_expert_blocks.py.  Qwen3-30B-A3B's w13 (two
slices, and one A for both) and w2 at the base alignment's blocks of 256 tokens (32 rows) and 1024 (64), a
program per slot and the slot loop: no spills.  One "ok" line per kernel with its registers; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, resources, specialise  # noqa: E402
from vllm.lora.ops.triton_ops._moe_lora_expert_block_kernel import moe_lora_expert_block_kernel as KERNEL  # noqa

PTRS = dict(x_ptr="bf16", a_ptr="bf16", b_ptr="bf16", out_ptr="bf16", w_ptr="fp32", sorted_ids_ptr="i32",
            block_expert_ids_ptr="i32", num_post_padded_ptr="i32", mapping_ptr="i32", enabled_ptr="i32")
E, L, R = 128, 4, 16
# name: (K, N, top_k_in, MUL_ROUTED_WEIGHT, slices in the grid, slices per program, BLOCK_N)
GEMMS = {"w13": (2048, 768, 8, False, 2, 1, 128), "w13, one A": (2048, 768, 8, False, 1, 2, 128),
         "w2": (768, 2048, 1, True, 1, 1, 256)}


def compile_case(K, N, top_k_in, mul_w, slices, per_program, block_n, block_m, slot_groups):
    ints = dict(numel=2048, top_k=8, top_k_in=top_k_in, K=K, N=N, R=R, max_loras=L, stride_xm=K, stride_xk=1,
                stride_as=0 if per_program > 1 else L * E * R * K, stride_al=E * R * K, stride_ae=R * K,
                stride_ar=K, stride_ak=1, stride_bs=L * E * N * R, stride_bl=E * N * R, stride_be=N * R,
                stride_bn=R, stride_br=1, stride_ot=8 * N * 2, stride_oj=N * 2, stride_on=1, out_col0=0,
                out_slice_cols=N, num_n_splits=2, num_slices=slices, slices_per_program=per_program,
                slot_groups=slot_groups)
    cexp = dict(MUL_ROUTED_WEIGHT=mul_w, UPCAST=False, FP32_PRECISION="tf32x3", EXPAND_MODE=1, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=128, BLOCK_R=R, USE_PDL=True)
    return triton.compile(specialise(KERNEL, PTRS, cexp, ints), target=TARGET,
                          options=dict(num_warps=4, num_stages=3))


def main() -> None:
    bad = 0
    for name, (K, N, top_k_in, mul_w, slices, per_program, block_n) in GEMMS.items():
        for block_m in (32, 64):
            for slot_groups in (L, 1):
                regs, spill = resources(compile_case(K, N, top_k_in, mul_w, slices, per_program, block_n, block_m,
                                                     slot_groups).asm["cubin"])
                label = f"{name}, BLOCK_M {block_m}, {'a program per slot' if slot_groups > 1 else 'slot loop'}"
                if spill:
                    print(f"FAIL {label}: {spill} bytes spilled ({regs} registers)")
                    bad += 1
                else:
                    print(f"ok {label}: {regs} registers")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
