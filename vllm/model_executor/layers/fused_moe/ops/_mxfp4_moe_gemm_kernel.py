"""Private Triton body of the MXFP4 grouped expert GEMM (see ``mxfp4_moe_gemm.py``).

One program computes one [BLOCK_SIZE_M, BLOCK_SIZE_N] output tile of one expert, as
``_fused_moe_gemm_kernel`` does, but reads the weight as 4-bit codes: per K-step it
loads BLOCK_SIZE_K / 2 bytes of each of its BLOCK_SIZE_N rows and BLOCK_SIZE_K / 32
scales (each broadcast over its 16 bytes), decodes them in registers and splits the
step into two dots: the even K elements (low nibbles) against the even activation
columns, the odd ones (high nibbles) against the odd columns (one contiguous activation
load, split in registers).  No dequantised weight ever reaches memory.

Split-K (``SPLIT_K > 1``, for decode, where few experts give few tiles): program (pid, s) walks
the s-th share of the K-tiles and stores its fp32 partial tile, without bias or router weight,
into ``out_ptr`` = part[s, pair, n]; ``_mxfp4_split_k_reduce_kernel`` then walks the same
blocks, adds the shares of each routed pair, the bias and the router weight, and stores the
row (rows of pairs in no block are left untouched, as without split-K).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _bias_and_gate, _grouped_pid
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _e2m1_to_f32(code):
    """int32 e2m1 codes (0..15) -> float32 values: 0 .5 1 1.5 2 3 4 6, negated for codes 8..15 (8 is -0).

    The code's exponent and mantissa bits are placed in an fp16's (exponent field e, so the
    value is 2^(e-15) (1 + m/2), and e = 0 is the fp16 subnormal m 2^-15), the sign in its
    sign bit; that fp16 is the e2m1 value times 2^-14 exactly.  Five integer ops and two
    conversions per value instead of a table or float arithmetic.
    """
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _e8m0_to_f32(s):
    """int32 e8m0 exponents -> 2^(s - 127) as float32 (built from the bits; s = 0 is the subnormal 2^-127)."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    return bits.to(tl.float32, bitcast=True)


# Packed e2m1 -> bf16 decode (CUDA only: the interpreter cannot run inline PTX).  For the
# 4 bytes in $4 it writes the 4 low-nibble values to $0/$1 and the 4 high-nibble values to
# $2/$3 (two bf16 per register, byte i -> element i).  The 3-bit magnitude of each nibble
# selects, with one PRMT per byte half, the high and the low byte of its bf16 from two
# 8-entry byte tables (0, .5, 1, 1.5, 2, 3, 4, 6: 0x0000 0x3F00 0x3F80 0x3FC0 0x4000 0x4040
# 0x4080 0x40C0); the nibble's sign bit, moved to bit 7 of its byte, is ORed into bit 15.
# Compiled for sm90 the main loop takes about 7 instructions per weight value (decode, scale,
# loads, dots), against about 12 with the portable decode.
_E2M1_HALF = """
    and.b32 t, {src}, 0x07070707;
    shr.u32 y, t, 4;
    or.b32 y, y, t;
    prmt.b32 sel, y, 0, 0x0020;
    prmt.b32 hi, 0x3F3F3F00, 0x40404040, sel;
    and.b32 sg, {sign}, 0x80808080;
    or.b32 hi, hi, sg;
    prmt.b32 lo, 0xC0800000, 0xC0804000, sel;
    prmt.b32 {out0}, lo, hi, 0x5140;
    prmt.b32 {out1}, lo, hi, 0x7362;
"""
_E2M1_TO_BF16_ASM = tl.constexpr("""{
    .reg .b32 t, y, sel, hi, lo, sg, w4;
    shl.b32 w4, $4, 4;"""
    + _E2M1_HALF.format(src="$4", sign="w4", out0="$0", out1="$1")
    + "    shr.u32 w4, $4, 4;"
    + _E2M1_HALF.format(src="w4", sign="$4", out0="$2", out1="$3")
    + "}")


@triton.jit
def _e2m1_bytes_to_bf16(q):
    """uint8 bytes -> (low-nibble values, high-nibble values), bf16, same shape (CUDA only)."""
    return tl.inline_asm_elementwise(_E2M1_TO_BF16_ASM, "=r,=r,=r,=r,r", [q], dtype=(tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=4)


@triton.jit
def _mxfp4_moe_gemm_kernel(
    a_ptr,  # [num_rows, K] fp16 / bf16 / fp32
    wq_ptr,  # [E_local, N, K // 2] uint8 codes (the blocks, flattened per row)
    ws_ptr,  # [E_local, N, K // 32] uint8 e8m0 scales
    out_ptr,  # [num_pairs, N] (any strides), or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    bias_ptr,  # [E_local, N] or a dummy pointer when HAS_BIAS is False
    topk_weights_ptr,  # [num_pairs] or a dummy pointer when MUL_ROUTED_WEIGHT is False
    sorted_token_ids_ptr,  # [EM] int32, flat pair ids, sentinel = num_pairs
    block_expert_ids_ptr,  # [EM // BLOCK_SIZE_M] int32, -1 = nothing to do
    num_tokens_post_padded_ptr,  # [1] int32
    N,
    K,
    num_pid_m,
    num_pairs,
    top_k_in,
    stride_am,
    stride_ak,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_os,  # split stride of the partial sums (SPLIT_K > 1)
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot in fp32 (fp32 activations, or the interpreter, whose bf16 dot is wrong)
    DECODE_ASM: tl.constexpr,  # bf16 activations on CUDA: packed PTX decode, bf16 scale multiply
    EVEN_K: tl.constexpr,  # K % BLOCK_SIZE_K == 0
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,  # a multiple of 32
    GROUP_SIZE_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), N, num_pid_m, BLOCK_SIZE_N, GROUP_SIZE_M)

    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_token_ids_ptr + offs_m)
    pair_ok = pair < num_pairs
    row = tl.where(pair_ok, pair // top_k_in, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    offs_wn = offs_n % N  # N-tail columns wrap onto valid rows; never stored
    HALF_K: tl.constexpr = BLOCK_SIZE_K // 2
    offs_j = tl.arange(0, HALF_K)  # byte j of the step holds elements 2j (low) and 2j+1 (high)

    q_ptrs = wq_ptr + expert * stride_qe + offs_wn[None, :] * stride_qn + offs_j[:, None]  # [HALF_K, BN]
    GROUPS: tl.constexpr = BLOCK_SIZE_K // 32
    offs_g = tl.arange(0, GROUPS)
    s_ptrs = ws_ptr + expert * stride_se + offs_wn[None, :] * stride_sn + offs_g[:, None]  # [GROUPS, BN]
    a_rows = a_ptr + row * stride_am
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_rows[:, None] + offs_k[None, :] * stride_ak  # [BM, BK]: one contiguous load, split into even / odd

    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)
    q_ptrs += k_first * HALF_K
    s_ptrs += k_first * GROUPS
    a_ptrs += k_first * BLOCK_SIZE_K * stride_ak
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(k_first, k_last):
        if EVEN_K:
            q = tl.load(q_ptrs)
            s = tl.load(s_ptrs).to(tl.int32)
            a = tl.load(a_ptrs)
        else:
            j_ok = offs_j < (K - k * BLOCK_SIZE_K) // 2  # K is a multiple of 32: whole bytes and groups
            q = tl.load(q_ptrs, mask=j_ok[:, None], other=0)
            g_ok = offs_g < (K - k * BLOCK_SIZE_K) // 32
            s = tl.load(s_ptrs, mask=g_ok[:, None], other=127).to(tl.int32)
            a = tl.load(a_ptrs, mask=(offs_k < K - k * BLOCK_SIZE_K)[None, :], other=0.0)
        a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_SIZE_M, HALF_K, 2)))
        if DECODE_ASM:
            # e2m1 values are exact in bf16, and so is their product with a power of two
            scale = tl.where(s == 0, 0x40, s << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 2^(s-127)
            scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (GROUPS, 16, BLOCK_SIZE_N)),
                               (HALF_K, BLOCK_SIZE_N))
            v_lo, v_hi = _e2m1_bytes_to_bf16(q)
            acc = tl.dot(a_lo, v_lo * scale, acc)
            acc = tl.dot(a_hi, v_hi * scale, acc)
        else:
            # one scale per 32 elements = per 16 bytes of a row: load [GROUPS, BN], repeat each row 16 times
            scale = _e8m0_to_f32(s)
            scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (GROUPS, 16, BLOCK_SIZE_N)),
                               (HALF_K, BLOCK_SIZE_N))
            q = q.to(tl.int32)
            w_lo = _e2m1_to_f32(q & 0xF) * scale
            w_hi = _e2m1_to_f32(q >> 4) * scale
            if DOT_F32:
                acc += tl.dot(a_lo.to(tl.float32), w_lo, input_precision="ieee")
                acc += tl.dot(a_hi.to(tl.float32), w_hi, input_precision="ieee")
            else:
                acc += tl.dot(a_lo, w_lo.to(a_lo.dtype))
                acc += tl.dot(a_hi, w_hi.to(a_hi.dtype))
        q_ptrs += HALF_K
        s_ptrs += GROUPS
        a_ptrs += BLOCK_SIZE_K * stride_ak

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K > 1:  # fp32 share; the reduction adds the shares, the bias and the router weight
        tl.store(out_ptrs + pid_k.to(tl.int64) * stride_os, acc, mask=pair_ok[:, None] & n_ok[None, :])
    else:
        acc = _bias_and_gate(acc, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, offs_n, n_ok, stride_be,
                             stride_bn, HAS_BIAS, MUL_ROUTED_WEIGHT)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _mxfp4_split_k_reduce_kernel(
    part_ptr,  # fp32 [SPLIT_K, num_pairs, N], contiguous
    out_ptr,  # [num_pairs, N] (any strides)
    bias_ptr,  # [E_local, N] or a dummy pointer when HAS_BIAS is False
    topk_weights_ptr,  # [num_pairs] or a dummy pointer when MUL_ROUTED_WEIGHT is False
    sorted_token_ids_ptr,
    block_expert_ids_ptr,
    num_tokens_post_padded_ptr,
    N,
    num_pairs,
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """out[p] = (sum_s part[s, p] + bias[e]) * weight_p for the pairs p of block program_id(0)."""
    pdl_wait(USE_PDL)
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_SIZE_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M))
    pair_ok = pair < num_pairs
    pair = tl.where(pair_ok, pair, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = pair_ok[:, None] & n_ok[None, :]
    part = part_ptr + pair[:, None] * N + offs_n[None, :]
    split_stride = num_pairs.to(tl.int64) * N
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part + s * split_stride, mask=mask, other=0.0)
    acc = _bias_and_gate(acc, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, offs_n, n_ok, stride_be, stride_bn,
                         HAS_BIAS, MUL_ROUTED_WEIGHT)
    tl.store(out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)
