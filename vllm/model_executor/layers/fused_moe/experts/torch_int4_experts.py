"""Int4 (W4A16) experts in plain torch: the CPU backend of int4 layers (also runs on CUDA).

Each routed expert's weight is dequantised on the fly inside ``apply`` (one expert at a time,
never stored), then the pairs routed to it are multiplied as ``TorchExperts`` does.  LoRA at the
same two seams, on the unquantized activations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts.lora_mixin import MoELoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.experts.torch_experts import local_expert_ids
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig, Int4PackedWeight
from vllm.model_executor.layers.fused_moe.modular_kernel import (
    FusedMoEExpertsModular,
    Support,
    WorkspaceShapes,
    two_gemm_workspace_shapes,
)

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


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


def check_int4_quant(cls: type, quant_config) -> Support:
    if isinstance(quant_config, Int4MoEQuantConfig) and quant_config.w13 is not None and quant_config.w2 is not None:
        return Support.yes()
    return Support.no(f"{cls.__name__} runs packed int4 expert weights (Int4MoEQuantConfig) only")


class Int4ExpertsBase(MoELoRAExpertsMixin, FusedMoEExpertsModular):
    """What every packed-int4 experts class shares: the quant config it runs, the activations, the workspaces."""

    quant_config: Int4MoEQuantConfig

    @classmethod
    def supports_quant(cls, quant_config) -> Support:
        return check_int4_quant(cls, quant_config)

    @classmethod
    def supports_activation(cls, activation) -> Support:
        if activation.value == "swigluoai":
            return Support.no(f"{cls.__name__} does not run gpt-oss's interleaved swigluoai experts")
        return Support.yes()

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        # N from the packed weight: the kernel passes w1.shape[1], which is K/8 of [E, K/8, N] words
        return two_gemm_workspace_shapes(self.moe_config, M, self.quant_config.w13.n, K, top_k)


class TorchInt4Experts(Int4ExpertsBase):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum."""

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *, activation, global_num_experts,
              expert_map, a1q_scale, workspace13, workspace2, apply_router_weight_on_input,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation_torch

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        qc = self.quant_config
        N = qc.w13.n
        ids = local_expert_ids(topk_ids, expert_map)

        gemm1 = workspace13[: pairs * N].view(pairs, N)
        int4_grouped_gemm_torch(gemm1, hidden_states, qc.w13, ids, top_k_in=top_k)
        routing = None
        if lora_context is not None:
            routing = self.apply_w13_lora(lora_context, y=gemm1, x=hidden_states, topk_ids=topk_ids,
                                          topk_weights=topk_weights, expert_map=expert_map)
        act = moe_activation_torch(activation, gemm1)
        act_out = workspace2[: act.numel()].view(act.shape)
        act_out.copy_(act)

        gemm2 = workspace13[: pairs * H].view(pairs, H)
        int4_grouped_gemm_torch(gemm2, act_out, qc.w2, ids, top_k_in=1)
        weighted = not apply_router_weight_on_input
        if weighted:
            gemm2.mul_(topk_weights.reshape(pairs, 1).to(gemm2.dtype))
        if lora_context is not None:
            self.apply_w2_lora(lora_context, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids,
                               topk_weights=topk_weights, expert_map=expert_map, mul_routed_weight=weighted)
        torch.sum(gemm2.view(M, top_k, H), dim=1, out=output)
