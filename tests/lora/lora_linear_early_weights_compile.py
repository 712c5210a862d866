"""Compile the dense LoRA prefetch kernel for an H100/H200 (sm_90) with PDL, without a GPU, at the q/k/v launch
of Qwen3-30B-A3B width (rank 16, one token; ``benchmarks/kernels/early_loads_report.py``): run as a script
without TRITON_INTERPRET, by test_lora_linear_token_variant.py.  With ``EARLY_WEIGHTS`` global loads (the slot,
A, B) come before ``griddepcontrol.wait`` and no store does; without it no global access comes before the wait.
Prints one "ok" line per setting, with the loads issued before the wait; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

from benchmarks.kernels.early_loads_report import compile_lora_prefetch  # noqa: E402
from benchmarks.kernels.sass_stats import resources  # noqa: E402


def main() -> None:
    for early in (False, True):
        out = compile_lora_prefetch(early)
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
