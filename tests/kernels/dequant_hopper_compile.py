"""Compile the expert dequantisers (``ops/_int4_dequant_kernel.py``, ``ops/_mxfp4_dequant_kernel.py``) for an
H100/H200 (sm_90) without a GPU: run as a script, without TRITON_INTERPRET, by test_expert_dequant.py.  The
interpreter checks their numbers; this catches what only the compiler sees (types, the unpack reshape, the
nibble join, the transposed and bit-pattern stores).  Prints one line per variant; exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

from tests.kernels.int4_hopper_compile import compile_kernel  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._int4_dequant_kernel import _int4_dequant_kernel  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._mxfp4_dequant_kernel import _mxfp4_dequant_kernel  # noqa: E402

# the output pointer of each dtype (bf16 results are stored as int16 bit patterns), its OUT_KIND
OUTS = {"bf16": ("i16", 2), "fp16": ("fp16", 1), "fp32": ("fp32", 0)}


def main() -> None:
    # (zeros, g_idx, perm, scales in another dtype)
    variants = [(True, False, False, False), (False, False, True, False), (True, True, True, True)]
    for dtype, (zeros, gidx, perm, other) in itertools.product(OUTS, variants):
        out, kind = OUTS[dtype]
        ptrs = {"qw_ptr": "i32", "s_ptr": "fp16" if other else {"bf16": "bf16"}.get(dtype, dtype), "z_ptr": "u8",
                "g_ptr": "i32", "perm_ptr": "i32", "out_ptr": out}
        compile_kernel(_int4_dequant_kernel, ptrs, dict(GROUP_SIZE=128, HAS_ZEROS=zeros, HAS_G_IDX=gidx, HAS_PERM=perm,
                                                        ROUND_SCALES=other, OUT_KIND=kind, BLOCK_N=64, BLOCK_K=128),
                       num_warps=4)
        print(f"ok int4 {dtype} zeros {zeros} g_idx {gidx} perm {perm} scales-other {other}", flush=True)
    for dtype, (bn, bk) in itertools.product(OUTS, [(32, 256), (64, 64)]):
        out, kind = OUTS[dtype]
        compile_kernel(_mxfp4_dequant_kernel, {"q_ptr": "u8", "s_ptr": "u8", "out_ptr": out},
                       dict(OUT_KIND=kind, BLOCK_N=bn, BLOCK_K=bk), num_warps=4)
        print(f"ok mxfp4 {dtype} {bn}x{bk}", flush=True)


if __name__ == "__main__":
    main()
