"""Triton helpers of the pending low-rank delta (host side and the reason: ``pending_delta.py``).

``pending_slot``: row t's slot and whether it is enabled.  ``pending_shrink``: one producer program - the fp32
sums of one K chunk of a row (already in registers, as the kernel will round it for the projection) times A's
[BLOCK_R, BLOCK_K] chunk of that slot, stored at ``part[t, s, j]``.  ``pending_delta``: a consumer's fp32 delta
at column offsets ``cols`` (any 2-D tile) of slice s: the row's K-split partials summed in a fixed order, then
times B's rows, R_CHUNK rank columns a step; zero where the row has no enabled slot (nothing is read there).
"""
import triton
import triton.language as tl


@triton.jit
def pending_slot(map_ptr, en_ptr, t, max_loras):
    slot = tl.load(map_ptr + t)
    ok = (slot >= 0) & (slot < max_loras)
    on = tl.load(en_ptr + slot, mask=ok, other=0) != 0
    return slot.to(tl.int64), ok & on


@triton.jit
def pending_shrink(a_ptr, stride_as, stride_al, stride_ar, stride_ak, part_ptr, stride_pt, stride_ps, stride_pj,
                   rank, slot, on, t, s, j, y_k, offs_k, k_ok, BLOCK_R: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + s * stride_as + slot * stride_al + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=on & (offs_r[:, None] < rank) & k_ok[None, :], other=0.0)
    part = tl.sum(a.to(tl.float32) * y_k[None, :], axis=1)  # fp32 [BLOCK_R]
    tl.store(part_ptr + t * stride_pt + s * stride_ps + j * stride_pj + offs_r, part, mask=on & (offs_r >= 0))


@triton.jit
def pending_delta(part_ptr, stride_pt, stride_ps, stride_pj, splits, b_ptr, stride_bs, stride_bl, stride_bn,
                  stride_br, rank, slot, on, t, s, cols, cols_ok,
                  BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr):
    acc = cols.to(tl.float32) * 0.0
    offs_j = tl.arange(0, BLOCK_J)
    prow = part_ptr + t * stride_pt + s * stride_ps
    brow = b_ptr + s * stride_bs + slot * stride_bl
    for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < rank
        parts = tl.load(prow + offs_j[:, None] * stride_pj + offs_r[None, :],
                        mask=on & (offs_j[:, None] < splits) & r_ok[None, :], other=0.0)
        shrunk = tl.sum(parts, axis=0)  # fp32 [R_CHUNK]: the K splits in a fixed order
        b = tl.load(brow + cols[:, :, None].to(tl.int64) * stride_bn + offs_r[None, None, :] * stride_br,
                    mask=on & cols_ok[:, :, None] & r_ok[None, None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * shrunk[None, None, :], axis=2)
    return acc
