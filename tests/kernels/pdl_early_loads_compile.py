"""Compile the kernels of ``vllm/platforms/pdl.EARLY_LOADS`` for an H100/H200 (sm_90) with PDL, without a GPU: run
as a script without TRITON_INTERPRET, by test_pdl_early_loads.py.  With ``EARLY`` global loads (the step's
metadata, the cos / sin rows) come before ``griddepcontrol.wait`` and no store does; without it no global access
does.  One "ok" line per kernel and setting; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.kernels.sass_stats import resources, specialise  # noqa: E402
from vllm.attention._decode_split_kernel import decode_reduce_kernel, decode_split_kernel  # noqa: E402
from vllm.model_executor.layers.ops._qk_norm_rope_kernel import _qk_norm_rope_kernel  # noqa: E402

CASES = {  # Qwen3-30B-A3B's attention: 32 query / 4 KV heads of 128, block size 16, 16 splits
    "qk_norm_rope": (_qk_norm_rope_kernel,
                     {**{n: "bf16" for n in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qw_ptr", "kw_ptr")},
                      "pos_ptr": "i64", "cos_ptr": "fp32", "sin_ptr": "fp32"},
                     {"NORM": 1, "CLIP": False, "HAS_PASS": False, "NH_P": 32, "HALF_P": 64, "PASS_P": 1},
                     {"NQ": 0, "NK": 0, "HEAD_DIM": 128, "HALF": 64, "MAX_POS": 0, "stride_q": 5120,
                      "stride_k": 5120, "stride_qo": 4096, "stride_ko": 512, "stride_cos": 64, "n_tokens": 0}, 8),
    "decode_split": (decode_split_kernel,
                     {"q_ptr": "bf16", "kv_ptr": "bf16", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32",
                      "block_tables_ptr": "i32", "part_acc_ptr": "fp32", "part_m_ptr": "fp32", "part_l_ptr": "fp32"},
                     {"NUM_SPLITS": 16, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 128, "UPCAST": False,
                      "USE_WINDOW": False},
                     {"GROUP": 8, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "NUM_HEADS": 32, "WINDOW": 0, "stride_qt": 4096,
                      "stride_qh": 128, "stride_qd": 1, "stride_kv": 0, "stride_kb": 8192, "stride_ko": 512,
                      "stride_kh": 128, "stride_kd": 1, "stride_bt_b": 64}, 4),
    "decode_reduce": (decode_reduce_kernel,
                      {"out_ptr": "bf16", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32", "part_acc_ptr": "fp32",
                       "part_m_ptr": "fp32", "part_l_ptr": "fp32", "sinks_ptr": "bf16"},
                      {"NUM_SPLITS": 16, "SPLITS_P": 16, "BLOCK_N": 32, "BLOCK_D": 128, "USE_WINDOW": False,
                       "USE_SINKS": True},
                      {"HEAD_DIM": 128, "NUM_HEADS": 32, "WINDOW": 0, "stride_ot": 4096, "stride_oh": 128,
                       "stride_od": 1}, 1),
}


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, (fn, ptrs, cexp, ints, warps) in CASES.items():
        for early in (False, True):
            src = specialise(fn, ptrs, {**cexp, "USE_PDL": True, "EARLY": early}, ints)
            out = triton.compile(src, target=target, options={"num_warps": warps, "launch_pdl": True})
            ptx = out.asm["ptx"]
            before = ptx[:ptx.find("griddepcontrol.wait")]
            loads, stores = before.count("ld.global"), before.count("st.global")
            _, spills = resources(out.asm["cubin"])
            if "griddepcontrol.wait" not in ptx or stores or spills or (loads > 0) != early:
                sys.exit(f"{name} EARLY={early}: {loads} loads and {stores} stores before the wait, {spills} B spills")
            print(f"ok {name} EARLY={early}: {loads} global loads before the wait", flush=True)


if __name__ == "__main__":
    main()
