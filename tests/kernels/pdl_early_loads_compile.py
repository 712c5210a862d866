"""Compile the kernels of ``vllm/platforms/pdl.EARLY_LOADS`` for an H100/H200 (sm_90) with PDL, without a GPU: run
as a script without TRITON_INTERPRET, by test_pdl_early_loads.py.  With ``EARLY`` global loads (the step's
metadata, the cos / sin rows) come before ``griddepcontrol.wait`` and no store does; without it no global access
does.  The specialisations: ``benchmarks/kernels/early_loads_report.py``.  One "ok" line per kernel and setting;
exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

from benchmarks.kernels.early_loads_report import ATTENTION_CASES, compile_attention  # noqa: E402
from benchmarks.kernels.sass_stats import resources  # noqa: E402


def main() -> None:
    for name in ATTENTION_CASES:
        for early in (False, True):
            out = compile_attention(name, early)
            ptx = out.asm["ptx"]
            before = ptx[:ptx.find("griddepcontrol.wait")]
            loads, stores = before.count("ld.global"), before.count("st.global")
            _, spills = resources(out.asm["cubin"])
            if "griddepcontrol.wait" not in ptx or stores or spills or (loads > 0) != early:
                sys.exit(f"{name} EARLY={early}: {loads} loads and {stores} stores before the wait, {spills} B spills")
            print(f"ok {name} EARLY={early}: {loads} global loads before the wait", flush=True)


if __name__ == "__main__":
    main()
