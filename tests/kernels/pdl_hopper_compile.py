"""Compile PDL-aware kernels for an H100/H200 (sm_90) with ``USE_PDL`` and ``launch_pdl``, without a GPU: run as
a script without TRITON_INTERPRET, by test_pdl.py.  Each must wait (``griddepcontrol.wait``) and then trigger
its dependents before its first global load or store; without ``USE_PDL`` no grid dependency control remains.
One "ok" line per kernel and setting; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.kernels.sass_stats import specialise  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._moe_sum_kernel import _moe_sum_kernel  # noqa: E402
from vllm.model_executor.layers.ops._dense_gemv_kernel import dense_gemv_kernel  # noqa: E402
from vllm.model_executor.layers.ops._rms_norm_kernel import _rms_norm_kernel  # noqa: E402

CASES = {
    "rms_norm": (_rms_norm_kernel, {n: "bf16" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")},
                 {"HAS_RESIDUAL": True, "BLOCK_N": 2048},
                 {n: 2048 for n in ("N", "stride_x", "stride_r", "stride_o", "stride_ro")}, 8),
    "dense_gemv": (dense_gemv_kernel, {n: "bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")},
                   {"HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024},
                   {"M": 1, "N": 2048, "K": 2048, "stride_xm": 2048, "stride_wn": 2048, "stride_ym": 2048}, 8),
    "moe_sum": (_moe_sum_kernel, {"x_ptr": "bf16", "out_ptr": "bf16"}, {"BLOCK_K": 8, "BLOCK_H": 1024},
                {"H": 2048, "top_k": 8, "stride_xm": 16384, "stride_xk": 2048, "stride_xh": 1, "stride_om": 2048,
                 "stride_oh": 1}, 4),
}
WEIGHTS_FIRST = {"dense_gemv"}


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, (fn, ptrs, cexp, ints, warps) in CASES.items():
        for use_pdl in (True, False):
            src = specialise(fn, ptrs, {**cexp, "USE_PDL": use_pdl}, ints)
            ptx = triton.compile(src, target=target, options={"num_warps": warps, "launch_pdl": use_pdl}).asm["ptx"]
            if use_pdl:
                wait, trigger = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
                store, load = ptx.find("st.global"), ptx.find("ld.global")
                # the GEMV loads its first W tile before the wait; the others load nothing before it
                loads_first = name in WEIGHTS_FIRST
                if not (0 <= wait < trigger < store and (load < wait) == loads_first):
                    sys.exit(f"{name}: wait at {wait}, trigger at {trigger}, first load at {load}, store at {store}")
            elif "griddepcontrol" in ptx:
                sys.exit(f"{name}: grid dependency control without USE_PDL")
            print(f"ok {name} USE_PDL={use_pdl}", flush=True)


if __name__ == "__main__":
    main()
