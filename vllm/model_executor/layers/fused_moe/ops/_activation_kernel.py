"""Private Triton body of the MoE activation (see ``activation.py``)."""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait

# Activation codes (constexpr ACT); activation.py maps MoEActivation onto them.
ACT_SILU = 0
ACT_GELU = 1
ACT_SWIGLUOAI = 2
ACT_SILU_NO_MUL = 3
ACT_GELU_NO_MUL = 4
ACT_RELU2_NO_MUL = 5


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gated_act(gate, up, alpha, limit, ACT: tl.constexpr):
    """fp32 gate / up -> the gated activation (ACT 0 silu, 1 gelu, 2 gpt-oss's clamped SwiGLU), fp32; shared
    with the grouped GEMM's fused epilogue so both give the same bits."""
    if ACT == 0:
        y = _silu(gate) * up
    elif ACT == 1:
        y = _gelu_erf(gate) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        y = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    return y


@triton.jit
def _input(x_row, d_row, cols, stride_xn, stride_dn, ok, HAS_DELTA: tl.constexpr):
    """fp32 x[row, cols], or x + delta rounded to x's dtype first: the bits of adding the delta into x in place."""
    v = tl.load(x_row + cols * stride_xn, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_row + cols * stride_dn, mask=ok, other=0.0)
        v = (v.to(tl.float32) + d).to(v.dtype)
    return v.to(tl.float32)


@triton.jit
def _moe_activation_kernel(
    x_ptr,  # [P, W_in]
    out_ptr,  # [P, W_out]: W_in // 2 for gated activations, W_in otherwise
    W_out,
    stride_xm,
    stride_xn,
    stride_om,
    stride_on,
    alpha,
    limit,
    d_ptr,  # [P, W_in] fp32 delta, read when HAS_DELTA
    stride_dm,
    stride_dn,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DELTA: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < W_out
    x_row = x_ptr + row * stride_xm
    d_row = d_ptr + row * stride_dm
    if ACT == 0 or ACT == 1:  # gate = first half, up = second half
        gate = _input(x_row, d_row, cols, stride_xn, stride_dn, ok, HAS_DELTA)
        up = _input(x_row, d_row, cols + W_out, stride_xn, stride_dn, ok, HAS_DELTA)
        y = gated_act(gate, up, alpha, limit, ACT)
    elif ACT == 2:  # gpt-oss: interleaved, even = gate, odd = up, clamped
        gate = _input(x_row, d_row, 2 * cols, stride_xn, stride_dn, ok, HAS_DELTA)
        up = _input(x_row, d_row, 2 * cols + 1, stride_xn, stride_dn, ok, HAS_DELTA)
        y = gated_act(gate, up, alpha, limit, ACT)
    else:
        v = _input(x_row, d_row, cols, stride_xn, stride_dn, ok, HAS_DELTA)
        if ACT == 3:
            y = _silu(v)
        elif ACT == 4:
            y = _gelu_erf(v)
        else:
            r = tl.maximum(v, 0.0)
            y = r * r
    tl.store(out_ptr + row * stride_om + cols * stride_on, y.to(out_ptr.dtype.element_ty), mask=ok)
