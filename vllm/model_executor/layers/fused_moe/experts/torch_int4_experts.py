"""Int4 (W4A16) experts in plain torch: the CPU backend of int4 layers (also runs on CUDA).

Each routed expert's weight is dequantised on the fly inside ``apply`` (one expert at a time,
never stored), then the pairs routed to it are multiplied as ``TorchExperts`` does.  LoRA at the
same two seams, on the unquantized activations.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts.int4_experts_base import Int4ExpertsBase
from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight


def int4_grouped_gemm_torch(out: torch.Tensor, a: torch.Tensor, w: Int4PackedWeight, local_ids: torch.Tensor, *,
                            top_k_in: int) -> None:
    """out[p] = a[p // top_k_in][perm_e] @ dequant(w[e_p]).T for every pair p with e_p >= 0; other rows 0."""
    flat = local_ids.reshape(-1)
    out.zero_()
    for e in torch.unique(flat).tolist():
        if e < 0:
            continue
        pairs = torch.nonzero(flat == e).squeeze(1)
        rows = a.index_select(0, pairs // top_k_in)
        if w.perm is not None:
            rows = rows.index_select(1, w.perm[e].long())
        out.index_copy_(0, pairs, (rows @ w.dequantize_expert(e, a.dtype).t()).to(out.dtype))


class TorchInt4Experts(Int4ExpertsBase):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum
    (``TwoGemmExperts``), each expert's int4 weight dequantised on the fly."""

    triton_glue = False

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, route: Optional[Any],
              *, stage: int, top_k_in: int, topk_weights: torch.Tensor, weighted: bool) -> None:
        qc = self.quant_config
        int4_grouped_gemm_torch(out, a, qc.w13 if stage == 1 else qc.w2, ids, top_k_in=top_k_in)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
