"""Experts in plain torch, grouped by expert: the CPU backend (also runs on CUDA)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts


def grouped_gemm_torch(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, local_ids: torch.Tensor, *,
                       top_k_in: int, bias: Optional[torch.Tensor]) -> None:
    """out[p] = a[p // top_k_in] @ w[e_p].T (+ bias[e_p]) for every pair p with e_p >= 0; other rows 0."""
    flat = local_ids.reshape(-1)
    out.zero_()
    for e in torch.unique(flat).tolist():
        if e < 0:
            continue
        pairs = torch.nonzero(flat == e).squeeze(1)
        rows = a.index_select(0, pairs // top_k_in)
        res = rows @ w[e].t()
        if bias is not None:
            res = res + bias[e]
        out.index_copy_(0, pairs, res.to(out.dtype))


class TorchExperts(TwoGemmExperts):
    """Per-expert matmuls over the pairs routed to each expert; LoRA at both seams (``TwoGemmExperts``)."""

    triton_glue = False

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, route: Optional[Any],
              *, stage: int, top_k_in: int, topk_weights: torch.Tensor, weighted: bool) -> None:
        qc = self.quant_config
        grouped_gemm_torch(out, a, w, ids, top_k_in=top_k_in, bias=qc.w1_bias if stage == 1 else qc.w2_bias)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
