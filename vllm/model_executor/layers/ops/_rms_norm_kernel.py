"""Private Triton body of RMSNorm and residual-add + RMSNorm (launcher: ``rms_norm.py``).

Grid (rows,).  One program normalises one row of N values held in one BLOCK_N tile.  The rounding
follows the torch reference step by step: the residual sum is rounded to the activation dtype, the
normalised row is rounded to it before the weight multiply, and the product is rounded again.
A pending low-rank delta (``pending_delta.py``): with SHRINK, programs ``n_norm`` .. ``n_rows`` - 1 each
recompute one row's norm and store the fp32 shrink of one (slice, K chunk) of the normalised row, the next
projection's LoRA input; with DELTA, each row first adds the previous projection's delta to x (rounded once).
Their slots and A / B tiles are loaded before the PDL wait (step-invariant: ``_pending_delta.py``).
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait
from vllm.model_executor.layers.ops._pending_delta import (pending_apply, pending_b, pending_shrink,
                                                            pending_shrink_operands, pending_slot)


@triton.jit
def _summed_row(x_ptr, res_ptr, t, stride_x, stride_r, cols, ok, HAS_RESIDUAL: tl.constexpr):
    """Row t's columns ``cols`` of x (+ the residual, rounded to x's dtype)."""
    x = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    N, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
    n_rows=0, n_norm=0, sa_ptr=None, stride_sas=0, stride_sal=0, stride_sar=0, stride_sak=0,
    sp_ptr=None, stride_spt=0, stride_sps=0, stride_spj=0, smap_ptr=None,
    s_slices=1, s_splits=1, s_rank=0, s_loras=0,
    SHRINK: tl.constexpr = False, S_BLOCK_R: tl.constexpr = 16, S_BLOCK_K: tl.constexpr = 16,
    dp_ptr=None, stride_dpt=0, stride_dps=0, stride_dpj=0, d_splits=1, db_ptr=None,
    stride_dbs=0, stride_dbl=0, stride_dbn=0, stride_dbr=0, dmap_ptr=None, d_rank=0, d_loras=0,
    DELTA: tl.constexpr = False, D_BLOCK_J: tl.constexpr = 1, D_BLOCK_R: tl.constexpr = 4,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    if DELTA:  # the row's slot and B rows (step-invariant) before the wait
        slot_d, on_d = pending_slot(dmap_ptr, row, d_loras, row < n_norm)
        b_d = pending_b(db_ptr, stride_dbs, stride_dbl, stride_dbn, stride_dbr, d_rank, slot_d, on_d, 0, cols[None, :],
                        ok[None, :], D_BLOCK_R)
    if SHRINK:  # a shrink program's (row t, slice s, K chunk j), its slot and A chunk, before the wait
        t, s, j, offs_k, k_ok, on_s, a_s = pending_shrink_operands(
            row, n_norm, (row >= n_norm) & (row < n_rows), smap_ptr, s_slices, s_splits, s_loras, sa_ptr, stride_sas,
            stride_sal, stride_sar, stride_sak, s_rank, N, S_BLOCK_R, S_BLOCK_K)
    pdl_wait(USE_PDL)
    if SHRINK:
        if row >= n_norm:  # the shrink of one (slice, K chunk) of the normalised row t
            h = _summed_row(x_ptr, res_ptr, t, stride_x, stride_r, cols, ok, HAS_RESIDUAL).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)  # the row program's sum, bit for bit
            xk = _summed_row(x_ptr, res_ptr, t, stride_x, stride_r, offs_k, k_ok, HAS_RESIDUAL)
            wk = tl.load(w_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            yk = (wk * (xk.to(tl.float32) * rstd).to(xk.dtype).to(tl.float32)).to(out_ptr.dtype.element_ty)
            pending_shrink(sp_ptr, stride_spt, stride_sps, stride_spj, on_s, t, s, j, a_s, yk.to(tl.float32),
                           S_BLOCK_R)
            return
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    dt = x.dtype
    if DELTA:  # the previous projection's pending delta, rounded once into its output
        d = pending_apply(dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, on_d, row, 0, b_d, D_BLOCK_J,
                          D_BLOCK_R)
        x = (x.to(tl.float32) + tl.sum(d, axis=0)).to(dt)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * (h * rstd).to(dt).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=ok)
