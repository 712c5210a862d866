"""Private Triton body of RMSNorm and residual-add + RMSNorm (launcher: ``rms_norm.py``).

Grid (rows,).  One program normalises one row of N values held in one BLOCK_N tile.  The rounding
follows the torch reference step by step: the residual sum is rounded to the activation dtype, the
normalised row is rounded to it before the weight multiply, and the product is rounded again.
With PREFETCH the grid has programs past the rows (``n_rows``): each brings one chunk of the next
projection's weight into L2 (``l2_prefetch.py``) after the PDL wait - or, with PF_EARLY, before it (the kernel
before this one is light: the prefetch overlaps it) - and stores nothing.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._l2_prefetch import l2_prefetch_chunk
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    N, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
    n_rows=0, pf_ptr=None, pf_bytes=0, PREFETCH: tl.constexpr = False, PF_CHUNK: tl.constexpr = 16,
    PF_PIECE: tl.constexpr = 16, PF_INTERP: tl.constexpr = False, PF_EARLY: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    if PREFETCH and PF_EARLY:  # weights only, beside a light kernel before this one; the rows still wait
        if row >= n_rows:
            l2_prefetch_chunk(pf_ptr, pf_bytes, row - n_rows, PF_CHUNK, PF_PIECE, PF_INTERP)
            return
    pdl_wait(USE_PDL)
    if PREFETCH and not PF_EARLY:
        if row >= n_rows:
            l2_prefetch_chunk(pf_ptr, pf_bytes, row - n_rows, PF_CHUNK, PF_PIECE, PF_INTERP)
            return
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    dt = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * (h * rstd).to(dt).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=ok)
