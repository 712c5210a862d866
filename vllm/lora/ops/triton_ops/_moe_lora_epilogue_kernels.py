"""Private ``@triton.jit`` bodies of the MoE LoRA delta in the base GEMM's epilogue (``moe_lora_epilogue.py``).

Both work on the *base* expert alignment (``moe_align_block_size``): an M-block holds pairs of one expert,
whose tokens may use different adapter slots (or none).  No (adapter, expert) alignment is made.

* ``moe_lora_block_shrink_kernel`` - grid (M-blocks, slices): the fp32 shrink ``x[row] @ A_s[slot, e]^T`` of
  every pair of the block into ``shrunk[s, pair, :]``.  With ``CONCAT`` (slots x rank tile <= 128 columns)
  each K tile of x meets one tile of every slot's A side by side (one dot) and each row keeps its own
  slot's columns; else one K loop per slot present.
* ``lora_epilogue`` - called by the grouped GEMM (``_fused_moe_gemm_kernel``) on its fp32 accumulator before
  the bias and the router weight: ``acc[m, n] += shrunk[s(n), pair_m] @ B_s(n)[slot_m, e, n]^T``, with
  ``CONCAT`` as one expand of the rows' shrinks placed in their slots' columns against every slot's B
  stacked along the rank, else one expand per slot present (rows of other slots zeroed); the GEMM output
  is rounded once, with the delta in it, and never read back.

The shrink stays fp32 until the expand, which splits it into three bf16 terms for bf16 B (``EXPAND_MODE`` 1,
see ``_fused_moe_lora_kernels``).  Offsets that multiply a pair, slot or expert index are 64-bit.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _dot, _split_for_expand, expand_acc


@triton.jit
def pair_slots(pair, pair_ok, map_ptr, enabled_ptr, top_k, max_loras):
    """int32 [BLOCK_M] adapter slot of each pair (token ``pair // top_k``), -1 for none, a disabled slot, or
    padding."""
    token = tl.where(pair_ok, pair, 0).to(tl.int64) // top_k
    slot = tl.load(map_ptr + token, mask=pair_ok, other=-1).to(tl.int32)
    slot_ok = pair_ok & (slot >= 0) & (slot < max_loras)
    on = tl.load(enabled_ptr + tl.where(slot_ok, slot, max_loras), mask=slot_ok, other=0)
    return tl.where(slot_ok & (on != 0), slot, -1)


@triton.jit
def _slot_columns(slot, max_loras, R, SLOTS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The concatenated-slots layout: column c of a [., SLOTS * BLOCK_R] tile is rank ``c % BLOCK_R`` of slot
    ``c // BLOCK_R``.  Returns (slot of each column, rank of each column, whether the column is read: a rank
    < R of a slot some row of the block uses)."""
    offs_c = tl.arange(0, SLOTS * BLOCK_R)
    c_slot = offs_c // BLOCK_R
    c_r = offs_c % BLOCK_R
    used = tl.max((slot[:, None] == c_slot[None, :]).to(tl.int32), 0) > 0
    return c_slot, c_r, used & (c_r < R) & (c_slot < max_loras)


@triton.jit
def moe_lora_block_shrink_kernel(
    x_ptr, a_ptr, s_ptr, sorted_ids_ptr, block_expert_ids_ptr, num_post_padded_ptr, map_ptr, enabled_ptr,
    numel, top_k, top_k_in, K, R, max_loras,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_ss, stride_sp, stride_sr,
    SLOTS: tl.constexpr, CONCAT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    sl = tl.program_id(1).to(tl.int64)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    pair_ok = pair < numel
    slot = pair_slots(pair, pair_ok, map_ptr, enabled_ptr, top_k, max_loras)
    has = slot >= 0
    p64 = tl.where(pair_ok, pair, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    x_ptrs = x_ptr + (p64 // top_k_in)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_base = a_ptr + sl * stride_as + expert * stride_ae

    if CONCAT:
        # one [BLOCK_K, SLOTS * BLOCK_R] tile of every slot's A^T a K step (absent slots masked off: no traffic),
        # one dot, then each row keeps its own slot's BLOCK_R columns: a loop of one x load, one A load, one dot
        c_slot, c_r, c_ok = _slot_columns(slot, max_loras, R, SLOTS, BLOCK_R)
        a_ptrs = a_base + c_slot[None, :] * stride_al + c_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
        acc_all = tl.zeros((BLOCK_M, SLOTS * BLOCK_R), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:  # no K mask: the loads stay vectorised (and asynchronous)
                xt = tl.load(x_ptrs, mask=has[:, None], other=0.0)
                at = tl.load(a_ptrs, mask=c_ok[None, :], other=0.0)
            else:
                k_in = offs_k < K - kt * BLOCK_K
                xt = tl.load(x_ptrs, mask=has[:, None] & k_in[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_in[:, None] & c_ok[None, :], other=0.0)
            acc_all = _dot(xt, at, acc_all, UPCAST, FP32_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        mine = tl.where(slot[:, None] == c_slot[None, :], acc_all, 0.0)
        acc = tl.sum(tl.reshape(mine, (BLOCK_M, SLOTS, BLOCK_R)), axis=1)
    else:
        # many slots: per slot present in the block, its own K loop (x read again, from L2)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_ptrs = a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
        for j in range(0, max_loras):
            mine = slot == j
            if tl.max(mine.to(tl.int32), 0) > 0:
                d = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for kt in range(0, tl.cdiv(K, BLOCK_K)):
                    k_in = offs_k < K - kt * BLOCK_K
                    xt = tl.load(x_ptrs + kt * BLOCK_K * stride_xk, mask=mine[:, None] & k_in[None, :], other=0.0)
                    at = tl.load(a_ptrs + j * stride_al + kt * BLOCK_K * stride_ak, mask=k_in[:, None] & r_ok[None, :],
                                 other=0.0)
                    d = _dot(xt, at, d, UPCAST, FP32_PRECISION)
                acc += d  # rows of other slots read x as zeros: d is 0 there
    tl.store(s_ptr + sl * stride_ss + p64[:, None] * stride_sp + offs_r[None, :] * stride_sr, acc,
             mask=pair_ok[:, None] & r_ok[None, :])


@triton.jit
def lora_epilogue(acc, pair, pair_ok, expert, offs_n, n_ok, s_ptr, b_ptr, map_ptr, enabled_ptr, top_k, R,
                  max_loras, slice_cols, stride_ss, stride_sp, stride_sr, stride_bs, stride_bl, stride_be,
                  stride_bn, stride_br, SLOTS: tl.constexpr, SLICES: tl.constexpr, BLOCK_R: tl.constexpr,
                  EXPAND_MODE: tl.constexpr, CONCAT: tl.constexpr, UPCAST: tl.constexpr,
                  FP32_PRECISION: tl.constexpr):
    """fp32 ``acc`` [BLOCK_M, BLOCK_N] of the GEMM tile (pairs ``pair`` of local expert ``expert``, columns
    ``offs_n``) + each pair's LoRA delta; column n belongs to slice ``n // slice_cols``."""
    slot = pair_slots(pair, pair_ok, map_ptr, enabled_ptr, top_k, max_loras)
    if tl.max((slot >= 0).to(tl.int32), 0) > 0:
        p64 = tl.where(pair_ok, pair, 0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        for sl in tl.static_range(SLICES):
            col = offs_n - sl * slice_cols
            in_sl = n_ok & (col >= 0) & (col < slice_cols)
            if tl.max(in_sl.to(tl.int32), 0) > 0:
                col64 = tl.where(in_sl, col, 0).to(tl.int64)
                b_base = b_ptr + sl * stride_bs + expert * stride_be
                s_rows = s_ptr + sl * stride_ss + p64[:, None] * stride_sp
                if CONCAT:
                    # each row's shrink in its slot's BLOCK_R columns of a [BLOCK_M, SLOTS * BLOCK_R] tile (zeros
                    # elsewhere) @ every slot's B stacked along the rank: one expand for the whole block
                    c_slot, c_r, c_ok = _slot_columns(slot, max_loras, R, SLOTS, BLOCK_R)
                    s = tl.load(s_rows + c_r[None, :] * stride_sr, mask=(slot[:, None] == c_slot[None, :])
                                & c_ok[None, :], other=0.0)
                    b = tl.load(b_base + c_slot[:, None] * stride_bl + c_r[:, None] * stride_br
                                + col64[None, :] * stride_bn, mask=c_ok[:, None] & in_sl[None, :], other=0.0)
                    acc = _expand_into(acc, s, b, UPCAST, FP32_PRECISION, EXPAND_MODE)
                else:
                    s = tl.load(s_rows + offs_r[None, :] * stride_sr, mask=(slot >= 0)[:, None] & r_ok[None, :],
                                other=0.0)
                    for j in range(0, max_loras):
                        mine = slot == j
                        if tl.max(mine.to(tl.int32), 0) > 0:
                            b = tl.load(b_base + j * stride_bl + offs_r[:, None] * stride_br
                                        + col64[None, :] * stride_bn, mask=r_ok[:, None] & in_sl[None, :], other=0.0)
                            acc = _expand_into(acc, tl.where(mine[:, None], s, 0.0), b, UPCAST, FP32_PRECISION,
                                               EXPAND_MODE)
    return acc


@triton.jit
def _expand_into(acc, s, b, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr):
    """acc += the fp32 shrink ``s`` @ the B tile ``b``, into the accumulator itself (no second output tile)."""
    hi, mid, lo = _split_for_expand(s, EXPAND_MODE)
    return expand_acc(acc, hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE)
