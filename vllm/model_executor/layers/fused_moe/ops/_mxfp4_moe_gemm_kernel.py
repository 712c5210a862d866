"""Private Triton body of the MXFP4 grouped expert GEMM (see ``mxfp4_moe_gemm.py``).

One program computes one [BLOCK_SIZE_M, BLOCK_SIZE_N] output tile of one expert, as
``_fused_moe_gemm_kernel`` does, but reads the weight as 4-bit codes: per K-step it
loads BLOCK_SIZE_K / 2 bytes of each of its BLOCK_SIZE_N rows and BLOCK_SIZE_K / 32
scales (each broadcast over its 16 bytes), decodes them in registers and splits the step into two dots: the even K
elements (low nibbles) against the even activation columns, the odd ones (high
nibbles) against the odd columns.  No dequantised weight ever reaches memory.
"""
from __future__ import annotations

import triton
import triton.language as tl


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


@triton.jit
def _mxfp4_moe_gemm_kernel(
    a_ptr,  # [num_rows, K] fp16 / bf16 / fp32
    wq_ptr,  # [E_local, N, K // 2] uint8 codes (the blocks, flattened per row)
    ws_ptr,  # [E_local, N, K // 32] uint8 e8m0 scales
    out_ptr,  # [num_pairs, N] (any strides)
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
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot in fp32 (fp32 activations, or the interpreter, whose bf16 dot is wrong)
    EVEN_K: tl.constexpr,  # K % BLOCK_SIZE_K == 0
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,  # a multiple of 32
    GROUP_SIZE_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pids_per_group = GROUP_SIZE_M * num_pid_n
    group = pid // pids_per_group
    first_m = group * GROUP_SIZE_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % pids_per_group) % rows_in_group
    pid_n = (pid % pids_per_group) // rows_in_group

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
    a_even = a_rows[:, None] + (2 * offs_j)[None, :] * stride_ak  # [BM, HALF_K]

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        if EVEN_K:
            q = tl.load(q_ptrs).to(tl.int32)
            s = tl.load(s_ptrs).to(tl.int32)
            a_lo = tl.load(a_even)
            a_hi = tl.load(a_even + stride_ak)
        else:
            j_ok = offs_j < (K - k * BLOCK_SIZE_K) // 2  # K is a multiple of 32: whole bytes and groups
            q = tl.load(q_ptrs, mask=j_ok[:, None], other=0).to(tl.int32)
            g_ok = offs_g < (K - k * BLOCK_SIZE_K) // 32
            s = tl.load(s_ptrs, mask=g_ok[:, None], other=127).to(tl.int32)
            a_lo = tl.load(a_even, mask=j_ok[None, :], other=0.0)
            a_hi = tl.load(a_even + stride_ak, mask=j_ok[None, :], other=0.0)
        # one scale per 32 elements = per 16 bytes of a row: load [GROUPS, BN], repeat each row 16 times
        scale = _e8m0_to_f32(s)
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (GROUPS, 16, BLOCK_SIZE_N)), (HALF_K, BLOCK_SIZE_N))
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
        a_even += BLOCK_SIZE_K * stride_ak

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        gate = tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0)
        acc *= gate.to(tl.float32)[:, None]

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])
