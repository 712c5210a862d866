"""Compile the dense LoRA prefetch kernel for an H100/H200 (sm_90) with PDL, without a GPU, at the q/k/v launch
of Qwen3-30B-A3B width (rank 16, one token): run as a script without TRITON_INTERPRET, by
test_lora_linear_token_variant.py.  With ``EARLY_WEIGHTS`` global loads (the slot, A, B) come before
``griddepcontrol.wait`` and no store does; without it no global access comes before the wait.  Prints one
"ok" line per setting, with the loads issued before the wait; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.kernels.sass_stats import resources, specialise  # noqa: E402
from vllm.lora.ops.triton_ops._lora_linear_kernels import lora_linear_token_prefetch_kernel as kern  # noqa: E402

PTRS = {"x_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "y_ptr": "bf16", "mapping_ptr": "i32", "enabled_ptr": "i32"}
INTS = {"K": 2048, "R": 16, "max_loras": 4, "n0": 4096, "n1": 512, "n2": 512, "off0": 0, "off1": 4096, "off2": 4608,
        "stride_xt": 2048, "stride_xk": 1, "stride_as": 131072, "stride_al": 32768, "stride_ar": 2048, "stride_ak": 1,
        "stride_bs": 262144, "stride_bl": 65536, "stride_bn": 16, "stride_br": 1, "stride_yt": 5120, "stride_yn": 1}


def main() -> None:
    for early in (False, True):
        cexp = {"HAS_ENABLED": True, "BLOCK_N": 128, "BLOCK_K": 2048, "BLOCK_R": 16, "K_TILES": 1, "USE_PDL": True,
                "EARLY_WEIGHTS": early}
        out = triton.compile(specialise(kern, PTRS, cexp, INTS), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 16, "launch_pdl": True})
        ptx = out.asm["ptx"]
        wait = ptx.find("griddepcontrol.wait")
        before = ptx[:wait]
        loads, stores = before.count("ld.global"), before.count("st.global")
        _, spills = resources(out.asm["cubin"])
        if wait < 0 or stores or spills or (loads > 0) != early:
            sys.exit(f"EARLY_WEIGHTS={early}: wait at {wait}, {loads} loads and {stores} stores before it, "
                     f"{spills} bytes of spills")
        print(f"ok EARLY_WEIGHTS={early}: {loads} global loads before the wait", flush=True)


if __name__ == "__main__":
    main()
