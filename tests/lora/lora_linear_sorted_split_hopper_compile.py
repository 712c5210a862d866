"""Compile the dense LoRA sorted path's split pair (``_lora_linear_sorted_split_kernels.py``) for an H100/H200
(sm_90) without a GPU: run as a script, without TRITON_INTERPRET, by test_lora_linear_sorted_split.py.  The
GPU tiles of ``sorted_split_config`` for the Qwen3-30B-A3B q/k/v (3 slices) and o launches at 64 and 256
tokens, ranks 16 and 32, specialised as at run time on contiguous tensors, with PDL, without and with
``EARLY_WEIGHTS`` (global loads before ``griddepcontrol.wait`` only with it, never a store).  Prints one line per
kernel and case (registers, spills, shared memory, loads before the wait); exits 1 when one spills or fails that."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

from benchmarks.kernels.early_loads_report import compile_sorted_pair as compile_pair  # noqa: E402
from benchmarks.kernels.sass_stats import resources  # noqa: E402


def main() -> int:
    bad = 0
    for name, (K, widths) in {"qkv": (2048, [4096, 512, 512]), "o": (4096, [2048])}.items():
        for T in (64, 256):
            for R in (16, 32):
                for early in (False, True):
                    for kname, k in zip(("shrink", "expand"), compile_pair(T, K, widths, R, early=early)):
                        regs, spills = resources(k.asm["cubin"])
                        ptx = k.asm["ptx"]
                        before = ptx[:ptx.find("griddepcontrol.wait")]
                        # EARLY_WEIGHTS: loads (the slot blocks, A / B) and no store before the wait; else nothing
                        ok = spills == 0 and "st.global" not in before and ("ld.global" in before) == early
                        bad += not ok
                        print(f"{'ok' if ok else 'FAILED'} {kname} {name} {T} tokens rank {R} early {early}: "
                              f"{regs} registers, {spills} B local, shared {k.metadata.shared} B, "
                              f"{before.count('ld.global')} loads before the wait", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
