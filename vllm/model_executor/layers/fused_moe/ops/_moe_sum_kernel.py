"""Triton body of ``moe_sum`` (launcher and reference: ``moe_sum.py``)."""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _moe_sum_kernel(x_ptr, out_ptr, H, top_k, stride_xm, stride_xk, stride_xh, stride_om, stride_oh,
                    d_ptr, stride_dm, stride_dk, stride_dh,
                    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DELTA: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
    """out[m, h] = sum over k of x[m, k, h], in fp32 in the order k = 0, 1, ..., rounded once.  HAS_DELTA: each
    x[m, k, h] is first x + d[m, k, h] (fp32) rounded to x's dtype, the bits of adding d into x in place."""
    pdl_wait(USE_PDL)
    m = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < top_k) & (offs_h[None, :] < H)
    x = tl.load(x_ptr + m * stride_xm + offs_k[:, None] * stride_xk + offs_h[None, :] * stride_xh, mask=mask,
                other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + m * stride_dm + offs_k[:, None] * stride_dk + offs_h[None, :] * stride_dh, mask=mask,
                    other=0.0)
        x = (x.to(tl.float32) + d).to(x.dtype)
    x = x.to(tl.float32)
    total = tl.sum(x, axis=0)
    tl.store(out_ptr + m * stride_om + offs_h * stride_oh, total.to(out_ptr.dtype.element_ty), mask=offs_h < H)
