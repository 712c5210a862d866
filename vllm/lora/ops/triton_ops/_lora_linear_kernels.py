"""Private ``@triton.jit`` bodies of the dense LoRA op (launcher: ``lora_linear.py``).

Both kernels fuse the shrink (x @ A^T, fp32) and the expand (@ B^T, added in
place into y); the shrink result never leaves the registers and is never
rounded before it has been multiplied by B.  Grid axis 1 is the slice (up to
three, e.g. q/k/v; per-slice width ``n*`` and first output column ``off*`` are
scalars picked by the slice index), axis 2 splits the N tiles of a slice.

* ``lora_linear_token_kernel`` - grid (tokens, slices, N-splits), no grouping:
  decode-sized batches.  Broadcast-multiply and ``tl.sum`` (a dot needs 16 rows).
  The shrink's K loop is unrolled (``_shrink_one_row``, ``K_TILES``); many
  N-splits (each recomputing the small shrink from L2) keep the expand's memory
  round trips parallel.
* ``lora_linear_sorted_kernel`` - grid (M-blocks, slices, N-splits) over tokens
  grouped by slot (``sorted_token_ids``, ``slot_counts``): slot l's run of
  tokens is cut into ceil(count_l / BLOCK_M) blocks, numbered slot after slot,
  and each program finds its slot by walking ``slot_counts``.  Worked example:
  counts [3, 0, 5], BLOCK_M 4 -> blocks 0: slot 0 rows 0-2; 1: slot 2 rows 3-6;
  2: slot 2 row 7; programs 3 and up return at once.  Shrink and expand run on
  tensor cores; the expand of the fp32 intermediate uses the bf16x3 split or a
  tf32x3 dot (``EXPAND_MODE``, see ``_fused_moe_lora_kernels``).

``UPCAST`` (under ``TRITON_INTERPRET=1``) converts dot operands to fp32: the
interpreter's dot on bf16 multiplies raw bit patterns.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import (
    _expand_dot,
    _n_tile_range,
    _shrink_one_row,
    _shrink_rows,
    _split_for_expand,
)
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _slice_params(s, n0, n1, n2, off0, off1, off2):
    n = tl.where(s == 0, n0, tl.where(s == 1, n1, n2))
    col0 = tl.where(s == 0, off0, tl.where(s == 1, off1, off2))
    return n, col0


@triton.jit
def _slot_block(pid_m, counts_ptr, num_slots, BLOCK_M: tl.constexpr):
    """The sorted path's block ``pid_m``: its slot (-1 past the last block), its first block and the slot's rows
    [row_begin, row_end) of the slot-sorted order.  Slot l's run of tokens is cut into ceil(count_l / BLOCK_M)
    blocks, numbered slot after slot (the module docstring's example)."""
    zero = pid_m * 0
    slot = zero - 1
    first_block = zero
    row_begin = zero
    row_end = zero
    blocks = zero
    rows = zero
    for lid in range(0, num_slots):
        c = tl.load(counts_ptr + lid)
        nb = (c + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= blocks) & (pid_m < blocks + nb)
        slot = tl.where(hit, lid, slot)
        first_block = tl.where(hit, blocks, first_block)
        row_begin = tl.where(hit, rows, row_begin)
        row_end = tl.where(hit, rows + c, row_end)
        blocks += nb
        rows += c
    return slot, first_block, row_begin, row_end


@triton.jit
def _block_tokens(pid_m, first_block, row_begin, row_end, sorted_ids_ptr, num_tokens, BLOCK_M: tl.constexpr):
    """Block ``pid_m``'s tokens ([BLOCK_M] int64, from ``_slot_block``'s rows) and their mask."""
    offs_m = row_begin + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    tokens = tl.load(sorted_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    return tokens, mask_m & (tokens < num_tokens)


@triton.jit
def lora_linear_token_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, mapping_ptr, enabled_ptr,
    K, R, max_loras,
    n0, n1, n2, off0, off1, off2,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn, num_n_splits,
    HAS_ENABLED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    K_TILES: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(mapping_ptr + t)
    if (slot < 0) | (slot >= max_loras):
        return
    if HAS_ENABLED:
        if tl.load(enabled_ptr + slot) == 0:
            return
    slot = slot.to(tl.int64)
    s64 = s.to(tl.int64)
    N, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + t * stride_xt + offs_k * stride_xk
    a_ptrs = a_ptr + s64 * stride_as + slot * stride_al + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    shrunk = _shrink_one_row(x_ptrs, a_ptrs, mask_r, K, stride_xk, stride_ak, BLOCK_K, BLOCK_R, K_TILES)  # fp32

    y_row = y_ptr + t * stride_yt
    b_base = b_ptr + s64 * stride_bs + slot * stride_bl + offs_r[None, :] * stride_br
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for tile in range(t_begin, t_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(b * shrunk[None, :], axis=1)
        y_ptrs = y_row + (col0 + offs_n).to(tl.int64) * stride_yn
        yv = tl.load(y_ptrs, mask=mask_n, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=mask_n)


@triton.jit
def lora_linear_sorted_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, sorted_ids_ptr, counts_ptr, enabled_ptr,
    num_tokens, K, R, num_slots,
    n0, n1, n2, off0, off1, off2,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn, num_n_splits,
    HAS_ENABLED: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot, first_block, row_begin, row_end = _slot_block(pid_m, counts_ptr, num_slots, BLOCK_M)
    if slot < 0:
        return
    if HAS_ENABLED:
        if tl.load(enabled_ptr + slot) == 0:
            return
    slot64 = slot.to(tl.int64)
    s64 = s.to(tl.int64)
    N, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
    tokens, mask_m = _block_tokens(pid_m, first_block, row_begin, row_end, sorted_ids_ptr, num_tokens, BLOCK_M)

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk
    a_ptrs = (a_ptr + s64 * stride_as + slot64 * stride_al
              + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak)  # [BLOCK_K, BLOCK_R] view of A^T
    acc = _shrink_rows(x_ptrs, a_ptrs, mask_m, mask_r, K, stride_xk, stride_ak, UPCAST, FP32_PRECISION,
                       BLOCK_M, BLOCK_K, BLOCK_R)

    hi, mid, lo = _split_for_expand(acc, EXPAND_MODE)
    y_rows = y_ptr + tokens * stride_yt
    b_base = b_ptr + s64 * stride_bs + slot64 * stride_bl + offs_r[:, None] * stride_br
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for tile in range(t_begin, t_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_base + offs_n[None, :].to(tl.int64) * stride_bn, mask=mask_r[:, None] & mask_n[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_N] view of B^T
        delta = _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N)
        y_ptrs = y_rows[:, None] + (col0 + offs_n[None, :]).to(tl.int64) * stride_yn
        y_mask = mask_m[:, None] & mask_n[None, :]
        yv = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=y_mask)


@triton.jit
def _slot_operands(a_ptr, b_ptr, enabled_ptr, slot, live, s64, offs_n, mask_n, offs_r, mask_r, offs_k, K,
                   stride_as, stride_al, stride_ar, stride_ak, stride_bs, stride_bl, stride_bn, stride_br,
                   HAS_ENABLED: tl.constexpr):
    """The prefetch kernel's loads of slot ``slot`` (int64; only where ``live``): B's [BLOCK_N, BLOCK_R] tile,
    the slot's enabled flag (``live`` itself without flags), A's first tile and its pointers."""
    b = tl.load(b_ptr + s64 * stride_bs + slot * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn
                + offs_r[None, :] * stride_br, mask=mask_n[:, None] & mask_r[None, :] & live, other=0.0)
    if HAS_ENABLED:
        on = tl.load(enabled_ptr + slot, mask=live, other=0) != 0
    else:
        on = live
    a_ptrs = a_ptr + s64 * stride_as + slot * stride_al + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    a = tl.load(a_ptrs, mask=mask_r[:, None] & (offs_k[None, :] < K) & live, other=0.0)
    return b, on, a_ptrs, a


@triton.jit
def lora_linear_token_prefetch_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, mapping_ptr, enabled_ptr,
    K, R, max_loras,
    n0, n1, n2, off0, off1, off2,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_ENABLED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    K_TILES: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """The token path in two dependent memory round trips (``LoRALinearTileConfig.token_kernel = 1``).

    Grid (tokens, slices, cdiv(max N, BLOCK_N)): one program per BLOCK_N columns of one slice of
    one token.  Trip 1: the token's slot, its x row and its y tile (x and y do not depend on the
    slot); trip 2: A (all K, ``K_TILES`` tiles of BLOCK_K, one tile at the launcher's defaults),
    B's tile and the slot's enabled flag, all issued before any arithmetic.  A disabled slot is
    masked out of the store instead of branched on (a branch would add a trip).  Programs past
    the end of a narrow slice return before loading anything.
    """
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    N, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    s64 = s.to(tl.int64)
    pdl_wait(USE_PDL)
    if pid_n * BLOCK_N >= N:
        return
    slot = tl.load(mapping_ptr + t)
    y_ptrs = y_ptr + t * stride_yt + (col0 + offs_n).to(tl.int64) * stride_yn
    yv = tl.load(y_ptrs, mask=mask_n, other=0.0)
    x_row = x_ptr + t * stride_xt
    # x as a [1, BLOCK_K] row: it takes A's layout, with no trip through shared memory (whose barrier
    # would hold the loads of A behind x's)
    xk = tl.load(x_row + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < K, other=0.0).to(tl.float32)
    if (slot < 0) | (slot >= max_loras):
        return
    b, on, a_ptrs, a = _slot_operands(a_ptr, b_ptr, enabled_ptr, slot.to(tl.int64), slot >= 0, s64, offs_n,
                                      mask_n, offs_r, mask_r, offs_k, K, stride_as, stride_al, stride_ar,
                                      stride_ak, stride_bs, stride_bl, stride_bn, stride_br, HAS_ENABLED)
    acc2 = a.to(tl.float32) * xk
    for kt in tl.static_range(1, K_TILES):  # only when A does not fit one tile (large K or rank)
        k_left = K - kt * BLOCK_K
        xt = tl.load(x_row + (kt * BLOCK_K + offs_k[None, :]) * stride_xk, mask=offs_k[None, :] < k_left,
                     other=0.0).to(tl.float32)
        at = tl.load(a_ptrs + kt * BLOCK_K * stride_ak, mask=mask_r[:, None] & (offs_k[None, :] < k_left), other=0.0)
        acc2 += at.to(tl.float32) * xt
    shrunk = tl.sum(acc2, axis=1)  # fp32 [BLOCK_R]
    delta = tl.sum(b.to(tl.float32) * shrunk[None, :], axis=1)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=mask_n & on)
