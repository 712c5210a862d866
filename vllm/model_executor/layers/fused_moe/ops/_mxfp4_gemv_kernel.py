"""Private Triton body of the MXFP4 expert GEMV for decode (config ``gemv`` 1 or 2, see ``mxfp4_moe_gemm.py``).

At 1-16 tokens an M-block of the sorted routing holds one or a few real rows: tensor cores buy
nothing.  One program computes one M-block's [BLOCK_SIZE_N] output slice over one K split with
plain fp32 FMAs, no ``tl.dot``, in passes over the block's rows, ROWS (1 or 2) per pass: each pass
decodes the weight tile once for its rows, and a pass without a real row costs one or two scalar
loads (the alignment puts a block's real rows first):

* a K-tile's codes are loaded as int32 words, [BLOCK_SIZE_N, BLOCK_SIZE_K / 8] (4 words = the 16
  bytes = the 32 codes of one scale group; word j holds elements 8j..8j+7, nibble c = element 8j + c);
* the 8 codes of a word are decoded together (``_e2m1_word``; on CUDA ``_e2m1_word_asm``, the same
  in PTX): 7 integer instructions build the high bytes of 8 fp16s (sign to bit 7, magnitude e1 e0 m
  to bits 1-3), each fp16 [high byte, 0] being the e2m1 value times 2^-14 exactly (e = 0 is the fp16
  subnormal: +-0.5 and -0 need no fix); one PRMT per two codes places them in an fp16x2 whose halves
  convert exactly to fp32 (HADD2.F32): about 2.4 instructions per code, one FFMA per weight;
* bf16 activations are loaded 4 per 8-byte load and widened by a shift or a mask (``_bf16_quads``);
* per row ``part[n, j] = sum_c w[n, 8j + c] a[8j + c]`` (fp32 FMAs), then per scale group its 4 words are
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

from vllm.model_executor.layers.ops._pdl import pdl_wait


_SIGNS = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as an int32: bit 7 of every byte
_MAGS = tl.constexpr(0x0E0E0E0E)  # bits 1-3 of every byte

# The e2m1 codes of an int32 word (8 codes: byte i holds element 2i in its low nibble, 2i + 1 in its
# high nibble) -> the high bytes of their fp16s, four codes per register: the sign to bit 7, the
# magnitude (e1 e0 m) to bits 1-3, so that the fp16 [high byte, 0] is the e2m1 value times 2^-14
# exactly (exponent field e; e = 0 is the fp16 subnormal m 2^-15: +-0.5 and -0 need no fix):
#   low nibbles   L = ((w << 4) & 0x80808080) | ((w << 1) & 0x0E0E0E0E)
#   high nibbles  H = (w & 0x80808080) | ((w >> 3) & 0x0E0E0E0E)
# 7 integer instructions per 8 codes.  In PTX one PRMT per two codes then places two high bytes
# (beside zero bytes) into an fp16x2, and cvt.f32.f16 reads each half in place (HADD2.F32 .H0/.H1).
_E2M1_WORD_ASM = tl.constexpr(
    "{ .reg .b32 a, b, L, H, p; .reg .b16 l, h;"
    " shl.b32 a, $8, 4; and.b32 a, a, 0x80808080; shl.b32 b, $8, 1; and.b32 b, b, 0x0E0E0E0E; or.b32 L, a, b;"
    " and.b32 a, $8, 0x80808080; shr.u32 b, $8, 3; and.b32 b, b, 0x0E0E0E0E; or.b32 H, a, b;"
    " prmt.b32 p, L, 0, 0x1404; mov.b32 {l, h}, p; cvt.f32.f16 $0, l; cvt.f32.f16 $2, h;"
    " prmt.b32 p, L, 0, 0x3424; mov.b32 {l, h}, p; cvt.f32.f16 $4, l; cvt.f32.f16 $6, h;"
    " prmt.b32 p, H, 0, 0x1404; mov.b32 {l, h}, p; cvt.f32.f16 $1, l; cvt.f32.f16 $3, h;"
    " prmt.b32 p, H, 0, 0x3424; mov.b32 {l, h}, p; cvt.f32.f16 $5, l; cvt.f32.f16 $7, h; }")


@triton.jit
def _e2m1_word_asm(w):
    """The 8 codes of int32 words -> 8 fp32 tensors (element c of each word), the e2m1 values times 2^-14
    (CUDA only: the interpreter cannot run inline PTX; ``_e2m1_word`` is the same decode in Triton)."""
    return tl.inline_asm_elementwise(_E2M1_WORD_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                                            tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _half_byte(x, i: tl.constexpr):
    """Byte i of int32 ``x`` as the high byte of an fp16 (low byte 0), converted to fp32."""
    return (((x >> (8 * i)) & 0xFF) << 8).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_word(w):
    """``_e2m1_word_asm`` in portable Triton (the same L / H bytes, then each byte's fp16 converted)."""
    lo = ((w << 4) & _SIGNS) | ((w << 1) & _MAGS)
    hi = (w & _SIGNS) | ((w >> 3) & _MAGS)
    return (_half_byte(lo, 0), _half_byte(hi, 0), _half_byte(lo, 1), _half_byte(hi, 1),
            _half_byte(lo, 2), _half_byte(hi, 2), _half_byte(lo, 3), _half_byte(hi, 3))


@triton.jit
def _bf16_quads(a_row, kw, ok, EVEN: tl.constexpr):
    """bf16 activations 8j..8j+7 of the words j = ``kw`` as fp32 (8 tensors shaped like kw): two 8-byte loads
    per word (four bf16 each), each value's bits moved to the top half of an fp32 (one LOP or shift)."""
    quads = a_row.to(tl.pointer_type(tl.int64)) + kw * 2
    if EVEN:
        q0 = tl.load(quads)
        q1 = tl.load(quads + 1)
    else:
        q0 = tl.load(quads, mask=ok, other=0)
        q1 = tl.load(quads + 1, mask=ok, other=0)
    lo0, hi0 = q0.to(tl.int32), (q0 >> 32).to(tl.int32)
    lo1, hi1 = q1.to(tl.int32), (q1 >> 32).to(tl.int32)
    return (_low_bf16(lo0), _high_bf16(lo0), _low_bf16(hi0), _high_bf16(hi0),
            _low_bf16(lo1), _high_bf16(lo1), _low_bf16(hi1), _high_bf16(hi1))


@triton.jit
def _low_bf16(x):
    return (x << 16).to(tl.float32, bitcast=True)


@triton.jit
def _high_bf16(x):
    return (x & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _group_sums(vals, a_row, kw, kw_ok, stride_ak, EVEN_K: tl.constexpr, A_QUADS: tl.constexpr,
                BLOCK_SIZE_N: tl.constexpr, BKW: tl.constexpr):
    """sum over each scale group (4 words) of the decoded codes ``vals`` (8 x [BN, BKW]) times one row's
    activations, times 2^14 (the decode's 2^-14 undone before the scale: 2^14 * 2^127 would overflow)."""
    if A_QUADS:
        acts = _bf16_quads(a_row, kw, kw_ok, EVEN_K)
    part = tl.zeros((BLOCK_SIZE_N, BKW), dtype=tl.float32)
    for c in tl.static_range(8):  # element 8j + c of every word j
        if A_QUADS:
            a_c = acts[c]
        elif EVEN_K:
            a_c = tl.load(a_row + (kw * 8 + c) * stride_ak).to(tl.float32)
        else:
            a_c = tl.load(a_row + (kw * 8 + c) * stride_ak, mask=kw_ok, other=0.0).to(tl.float32)
        part += vals[c] * a_c[None, :]
    return tl.sum(tl.reshape(part, (BLOCK_SIZE_N, BKW // 4, 4)), axis=2) * 16384.0


@triton.jit
def _epilogue(acc, pair, ok, out_ptr, bias_ptr, topk_weights_ptr, expert, offs_n, n_ok, pid_k, stride_os, stride_om,
              stride_on, stride_be, stride_bn, HAS_BIAS: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
              SPLIT_K: tl.constexpr):
    """Store one row's [BLOCK_SIZE_N] result (nothing when ``ok`` is false): the fp32 share with split-K,
    else + bias[e], times the router weight, rounded once."""
    out_ptrs = out_ptr + pair.to(tl.int64) * stride_om + offs_n * stride_on
    if SPLIT_K > 1:  # the reduction adds the shares, the bias and the router weight
        tl.store(out_ptrs + pid_k.to(tl.int64) * stride_os, acc, mask=n_ok & ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
        if MUL_ROUTED_WEIGHT:
            acc *= tl.load(topk_weights_ptr + pair, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok & ok)


@triton.jit
def _step_loads(q_base, s_base, kt, offs_j, offs_g, K, EVEN_K: tl.constexpr, BKW: tl.constexpr, GROUPS: tl.constexpr):
    """K-step kt's [BN, BKW] code words and [BN, GROUPS] int32 scale exponents (past K: codes 0, exponent 127)."""
    if EVEN_K:
        w = tl.load(q_base + kt * BKW)
        s = tl.load(s_base + kt * GROUPS).to(tl.int32)
    else:
        w = tl.load(q_base + kt * BKW, mask=(kt * BKW + offs_j < K // 8)[None, :], other=0)
        s = tl.load(s_base + kt * GROUPS, mask=(kt * GROUPS + offs_g < K // 32)[None, :], other=127).to(tl.int32)
    return w, s


@triton.jit
def _mxfp4_gemv_kernel(
    a_ptr,  # [num_rows, K] fp16 / bf16 / fp32
    wq_ptr,  # [E_local, N, K // 2] uint8 codes, rows 4-byte aligned (read as int32 words)
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
    stride_qe,  # in bytes
    stride_qn,  # in bytes (a multiple of 16 when K is a multiple of 32: the word loads vectorise)
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
    A_QUADS: tl.constexpr,  # bf16 activations with 8-byte aligned rows: loaded four at a time (_bf16_quads)
    DECODE_ASM: tl.constexpr,  # CUDA: _e2m1_word_asm (the decode in PTX); else the portable _e2m1_word
    BLOCK_SIZE_M: tl.constexpr,  # rows of an M-block of the routing (the alignment's block size)
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,  # a multiple of 32
    SPLIT_K: tl.constexpr,
    ROWS: tl.constexpr, USE_PDL: tl.constexpr = False,  # rows computed per pass over the weight tile: 1 or 2
):
    pdl_wait(USE_PDL)
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
    q_rows = (wq_ptr + expert * stride_qe + offs_wn * stride_qn).to(tl.pointer_type(tl.int32))
    q_base = q_rows[:, None] + offs_j[None, :]  # [BN, BKW] words
    s_base = ws_ptr + expert * stride_se + offs_wn[:, None] * stride_sn + offs_g[None, :]  # [BN, GROUPS]
    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    for r0 in range(0, BLOCK_SIZE_M, ROWS):  # ROWS (1 or 2) rows per pass; passes without a real row are skipped
        pair0 = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + r0)
        ok0 = pair0 < num_pairs
        if ROWS == 2:
            pair1 = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + r0 + 1)
            ok1 = pair1 < num_pairs
            run = ok0 | ok1
        else:
            pair1 = pair0
            ok1 = False
            run = ok0
        if run:
            a_row0 = a_ptr + tl.where(ok0, pair0 // top_k_in, 0).to(tl.int64) * stride_am
            a_row1 = a_ptr + tl.where(ok1, pair1 // top_k_in, 0).to(tl.int64) * stride_am
            total0 = tl.zeros((BLOCK_SIZE_N, GROUPS), dtype=tl.float32)
            total1 = tl.zeros((BLOCK_SIZE_N, GROUPS), dtype=tl.float32)
            for kt in range(k_first, k_last):
                kw = kt * BKW + offs_j  # word index in the row
                kw_ok = kw < K // 8
                w, s = _step_loads(q_base, s_base, kt, offs_j, offs_g, K, EVEN_K, BKW, GROUPS)
                if DECODE_ASM:
                    vals = _e2m1_word_asm(w)
                else:
                    vals = _e2m1_word(w)
                scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
                total0 += _group_sums(vals, a_row0, kw, kw_ok, stride_ak, EVEN_K, A_QUADS, BLOCK_SIZE_N, BKW) * scale
                if ROWS == 2:
                    total1 += _group_sums(vals, a_row1, kw, kw_ok, stride_ak, EVEN_K, A_QUADS, BLOCK_SIZE_N,
                                          BKW) * scale
            _epilogue(tl.sum(total0, axis=1), pair0, ok0, out_ptr, bias_ptr, topk_weights_ptr, expert, offs_n, n_ok,
                      pid_k, stride_os, stride_om, stride_on, stride_be, stride_bn, HAS_BIAS, MUL_ROUTED_WEIGHT,
                      SPLIT_K)
            if ROWS == 2:
                _epilogue(tl.sum(total1, axis=1), pair1, ok1, out_ptr, bias_ptr, topk_weights_ptr, expert, offs_n,
                          n_ok, pid_k, stride_os, stride_om, stride_on, stride_be, stride_bn, HAS_BIAS,
                          MUL_ROUTED_WEIGHT, SPLIT_K)
