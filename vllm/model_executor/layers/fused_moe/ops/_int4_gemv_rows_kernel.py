"""Private Triton body of the int4 (W4A16) expert GEMV for SORTED routing: a few rows per block (``GEMV=1``).

At 16-64 tokens the pairs are sorted by expert (``moe_align_block_size``) but most experts get only 1-4
rows: tensor cores buy nothing (the dot kernel pads each block to 16 rows) and decoding dominates.  Here
one program computes one [BLOCK_SIZE_M, BLOCK_SIZE_N] output tile (one alignment block of BLOCK_SIZE_M
sorted pairs, all of one expert) over one K-split with plain FMAs: each weight is decoded ONCE, exactly
as in the one-row GEMV (``_int4_gemv_kernel.py``: the nibble left in place, OR-ed into 2^23's bits, one
FFMA to q), then FMA-ed into the BLOCK_SIZE_M row accumulators ([BLOCK_SIZE_M, BLOCK_SIZE_K / 8,
BLOCK_SIZE_N] fp32, reduced over the word rows once after the K loop).  Per word and row the zero point
and group scale once: ``total += (sum_c q_c a_c - z * sum_c a_c) * s``.

Sentinel rows (padding of a block: sorted id == num_pairs) read activation zeros and are never stored;
pick BLOCK_SIZE_M close to the rows per expert (the heuristic does) so that few FMAs go to padding.  A
block's real rows come first, so a block with at most half of them real (an expert with 1 pair in a block
of 2) runs a second copy of the loop compiled for BLOCK_SIZE_M / 2 rows: one FMA per weight fewer.
Blocks past ``num_tokens_post_padded`` or with expert -1 return at once.  Act-order ``perm`` reads
activation column perm[e, k] at input position k; a per-position ``g_idx`` (or a group size that is not a
multiple of 8) takes the per-weight path (q - z exactly, times each weight's scale).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._int4_gemv_kernel import _code, _code_minus_zero
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _load_n3(ptrs, n_ok3, EVEN_N: tl.constexpr):
    """A [1, rows, BLOCK_SIZE_N] load, masked by the N tail unless there is none."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=n_ok3, other=0)


@triton.jit
def _word_rows(qw_cols, kt, offs_kw, kw_total, n_ok3, stride_qk, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               BKW: tl.constexpr):
    """K-step kt's [1, BKW, BLOCK_SIZE_N] int32 words (rows past K read as 0)."""
    kw3 = (kt * BKW + offs_kw)[None, :, None]
    if EVEN_K:
        return _load_n3(qw_cols + kw3 * stride_qk, n_ok3, EVEN_N)
    else:
        return tl.load(qw_cols + kw3 * stride_qk, mask=(kw3 < kw_total) & n_ok3, other=0)


@triton.jit
def _block_rows(a_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, out_ptr, topk_weights_ptr, sorted_token_ids_ptr,
                first, pid_n, pid_k, expert, magic, N, K, num_pairs, top_k_in, stride_am, stride_ak, stride_qe,
                stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_pe, stride_os, stride_om, stride_on,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_PERM: tl.constexpr,
                MUL_ROUTED_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SPLIT_K: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """Rows first .. first + ROWS - 1 of the sorted pairs (one expert's) times the [BLOCK_SIZE_N] column tile
    over K-split pid_k, stored."""
    BKW: tl.constexpr = BLOCK_SIZE_K // 8
    PER_WEIGHT_SCALE: tl.constexpr = HAS_G_IDX or GROUP_SIZE % 8 != 0
    offs_m = first + tl.arange(0, ROWS)
    pair = tl.load(sorted_token_ids_ptr + offs_m)
    pair_ok = pair < num_pairs
    row = tl.where(pair_ok, pair // top_k_in, 0).to(tl.int64)  # padding reads row 0 masked to zeros
    # Every tile is 3-D [rows, word rows, columns]: the weight side [1, BKW, BN] (loaded as such, so that
    # its layout is the accumulators' and broadcasting it over the rows moves no data), the activation
    # side [BM, BKW, 1].
    a_rows = (a_ptr + row * stride_am)[:, None, None]
    m_ok = pair_ok[:, None, None]

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    n_ok3 = n_ok[None, None, :]
    offs_kw = tl.arange(0, BKW)
    qw_cols = (qw_ptr + expert * stride_qe + offs_n)[None, None, :]
    s_cols = (s_ptr + expert * stride_se + offs_n)[None, None, :]
    z_cols = (z_ptr + expert * stride_ze + offs_n)[None, None, :]
    kw_total = K // 8

    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    total = tl.zeros((ROWS, BKW, BLOCK_SIZE_N), dtype=tl.float32)
    for kt in range(k_first, k_last):
        words = _word_rows(qw_cols, kt, offs_kw, kw_total, n_ok3, stride_qk, EVEN_K, EVEN_N, BKW)
        kw = kt * BKW + offs_kw
        kw_ok = kw < kw_total
        kw3 = kw[None, :, None]
        if EVEN_K:
            a_ok = m_ok
        else:
            kw = tl.where(kw_ok, kw, 0)  # rows past K: codes 0 against activations 0
            kw3 = kw[None, :, None]
            a_ok = m_ok & kw_ok[None, :, None]
        hi = words >> 16
        if PER_WEIGHT_SCALE:
            for c in tl.static_range(8):
                k_c = kw3 * 8 + c  # [1, BKW, 1]
                if HAS_G_IDX:
                    g_c = tl.load(g_ptr + expert * stride_pe + k_c)
                else:
                    g_c = k_c // GROUP_SIZE
                s_c = _load_n3(s_cols + g_c * stride_sg, n_ok3, EVEN_N).to(tl.float32)
                if HAS_ZEROS:
                    z_c = _load_n3(z_cols + g_c * stride_zg, n_ok3, EVEN_N).to(tl.float32)
                else:
                    z_c = 8.0
                if HAS_PERM:
                    col_c = tl.load(perm_ptr + expert * stride_pe + k_c)
                else:
                    col_c = k_c
                a_c = tl.load(a_rows + col_c * stride_ak, mask=a_ok, other=0.0).to(tl.float32)  # [BM, BKW, 1]
                total += _code_minus_zero(words, hi, magic, c, z_c) * s_c * a_c  # decoded once for every row
        else:
            # the 8 codes of a word share one group: a scale row per word row, also when one row would do
            # (a [1, 1, BN] load would take another layout than the words: a shared-memory conversion of
            # the [BM, BKW, BN] tile per K-step; the repeated rows come from L1)
            g = (kw3 * 8) // GROUP_SIZE
            s = _load_n3(s_cols + g * stride_sg, n_ok3, EVEN_N).to(tl.float32)
            if HAS_ZEROS:
                z = _load_n3(z_cols + g * stride_zg, n_ok3, EVEN_N).to(tl.float32)
            else:
                z = 8.0
            # tile[m, j, n] = sum_c q[8j + c, n] a[m, 8j + c]; the zero point once per word and row
            tile = tl.zeros((ROWS, BKW, BLOCK_SIZE_N), dtype=tl.float32)
            a_sum = tl.zeros((ROWS, BKW, 1), dtype=tl.float32)
            for c in tl.static_range(8):
                k_c = kw3 * 8 + c
                if HAS_PERM:
                    col_c = tl.load(perm_ptr + expert * stride_pe + k_c)
                else:
                    col_c = k_c
                a_c = tl.load(a_rows + col_c * stride_ak, mask=a_ok, other=0.0).to(tl.float32)  # [BM, BKW, 1]
                q_c = _code(words, hi, magic, c)  # [1, BKW, BN], decoded once for every row
                if c == 0:
                    tile = q_c * a_c
                    a_sum = a_c
                else:
                    tile += q_c * a_c
                    a_sum += a_c
            total += (tile - z * a_sum) * s

    acc = tl.sum(total, axis=1)  # [ROWS, BLOCK_SIZE_N]
    if MUL_ROUTED_WEIGHT:
        acc *= tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = pair_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=mask)


@triton.jit
def _int4_gemv_rows_kernel(
    a_ptr,  # [num_rows, K] activations
    qw_ptr,  # [E_local, K/8, N] int32, code c of word [j, n] = q[n, 8j + c]
    s_ptr,  # [E_local, Gs, N] scales
    z_ptr,  # [E_local, Gs, N] uint8 zeros (dummy when not HAS_ZEROS)
    g_ptr,  # [E_local, K] int32 group of each position (dummy when not HAS_G_IDX)
    perm_ptr,  # [E_local, K] int32 activation column of each position (dummy when not HAS_PERM)
    out_ptr,  # [num_pairs, N], or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    topk_weights_ptr,  # [num_pairs] (dummy when not MUL_ROUTED_WEIGHT)
    sorted_token_ids_ptr,  # [EM] int32, sentinel = num_pairs
    block_expert_ids_ptr,  # [EM // BLOCK_SIZE_M] int32, -1 = nothing to do
    num_tokens_post_padded_ptr,  # [1] int32
    magic,  # 0x4B000000 (the bits of 2^23), a run-time value on purpose: see _int4_gemv_kernel._code
    N,
    K,
    num_pairs,
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
    EVEN_N: tl.constexpr,  # N % BLOCK_SIZE_N == 0: no N mask on the weight loads
    SPLIT_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_SIZE_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    # The real rows of a block come first (then padding): a block with at most half its rows real (about
    # half the blocks of 2 rows at ~1.6 pairs per expert) runs the loop of half the rows, one FMA per weight fewer.
    HALF: tl.constexpr = BLOCK_SIZE_M // 2 if BLOCK_SIZE_M > 1 else 1
    first = pid_m * BLOCK_SIZE_M
    if BLOCK_SIZE_M > 1:
        if tl.load(sorted_token_ids_ptr + first + HALF) < num_pairs:
            _block_rows(a_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, out_ptr, topk_weights_ptr,
                        sorted_token_ids_ptr, first, pid_n, pid_k, expert, magic, N, K, num_pairs, top_k_in,
                        stride_am, stride_ak, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg,
                        stride_pe, stride_os, stride_om, stride_on, GROUP_SIZE, HAS_ZEROS, HAS_G_IDX, HAS_PERM,
                        MUL_ROUTED_WEIGHT, EVEN_K, EVEN_N, SPLIT_K, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
        else:
            _block_rows(a_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, out_ptr, topk_weights_ptr,
                        sorted_token_ids_ptr, first, pid_n, pid_k, expert, magic, N, K, num_pairs, top_k_in,
                        stride_am, stride_ak, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg,
                        stride_pe, stride_os, stride_om, stride_on, GROUP_SIZE, HAS_ZEROS, HAS_G_IDX, HAS_PERM,
                        MUL_ROUTED_WEIGHT, EVEN_K, EVEN_N, SPLIT_K, HALF, BLOCK_SIZE_N, BLOCK_SIZE_K)
    else:
        _block_rows(a_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, out_ptr, topk_weights_ptr,
                    sorted_token_ids_ptr, first, pid_n, pid_k, expert, magic, N, K, num_pairs, top_k_in,
                    stride_am, stride_ak, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg,
                    stride_pe, stride_os, stride_om, stride_on, GROUP_SIZE, HAS_ZEROS, HAS_G_IDX, HAS_PERM,
                    MUL_ROUTED_WEIGHT, EVEN_K, EVEN_N, SPLIT_K, 1, BLOCK_SIZE_N, BLOCK_SIZE_K)
