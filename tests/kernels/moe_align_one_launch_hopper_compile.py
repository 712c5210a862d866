"""Compile ``_align_one_kernel`` (moe_align_block_size's one-program align) for an H100/H200 (sm_90) without a
GPU: run as a script, without TRITON_INTERPRET, by test_moe_align_one_launch.py.  The expert align (128 experts)
and the LoRA align (4 slots x 128 experts) at 2048 pairs (256 tokens, top-8).  One line each (registers,
spills, shared memory); exits 1 when one spills."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, resources, specialise  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._moe_align_kernel import _align_one_kernel  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import _one_launch_warps  # noqa: E402


def main() -> int:
    bad = 0
    for name, groups, lora, block in (("expert", 128, False, 32), ("LoRA", 512, True, 16)):
        g_pad = 1 << groups.bit_length()  # next power of two of groups + 1
        ptrs = {n: "i32" for n in ("ids_ptr", "sorted_ptr", "block_ids_ptr", "total_ptr", "padded_ptr",
                                   "slot_counts_ptr", "map_ptr", "enabled_ptr", "emap_ptr")}
        cexp = dict(BLOCK_SIZE=block, CHUNK=2048, G_PAD=g_pad, PAD_W=16, FILL=1024, LORA=lora, HAS_EMAP=False,
                    SLOT_SUMS=lora, USE_PDL=True)
        ints = dict(numel=2048, num_groups=groups, size=2048 + groups * (block - 1), num_blocks=groups * 2,
                    top_k=8, e_local=128 if lora else 0, max_loras=4, e_global=1, num_slots=4 if lora else 0)
        k = triton.compile(specialise(_align_one_kernel, ptrs, cexp, ints), target=TARGET,
                           options=dict(num_warps=_one_launch_warps(g_pad, 2048)))
        regs, spills = resources(k.asm["cubin"])
        ok = spills == 0
        bad += not ok
        print(f"{'ok' if ok else 'FAILED'} {name} align, 2048 pairs: {regs} registers, {spills} B local, "
              f"shared {k.metadata.shared} B", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
