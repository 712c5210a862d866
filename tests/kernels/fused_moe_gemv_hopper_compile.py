"""Compile the bf16 expert GEMV (``_fused_moe_gemv_kernel.py``) for an H100/H200 (sm_90) without a GPU: run as a
script without TRITON_INTERPRET, by test_fused_moe_gemv.py.  One line per variant; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemv_kernel import _fused_moe_gemv_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def main() -> None:
    fn = _fused_moe_gemv_kernel
    # (dtype, bias, routed weight, split, block_n, block_k): the heuristic's one-token tiles and the other paths
    cases = [("bf16", False, False, 1, 16, 256), ("bf16", True, True, 1, 8, 512), ("fp16", False, True, 2, 64, 256),
             ("bf16", True, False, 4, 32, 256), ("fp32", True, True, 1, 16, 128)]
    for dtype, bias, weighted, split, bn, bk in cases:
        ptrs = {"a_ptr": dtype, "w_ptr": dtype, "out_ptr": "fp32" if split > 1 else dtype, "bias_ptr": dtype,
                "topk_weights_ptr": "fp32", "pair_expert_ids_ptr": "i32"}
        cexp = dict(HAS_BIAS=bias, MUL_ROUTED_WEIGHT=weighted, SPLIT_K=split, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
                    stride_ak=1, stride_wk=1, stride_on=1, stride_bn=1)
        if "USE_PDL" in fn.arg_names:  # a plain launch
            cexp = {**cexp, "USE_PDL": False}
        sig = {n: ("*" + ptrs[n]) if n in ptrs else "constexpr" if n in cexp else "i32" for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()})
        triton.compile(src, target=TARGET, options=dict(num_warps=4, num_stages=1))
        print(f"ok gemv {dtype} bias {bias} weighted {weighted} split {split} tiles {bn}x{bk}", flush=True)


if __name__ == "__main__":
    main()
