"""Compile the dense decode GEMVs (``_dense_gemv_kernel.py``) for an H100/H200 (sm_90) without a GPU: run as a
script without TRITON_INTERPRET, by test_dense_gemv.py.  One line per variant; exits 1 on failure."""
import inspect
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm.model_executor.layers.ops._dense_gemv_kernel import dense_gemv_delayed_kernel, dense_gemv_kernel  # noqa

TARGET = GPUTarget("cuda", 90, 32)


def main() -> None:
    # the heuristic's tiles (4 x 1024, 8 warps; fp32 4 x 256) at 1 / 2 / 4 tokens, with and without a K tail
    for fn, dtype, bm, even in itertools.product((dense_gemv_kernel, dense_gemv_delayed_kernel), ("bf16", "fp16"),
                                                 (1, 2, 4), (True, False)):
        ptrs = {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "y_ptr": dtype}
        cexp = dict(HAS_BIAS=bm != 2, EVEN_K=even, BLOCK_M=bm, BLOCK_N=4, BLOCK_K=1024)
        if "USE_PDL" in fn.arg_names:  # a plain launch
            cexp = {**cexp, "USE_PDL": False}
        # the other constexprs at their defaults (dense_gemv_kernel's LoRA shrink programs off)
        cexp.update({p.name: p.default for p in fn.params if p.is_constexpr and p.name not in cexp
                     and p.default is not inspect.Parameter.empty})
        sig = {n: ("*" + ptrs[n]) if n in ptrs else "constexpr" if n in cexp else "i32" for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()})
        triton.compile(src, target=TARGET, options=dict(num_warps=8))
        print(f"ok {fn.__name__} {dtype} rows {bm} even_k {even}", flush=True)


if __name__ == "__main__":
    main()
