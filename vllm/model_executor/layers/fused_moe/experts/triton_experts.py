"""Experts as Triton grouped GEMMs over expert-sorted (token, k) pairs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum
from vllm.model_executor.layers.fused_moe.experts.lora_mixin import MoELoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.experts.torch_experts import local_expert_ids
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular, Support, WorkspaceShapes, two_gemm_workspace_shapes

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


class TritonExperts(MoELoRAExpertsMixin, FusedMoEExpertsModular):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum.

    Pairs are sorted by expert once (``moe_align_block_size``), or, for a few pairs among many
    experts (decode), each pair gets its own block without a launch (``pairwise_alignment``);
    both GEMMs walk the same order.  Supports SiLU/GELU-gated, non-gated and the gpt-oss
    clamped SwiGLU on interleaved gate/up, and per-expert biases.
    """

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        return two_gemm_workspace_shapes(self.moe_config, M, N, K, top_k)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *, activation, global_num_experts,
              expert_map, a1q_scale, workspace13, workspace2, apply_router_weight_on_input,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (
            get_fused_moe_config,
            invoke_fused_moe_gemm,
        )
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        E_local, N, _ = w1.shape
        if pairs == 0:
            output.zero_()
            return
        qc = self.quant_config
        ids = local_expert_ids(topk_ids, expert_map)

        cfg1 = get_fused_moe_config(pairs, E_local, N, H, top_k, hidden_states.dtype)
        align = align_for_experts(ids, cfg1["BLOCK_SIZE_M"], E_local)
        route = dict(sorted_token_ids=align.sorted_token_ids, block_expert_ids=align.block_expert_ids,
                     num_tokens_post_padded=align.num_tokens_post_padded)

        gemm1 = workspace13[: pairs * N].view(pairs, N)
        invoke_fused_moe_gemm(hidden_states, w1, gemm1, top_k_in=top_k, bias=qc.w1_bias, config=cfg1, **route)
        routing = None
        if lora_context is not None:
            routing = self.apply_w13_lora(lora_context, y=gemm1, x=hidden_states, topk_ids=topk_ids,
                                          topk_weights=topk_weights, expert_map=expert_map)
        act_n = N // 2 if activation.is_gated else N
        act_out = workspace2[: pairs * act_n].view(pairs, act_n)
        moe_activation(activation, gemm1, out=act_out)

        # GEMM2 writes over workspace13: gemm1 is dead once the activation has run.
        gemm2 = workspace13[: pairs * H].view(pairs, H)
        if expert_map is not None:
            gemm2.zero_()  # pairs routed to other ranks' experts are never written by the kernel
        cfg2 = dict(cfg1)  # same BLOCK_SIZE_M: the alignment is shared
        cfg2.update({k: v for k, v in get_fused_moe_config(pairs, E_local, H, act_n, 1, hidden_states.dtype).items()
                     if k != "BLOCK_SIZE_M"})
        weighted = not apply_router_weight_on_input
        invoke_fused_moe_gemm(act_out, w2, gemm2, top_k_in=1, topk_weights=topk_weights, mul_routed_weight=weighted,
                              bias=qc.w2_bias, config=cfg2, **route)
        if lora_context is not None:
            self.apply_w2_lora(lora_context, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids,
                               topk_weights=topk_weights, expert_map=expert_map, mul_routed_weight=weighted)
        moe_sum(gemm2.view(M, top_k, H), output)  # one Triton launch on CUDA
