"""Private Triton body of the grouped expert GEMM (see ``fused_moe_gemm.py``).

One program computes one [BLOCK_SIZE_M, BLOCK_SIZE_N] output tile: BLOCK_SIZE_M
consecutive entries of ``sorted_token_ids`` (all routed to the same expert, as
``moe_align_block_size`` guarantees) times one N-slice of that expert's weight.

With ``FUSED_ACT`` >= 0 (GEMM1 without LoRA) the output is the gated activation of width N: the program
keeps two accumulators, of the gate rows and of the up rows of its N-slice (rows n and N + n; gpt-oss's
interleaved 2n and 2n + 1), rounds each to the output dtype as GEMM1's output would be, and applies
``gated_act`` - the activation kernel's math - before the one store.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._activation_kernel import gated_act
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _grouped_pid(pid, N, num_pid_m, BLOCK_SIZE_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the grouped tile order of the MoE GEMMs: GROUP_SIZE_M consecutive
    M-blocks sweep the N tiles together, so a weight N-slice stays in L2 while those M-blocks read it."""
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pids_per_group = GROUP_SIZE_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_SIZE_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    return first_m + (pid % pids_per_group) % rows_in_group, (pid % pids_per_group) // rows_in_group


@triton.jit
def _bias_and_gate(acc, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, offs_n, n_ok, stride_be, stride_bn,
                   HAS_BIAS: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr):
    """The MoE GEMMs' epilogue before the one rounding: fp32 ``acc`` [pairs, n] + the expert's bias row, then
    times each pair's router weight (each where its flag is set; masked pairs / columns read 0)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        gate = tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0)
        acc *= gate.to(tl.float32)[:, None]
    return acc


@triton.jit
def _dot_step(acc, a, w, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
    elif a.dtype == tl.float32:  # a float32 model gets float32 products, not tf32
        acc += tl.dot(a, w, input_precision="ieee")
    else:
        acc += tl.dot(a, w)
    return acc


@triton.jit
def _fused_moe_gemm_kernel(
    a_ptr,  # [num_rows, K]
    w_ptr,  # [E_local, N, K]
    out_ptr,  # [num_pairs, N] (any strides)
    bias_ptr,  # [E_local, N] or a dummy pointer when HAS_BIAS is False
    topk_weights_ptr,  # [num_pairs] or a dummy pointer when MUL_ROUTED_WEIGHT is False
    sorted_token_ids_ptr,  # [EM] int32, flat pair ids, sentinel = num_pairs
    block_expert_ids_ptr,  # [EM // BLOCK_SIZE_M] int32, -1 = nothing to do
    num_tokens_post_padded_ptr,  # [1] int32
    N,
    K,
    num_pid_m,  # M-blocks launched (<= len(sorted_token_ids) // BLOCK_SIZE_M)
    num_pairs,
    top_k_in,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_be,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter: its bf16 dot multiplies raw bits
    EVEN_K: tl.constexpr,  # K % BLOCK_SIZE_K == 0: no K-tail masks
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, USE_PDL: tl.constexpr = False,
    FUSED_ACT: tl.constexpr = -1,  # >= 0: gated_act's ACT code; N is then the activated width
    alpha=0.0,
    limit=0.0,
):
    pdl_wait(USE_PDL)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), N, num_pid_m, BLOCK_SIZE_N, GROUP_SIZE_M)

    # The buffers are sized for the worst case: stop at the used length.
    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_token_ids_ptr + offs_m)
    pair_ok = pair < num_pairs  # padding holds the sentinel num_pairs
    # Padding rows read row 0 and N-tail columns wrap onto valid rows of w, so
    # the loads need no M or N masks; those results are never stored.
    row = tl.where(pair_ok, pair // top_k_in, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_ok = offs_n < N
    offs_wn = offs_n % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    # 64-bit base pointers (expert slab, activation rows); the offsets inside
    # one expert's [N, K] slab fit in int32 (the launcher checks).
    w_base = w_ptr + expert * stride_we
    if FUSED_ACT == 2:  # gpt-oss: gate / up interleaved
        gate_rows, up_rows = 2 * offs_wn, 2 * offs_wn + 1
    else:
        gate_rows, up_rows = offs_wn, offs_wn + N
    w_offs = gate_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w_up_offs = up_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    a_rows = a_ptr + row * stride_am
    a_offs = offs_k[None, :] * stride_ak

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        if EVEN_K:
            a = tl.load(a_rows[:, None] + a_offs)
            w = tl.load(w_base + w_offs)
            if FUSED_ACT >= 0:
                w_up = tl.load(w_base + w_up_offs)
        else:
            k_ok = offs_k < K - k * BLOCK_SIZE_K
            a = tl.load(a_rows[:, None] + a_offs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_base + w_offs, mask=k_ok[:, None], other=0.0)
            if FUSED_ACT >= 0:
                w_up = tl.load(w_base + w_up_offs, mask=k_ok[:, None], other=0.0)
        acc = _dot_step(acc, a, w, UPCAST_DOT)
        if FUSED_ACT >= 0:
            acc_up = _dot_step(acc_up, a, w_up, UPCAST_DOT)
        a_rows += BLOCK_SIZE_K * stride_ak
        w_base += BLOCK_SIZE_K * stride_wk

    out_t = out_ptr.dtype.element_ty
    if FUSED_ACT >= 0:  # GEMM1's rounding of gate and up, then the activation
        gate = _bias_and_gate(acc, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, gate_rows, n_ok, stride_be,
                              stride_bn, HAS_BIAS, False)
        up = _bias_and_gate(acc_up, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, up_rows, n_ok, stride_be,
                            stride_bn, HAS_BIAS, False)
        acc = gated_act(gate.to(out_t).to(tl.float32), up.to(out_t).to(tl.float32), alpha, limit, FUSED_ACT)
    else:
        acc = _bias_and_gate(acc, bias_ptr, topk_weights_ptr, expert, pair, pair_ok, offs_n, n_ok, stride_be,
                             stride_bn, HAS_BIAS, MUL_ROUTED_WEIGHT)

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_t), mask=pair_ok[:, None] & n_ok[None, :])
