"""Compile the int4 GEMV (``_int4_gemv_kernel.py``) for an H100/H200 (sm_90) without a GPU: run as a
script without TRITON_INTERPRET, by test_int4_gemv.py.  One line per variant; exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm.model_executor.layers.fused_moe.ops._int4_gemv_kernel import _int4_gemv_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def main() -> None:
    fn = _int4_gemv_kernel
    # (group, zeros, g_idx, perm, even K, split): the heuristic's (group 128 / 32) and the act-order paths
    variants = [(128, True, False, False, True, 4), (32, False, False, True, False, 1),
                (128, True, True, True, True, 2)]
    cases = [*itertools.product(["bf16", "fp16"], variants), ("fp32", (32, True, False, False, True, 2))]
    for dtype, (group, zeros, gidx, perm, even, split) in cases:
        ptrs = {"a_ptr": dtype, "qw_ptr": "i32", "s_ptr": dtype, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
                "out_ptr": "fp32" if split > 1 else dtype, "topk_weights_ptr": "fp32", "pair_expert_ids_ptr": "i32"}
        cexp = dict(GROUP_SIZE=group, HAS_ZEROS=zeros, HAS_G_IDX=gidx, HAS_PERM=perm, MUL_ROUTED_WEIGHT=True,
                    EVEN_K=even, EVEN_N=even, SPLIT_K=split, BLOCK_SIZE_N=128, BLOCK_SIZE_K=256)
        if "USE_PDL" in fn.arg_names:  # a plain launch
            cexp = {**cexp, "USE_PDL": False}
        sig = {n: ("*" + ptrs[n]) if n in ptrs else "constexpr" if n in cexp else "i32" for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()})
        triton.compile(src, target=TARGET, options=dict(num_warps=4, num_stages=1))
        print(f"ok gemv {dtype} group {group} zeros {zeros} g_idx {gidx} perm {perm} "
              f"even {even} split {split}", flush=True)


if __name__ == "__main__":
    main()
