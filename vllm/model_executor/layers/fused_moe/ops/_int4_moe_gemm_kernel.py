"""Private Triton bodies of the int4 (W4A16) grouped expert GEMM (see ``int4_moe_gemm.py``).

One program computes one [BLOCK_SIZE_M, BLOCK_SIZE_N] output tile over one K-split: BLOCK_SIZE_M
consecutive entries of ``sorted_token_ids`` (all routed to one expert) times an N-slice of that
expert's packed weight; or, unsorted (small batches, no ``moe_align_block_size``), the one pair
``pid_m`` alone (row 0 of the tile; the rest masked).  Each K-tile loads the [BLOCK_SIZE_K / 8,
BLOCK_SIZE_N] int32 words holding its codes once (rows along N, coalesced), unpacks them in
registers to [BLOCK_SIZE_K, BLOCK_SIZE_N], loads one scale row per group (one row per tile when
the group spans the tile), and dequantises: w = (q - z) * s, one rounding, in the activation
dtype, before the dot.  ``_split_k_reduce_kernel`` adds the K-splits' fp32 partial sums.

How the codes are unpacked (``UNPACK``, a config key; the static report
``benchmarks/kernels/kernel_static_report.py`` counts what each costs on sm_90):
  0: the [BK/8, BN] words once, shifted along a third axis of 8 and reshaped to [BK, BN];
  1: the [BK, BN] tile of words directly, each word loaded for its 8 K-rows (the same addresses:
     one memory transaction, cached), row k shifted by (k % 8) * 4: no reshape;
  2: as 1, and each code turned into a float by placing its bits in the mantissa of a constant
     (fp16 1024 + q, bf16 128 + q, fp32 2^23 + q; exact), so that w = ((C + q) - (C + z)) * s needs
     no integer -> float conversion (a multi-function-unit instruction) per weight;
  3: one scale group per K-tile (the launcher checks; else it runs 0): the [BK/8, BN] words are split
     by code position c instead of reshaped, 8 dots of BK/8 (BLOCK_SIZE_K >= 128) each take code c
     (bit-placed as in 2, no zero point, exact) against activation columns 8j + c, and the tile's
     product becomes the dequantised one afterwards, (a @ q - z * sum(a)) * s per column in fp32: no
     per-weight arithmetic but the unpacking, code tiles stored to shared memory (for the MMA layout)
     in vectors rather than one value at a time, and no rounding of dequantised weights (more accurate
     than 0-2; not bit-identical to them).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.config import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT
from vllm.model_executor.layers.fused_moe.ops._activation_kernel import _gelu_erf, _silu, gated_act
from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _grouped_pid
from vllm.model_executor.layers.ops._pdl import pdl_wait

_OAI_ALPHA = tl.constexpr(SWIGLUOAI_ALPHA)
_OAI_LIMIT = tl.constexpr(SWIGLUOAI_LIMIT)


@triton.jit
def _int4_magic(q, dtype: tl.constexpr):
    """int32 codes 0..15 (and zero points: below 1024 / 128 / 2^23) -> C + q in ``dtype``, exact, by bit
    placement: fp16 0x6400 | q = 1024 + q, bf16 0x4300 | q = 128 + q, fp32 0x4B000000 | q = 2^23 + q."""
    if dtype == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif dtype == tl.bfloat16:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _block_pairs(pid_m, sorted_token_ids_ptr, num_pairs, top_k_in, BLOCK_SIZE_M: tl.constexpr, SORTED: tl.constexpr):
    """(pair, pair_ok, row) of a block's BLOCK_SIZE_M slots: sorted, the alignment's entries; unsorted, the one
    pair ``pid_m`` in slot 0 (the rest masked).  Padding reads activation row 0, never stored."""
    if SORTED:
        pair = tl.load(sorted_token_ids_ptr + (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)))
        pair_ok = pair < num_pairs
    else:
        pair_ok = tl.arange(0, BLOCK_SIZE_M) == 0
        pair = tl.where(pair_ok, pid_m, num_pairs)
    return pair, pair_ok, tl.where(pair_ok, pair // top_k_in, 0).to(tl.int64)


@triton.jit
def _int4_moe_gemm_kernel(
    a_ptr,  # [num_rows, K] activations
    qw_ptr,  # [E_local, K/8, N] int32, code c of word [j, n] = q[n, 8j + c], last stride 1
    s_ptr,  # [E_local, Gs, N] scales, last stride 1
    z_ptr,  # [E_local, Gs, N] uint8 zeros, last stride 1 (dummy when not HAS_ZEROS)
    g_ptr,  # [E_local, K] int32 group of each position (dummy when not HAS_G_IDX)
    perm_ptr,  # [E_local, K] int32 activation column of each position (dummy when not HAS_PERM)
    out_ptr,  # [num_pairs, N], or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    topk_weights_ptr,  # [num_pairs] (dummy when not MUL_ROUTED_WEIGHT)
    sorted_token_ids_ptr,  # [EM] int32, sentinel = num_pairs (dummy when not SORTED)
    block_expert_ids_ptr,  # [EM // BLOCK_SIZE_M] int32, -1 = nothing to do; unsorted: [num_pairs] pair experts
    num_tokens_post_padded_ptr,  # [1] int32 (dummy when not SORTED)
    N,
    K,
    num_pid_m,
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
    UPCAST_DOT: tl.constexpr,  # interpreter: its bf16 dot multiplies raw bits
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    SORTED: tl.constexpr,
    UNPACK: tl.constexpr = 0, USE_PDL: tl.constexpr = False,  # see the module docstring
):
    pdl_wait(USE_PDL)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), N, num_pid_m, BLOCK_SIZE_N, GROUP_SIZE_M)

    if SORTED:
        num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
        if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
            return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    pair, pair_ok, row = _block_pairs(pid_m, sorted_token_ids_ptr, num_pairs, top_k_in, BLOCK_SIZE_M, SORTED)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    offs_wn = offs_n % N  # N-tail columns wrap onto valid ones, never stored
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    a_rows = a_ptr + row * stride_am
    qw_cols = qw_ptr + expert * stride_qe + offs_wn
    s_cols = s_ptr + expert * stride_se + offs_wn
    z_cols = z_ptr + expert * stride_ze + offs_wn
    offs_kw = tl.arange(0, BLOCK_SIZE_K // 8)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]

    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kt in range(k_first, k_last):
        kk = kt * BLOCK_SIZE_K + offs_k
        if EVEN_K:
            k_ok = offs_k < BLOCK_SIZE_K
        else:
            k_ok = kk < K
        kk = tl.where(k_ok, kk, 0)
        if UNPACK == 3:  # 8 dots of BK/8: code c of word j (row 8j + c) against activation column 8j + c
            kw = kt * (BLOCK_SIZE_K // 8) + offs_kw
            if EVEN_K:
                words = tl.load(qw_cols[None, :] + kw[:, None] * stride_qk)  # [BK/8, BN], one load per word
            else:
                words = tl.load(qw_cols[None, :] + kw[:, None] * stride_qk, mask=(kw < K // 8)[:, None], other=0)
            zero_code = _int4_magic(tl.zeros((1, BLOCK_SIZE_N), tl.int32), a_ptr.dtype.element_ty)
            part = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
            a_part = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_K // 8), dtype=tl.float32)  # summed over K once per tile
            for c in tl.static_range(8):
                kc = kw * 8 + c
                kc_ok = kc < K
                kc = tl.where(kc_ok, kc, 0)
                if HAS_PERM:
                    cols_c = tl.load(perm_ptr + expert * stride_pe + kc)
                else:
                    cols_c = kc
                a_c = tl.load(a_rows[:, None] + cols_c[None, :] * stride_ak, mask=kc_ok[None, :], other=0.0)
                v = _int4_magic((words >> (4 * c)) & 0xF, a_c.dtype) - zero_code  # the codes, exact
                if UPCAST_DOT:
                    part += tl.dot(a_c.to(tl.float32), v.to(tl.float32))
                elif a_c.dtype == tl.float32:
                    part += tl.dot(a_c, v, input_precision="ieee")
                else:
                    part = tl.dot(a_c, v, part)
                a_part += a_c.to(tl.float32)
            g = (kt * BLOCK_SIZE_K) // GROUP_SIZE
            s = tl.load(s_cols[None, :] + g * stride_sg).to(a_ptr.dtype.element_ty).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_cols[None, :] + g * stride_zg).to(tl.float32)
            else:
                z = 8.0
            acc += (part - z * tl.sum(a_part, axis=1)[:, None]) * s
        else:
            if HAS_PERM:
                cols = tl.load(perm_ptr + expert * stride_pe + kk)
            else:
                cols = kk
            a = tl.load(a_rows[:, None] + cols[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            if UNPACK == 0:
                kw = kt * (BLOCK_SIZE_K // 8) + offs_kw
                if EVEN_K:
                    words = tl.load(qw_cols[None, :] + kw[:, None] * stride_qk)  # [BK/8, BN], one load per word
                else:
                    words = tl.load(qw_cols[None, :] + kw[:, None] * stride_qk, mask=(kw < K // 8)[:, None], other=0)
                q = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_SIZE_K, BLOCK_SIZE_N))  # row 8j + c
            else:  # [BK, BN] words: row k reads word k // 8 (8 rows share each address), shifted by (k % 8) * 4
                kw_rows = kt * (BLOCK_SIZE_K // 8) + offs_k // 8
                if EVEN_K:
                    word_rows = tl.load(qw_cols[None, :] + kw_rows[:, None] * stride_qk)
                else:
                    word_rows = tl.load(qw_cols[None, :] + kw_rows[:, None] * stride_qk, mask=k_ok[:, None], other=0)
                q = (word_rows >> ((offs_k % 8) * 4)[:, None]) & 0xF
            if HAS_G_IDX:
                g = tl.load(g_ptr + expert * stride_pe + kk)[:, None]
            elif GROUP_SIZE % BLOCK_SIZE_K == 0:
                g = (kt * BLOCK_SIZE_K) // GROUP_SIZE  # the whole tile is in one group: one scale row
            else:
                g = (kk // GROUP_SIZE)[:, None]
            s = tl.load(s_cols[None, :] + g * stride_sg).to(a.dtype)
            if HAS_ZEROS:
                z = tl.load(z_cols[None, :] + g * stride_zg).to(tl.int32)
            else:
                z = tl.full((1, BLOCK_SIZE_N), 8, tl.int32)  # a tensor: _int4_magic takes tensors
            if UNPACK == 2:
                w = (_int4_magic(q, a.dtype) - _int4_magic(z, a.dtype)) * s  # (C + q) - (C + z) exact, one rounding
            else:
                w = (q - z).to(a.dtype) * s  # exact difference, one rounding: as Int4Weight.dequantize
            if UPCAST_DOT:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
            elif a.dtype == tl.float32:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)

    if MUL_ROUTED_WEIGHT:
        gate = tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0)
        acc *= gate.to(tl.float32)[:, None]
    mask = pair_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(part_ptr, out_ptr, num_out_rows, N_out, stride_ps, stride_pm, stride_om, stride_on,
                           SPLIT_K: tl.constexpr, ROWS: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr = False):
    """The K-splits' fp32 partial sums part[s, row, n] added, one epilogue applied, cast and stored:

    ACT -1, ROWS 1:  out[m, n] = sum_s part[s, m, n]
    ACT -1, ROWS k:  out[m, n] = sum_{r<k} sum_s part[s, m*k + r, n]     (the top-k sum of GEMM2)
    ACT 0 / 1:       out[m, n] = silu / gelu(g) * u, g = sum_s part[s, m, n], u = sum_s part[s, m, n + N_out]
    ACT 2:           out[m, n] = gpt-oss's clamped SwiGLU of g = sum_s part[s, m, 2n], u = sum_s part[s, m, 2n + 1]
                     (interleaved rows), g and u rounded to out's dtype first: bit for bit the unfused GEMM
                     then ``moe_activation``
    ACT 3 / 4 / 5:   out[m, n] = silu / gelu / relu^2 (sum_s part[s, m, n])
    (the activation codes of ``_activation_kernel.py``)."""
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_out_rows * N_out
    m = (offs // N_out).to(tl.int64)
    n = offs % N_out
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if ACT == 2:
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + 2 * n, mask=ok, other=0.0)
            up += tl.load(part_ptr + s * stride_ps + m * stride_pm + 2 * n + 1, mask=ok, other=0.0)
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gated_act(gate, up, _OAI_ALPHA, _OAI_LIMIT, 2)
    else:
        for r in tl.static_range(ROWS):
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + s * stride_ps + (m * ROWS + r) * stride_pm + n, mask=ok, other=0.0)
    if ACT == 0 or ACT == 1:
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            up += tl.load(part_ptr + s * stride_ps + m * stride_pm + n + N_out, mask=ok, other=0.0)
        if ACT == 0:
            acc = _silu(acc) * up
        else:
            acc = _gelu_erf(acc) * up
    elif ACT == 3:
        acc = _silu(acc)
    elif ACT == 4:
        acc = _gelu_erf(acc)
    elif ACT == 5:
        acc = tl.maximum(acc, 0.0) * tl.maximum(acc, 0.0)
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=ok)
