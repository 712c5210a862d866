"""Private Triton body of the bf16 / fp16 / fp32 expert GEMV: the pairwise one-token launch (``GEMV=1``).

At decode among many experts each routed (token, expert) pair is a matrix-vector product and the pairwise
alignment gives every pair its own M-block: the tl.dot kernel then runs a 16-row tensor-core tile with one
real row.  Here one program computes one pair's [BLOCK_SIZE_N] output slice over one K-split with plain
FMAs, no ``tl.dot`` and no shared memory in the K loop:

* the weight is [E, N, K] with K contiguous: a K-tile is a [BLOCK_SIZE_N, BLOCK_SIZE_K] load whose rows
  are contiguous, so each thread reads 16 bytes at a time (8 bf16);
* the activation's K-tile is loaded through a [BLOCK_SIZE_N, BLOCK_SIZE_K] pointer tile that repeats one
  row (``tl.broadcast_to``): it then takes the weight tile's layout, each thread loads the 8 values its
  weight columns need once (one 16-byte load; the compiler drops the repeated rows) and reuses them for
  its rows.  A [BLOCK_SIZE_K] load would take a layout of its own and be converted through shared
  memory, with two barriers, every K-step (seen in the sm_90 SASS);
* products accumulate in an fp32 [BLOCK_SIZE_N, BLOCK_SIZE_K] tile (one FFMA per weight), reduced over K
  once after the loop;
* full K-tiles run without masks; a K tail (K % BLOCK_SIZE_K) runs once, masked, in the last split.

Epilogue as the dot kernel's: + the expert's bias row (split 0 only), times the pair's router weight
(every split: the sum of weighted splits is the weighted sum), one rounding at the store.  With
``SPLIT_K > 1`` the program stores fp32 partial sums [SPLIT_K, num_pairs, N] that one reduction launch
adds; a pair whose expert is -1 stores zeros there, so no buffer needs zeroing.  Without split-K such a
pair's row is not written (the dot kernel's contract).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _fused_moe_gemv_kernel(
    a_ptr,  # [num_rows, K]
    w_ptr,  # [E_local, N, K]
    out_ptr,  # [num_pairs, N] (any strides), or fp32 [SPLIT_K, num_pairs, N] partial sums when SPLIT_K > 1
    bias_ptr,  # [E_local, N] or a dummy pointer when HAS_BIAS is False
    topk_weights_ptr,  # [num_pairs] or a dummy pointer when MUL_ROUTED_WEIGHT is False
    pair_expert_ids_ptr,  # [num_pairs] int32 local expert of each pair, -1 = skip
    N,
    K,
    top_k_in,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_os,  # split stride of the partial-sum buffer (SPLIT_K > 1)
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pair = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    out_ptrs = out_ptr + pair.to(tl.int64) * stride_om + offs_n * stride_on
    if SPLIT_K > 1:
        out_ptrs += pid_k * stride_os
    expert = tl.load(pair_expert_ids_ptr + pair).to(tl.int64)
    if expert < 0:
        if SPLIT_K > 1:  # the reduction adds every row: this pair's partial sums are zeros
            tl.store(out_ptrs, tl.zeros((BLOCK_SIZE_N,), dtype=tl.float32), mask=n_ok)
        return
    row = (pair // top_k_in).to(tl.int64)

    # N-tail rows wrap onto valid rows of w: the loads need no N mask (those sums are never stored).
    offs_wn = offs_n % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    # 64-bit base pointers; offsets inside one expert's [N, K] slab fit in int32 (the launcher checks)
    w_tile = w_ptr + expert * stride_we + (offs_wn[:, None] * stride_wn + offs_k[None, :] * stride_wk)
    a_tile = a_ptr + row * stride_am + tl.broadcast_to(offs_k[None, :] * stride_ak, (BLOCK_SIZE_N, BLOCK_SIZE_K))

    full_tiles = K // BLOCK_SIZE_K
    tiles_per_split = tl.cdiv(full_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, full_tiles)

    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    for kt in range(k_first, k_last):
        w = tl.load(w_tile + kt * BLOCK_SIZE_K * stride_wk)
        a = tl.load(a_tile + kt * BLOCK_SIZE_K * stride_ak)
        acc += w.to(tl.float32) * a.to(tl.float32)
    k_tail = full_tiles * BLOCK_SIZE_K
    if k_tail < K and pid_k == SPLIT_K - 1:  # the K tail, masked, once
        k_ok = offs_k < K - k_tail
        w = tl.load(w_tile + k_tail * stride_wk, mask=k_ok[None, :], other=0.0)
        a = tl.load(a_tile + k_tail * stride_ak, mask=k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)
    y = tl.sum(acc, axis=1)  # [BLOCK_SIZE_N] fp32

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok & (pid_k == 0), other=0.0)
        y += bias.to(tl.float32)
    if MUL_ROUTED_WEIGHT:
        y *= tl.load(topk_weights_ptr + pair).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(out_ptrs, y, mask=n_ok)
