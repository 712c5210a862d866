"""Compile the int4 tl.dot kernel with UNPACK 3 for sm_90 without a GPU (run without TRITON_INTERPRET, by
test_int4_unpack3_fit.py) and check its shared memory against ``int4_dot_smem.unpack3_shared_bytes``: never
above the bound, equal to it at the heuristic's 4-32 rows-per-expert tiles (16x128x128, 32x128x128).  One line
per (dtype, tiles, stages): "ok ..." or "FAILED ..."; exits 1 on any failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402

from benchmarks.kernels.kernel_static_report import compile_int4  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops.int4_dot_smem import SM90_SHARED_LIMIT, unpack3_shared_bytes  # noqa: E402

# the heuristic's 4-32 rows-per-expert tiles, and wider ones where the bound is loose (16x64x*, 32x64x256 and
# 64x128x128 also checked when it was written: 14848-57344 B, within the bound)
TILES = [(16, 128, 128), (32, 128, 128), (16, 128, 256), (32, 256, 128)]
EXACT = {(16, 128, 128), (32, 128, 128)}


def main() -> None:
    failed = 0
    for dtype, (bm, bn, bk), stages in itertools.product((torch.bfloat16, torch.float16), TILES, (2, 3, 4)):
        cfg = dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=8, SPLIT_K=1, num_warps=4,
                   num_stages=stages, UNPACK=3)
        kern = compile_int4(dtype, cfg, N=4096, K=4096, num_pairs=512, sorted_pairs=True, group=256)
        got, bound = kern.metadata.shared, unpack3_shared_bytes(bm, bn, bk, stages)
        good = got <= bound <= SM90_SHARED_LIMIT and (got == bound or (bm, bn, bk) not in EXACT)
        failed += not good
        print(f"{'ok' if good else 'FAILED'} {dtype} {bm}x{bn}x{bk} stages {stages}: {got} B compiled, bound {bound}",
              flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
