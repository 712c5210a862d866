"""Private Triton body of the int4 (W4A16) expert GEMV: the unsorted small-batch path (``GEMV=1``).

At 1-16 tokens each routed (token, expert) pair is a matrix-vector product: tensor cores buy
nothing (M padded to 16 for one row) and the dot-based kernel spends most of its instructions
bringing decoded weights into the MMA layout.  Here one program computes one pair's
[BLOCK_SIZE_N] output slice over one K-split with plain FMAs, no ``tl.dot``, no shared memory in
the K loop (only the final cross-warp sum uses some):

* a K-tile's [BLOCK_SIZE_K / 8, BLOCK_SIZE_N] int32 words (``Int4PackedWeight`` layout, N
  contiguous: coalesced rows) are loaded once;
* code c of word j (input position 8j + c) is decoded in fp32 without shifting it down or
  converting it: with the nibble left in place at bit sh (sh = 4c for c <= 4; codes 5-7 from the
  word shifted right by 16, one shift per word, sh = 4(c - 4)), ``(word & (0xF << sh)) | 0x4B000000``
  bitcast to fp32 is 2^23 + 2^sh q exactly (the code stays inside the 23-bit mantissa), and one
  FMA ``f * 2^-sh - 2^(23-sh)`` gives q exactly: an AND+OR (one LOP3) and one FFMA per weight, no
  integer->float conversion;
* ``tile[j, n] = sum_c q[8j + c, n] * a[8j + c]`` (fp32 FMAs; the 8 codes of a word share one
  group), then per word its zero point and group scale once: ``total += (tile - z * sum_c a) * s``;
* the [BK/8, BN] total is reduced over its rows once, after the K loop.

Act-order ``perm`` reads activation column perm[e, k] at input position k.  A per-position
``g_idx`` (or a group size that is not a multiple of 8) takes a per-weight path instead: q - z
exactly (``_code_minus_zero``), times the scale of each weight.
Exact decoding, fp32 accumulation, one rounding at the store: not bit-identical to the dot
kernel (which rounds each dequantised weight to the activation dtype), closer to the fp32 reference.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _code(words, hi, magic, c: tl.constexpr):
    """Code c (0..7) of ``words`` (``hi`` = words >> 16) as an exact fp32 q: the nibble left at bit sh,
    (x & (0xF << sh)) | 2^23's bits = 2^23 + 2^sh q, then one FMA f * 2^-sh - 2^(23-sh).  ``magic`` is
    0x4B000000 passed at run time: in a register, the AND and the OR fuse into one LOP3 (two immediates
    cannot)."""
    sh: tl.constexpr = 4 * c if c < 5 else 4 * (c - 4)
    if c < 5:
        f = ((words & (0xF << sh)) | magic).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (0xF << sh)) | magic).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << sh)) - (1 << (23 - sh))


@triton.jit
def _code_minus_zero(words, hi, magic, c: tl.constexpr, z):
    """q - z in fp32, exactly (z a float tensor: the zero point of each weight)."""
    sh: tl.constexpr = 4 * c if c < 5 else 4 * (c - 4)
    if c < 5:
        f = ((words & (0xF << sh)) | magic).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (0xF << sh)) | magic).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << sh)) - ((1 << (23 - sh)) + z)  # (2^(23-sh) + q) - (2^(23-sh) + z)


@triton.jit
def _load_n(ptrs, n_ok, EVEN_N: tl.constexpr):
    """A [rows, BLOCK_SIZE_N] load, masked by the N tail unless there is none (masks cost instructions)."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=n_ok[None, :], other=0)


@triton.jit
def _word_tile(qw_cols, kt, offs_kw, kw_total, n_ok, stride_qk, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               BKW: tl.constexpr):
    """K-step kt's [BKW, BLOCK_SIZE_N] int32 words (rows past K read as 0)."""
    kw = kt * BKW + offs_kw
    if EVEN_K:
        return _load_n(qw_cols[None, :] + kw[:, None] * stride_qk, n_ok, EVEN_N)
    else:
        return tl.load(qw_cols[None, :] + kw[:, None] * stride_qk, mask=(kw < kw_total)[:, None] & n_ok[None, :],
                       other=0)


@triton.jit
def _int4_gemv_kernel(
    a_ptr,  # [num_rows, K] activations
    qw_ptr,  # [E_local, K/8, N] int32, code c of word [j, n] = q[n, 8j + c]
    s_ptr,  # [E_local, Gs, N] scales
    z_ptr,  # [E_local, Gs, N] uint8 zeros (dummy when not HAS_ZEROS)
    g_ptr,  # [E_local, K] int32 group of each position (dummy when not HAS_G_IDX)
    perm_ptr,  # [E_local, K] int32 activation column of each position (dummy when not HAS_PERM)
    out_ptr,  # [num_pairs, N], or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    topk_weights_ptr,  # [num_pairs] (dummy when not MUL_ROUTED_WEIGHT)
    pair_expert_ids_ptr,  # [num_pairs] int32 local expert of each pair, -1 = skip
    magic,  # 0x4B000000 (the bits of 2^23), a run-time value on purpose: see _code
    N,
    K,
    top_k_in,
    stride_am,
    stride_ak,
    stride_qe,
    stride_qk,  # of a word row (K/8)
    stride_se,
    stride_sg,
    stride_ze,
    stride_zg,
    stride_pe,  # of g_idx and perm
    stride_os,  # split stride of the partial-sum buffer
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_PERM: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_SIZE_N == 0: no N mask on the loads
    SPLIT_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    BKW: tl.constexpr = BLOCK_SIZE_K // 8
    PER_WEIGHT_SCALE: tl.constexpr = HAS_G_IDX or GROUP_SIZE % 8 != 0
    TILE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_SIZE_K == 0  # one scale row per K-tile
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pair = pid // num_pid_n
    pid_n = pid % num_pid_n
    expert = tl.load(pair_expert_ids_ptr + pair).to(tl.int64)
    if expert < 0:
        return
    row = (pair // top_k_in).to(tl.int64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    offs_kw = tl.arange(0, BKW)
    a_row = a_ptr + row * stride_am
    qw_cols = qw_ptr + expert * stride_qe + offs_n  # loads masked by n_ok (keeps them vectorised)
    s_cols = s_ptr + expert * stride_se + offs_n
    z_cols = z_ptr + expert * stride_ze + offs_n
    kw_total = K // 8

    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    total = tl.zeros((BKW, BLOCK_SIZE_N), dtype=tl.float32)
    for kt in range(k_first, k_last):
        words = _word_tile(qw_cols, kt, offs_kw, kw_total, n_ok, stride_qk, EVEN_K, EVEN_N, BKW)
        kw = kt * BKW + offs_kw
        kw_ok = kw < kw_total
        if not EVEN_K:
            kw = tl.where(kw_ok, kw, 0)  # rows past K: codes 0 against activations 0
        hi = words >> 16
        if PER_WEIGHT_SCALE:
            for c in tl.static_range(8):
                k_c = kw * 8 + c
                if HAS_G_IDX:
                    g_c = tl.load(g_ptr + expert * stride_pe + k_c)[:, None]
                else:
                    g_c = (k_c // GROUP_SIZE)[:, None]
                s_c = _load_n(s_cols[None, :] + g_c * stride_sg, n_ok, EVEN_N).to(tl.float32)
                if HAS_ZEROS:
                    z_c = _load_n(z_cols[None, :] + g_c * stride_zg, n_ok, EVEN_N).to(tl.float32)
                else:
                    z_c = 8.0
                if HAS_PERM:
                    col_c = tl.load(perm_ptr + expert * stride_pe + k_c)
                else:
                    col_c = k_c
                if EVEN_K:
                    a_c = tl.load(a_row + col_c * stride_ak).to(tl.float32)
                else:
                    a_c = tl.load(a_row + col_c * stride_ak, mask=kw_ok, other=0.0).to(tl.float32)
                total += _code_minus_zero(words, hi, magic, c, z_c) * s_c * a_c[:, None]
        else:
            if TILE_GROUP:
                g = (kt * BLOCK_SIZE_K) // GROUP_SIZE  # the whole tile is in one group: one scale row
                s = _load_n(s_cols[None, :] + g * stride_sg, n_ok, EVEN_N).to(tl.float32)
                if HAS_ZEROS:
                    z = _load_n(z_cols[None, :] + g * stride_zg, n_ok, EVEN_N).to(tl.float32)
            else:  # the 8 codes of a word share one group: a scale row per word row
                g = ((kw * 8) // GROUP_SIZE)[:, None]
                s = _load_n(s_cols[None, :] + g * stride_sg, n_ok, EVEN_N).to(tl.float32)
                if HAS_ZEROS:
                    z = _load_n(z_cols[None, :] + g * stride_zg, n_ok, EVEN_N).to(tl.float32)
            # tile[j, n] = sum_c q[8j + c, n] a[8j + c]; the zero point once per word: - z * sum_c a[8j + c]
            tile = tl.zeros((BKW, BLOCK_SIZE_N), dtype=tl.float32)
            a_sum = tl.zeros((BKW,), dtype=tl.float32)
            for c in tl.static_range(8):
                k_c = kw * 8 + c
                if HAS_PERM:
                    col_c = tl.load(perm_ptr + expert * stride_pe + k_c)
                else:
                    col_c = k_c
                if EVEN_K:
                    a_c = tl.load(a_row + col_c * stride_ak).to(tl.float32)
                else:
                    a_c = tl.load(a_row + col_c * stride_ak, mask=kw_ok, other=0.0).to(tl.float32)
                if c == 0:
                    tile = _code(words, hi, magic, c) * a_c[:, None]
                    a_sum = a_c
                else:
                    tile += _code(words, hi, magic, c) * a_c[:, None]
                    a_sum += a_c
            if HAS_ZEROS:
                total += (tile - z * a_sum[:, None]) * s
            else:
                total += (tile - 8.0 * a_sum[:, None]) * s

    acc = tl.sum(total, axis=0)  # [BLOCK_SIZE_N]
    if MUL_ROUTED_WEIGHT:
        acc *= tl.load(topk_weights_ptr + pair).to(tl.float32)
    out_ptrs = out_ptr + pair.to(tl.int64) * stride_om + offs_n * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=n_ok)
