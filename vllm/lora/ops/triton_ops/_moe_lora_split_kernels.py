"""Private ``@triton.jit`` bodies of the split-K MoE LoRA path (launcher: ``moe_lora_split.py``).

The fused ``moe_lora_sorted_kernel`` is latency bound at decode batches: each program
walks K in a serial loop of ``K / BLOCK_K`` steps (two tiles in flight with three
stages) on a 16-row block that holds one or two real rows, after three dependent
loads (virtual expert id, padded count, pair ids), then expands N tile after N tile,
each a read-modify-write of the output.  All programs fit on the GPU at once, so the
kernel takes one program's chain of memory round trips, not its bytes.

Here the same computation takes two launches with short chains:

* ``moe_lora_split_shrink_kernel`` - grid (M-blocks, slices, K-splits): one program
  loads its K range of x and A^T as one tile each (BLOCK_K wide: both loads in flight at
  once; a loop of tiles would put the layout conversions' barriers between them) and
  stores its fp32 partial [BLOCK_M, BLOCK_R] to ``part[split, slice, pair]``.  Where one
  tile of the range would not fit in shared memory (Mixtral-8x7B's w2 in two splits: 8192
  columns), the range is ``K_TILES`` tiles in a loop (``moe_lora_split.split_tiles``).
* ``moe_lora_split_expand_kernel`` - grid (M-blocks, slices, N-splits): sums the
  ``NUM_PARTS`` partials (fp32, in split order: deterministic), then expands as the
  fused kernel does (``EXPAND_MODE``, routed weight, read-modify-write of ``out``).

Neither branches on the block's three header loads (``_block_header``).  Only rows of real pairs in used
blocks are written and read, so ``part`` needs no initialisation.

The small-batch path (no alignment, one program per (token, expert) pair) has the same two launches
(``moe_lora_pair_split_shrink_kernel`` / ``moe_lora_pair_split_expand_kernel``, ``fused_moe_lora.PAIR_KERNEL``
2): there ``moe_lora_pair_kernel`` makes every N-split program redo its pair's whole shrink, and where K is long
(Mixtral-8x7B's w2: K = 14336) that shrink compiles to dozens of dependent round trips.  Neither branches on
the route (``_pair_route_masked``): a pair whose token has no enabled adapter or whose expert is not local
stores nothing in either, so its partials are neither written nor used.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import (
    _dot,
    _expand_dot,
    _n_tile_range,
    _split_for_expand,
)
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _block_header(block_vids_ptr, num_post_padded_ptr, sorted_ids_ptr, pid_m, num_experts, numel,
                  BLOCK_M: tl.constexpr):
    """(live, slot, expert, pairs, mask_m) of M-block ``pid_m``.

    The three loads are independent, and nothing branches on them: a block that is not in
    use (``live`` false) keeps running with every load and store masked off, so that the
    compiler issues the pair ids' load with the other two and the operand loads right after,
    instead of one round trip after the other behind an early return.  The ids' buffer holds
    every launched block's entries.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    vid = tl.load(block_vids_ptr + pid_m)
    num_post = tl.load(num_post_padded_ptr)
    pairs = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    live = (vid >= 0) & (pid_m * BLOCK_M < num_post)
    vid = tl.maximum(vid, 0)
    slot = (vid // num_experts).to(tl.int64)
    expert = (vid % num_experts).to(tl.int64)
    return live, slot, expert, pairs, (pairs < numel) & live


@triton.jit
def moe_lora_split_shrink_kernel(
    x_ptr, a_ptr, part_ptr, sorted_ids_ptr, block_vids_ptr, num_post_padded_ptr,
    numel, top_k_in, K, R, num_experts,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_pk, stride_ps, stride_pp,
    UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_TILES: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    slice_s = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    live, slot, expert, pairs, mask_m = _block_header(block_vids_ptr, num_post_padded_ptr, sorted_ids_ptr, pid_m,
                                                      num_experts, numel, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = (offs_r < R) & live
    rows = pairs // top_k_in
    a_base = a_ptr + slice_s * stride_as + slot * stride_al + expert * stride_ae + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # this split's K range: K_TILES tiles (one unless a tile of the whole range would not fit shared memory)
    for t in tl.range(0, K_TILES, num_stages=1):
        offs_k = (pid_k * K_TILES + t) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_base + offs_k[:, None].to(tl.int64) * stride_ak, mask=mask_k[:, None] & mask_r[None, :],
                     other=0.0)
        acc = _dot(xt, at, acc, UPCAST, FP32_PRECISION)
    p_ptrs = part_ptr + pid_k * stride_pk + slice_s * stride_ps + pairs[:, None] * stride_pp + offs_r[None, :]
    tl.store(p_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def moe_lora_split_expand_kernel(
    b_ptr, out_ptr, part_ptr, w_ptr, sorted_ids_ptr, block_vids_ptr, num_post_padded_ptr,
    numel, top_k, N, R, num_experts,
    stride_bs, stride_bl, stride_be, stride_bn, stride_br,
    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
    stride_pk, stride_ps, stride_pp, num_n_splits,
    MUL_ROUTED_WEIGHT: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr,
    EXPAND_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_PARTS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    slice_s = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    live, slot, expert, pairs, mask_m = _block_header(block_vids_ptr, num_post_padded_ptr, sorted_ids_ptr, pid_m,
                                                      num_experts, numel, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = (offs_r < R) & live
    mask_mr = mask_m[:, None] & mask_r[None, :]
    p_ptrs = part_ptr + slice_s * stride_ps + pairs[:, None] * stride_pp + offs_r[None, :]
    acc = tl.load(p_ptrs, mask=mask_mr, other=0.0)
    for k in tl.static_range(1, NUM_PARTS):
        acc += tl.load(p_ptrs + k * stride_pk, mask=mask_mr, other=0.0)
    hi, mid, lo = _split_for_expand(acc, EXPAND_MODE)
    if MUL_ROUTED_WEIGHT:
        w = tl.load(w_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)
    out_rows = out_ptr + (pairs // top_k) * stride_ot + (pairs % top_k) * stride_oj
    col0 = out_col0 + slice_s * out_slice_cols
    b_base = b_ptr + slice_s * stride_bs + slot * stride_bl + expert * stride_be + offs_r[:, None] * stride_br
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for t in range(t_begin, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_base + offs_n[None, :].to(tl.int64) * stride_bn, mask=mask_r[:, None] & mask_n[None, :],
                    other=0.0)
        o_ptrs = out_rows[:, None] + (col0 + offs_n[None, :]) * stride_on
        o_mask = mask_m[:, None] & mask_n[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        delta = _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N)
        if MUL_ROUTED_WEIGHT:
            delta = delta * w[:, None]
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=o_mask)


@triton.jit
def _pair_route_masked(topk_ids_ptr, mapping_ptr, expert_map_ptr, pair, top_k, max_loras, num_experts,
                       HAS_EXPERT_MAP: tl.constexpr):
    """(live, slot, local expert) of one pair without the enabled flag and without a branch: slot and expert
    are clamped to 0 where the pair is not live, so that the operand loads (masked by ``live``) go out in the
    round trip after this one; the caller loads ``enabled`` beside them and masks its store with it."""
    slot = tl.load(mapping_ptr + pair // top_k).to(tl.int64)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    if HAS_EXPERT_MAP:
        local = tl.load(expert_map_ptr + tl.maximum(expert, 0)).to(tl.int64)
        expert = tl.where(expert >= 0, local, -1)
    live = (slot >= 0) & (slot < max_loras) & (expert >= 0) & (expert < num_experts)
    return live, tl.where(live, slot, 0), tl.where(live, expert, 0)


@triton.jit
def moe_lora_pair_split_shrink_kernel(
    x_ptr, a_ptr, part_ptr, topk_ids_ptr, mapping_ptr, enabled_ptr, expert_map_ptr,
    top_k, top_k_in, K, R, num_experts, max_loras,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_pk, stride_ps, stride_pp,
    HAS_EXPERT_MAP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """grid (pairs, slices, K-splits): part[split, slice, pair] = fp32 x[pair's row, split's K range] @ A^T.
    The route with x, then A with the enabled flag."""
    pdl_wait(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    slice_s = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # this split's K range: one tile
    mask_k = offs_k < K
    xk = tl.load(x_ptr + (pair // top_k_in) * stride_xm + offs_k.to(tl.int64) * stride_xk, mask=mask_k,
                 other=0.0).to(tl.float32)[None, :]
    live, slot, expert = _pair_route_masked(topk_ids_ptr, mapping_ptr, expert_map_ptr, pair, top_k, max_loras,
                                            num_experts, HAS_EXPERT_MAP)
    mask_r = (offs_r < R) & live
    on = tl.load(enabled_ptr + slot) != 0
    a = tl.load(a_ptr + slice_s * stride_as + slot * stride_al + expert * stride_ae + offs_r[:, None] * stride_ar
                + offs_k[None, :].to(tl.int64) * stride_ak, mask=mask_r[:, None] & mask_k[None, :],
                other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
    tl.store(part_ptr + pid_k * stride_pk + slice_s * stride_ps + pair * stride_pp + offs_r,
             tl.sum(a * xk, axis=1), mask=mask_r & on)


@triton.jit
def moe_lora_pair_split_expand_kernel(
    b_ptr, out_ptr, part_ptr, w_ptr, topk_ids_ptr, mapping_ptr, enabled_ptr, expert_map_ptr,
    top_k, N, R, num_experts, max_loras,
    stride_bs, stride_bl, stride_be, stride_bn, stride_br,
    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
    stride_pk, stride_ps, stride_pp, num_n_splits,
    HAS_EXPERT_MAP: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_PARTS: tl.constexpr, USE_PDL: tl.constexpr = False, OVERWRITE: tl.constexpr = False,
):
    """grid (pairs, slices, N-splits): the pair's partials summed in split order (deterministic), then its
    expand over this N-split's columns, a read-modify-write of ``out`` per BLOCK_N tile; a pair that is not live
    or whose slot is disabled stores nothing.  ``OVERWRITE`` (``out`` is a delta buffer of its own): each tile is
    stored without reading ``out``, zeros for such a pair."""
    pdl_wait(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    slice_s = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    out_row = out_ptr + (pair // top_k) * stride_ot + (pair % top_k) * stride_oj
    col0 = out_col0 + slice_s * out_slice_cols
    p_ptrs = part_ptr + slice_s * stride_ps + pair * stride_pp + offs_r
    live, slot, expert = _pair_route_masked(topk_ids_ptr, mapping_ptr, expert_map_ptr, pair, top_k, max_loras,
                                            num_experts, HAS_EXPERT_MAP)
    mask_r = (offs_r < R) & live
    acc = tl.load(p_ptrs, mask=mask_r, other=0.0)
    for k in tl.static_range(1, NUM_PARTS):
        acc += tl.load(p_ptrs + k * stride_pk, mask=mask_r, other=0.0)
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(w_ptr + pair).to(tl.float32)
    on = (tl.load(enabled_ptr + slot) != 0) & live
    b_base = b_ptr + slice_s * stride_bs + slot * stride_bl + expert * stride_be + offs_r[None, :] * stride_br
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for t in range(t_begin, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        o_ptrs = out_row + (col0 + offs_n) * stride_on
        if not OVERWRITE:
            o = tl.load(o_ptrs, mask=mask_n & live, other=0.0)
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(b * acc[None, :], axis=1)
        if OVERWRITE:
            tl.store(o_ptrs, tl.where(on, delta, 0.0).to(out_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=mask_n & on)
