"""Every expert on every token, weighted by a dense routing matrix.

The simplest correct MoE: useful as a second reference and for a handful of
experts on CPU.  It never materialises per-(token, expert) GEMM outputs, so it
has no place for per-pair LoRA deltas and reports ``supports_lora() == False``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.two_gemm import local_expert_ids
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular, WorkspaceShapes

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


class NaiveDenseExperts(FusedMoEExpertsModular):
    @classmethod
    def lora_unsupported_reason(cls) -> str:
        return ("NaiveDenseExperts runs every expert on every token and sums densely; it has no "
                "per-(token, expert) GEMM outputs where LoRA deltas could be added")

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        return WorkspaceShapes(workspace13=(0,), workspace2=(0,), output=(M, K))

    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: MoEActivation,
              global_num_experts: int, expert_map: Optional[torch.Tensor], a1q_scale: Optional[torch.Tensor],
              workspace13: torch.Tensor, workspace2: torch.Tensor, apply_router_weight_on_input: bool,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation_torch

        if lora_context is not None:
            raise RuntimeError(self.lora_unsupported_reason())
        M = hidden_states.shape[0]
        E_local = w1.shape[0]
        ids = local_expert_ids(topk_ids, expert_map).long()
        weights = torch.ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
        dense = torch.zeros(M, E_local + 1, dtype=torch.float32, device=hidden_states.device)
        dense.scatter_add_(1, torch.where(ids >= 0, ids, E_local), weights.float())  # column E_local: dropped
        qc = self.quant_config
        acc = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
        for e in range(E_local):
            h = hidden_states @ w1[e].t()
            if qc.w1_bias is not None:
                h = h + qc.w1_bias[e]
            y = moe_activation_torch(activation, h) @ w2[e].t()
            if qc.w2_bias is not None:
                y = y + qc.w2_bias[e]
            acc += dense[:, e : e + 1] * y.float()
        output.copy_(acc)
