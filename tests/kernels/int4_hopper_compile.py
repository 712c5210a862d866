"""Compile the int4 MoE kernels for an H100/H200 (sm_90) without a GPU: run as a script, without
TRITON_INTERPRET (the interpreter patches triton.language), by test_int4_moe_gemm.py.  The CPU
interpreter runs the kernels' numbers; this catches what only the compiler sees (types, layouts,
the reshape of the unpacked codes, shared memory).  Prints one line per variant; exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import (  # noqa: E402
    _int4_moe_gemm_kernel,
    _split_k_reduce_kernel,
)
from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_swap_kernel import _int4_moe_gemm_swap_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, pointers: dict, constexprs: dict, **options) -> None:
    if "USE_PDL" in fn.arg_names:  # a plain launch
        constexprs = {**constexprs, "USE_PDL": False}
    sig = {n: ("*" + pointers[n]) if n in pointers else "constexpr" if n in constexprs else "i32" for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    triton.compile(src, target=TARGET, options=options)


def main() -> None:
    # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, sorted, zeros, g_idx, perm, even K): the configs the heuristic gives
    variants = [(16, 128, 128, 4, False, True, False, False, True), (16, 64, 128, 8, True, False, False, True, True),
                (64, 128, 64, 1, True, True, True, True, False), (128, 128, 64, 1, True, False, False, False, True)]
    # the UNPACK modes (0 = the default reshape) at the decode tiles, 1 and 2 with two stages (their [BK, BN]
    # word tiles take 4x the shared memory of mode 0's)
    variants = [v + (0, 4) for v in variants] + [(16, 128, 128, 4, False, True, False, False, even, unpack, 2)
                                                 for unpack in (1, 2) for even in (True, False)]
    # UNPACK 3 (one group per tile: K is a multiple of the tile): with and without zeros, act-order perm
    variants += [(16, 128, 128, 1, True, True, False, True, True, 3, 4), (16, 64, 256, 4, False, False, False, False,
                                                                       True, 3, 4)]
    # UNPACK 4 (the operands swapped; one group per tile): sorted and unsorted, split-K, zeros, perm, an uneven K
    variants += [(16, 128, 128, 1, True, True, False, True, True, 4, 3), (32, 256, 128, 2, False, False, False, False,
                                                                       False, 4, 1)]
    # UNPACK 5 (the same, int32 words, tf32 dots, pipelined)
    variants += [(32, 128, 128, 1, True, True, False, True, True, 5, 3), (16, 256, 128, 2, False, False, False, False,
                                                                       False, 5, 2)]
    # the 64- / 128-row tiers' wide tiles (WIDE_SWAP_TILES: 8 warps)
    variants += [(64, 256, 128, 1, True, True, False, False, True, 5, 3), (128, 256, 128, 1, True, False, False, True,
                                                                        True, 4, 1)]
    for dtype, (bm, bn, bk, split, srt, zeros, gidx, perm, even, unpack, stages) in itertools.product(["bf16", "fp16"],
                                                                                                    variants):
        ptrs = {"a_ptr": dtype, "qw_ptr": "i32", "s_ptr": dtype, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
                "out_ptr": "fp32" if split > 1 else dtype, "topk_weights_ptr": "fp32",
                "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
        cexp = dict(GROUP_SIZE=128, HAS_ZEROS=zeros, HAS_G_IDX=gidx, HAS_PERM=perm, MUL_ROUTED_WEIGHT=True,
                    UPCAST_DOT=False, EVEN_K=even, SPLIT_K=split, BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
                    GROUP_SIZE_M=8 if srt else 1, SORTED=srt, UNPACK=unpack)
        fn = _int4_moe_gemm_kernel
        if unpack >= 4:  # the operands swapped: its own kernel; 4 reads int16 halves of the words
            fn, ptrs = _int4_moe_gemm_swap_kernel, dict(ptrs, qw_ptr="i16" if unpack == 4 else "i32")
        compile_kernel(fn, ptrs, cexp, num_warps=8 if bm == 128 or bn == 256 and bm == 64 else 4, num_stages=stages)
        print(f"ok gemm {dtype} {bm}x{bn}x{bk} split {split} sorted {srt} unpack {unpack}", flush=True)
    for dtype, (rows, act) in itertools.product(["bf16", "fp16"], [(1, -1), (8, -1), (1, 0), (1, 1), (1, 5)]):
        compile_kernel(_split_k_reduce_kernel, {"part_ptr": "fp32", "out_ptr": dtype},
                       dict(SPLIT_K=4, ROWS=rows, ACT=act, BLOCK=1024), num_warps=4)
        print(f"ok reduce {dtype} rows {rows} act {act}", flush=True)


if __name__ == "__main__":
    main()
