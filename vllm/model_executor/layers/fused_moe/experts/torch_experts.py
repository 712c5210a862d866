"""Experts in plain torch, grouped by expert: the CPU backend (also runs on CUDA)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts.lora_mixin import MoELoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular, WorkspaceShapes, two_gemm_workspace_shapes

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


def local_expert_ids(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """Global expert ids -> this rank's ids (-1 for experts of other ranks)."""
    if expert_map is None:
        return topk_ids
    return expert_map[topk_ids.long()].to(topk_ids.dtype)


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


class TorchExperts(MoELoRAExpertsMixin, FusedMoEExpertsModular):
    """Per-expert matmuls over the pairs routed to each expert; LoRA at both seams."""

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        return two_gemm_workspace_shapes(self.moe_config, M, N, K, top_k)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *, activation, global_num_experts,
              expert_map, a1q_scale, workspace13, workspace2, apply_router_weight_on_input,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation_torch

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        N = w1.shape[1]
        ids = local_expert_ids(topk_ids, expert_map)
        qc = self.quant_config

        gemm1 = workspace13[: pairs * N].view(pairs, N)
        grouped_gemm_torch(gemm1, hidden_states, w1, ids, top_k_in=top_k, bias=qc.w1_bias)
        routing = None
        if lora_context is not None:
            routing = self.apply_w13_lora(lora_context, y=gemm1, x=hidden_states, topk_ids=topk_ids,
                                          topk_weights=topk_weights, expert_map=expert_map)
        act = moe_activation_torch(activation, gemm1)
        act_out = workspace2[: act.numel()].view(act.shape)
        act_out.copy_(act)

        gemm2 = workspace13[: pairs * H].view(pairs, H)
        grouped_gemm_torch(gemm2, act_out, w2, ids, top_k_in=1, bias=qc.w2_bias)
        weighted = not apply_router_weight_on_input
        if weighted:
            gemm2.mul_(topk_weights.reshape(pairs, 1).to(gemm2.dtype))
        if lora_context is not None:
            self.apply_w2_lora(lora_context, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids,
                               topk_weights=topk_weights, expert_map=expert_map, mul_routed_weight=weighted)
        torch.sum(gemm2.view(M, top_k, H), dim=1, out=output)
