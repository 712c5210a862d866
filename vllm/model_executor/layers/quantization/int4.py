"""The format-independent form of one 4-bit, group-quantized weight.

Every int4 format (GPTQ, AWQ, compressed-tensors pack-quantized) is decoded into
an ``Int4Weight`` at load; the experts' quant method repacks that once into the
layout its kernel wants.  ``dequantize`` is the reference the tests compare with.

    w[o, i] = scales[o, g(i)] * (q[o, i] - zeros[o, g(i)])      g(i) = g_idx[i]

``q``: uint8 [out, in], codes 0..15.  ``scales``: [out, G] (fp16/bf16/fp32).
``zeros``: uint8 [out, G] (0..16: GPTQ v1 stores zero - 1, so 16 can occur), or
None for symmetric weights, whose zero is 8.  ``g_idx``: int32 [in], or None for
the plain layout g(i) = i // group_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Int4Weight:
    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    group_size: int
    g_idx: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        out, inp = self.q.shape
        if self.q.dtype != torch.uint8:
            raise ValueError(f"Int4Weight.q must be uint8 codes, got {self.q.dtype}")
        if self.group_size <= 0 or inp % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input dimension {inp}")
        groups = inp // self.group_size
        if tuple(self.scales.shape) != (out, groups):
            raise ValueError(f"scales are {tuple(self.scales.shape)}, expected {(out, groups)}")
        if self.zeros is not None and tuple(self.zeros.shape) != (out, groups):
            raise ValueError(f"zeros are {tuple(self.zeros.shape)}, expected {(out, groups)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (inp,):
            raise ValueError(f"g_idx is {tuple(self.g_idx.shape)}, expected {(inp,)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        """g(i) for every input channel, int64 [in]."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[out, in] in ``dtype`` (default: the scales' dtype), one rounding: (q - z) is exact."""
        dtype = dtype or self.scales.dtype
        g = self.group_index()
        zeros = self.zeros if self.zeros is not None else torch.full_like(self.scales, 8, dtype=torch.uint8)
        q = self.q.to(dtype)
        z = zeros.to(dtype)[:, g]
        return (q - z) * self.scales.to(dtype)[:, g]
