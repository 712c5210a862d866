"""Packed int4 expert weights as the int4 experts read them (W4A16), and their quant config.

One projection (w13 or w2) of all local experts, after ``Int4MoEMethod`` repacked it:

    qweight  int32 [E, K/8, N]   word [e, j, n] holds q[e, n, 8j + c] as bits 4c..4c+3 (c = 0..7);
                                 N contiguous, so a K-tile's words load as coalesced rows (GPTQ's order)
    scales         [E, Gs, N]    one row per group, N contiguous (the activation dtype)
    zeros    uint8 [E, Gs, N]    0..16 (GPTQ v1 can reach 16), or None: symmetric, zero 8
    g_idx    int32 [E, K]        group of each input position, or None: position // group_size
    perm     int32 [E, K]        activation column read at each input position, or None: identity

    w[e, n, k] = scales[e, g(k), n] * (q[e, n, k] - zeros[e, g(k), n])
    out[n]     = sum_k w[e, n, k] * a[perm[e, k]]

Act-order checkpoints (permuted ``g_idx``) are stored with their input positions sorted by group
(``perm`` = that sort, applied to the activations in the kernel, as Marlin does), so that every
group's channels are contiguous and ``g_idx`` becomes ``k // group_size`` again (dropped); only a
tensor-parallel slice of an act-order w2, whose groups are split unevenly, keeps ``g_idx``.
``int4_moe_gemm_reference``: the grouped GEMM on these weights in fp32 torch, the kernels' reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig


@dataclass
class Int4PackedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    group_size: int
    g_idx: Optional[torch.Tensor] = None
    perm: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[2]

    @property
    def k(self) -> int:
        return self.qweight.shape[1] * 8

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.g_idx,
                                                          self.perm) if t is not None)

    def dequantize_expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s weight [N, K] in ``dtype`` (input positions in stored order; see ``perm``)."""
        q = unpack_int4_k(self.qweight[e].t())  # [N, K] uint8
        K = q.shape[1]
        g = self.g_idx[e].long() if self.g_idx is not None else torch.arange(K, device=q.device) // self.group_size
        s = self.scales[e].to(dtype).t()[:, g]  # [N, K]
        z = self.zeros[e].t()[:, g].to(dtype) if self.zeros is not None else 8
        return (q.to(dtype) - z) * s


@dataclass
class Int4MoEQuantConfig(FusedMoEQuantConfig):
    """W4A16: int4 expert weights (``w13`` / ``w2``), activations unquantized (``quant_dtype`` None,
    so prepare/finalize pass them through).  Only the int4 experts classes accept it."""

    w13: Optional[Int4PackedWeight] = None
    w2: Optional[Int4PackedWeight] = None
    # the tensor-core kernel's copies (ops/int4_mma_moe.Int4MmaWeight), when the weights were repacked for it at
    # load (VLLM_INT4_MMA): then w13 / w2's qweight is a shape-only view and every launch reads these
    w13_mma: Optional[Any] = None
    w2_mma: Optional[Any] = None


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K % 8 == 0) -> int32 words [..., K/8], code c of a word in bits 4c..4c+3."""
    if q.shape[-1] % 8:
        raise ValueError(f"the input dimension {q.shape[-1]} is not a multiple of 8: int4 weights are packed "
                         "eight codes to an int32 word along it")
    codes = q.to(torch.int64).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_k(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., K/8] -> uint8 codes [..., K] (inverse of ``pack_int4_k``)."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(*words.shape[:-1], words.shape[-1] * 8).to(torch.uint8)


def int4_moe_gemm_reference(a: torch.Tensor, w: Int4PackedWeight, topk_ids: torch.Tensor, *, top_k_in: int,
                            topk_weights: Optional[torch.Tensor] = None,
                            mul_routed_weight: bool = False) -> torch.Tensor:
    """fp32 reference on the dequantised weights: [numel(topk_ids), N]; pairs with expert -1 are zeros."""
    ids = topk_ids.reshape(-1).long()
    out = torch.zeros(ids.numel(), w.n, dtype=torch.float32, device=a.device)
    rows = torch.arange(ids.numel(), device=a.device) // top_k_in
    for e in range(w.num_experts):
        pairs = (ids == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        x = a[rows[pairs]].float()
        if w.perm is not None:
            x = x[:, w.perm[e].long()]
        y = x @ w.dequantize_expert(e, torch.float32).T
        if mul_routed_weight:
            y = y * topk_weights.reshape(-1)[pairs].float()[:, None]
        out[pairs] = y
    return out
