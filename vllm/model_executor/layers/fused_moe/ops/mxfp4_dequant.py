"""MXFP4 (OCP microscaling, e2m1 values with e8m0 scales) as gpt-oss stores it, in torch.

    blocks uint8 [..., out, in/32, 16]: two e2m1 codes per byte, element 2j in the
        low nibble of byte j, 2j+1 in the high nibble;
    scales uint8 [..., out, in/32]: one e8m0 exponent per 32 values, 2^(s - 127).

An e2m1 code is sign (bit 3), exponent (bits 2-1, bias 1), mantissa (bit 0):
0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6 and the same negated (code 8 is -0).

``dequantize_mxfp4`` is the reference the kernels are tested with; the torch experts
use it on one expert at a time (weights are never stored dequantised).
"""
from __future__ import annotations

import torch

MXFP4_BLOCK = 32  # values per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def check_mxfp4_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise ValueError unless ``blocks`` / ``scales`` are a matching uint8 MXFP4 pair."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks must be [..., in/32, 16], got {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 scales {tuple(scales.shape)} do not match blocks {tuple(blocks.shape)} "
                         "(expected blocks.shape[:-1])")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in/32, 16] blocks + [..., out, in/32] scales -> [..., out, in] in ``dtype``.

    Exact in float32 (every e2m1 value times a power of two within range); other dtypes
    round once from float32.
    """
    check_mxfp4_pair(blocks, scales)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = table[codes].flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1).float())
    return values.flatten(-2).to(dtype)
