"""Private Triton body of the tensor-core words' dequantiser (see ``w4_mma_dequant.py``).

One program writes one [BLOCK_N, BLOCK_K] tile of one expert's dense weight, K contiguous.  Each
element (n, k) finds its code in the [E, N/16, K/64, 32, 4] words (``int4_mma_layout`` /
``mxfp4_mma_layout``): row tile n // 16, input chunk k // 64, 16 x 16 tile j = (k % 64) // 16, and
within it (row r, column c) the lane 4 (r % 8) + (c % 8) // 2, the register (r // 8) + 2 (c // 8) and
the register's half c % 2.  The words of a tile are a few contiguous KiB, so the gather hits the
cache; the stores (4 or 8 times the bytes read) are coalesced.  ``_w4_mma_dequant_words_kernel`` (the
"words" order, the default) decodes whole words instead and moves the codes by one register permutation.

int4: the code is nibble register + 4 half; w = (q - z) * s, exact difference, the scale rounded
to the output dtype first, one rounding of the product (``Int4PackedWeight.dequantize_expert``).
MXFP4: code bit b sits at word bit (target(b) + 16 half + rotation) mod 32 (``mxfp4_mma_layout``'s
table: ``_mx_code``); w = e2m1 * 2^(s - 127), exact in float32, rounded once (``dequantize_mxfp4``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._float_round import round_f32_to, storage_value
from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import _e2m1_to_f32, _e8m0_to_f32


@triton.jit
def _mx_code(words, reg, half):
    """The e2m1 code held by (register ``reg``, ``half``) of ``words``: its three exponent / mantissa bits lie
    side by side at word bit (6 + 16 half + rotation) mod 32 (rotations 26 29 0 7 by register; no wrap), its sign
    at (15 + 16 half + rotation) mod 32 (rotations 26 29 27 28): one byte of a constant per register each."""
    rot_em = (0x07001D1A >> (8 * reg)) & 0xFF
    rot_s = (0x1C1B1D1A >> (8 * reg)) & 0xFF
    em = (words >> ((6 + 16 * half + rot_em) & 31)) & 7
    sign = (words >> ((15 + 16 * half + rot_s) & 31)) & 1
    return em | (sign << 3)


@triton.jit
def _w4_mma_dequant_kernel(
    w_ptr,  # [E, N/16, K/64, 32, 4] int32 words, contiguous
    s_ptr,  # int4: [E, G, N] scales; MXFP4: [E, K/32, N] uint8 e8m0; last stride 1
    z_ptr,  # int4: [E, G, N] uint8 zeros (dummy when not HAS_ZEROS)
    out_ptr,  # [e1 - e0, N, K] (any strides); int16 bits for bf16 (``_float_round.storage_view``)
    e0,
    N,
    K,
    stride_se,
    stride_sg,
    stride_ze,
    stride_zg,
    stride_oe,
    stride_on,
    stride_ok,
    MXFP4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # int4: inputs per scale (MXFP4: 32)
    HAS_ZEROS: tl.constexpr,
    ROUND_SCALES: tl.constexpr,  # int4: the scales' dtype is not the output's, round them to it first
    OUT_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16 (``_float_round.out_kind``)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    expert = e0 + pid_e

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    r = offs_n % 16
    c = offs_k % 16
    lane = 4 * (r % 8)[:, None] + ((c % 8) // 2)[None, :]
    reg = (r // 8)[:, None] + 2 * (c // 8)[None, :]
    half = (c % 2)[None, :]
    chunk = (offs_n // 16)[:, None] * (K // 64) + (offs_k // 64)[None, :]
    word_off = (chunk * 32 + lane) * 4 + ((offs_k % 64) // 16)[None, :]
    words = tl.load(w_ptr + expert * (N // 16) * (K // 64) * 128 + word_off, mask=mask, other=0)

    g = offs_k // GROUP_SIZE
    s_ptrs = s_ptr + expert * stride_se + g[None, :] * stride_sg + offs_n[:, None]
    if MXFP4:
        code = _mx_code(words, reg, half)
        exps = tl.load(s_ptrs, mask=mask, other=127).to(tl.int32)
        w = _e2m1_to_f32(code) * _e8m0_to_f32(exps)
    else:
        q = (words >> (4 * (reg + 4 * half))) & 0xF
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ROUND_SCALES:
            s = round_f32_to(s, OUT_KIND)
        if HAS_ZEROS:
            z = tl.load(z_ptr + expert * stride_ze + g[None, :] * stride_zg + offs_n[:, None], mask=mask,
                        other=0).to(tl.int32)
        else:
            z = 8
        w = (q - z).to(tl.float32) * s
    out_ptrs = out_ptr + pid_e * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, storage_value(w, OUT_KIND), mask=mask)


@triton.jit
def _widen16(x, ROWS: tl.constexpr, SEGS: tl.constexpr):
    """[ROWS, SEGS] per-16-input values -> [ROWS, SEGS * 16], each repeated over its 16 inputs."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (ROWS, SEGS, 16)), (ROWS, SEGS * 16))


@triton.jit
def _w4_mma_dequant_words_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, e0, N, K, stride_se, stride_sg, stride_ze, stride_zg, stride_oe, stride_on,
    stride_ok,
    MXFP4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # int4: inputs per scale, at least 16 (MXFP4: 32)
    HAS_ZEROS: tl.constexpr,
    ROUND_SCALES: tl.constexpr,
    OUT_KIND: tl.constexpr,
    TILES_N: tl.constexpr,  # 16-row tiles per program
    CHUNKS_K: tl.constexpr,  # 64-input chunks per program
):
    """``_w4_mma_dequant_kernel``'s contract, decoding whole words in their own order: the program loads its
    TILES_N x CHUNKS_K x 128 words as contiguous rows, splits each into its 8 codes, and moves the codes to their
    (row, column) by one register permutation: word w = 4 lane + j, lane = 4 g + t, code i = rh + 2 ch + 4 half
    -> row 8 rh + g, column 16 j + 8 ch + 2 t + half.  The scales are loaded once per 16 inputs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    expert = e0 + pid_e
    KC = K // 64
    nt = pid_n * TILES_N + tl.arange(0, TILES_N)
    kc = pid_k * CHUNKS_K + tl.arange(0, CHUNKS_K)
    tile_ok = (nt < N // 16)[:, None, None] & (kc < KC)[None, :, None]
    offs = (nt[:, None, None] * KC + kc[None, :, None]) * 128 + tl.arange(0, 128)[None, None, :]
    words = tl.load(w_ptr + expert * (N // 16) * KC * 128 + offs, mask=tile_ok, other=0)  # [TN, TK, 128]
    nib = tl.arange(0, 8)[None, None, None, :]
    if MXFP4:
        reg = nib % 4
        half = nib // 4
        code = _mx_code(words[:, :, :, None], reg, half)
    else:
        code = (words[:, :, :, None] >> (4 * nib)) & 0xF  # [TN, TK, 128, 8]
    # [TN, TK, g, t, j, half, ch, rh] -> [TN, rh, g, TK, j, ch, t, half] -> [rows, columns]
    code = tl.reshape(code, (TILES_N, CHUNKS_K, 8, 4, 4, 2, 2, 2))
    code = tl.permute(code, (0, 7, 2, 1, 4, 6, 3, 5))
    code = tl.reshape(code, (TILES_N * 16, CHUNKS_K * 64))

    offs_n = pid_n * TILES_N * 16 + tl.arange(0, TILES_N * 16)
    seg = pid_k * CHUNKS_K * 4 + tl.arange(0, CHUNKS_K * 4)  # 16-input segments: one scale each
    seg_ok = (offs_n < N)[:, None] & (seg < K // 16)[None, :]
    s_ptrs = s_ptr + expert * stride_se + (seg * 16 // GROUP_SIZE)[None, :] * stride_sg + offs_n[:, None]

    if MXFP4:
        exps = tl.load(s_ptrs, mask=seg_ok, other=127).to(tl.int32)
        w = _e2m1_to_f32(code) * _widen16(_e8m0_to_f32(exps), TILES_N * 16, CHUNKS_K * 4)
    else:
        s = tl.load(s_ptrs, mask=seg_ok, other=0.0).to(tl.float32)
        if ROUND_SCALES:
            s = round_f32_to(s, OUT_KIND)
        if HAS_ZEROS:
            z = tl.load(z_ptr + expert * stride_ze + (seg * 16 // GROUP_SIZE)[None, :] * stride_zg + offs_n[:, None],
                        mask=seg_ok, other=0).to(tl.int32)
        else:
            z = tl.full((TILES_N * 16, CHUNKS_K * 4), 8, tl.int32)
        w = (code - _widen16(z, TILES_N * 16, CHUNKS_K * 4)).to(tl.float32) * _widen16(s, TILES_N * 16, CHUNKS_K * 4)
    offs_k = pid_k * CHUNKS_K * 64 + tl.arange(0, CHUNKS_K * 64)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    out_ptrs = out_ptr + pid_e * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, storage_value(w, OUT_KIND), mask=mask)
