"""MXFP4 experts in plain torch: ``TorchMxfp4Experts``, the CPU backend of MXFP4 layers."""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts.mxfp4_experts_base import Mxfp4ExpertsBase


class TorchMxfp4Experts(Mxfp4ExpertsBase):
    """The CPU backend: per-expert matmuls, each expert's weight dequantised on the fly inside apply."""

    triton_glue = False

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, ids: torch.Tensor,
              route: Optional[Any], *, stage: int, top_k_in: int, topk_weights: torch.Tensor,
              weighted: bool) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import mxfp4_moe_gemm_torch

        scales, bias = self._stage(stage)
        mxfp4_moe_gemm_torch(out, a, blocks, scales, ids, top_k_in=top_k_in, bias=bias)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
