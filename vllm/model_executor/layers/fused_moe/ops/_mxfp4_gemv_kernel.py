"""Private Triton body of the MXFP4 expert GEMV for decode (config ``gemv=1``, see ``mxfp4_moe_gemm.py``).

At 1-16 tokens an M-block of the sorted routing holds one or a few real rows: tensor cores buy
nothing.  One program computes one M-block's [BLOCK_SIZE_N] output slice over one K split with
plain fp32 FMAs, no ``tl.dot``, and walks only the block's real rows (sentinel rows cost one
scalar load each):

* a K-tile's codes are loaded as int32 words, [BLOCK_SIZE_N, BLOCK_SIZE_K / 8] (4 words = the 16
  bytes = the 32 codes of one scale group; word j holds elements 8j..8j+7, nibble c = element 8j + c);
* nibbles c and c + 4 of a word are decoded together (``_e2m1_pair``): two shifts and two masks
  place both codes' magnitude bits (e1 e0 m) at bits 9-11 / 25-27 and their sign bits at 15 / 31 of
  two fp16s, which then hold the e2m1 values times 2^-14 exactly (e = 0 is an fp16 subnormal: the
  e2m1 subnormals +-0.5 and -0 need no fix); each fp16 -> fp32 conversion is exact;
* ``part[n, j] = sum_c w[n, 8j + c] a[8j + c]`` (fp32 FMAs), then per scale group its 4 words are
  added and the group sum is multiplied once by 2^14 and by the e8m0 scale 2^(s - 127) (built from
  the bits; s = 0 is the subnormal 2^-127); the [BLOCK_SIZE_N, groups] total is reduced once after
  the K loop.
* epilogue as the dot kernel's: + bias[e], times the router weight, one rounding at the store;
  with SPLIT_K > 1 the fp32 share goes to part[s, pair, n] for ``_mxfp4_split_k_reduce_kernel``.

Exact decoding and fp32 accumulation: not bit-identical to the dot kernel (which rounds operands
to the activation dtype for the tensor cores), closer to the fp64 reference.
"""
from __future__ import annotations

import triton
import triton.language as tl

_MAG2 = 0x0E000E00  # bits 9-11 and 25-27: the two codes' magnitudes in place
_SIGN2 = -0x7FFF8000  # 0x80008000 as an int32: bits 15 and 31


@triton.jit
def _e2m1_pair(w, c: tl.constexpr):
    """Nibbles c and c + 4 (c in 0..3) of int32 words -> two fp32 tensors, the e2m1 values times 2^-14."""
    if c < 3:
        m = w << (9 - 4 * c)
    else:
        m = w >> 3
    if c < 3:
        s = w << (12 - 4 * c)
    else:
        s = w
    t = (m & _MAG2) | (s & _SIGN2)
    lo = t.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _mxfp4_gemv_kernel(
    a_ptr,  # [num_rows, K] fp16 / bf16 / fp32
    wq_ptr,  # [E_local, N, K // 8] int32: the code bytes of each row read 4 at a time
    ws_ptr,  # [E_local, N, K // 32] uint8 e8m0 scales
    out_ptr,  # [num_pairs, N] (any strides), or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    bias_ptr,  # [E_local, N] or a dummy pointer when HAS_BIAS is False
    topk_weights_ptr,  # [num_pairs] or a dummy pointer when MUL_ROUTED_WEIGHT is False
    sorted_token_ids_ptr,  # [EM] int32, flat pair ids, sentinel >= num_pairs
    block_expert_ids_ptr,  # [EM // BLOCK_SIZE_M] int32, -1 = nothing to do
    num_tokens_post_padded_ptr,  # [1] int32
    N,
    K,
    num_pairs,
    top_k_in,
    stride_am,
    stride_ak,
    stride_qe,  # in words
    stride_qn,  # in words
    stride_se,
    stride_sn,
    stride_os,  # split stride of the partial sums (SPLIT_K > 1)
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_SIZE_K == 0
    BLOCK_SIZE_M: tl.constexpr,  # rows of an M-block of the routing (the alignment's block size)
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,  # a multiple of 32
    SPLIT_K: tl.constexpr,
):
    BKW: tl.constexpr = BLOCK_SIZE_K // 8
    GROUPS: tl.constexpr = BLOCK_SIZE_K // 32
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

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    offs_wn = offs_n % N  # N-tail columns read valid rows; never stored
    offs_j = tl.arange(0, BKW)
    offs_g = tl.arange(0, GROUPS)
    q_base = wq_ptr + expert * stride_qe + offs_wn[:, None] * stride_qn + offs_j[None, :]  # [BN, BKW]
    s_base = ws_ptr + expert * stride_se + offs_wn[:, None] * stride_sn + offs_g[None, :]  # [BN, GROUPS]
    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    for r in range(BLOCK_SIZE_M):  # the block's real rows; sentinel rows are skipped
        pair = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + r)
        if pair < num_pairs:
            a_row = a_ptr + (pair // top_k_in).to(tl.int64) * stride_am
            total = tl.zeros((BLOCK_SIZE_N, GROUPS), dtype=tl.float32)
            for kt in range(k_first, k_last):
                kw = kt * BKW + offs_j  # word index in the row
                if EVEN_K:
                    w = tl.load(q_base + kt * BKW)
                    s = tl.load(s_base + kt * GROUPS).to(tl.int32)
                else:
                    kw_ok = kw < K // 8
                    w = tl.load(q_base + kt * BKW, mask=kw_ok[None, :], other=0)
                    s = tl.load(s_base + kt * GROUPS, mask=(kt * GROUPS + offs_g < K // 32)[None, :],
                                other=127).to(tl.int32)
                part = tl.zeros((BLOCK_SIZE_N, BKW), dtype=tl.float32)
                for c in tl.static_range(4):
                    lo, hi = _e2m1_pair(w, c)
                    if EVEN_K:
                        a_lo = tl.load(a_row + (kw * 8 + c) * stride_ak).to(tl.float32)
                        a_hi = tl.load(a_row + (kw * 8 + c + 4) * stride_ak).to(tl.float32)
                    else:
                        a_lo = tl.load(a_row + (kw * 8 + c) * stride_ak, mask=kw_ok, other=0.0).to(tl.float32)
                        a_hi = tl.load(a_row + (kw * 8 + c + 4) * stride_ak, mask=kw_ok, other=0.0).to(tl.float32)
                    part += lo * a_lo[None, :]
                    part += hi * a_hi[None, :]
                gsum = tl.sum(tl.reshape(part, (BLOCK_SIZE_N, GROUPS, 4)), axis=2)
                scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
                total += (gsum * 16384.0) * scale  # 2^14 first: 2^14 * 2^127 would overflow
            acc = tl.sum(total, axis=1)  # [BLOCK_SIZE_N]
            out_ptrs = out_ptr + pair.to(tl.int64) * stride_om + offs_n * stride_on
            if SPLIT_K > 1:  # fp32 share; the reduction adds the shares, the bias and the router weight
                tl.store(out_ptrs + pid_k.to(tl.int64) * stride_os, acc, mask=n_ok)
            else:
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok,
                                   other=0.0).to(tl.float32)
                if MUL_ROUTED_WEIGHT:
                    acc *= tl.load(topk_weights_ptr + pair).to(tl.float32)
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
