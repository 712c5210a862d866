"""Private Triton body of the int4 expert dequantiser (see ``int4_dequant.py``).

One program writes one [BLOCK_N, BLOCK_K] tile of one expert's dense weight: it loads the
[BLOCK_K / 8, BLOCK_N] int32 words holding the tile's codes (rows along N, coalesced), unpacks
them in registers, loads the scale (and zero) row of each position's group, and computes
w = (q - z) * s exactly as ``Int4PackedWeight.dequantize_expert`` and the in-register GEMM do:
the difference is exact, the scale is first rounded to the output dtype, the product is
rounded once.  The tile is stored transposed, K contiguous ([E, N, K]); with act-order
(``perm``) stored position j is written to column perm[j], so the dense weight multiplies the
un-permuted activations.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._float_round import round_f32_to, storage_value


@triton.jit
def _int4_dequant_kernel(
    qw_ptr,  # [E, K/8, N] int32, code c of word [j, n] = q[n, 8j + c], last stride 1
    s_ptr,  # [E, Gs, N] scales, last stride 1
    z_ptr,  # [E, Gs, N] uint8 zeros (dummy when not HAS_ZEROS)
    g_ptr,  # [E, K] int32 group of each stored position (dummy when not HAS_G_IDX)
    perm_ptr,  # [E, K] int32 activation column of each stored position (dummy when not HAS_PERM)
    out_ptr,  # [e1 - e0, N, K] (any strides); int16 bits for bf16 (``_float_round.storage_view``)
    e0,
    N,
    K,
    stride_qe,
    stride_qk,
    stride_se,
    stride_sg,
    stride_ze,
    stride_zg,
    stride_pe,  # of g_idx and perm
    stride_oe,
    stride_on,
    stride_ok,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_PERM: tl.constexpr,
    ROUND_SCALES: tl.constexpr,  # the scales' dtype is not the output's: round them to it first
    OUT_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16 (``_float_round.out_kind``)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 8
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    expert = e0 + pid_e

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_kw = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    kw_ok = offs_kw < K // 8
    words = tl.load(qw_ptr + expert * stride_qe + offs_kw[:, None] * stride_qk + offs_n[None, :],
                    mask=kw_ok[:, None] & n_ok[None, :], other=0)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    q = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))  # row 8j + c

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # stored positions (kept affine: vectorised stores)
    k_ok = offs_k < K
    if HAS_G_IDX:
        g = tl.load(g_ptr + expert * stride_pe + offs_k, mask=k_ok, other=0)
    else:
        g = offs_k // GROUP_SIZE
    mask = k_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + expert * stride_se + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0)
    s = s.to(tl.float32)
    if ROUND_SCALES:
        s = round_f32_to(s, OUT_KIND)
    if HAS_ZEROS:
        z = tl.load(z_ptr + expert * stride_ze + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0)
        z = z.to(tl.int32)
    else:
        z = 8
    w = storage_value((q - z).to(tl.float32) * s, OUT_KIND)  # exact difference, one rounding

    if HAS_PERM:
        cols = tl.load(perm_ptr + expert * stride_pe + offs_k, mask=k_ok, other=0)
    else:
        cols = offs_k
    out_ptrs = out_ptr + pid_e * stride_oe + offs_n[None, :] * stride_on + cols[:, None] * stride_ok
    tl.store(out_ptrs, w, mask=mask)
