"""Compile the int4 multi-row GEMV (``_int4_gemv_rows_kernel.py``) for an H100/H200 (sm_90) without a GPU: run
as a script without TRITON_INTERPRET, by test_int4_gemv_rows.py.  One line per variant (with its registers and
spilled bytes when cuobjdump is there); exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm.model_executor.layers.fused_moe.ops._int4_gemv_rows_kernel import _int4_gemv_rows_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def main() -> None:
    fn = _int4_gemv_rows_kernel
    # (BLOCK_SIZE_M, group, zeros, g_idx, perm, even K and N, split): every block size at the heuristic's
    # BLOCK_SIZE_K (256 / BLOCK_SIZE_M), group 128 / 32, and the act-order paths
    variants = [(1, 128, True, False, False, True, 4), (2, 128, True, False, False, True, 1),
                (2, 32, False, False, True, False, 2), (4, 128, True, True, True, True, 1),
                (8, 32, True, False, False, True, 2), (16, 128, False, False, False, False, 1)]
    cases = [*itertools.product(["bf16", "fp16"], variants), ("fp32", (2, 32, True, False, False, True, 2))]
    for dtype, (bm, group, zeros, gidx, perm, even, split) in cases:
        ptrs = {"a_ptr": dtype, "qw_ptr": "i32", "s_ptr": dtype, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
                "out_ptr": "fp32" if split > 1 else dtype, "topk_weights_ptr": "fp32", "sorted_token_ids_ptr": "i32",
                "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
        cexp = dict(GROUP_SIZE=group, HAS_ZEROS=zeros, HAS_G_IDX=gidx, HAS_PERM=perm, MUL_ROUTED_WEIGHT=True,
                    EVEN_K=even, EVEN_N=even, SPLIT_K=split, BLOCK_SIZE_M=bm, BLOCK_SIZE_N=128,
                    BLOCK_SIZE_K=max(16, 256 // bm))
        if "USE_PDL" in fn.arg_names:  # a plain launch
            cexp = {**cexp, "USE_PDL": False}
        sig = {n: ("*" + ptrs[n]) if n in ptrs else "constexpr" if n in cexp else "i32" for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()})
        kernel = triton.compile(src, target=TARGET, options=dict(num_warps=4, num_stages=1))
        print(f"ok gemv rows {dtype} BLOCK_SIZE_M {bm} group {group} zeros {zeros} "
              f"g_idx {gidx} perm {perm} "
              f"even {even} split {split} shared {kernel.metadata.shared}", flush=True)


if __name__ == "__main__":
    main()
