"""Private ``@triton.jit`` body of the fused projection + LoRA op for batches of 17..``BATCH_MAX_TOKENS``
tokens (launcher: ``fused_linear_lora_batch.py``).

``fused_linear_lora_batch_kernel`` - grid (M tiles, N tiles), M fastest (the M tiles of one W tile run
together, so W streams from memory about once).  A program owns BLOCK_M consecutive positions of the
step's slot-sorted token order and BLOCK_N output columns:

0. rows: position q < A (A = sum of ``slot_counts``, the tokens on a slot) is token ``sorted_ids[q]``;
   a position q >= A is the (q - A)-th token (in index order) of the T whose slot is -1 / out of range,
   found here from the mapping (a prefix count over it).  So the grouping may describe only the first
   n <= T rows (a CUDA-graph replay pads a batch of n to T rows whose slot is -1) and entries of
   ``sorted_ids`` past n are never read.  Each row's slot is read from the mapping (then the enabled
   check); most tiles hold one slot, tiles at slot borders several;
1. base: acc [BLOCK_M, BLOCK_N] fp32 = x_rows @ W^T over K (tensor cores), and the shrink of the
   tile's first ``LOOP_SLOTS`` distinct slots (ascending) for the first slice s0 meeting the tile, from
   the same x loads, as ONE dot: x_rows @ [A[s0, slot_0]; ...; A[s0, slot_{LOOP_SLOTS-1}]]^T, fp32
   [BLOCK_M, LOOP_SLOTS * BLOCK_R] (the A rows gathered per column, their loads pipelined with W's);
2. bias, in fp32;
3. in that [BLOCK_M, LOOP_SLOTS * BLOCK_R] shrink, row m keeps only the columns of its own slot, and
   ONE expand dot against the matching B rows adds every row's delta; then every other (slice meeting
   the tile, slot of the tile) pair: slots between the tile's smallest and largest, a pair runs when a
   row holds it (shrink re-reading the rows' x, then expand).  A sorted tile holds few slots (at 64
   tokens over 4 adapters, a 64-row tile holds 4: all in the loop with LOOP_SLOTS 4);
4. one rounding, rows scattered back to their token order.

A row without an (enabled) slot gets exactly the base (every delta it sees is 0.0).  ``UPCAST`` (under
``TRITON_INTERPRET=1``) converts dot operands to fp32: the interpreter's dot on bf16 multiplies raw bits.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_linear_lora_kernel import (_add_other_pairs, _base_loop, _col_tile,
                                                                 _first_slice, _row_slots, _slice_cols)
from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _expand_dot, _split_for_expand


@triton.jit
def _tile_tokens(mapping_ptr, sorted_ids_ptr, counts_ptr, T, max_loras, offs_q,
                 BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Token index of each of the tile's sorted positions ``offs_q`` and whether the row exists."""
    offs_l = tl.arange(0, BLOCK_L)
    on_slot = tl.sum(tl.load(counts_ptr + offs_l, mask=offs_l < max_loras, other=0), axis=0)  # A
    head = offs_q < on_slot
    tok = tl.load(sorted_ids_ptr + offs_q, mask=head, other=0)
    q_first = tl.min(offs_q, axis=0)
    if q_first + BLOCK_M > on_slot:  # the tile reaches the tokens without a slot
        offs_t = tl.arange(0, BLOCK_TAIL)
        m = tl.load(mapping_ptr + offs_t, mask=offs_t < T, other=0)
        base_only = (offs_t < T) & ((m < 0) | (m >= max_loras))
        rank = tl.cumsum(base_only.to(tl.int32), axis=0) - 1  # rank among the base-only tokens
        hit = base_only[None, :] & (rank[None, :] == (offs_q - on_slot)[:, None])  # [BLOCK_M, BLOCK_TAIL]
        tail_tok = tl.sum(tl.where(hit, offs_t[None, :], 0), axis=1)
        tok = tl.where(head, tok, tail_tok)
    ok = (offs_q < T) & (tok >= 0) & (tok < T)
    return tl.where(ok, tok, 0), ok


@triton.jit
def fused_linear_lora_batch_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, mapping_ptr, sorted_ids_ptr, counts_ptr, enabled_ptr,
    T, N, K, R, max_loras,
    n0, n1, n2, off0, off1, off2,
    stride_xt, stride_xk, stride_wn, stride_wk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_ENABLED: tl.constexpr, NUM_SLICES: tl.constexpr, UPCAST: tl.constexpr,
    BASE_PRECISION: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
    LOOP_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    zero64 = (pid_n * 0).to(tl.int64)  # makes slice / slot offsets 64-bit
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok, mask_m = _tile_tokens(mapping_ptr, sorted_ids_ptr, counts_ptr, T, max_loras, offs_q,
                               BLOCK_M, BLOCK_L, BLOCK_TAIL)
    tok64 = tok.to(tl.int64)
    n_begin, n_end, offs_n, mask_n = _col_tile(pid_n, N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    # each row's slot if valid and enabled, else -1
    slots, valid = _row_slots(mapping_ptr, enabled_ptr, tok, mask_m, max_loras, HAS_ENABLED)
    slot_lo = tl.min(tl.where(valid, slots, max_loras), axis=0)
    slot_hi = tl.max(slots, axis=0)

    # the first slice meeting the tile: its shrink runs inside the main loop for LOOP_SLOTS slots
    s0 = _first_slice(n_begin, n_end, n0, n1, n2, off0, off1, off2, NUM_SLICES)
    in_loop = (slot_lo < max_loras) & (s0 >= 0) & (LOOP_SLOTS > 0)
    # column c of the in-loop shrink (BLOCK_C = BLOCK_R * max(LOOP_SLOTS, 1)): rank c % BLOCK_R of the
    # (c // BLOCK_R)-th distinct slot of the tile
    offs_c = tl.arange(0, BLOCK_C)
    col_slot = tl.full((BLOCK_C,), 0, tl.int32) + max_loras
    loop_hi = slot_lo  # the largest slot shrunk in the loop
    cur = slot_lo
    for i in tl.static_range(LOOP_SLOTS):
        col_slot = tl.where(offs_c // BLOCK_R == i, cur, col_slot)
        loop_hi = tl.where(cur < max_loras, cur, loop_hi)
        cur = tl.min(tl.where(slots > cur, slots, max_loras), axis=0)
    col_ok = (col_slot < max_loras) & (offs_c % BLOCK_R < R) & in_loop
    col_slot64 = zero64 + tl.minimum(col_slot, max_loras - 1)
    a0_ptrs = (a_ptr + (zero64 + tl.maximum(s0, 0)) * stride_as + col_slot64[None, :] * stride_al
               + (offs_c % BLOCK_R)[None, :] * stride_ar + offs_k[:, None] * stride_ak)  # [BLOCK_K, BLOCK_C]

    # 1. base GEMM: x_rows [BLOCK_M, BLOCK_K] @ W^T [BLOCK_K, BLOCK_N] (+ the in-loop shrink)
    x_ptrs0 = x_ptr + tok64[:, None] * stride_xt + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc, shrunk0 = _base_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                              tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), x_ptrs0, w_ptrs, a0_ptrs, mask_m,
                              mask_n, col_ok, mask_m, K, stride_xk, stride_wk, stride_ak, UPCAST, BASE_PRECISION,
                              FP32_PRECISION, LOOP_SLOTS > 0, False, BLOCK_K)

    # 2. bias
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # 3. LoRA delta: the in-loop slots (each row keeps its own slot's columns), then the other pairs present
    if LOOP_SLOTS > 0:
        if in_loop:
            shrunk0 = tl.where(slots[:, None] == col_slot[None, :], shrunk0, 0.0)
            cols, mask_c = _slice_cols(s0, n0, n1, n2, off0, off1, off2, offs_n, mask_n)
            b_ptrs = (b_ptr + (zero64 + s0) * stride_bs + col_slot64[:, None] * stride_bl
                      + (offs_c % BLOCK_R)[:, None] * stride_br + cols[None, :].to(tl.int64) * stride_bn)
            b = tl.load(b_ptrs, mask=col_ok[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
            hi, mid, lo = _split_for_expand(shrunk0, EXPAND_MODE)
            acc += _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N)
    acc = _add_other_pairs(acc, x_ptrs0, a_ptr, b_ptr, slots, slot_lo, slot_hi + 1, in_loop, s0, loop_hi, n_begin,
                           n_end, n0, n1, n2, off0, off1, off2, offs_n, mask_n, offs_r, mask_r, K, stride_xk,
                           stride_as, stride_al, stride_ar, stride_ak, stride_bs, stride_bl, stride_bn, stride_br,
                           NUM_SLICES, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)

    # 4. one rounding, rows back to their tokens
    y_ptrs = y_ptr + tok64[:, None] * stride_yt + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
