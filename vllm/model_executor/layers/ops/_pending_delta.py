"""Triton helpers of the pending low-rank delta (host side and the reason: ``pending_delta.py``).

The operands a program needs from the step's slot mapping and the adapters' A / B are step-invariant (the mapping
is copied in before the step's first kernel; A and B are weights), so the kernels load them before their PDL wait,
and keep the tiles in registers across it: after the wait only the rows and the partial sums are loaded.

``pending_slot``: row t's slot and whether it is one (a slot without this layer's adapter holds zero A and B, so it
adds exactly zero: no enabled flag is read, one dependent load less). ``pending_shrink_operands`` (with
``pending_a``) / ``pending_shrink``: one producer program - A's [BLOCK_R, BLOCK_K] chunk of the slot, then the fp32
sums of one K chunk of a row (as the kernel rounds it for the projection) times it, stored at ``part[t, s, j]``.
``pending_b`` / ``pending_apply``: a consumer - B's rows at column offsets ``cols`` (any 2-D tile) of slice s, [..,
.., BLOCK_R], then the fp32 delta there: the row's K-split partials summed in a fixed order, times the tile; zero
where the row has no slot (nothing is read there).
"""
import triton
import triton.language as tl


@triton.jit
def pending_slot(map_ptr, t, max_loras, live):
    slot = tl.load(map_ptr + t, mask=live, other=-1)
    return slot.to(tl.int64), (slot >= 0) & (slot < max_loras)


@triton.jit
def pending_a(a_ptr, stride_as, stride_al, stride_ar, stride_ak, rank, slot, on, s, offs_k, k_ok,
              BLOCK_R: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(a_ptr + s * stride_as + slot * stride_al + offs_r[:, None] * stride_ar
                   + offs_k[None, :] * stride_ak, mask=on & (offs_r[:, None] < rank) & k_ok[None, :], other=0.0)


@triton.jit
def pending_shrink_operands(pid, first, live, map_ptr, slices, splits, max_loras, a_ptr, stride_as, stride_al,
                            stride_ar, stride_ak, rank, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """A producer program ``pid`` (programs ``first`` on, where ``live``): its (row t, slice s, K chunk j), K
    offsets, slot and A chunk - what it loads before the PDL wait."""
    i = tl.maximum(pid - first, 0)
    t = i // (slices * splits)
    s = (i // splits) % slices
    j = i % splits
    offs_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    slot, on = pending_slot(map_ptr, t, max_loras, live)
    a = pending_a(a_ptr, stride_as, stride_al, stride_ar, stride_ak, rank, slot, on, s, offs_k, k_ok, BLOCK_R)
    return t, s, j, offs_k, k_ok, on, a


@triton.jit
def pending_shrink(part_ptr, stride_pt, stride_ps, stride_pj, on, t, s, j, a, y_k, BLOCK_R: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    part = tl.sum(a.to(tl.float32) * y_k[None, :], axis=1)  # fp32 [BLOCK_R]
    tl.store(part_ptr + t * stride_pt + s * stride_ps + j * stride_pj + offs_r, part, mask=on & (offs_r >= 0))


@triton.jit
def pending_b(b_ptr, stride_bs, stride_bl, stride_bn, stride_br, rank, slot, on, s, cols, cols_ok,
              BLOCK_R: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(b_ptr + s * stride_bs + slot * stride_bl + cols[:, :, None].to(tl.int64) * stride_bn
                   + offs_r[None, None, :] * stride_br,
                   mask=on & cols_ok[:, :, None] & (offs_r < rank)[None, None, :], other=0.0)


@triton.jit
def pending_apply(part_ptr, stride_pt, stride_ps, stride_pj, splits, rank, on, t, s, b,
                  BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_j = tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    parts = tl.load(part_ptr + t * stride_pt + s * stride_ps + offs_j[:, None] * stride_pj + offs_r[None, :],
                    mask=on & (offs_j[:, None] < splits) & (offs_r < rank)[None, :], other=0.0)
    shrunk = tl.sum(parts, axis=0)  # fp32 [BLOCK_R]: the K splits in a fixed order
    return tl.sum(b.to(tl.float32) * shrunk[None, None, :], axis=2)
