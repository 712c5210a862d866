"""Shared memory of the int4 tl.dot kernel (``_int4_moe_gemm_kernel.py``) on sm_90, from its tiles.

The heuristic (``int4_moe_gemm._heuristic_config``) uses it to give ``UNPACK`` 3 only (tiles, stages)
that fit one block's shared memory on an H100 / H200 (227 KB opt-in: 232448 B), lowering
``num_stages`` where they would not.  Read from the kernel compiled for sm_90 by Triton 3.6
(``tests/kernels/int4_dot_smem_compile.py`` checks the bound against the compiled figures):

    UNPACK 3:  (stages - 1) * W + max(W, 4 * BLOCK_M * BLOCK_N)      W = BLOCK_K / 8 * BLOCK_N * 4

W is one K-step of packed words (int32 [BLOCK_K / 8, BLOCK_N]), the one operand the pipeliner stages
through shared memory (cp.async); the last term is the larger of the last stage's words and the
fp32 accumulator tile (its epilogue layout conversion reuses the pipeline's buffers).  Exact at
16x128x128 and 32x128x128 (32768 / 40960 B at 4 stages, bf16 or fp16), an upper bound elsewhere.
"""
from __future__ import annotations

from typing import Optional

SM90_SHARED_LIMIT = 232448  # bytes one block may use on an H100 / H200 (227 KB, opt-in)


def unpack3_shared_bytes(block_m: int, block_n: int, block_k: int, num_stages: int) -> int:
    """Upper bound of the shared memory (bytes) of the UNPACK 3 kernel at these tiles (any 16-bit dtype)."""
    words = block_k // 8 * block_n * 4
    return (max(num_stages, 1) - 1) * words + max(words, 4 * block_m * block_n)


def unpack3_stages_that_fit(block_m: int, block_n: int, block_k: int, num_stages: int,
                            limit: int = SM90_SHARED_LIMIT) -> Optional[int]:
    """The most stages, from ``num_stages`` down to 2, whose UNPACK 3 kernel fits ``limit`` bytes; None if
    even 2 stages do not (the heuristic then keeps UNPACK 0)."""
    for stages in range(num_stages, 1, -1):
        if unpack3_shared_bytes(block_m, block_n, block_k, stages) <= limit:
            return stages
    return None
