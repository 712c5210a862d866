"""Compile the dense LoRA sorted path's split pair (``_lora_linear_sorted_split_kernels.py``) for an H100/H200
(sm_90) without a GPU: run as a script, without TRITON_INTERPRET, by test_lora_linear_sorted_split.py.  The
GPU tiles of ``sorted_split_config`` for the Qwen3-30B-A3B q/k/v (3 slices) and o launches at 64 and 256
tokens, ranks 16 and 32, specialised as at run time on contiguous tensors, with PDL (no global load or store
before ``griddepcontrol.wait``).  Prints one line per kernel and case (registers, spills, shared memory, loads
before the wait); exits 1 when one spills or fails that."""
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
                for kname, k in zip(("shrink", "expand"), compile_pair(T, K, widths, R)):
                    regs, spills = resources(k.asm["cubin"])
                    ptx = k.asm["ptx"]
                    wait = ptx.find("griddepcontrol.wait")
                    before = ptx[:wait]
                    ok = spills == 0 and wait >= 0 and "st.global" not in before and "ld.global" not in before
                    bad += not ok
                    print(f"{'ok' if ok else 'FAILED'} {kname} {name} {T} tokens rank {R}: {regs} registers, "
                          f"{spills} B local, shared {k.metadata.shared} B, {before.count('ld.global')} loads "
                          f"before the wait", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
