"""Private Triton helpers: round float32 values to a narrower float exactly as torch does.

torch rounds float32 -> bf16 / fp16 to nearest, ties to even.  On the GPU Triton's casts do the
same, but the CPU interpreter truncates float32 -> bf16, so kernels that must match torch bit for
bit on both (the dequantisers) round with these.  The interpreter also flushes bf16 subnormals when
it casts, so a bf16 result is stored as its bit pattern (``storage_value``) into an int16 view of
the output (``storage_view``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

OUT_FP32: tl.constexpr = tl.constexpr(0)
OUT_FP16: tl.constexpr = tl.constexpr(1)
OUT_BF16: tl.constexpr = tl.constexpr(2)


def storage_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel stores ``storage_value`` results into: an int16 view of a bf16 output."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def out_kind(dtype: torch.dtype) -> int:
    """The ``OUT_KIND`` constexpr of ``round_f32_to`` for a torch float dtype."""
    kinds = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if dtype not in kinds:
        raise ValueError(f"dtype {dtype} is not one of float32, float16, bfloat16")
    return kinds[dtype]


@triton.jit
def round_f32_to(x, OUT_KIND: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in the target format, returned as float32.

    bf16 is the top half of a float32, so the rounding is integer arithmetic on the bits (correct for
    subnormals and overflow to inf; NaNs stay NaN, whatever their payload).  fp16 goes through the cast, which both
    the GPU and the interpreter (numpy) round to nearest-even.
    """
    if OUT_KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN's payload could carry into -0.0
    elif OUT_KIND == 1:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def storage_value(x, OUT_KIND: tl.constexpr):
    """float32 ``x`` rounded to nearest-even as the value to store into ``storage_view(out)``:
    float32 itself, float16, or (bf16) the int16 bit pattern."""
    if OUT_KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)  # NaN: torch's quiet NaN
        y = bits.to(tl.uint16).to(tl.int16, bitcast=True)
    elif OUT_KIND == 1:
        y = x.to(tl.float16)
    else:
        y = x
    return y
