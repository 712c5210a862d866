"""Private Triton body of the int4 grouped expert GEMM with the operands swapped (``UNPACK`` 4 and 5).

The same op, arguments and routing as ``_int4_moe_gemm_kernel`` (read its docstring), computed transposed:
one program's [BLOCK_SIZE_N, BLOCK_SIZE_M] tile of out^T = W[e] @ a^T, the decoded weight tile the dot's
first operand and the activation rows its second.  On an H100 / H200 the first operand of a warpgroup MMA
may come from registers, the second only from shared memory: so the weight, decoded in registers, feeds the
MMA without the shared-memory round trip (store, barrier, load) that the weight as the second operand costs
in every other mode, and the few activation rows (BLOCK_SIZE_M of them, the MMA's narrow side) are what goes
through shared memory.  Triton (``MMAV3HoistLayoutConversion``) loads the words straight into the MMA
operand's register layout only if every op from the load to the dot is elementwise, takes nothing but loads
and constants besides, and never narrows the element type.  Hence, per K-tile:

- one dot of K = BLOCK_SIZE_K / 8 per code position c (constant shifts), against activation columns 8j + c,
  as ``UNPACK`` 3; the launcher runs 4 and 5 only with one scale group per K-tile, BLOCK_SIZE_K >= 128 and
  no g_idx (else 0);
- zero points and scales after the dots, in fp32: acc += s * (Q @ a^T - z * sum_k a^T); no rounding of
  decoded weights (as ``UNPACK`` 3; not bit-identical to 0-2);
- ``UNPACK`` 4: ``qw_ptr`` is the int16 view of the words (strides in int16 units), read as halves of 4 codes;
  a code becomes C + q in the activation dtype by bit placement (fp16 1024 + q, bf16 128 + q), minus C:
  exact.  Its 2-byte strided loads cannot be asynchronous copies: not pipelined (one stage);
- ``UNPACK`` 5: the int32 words themselves (16-byte vectors along N: pipelined), each code 2^23 + q - 2^23 in
  fp32 and the dot in tf32, in which codes and fp16 / bf16 activations are exact (fp32 activations: an
  IEEE dot).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _grouped_pid
from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import _block_pairs
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _int4_moe_gemm_swap_kernel(
    a_ptr, qw_ptr, s_ptr,  # qw_ptr: [E_local, K/8, N] int32 words (5) or their int16 view (4); g_idx never comes
    z_ptr, g_ptr, perm_ptr, out_ptr, topk_weights_ptr, sorted_token_ids_ptr,
    block_expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_pid_m, num_pairs, top_k_in,
    stride_am, stride_ak, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_pe,
    stride_os, stride_om, stride_on,
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
    UNPACK: tl.constexpr = 4,
    USE_PDL: tl.constexpr = False,  # 4: int16 halves, 16-bit MMA; 5: int32 words, tf32 MMA (see the docstring)
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
    offs_wn = offs_n % N  # N-tail channels wrap onto valid ones, never stored
    offs_kw = tl.arange(0, BLOCK_SIZE_K // 8)

    a_rows = a_ptr + row * stride_am
    if UNPACK == 5:
        qw_rows = qw_ptr + expert * stride_qe + offs_wn  # int32 words
    else:
        qw_rows = qw_ptr + expert * stride_qe + offs_wn * 2  # int16 units: two halves per word
    s_rows = s_ptr + expert * stride_se + offs_wn
    z_rows = z_ptr + expert * stride_ze + offs_wn

    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    for kt in range(k_first, k_last):
        kw = kt * (BLOCK_SIZE_K // 8) + offs_kw
        kw_ok = kw < K // 8
        word_ptrs = qw_rows[:, None] + (kw * stride_qk)[None, :]  # [BN, BK/8]: words (5), or their low halves (4)
        if UNPACK == 5:
            if EVEN_K:
                words = tl.load(word_ptrs)
            else:
                words = tl.load(word_ptrs, mask=kw_ok[None, :], other=0)
            lo = words
            hi = words
        elif EVEN_K:
            lo = tl.load(word_ptrs)
            hi = tl.load(word_ptrs + 1)
        else:
            lo = tl.load(word_ptrs, mask=kw_ok[None, :], other=0)
            hi = tl.load(word_ptrs + 1, mask=kw_ok[None, :], other=0)
        part = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
        a_sum = tl.zeros((BLOCK_SIZE_M,), dtype=tl.float32)
        for c in tl.static_range(8):  # code c of word j is weight column 8j + c: one dot per code position
            kc = kw * 8 + c
            kc_ok = kc < K
            kc = tl.where(kc_ok, kc, 0)
            if HAS_PERM:
                cols_c = tl.load(perm_ptr + expert * stride_pe + kc)
            else:
                cols_c = kc
            a_c = tl.load(a_rows[None, :] + cols_c[:, None] * stride_ak, mask=kc_ok[:, None], other=0.0)  # [BK/8, BM]
            if UNPACK == 5:  # a 32-bit chain from the word (no narrowing): 2^23 + q - 2^23, the code, exact
                w = (((lo >> (4 * c)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                a_op = a_c.to(tl.float32)
            else:
                if c < 4:
                    q = (lo >> (4 * c)) & 0xF
                else:
                    q = (hi >> (4 * (c - 4))) & 0xF
                if a_c.dtype == tl.float16:
                    w = (q | 0x6400).to(tl.float16, bitcast=True) - 1024.0  # 1024 + q - 1024: the code, exact
                elif a_c.dtype == tl.bfloat16:
                    w = (q | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
                else:
                    w = q.to(tl.float32)
                a_op = a_c
            if UPCAST_DOT:
                part += tl.dot(w.to(tl.float32), a_op.to(tl.float32))
            elif a_c.dtype == tl.float32:
                part += tl.dot(w, a_op, input_precision="ieee")
            elif UNPACK == 5:  # tf32: the codes and 16-bit activations are exact in it; fp32 products and sums
                part = tl.dot(w, a_op, part, input_precision="tf32")
            else:
                part = tl.dot(w, a_op, part)
            a_sum += tl.sum(a_c.to(tl.float32), axis=0)
        g = (kt * BLOCK_SIZE_K) // GROUP_SIZE  # the whole tile is in one group: one scale per channel
        s = tl.load(s_rows + g * stride_sg).to(a_ptr.dtype.element_ty).to(tl.float32)  # as stored, widened exactly
        if HAS_ZEROS:
            z = tl.load(z_rows + g * stride_zg).to(tl.float32)
        else:
            z = tl.full((BLOCK_SIZE_N,), 8.0, tl.float32)
        acc += (part - z[:, None] * a_sum[None, :]) * s[:, None]

    if MUL_ROUTED_WEIGHT:
        gate = tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0)
        acc *= gate.to(tl.float32)[None, :]
    mask = n_ok[:, None] & pair_ok[None, :]
    out_ptrs = out_ptr + pair.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=mask)
