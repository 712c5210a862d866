"""MXFP4 experts: ``UnfusedOAITritonExperts`` (Triton) and ``TorchMxfp4Experts`` (CPU).

Both take w1 / w2 as the layer's MXFP4 blocks (uint8 [E_local, N, K/32, 16]) and find
the scales in their ``Mxfp4MoEQuantConfig``.  The pipeline is that of ``TritonExperts``,
left unfused so the LoRA seams sit between its steps:

    GEMM1 (MXFP4, + bias) -> apply_w13_lora -> activation (swigluoai for gpt-oss)
    -> GEMM2 (MXFP4, + bias, router-weighted) -> apply_w2_lora -> top-k sum
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.experts.lora_mixin import MoELoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.experts.torch_experts import local_expert_ids
from vllm.model_executor.layers.fused_moe.modular_kernel import (
    FusedMoEExpertsModular,
    Support,
    WorkspaceShapes,
    two_gemm_workspace_shapes,
)

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


@dataclass
class Mxfp4MoEQuantConfig(FusedMoEQuantConfig):
    """MXFP4 expert weights: the e8m0 scales of w13 [E_local, 2I_part, H/32] and w2 [E_local, H, I_part/32].

    Weight-only: the activations stay in float, so ``quant_dtype`` (activation quantization,
    which prepare/finalize would perform) is None.
    """

    w1_scale: Optional[torch.Tensor] = None
    w2_scale: Optional[torch.Tensor] = None


def mxfp4_moe_quant_config(w1_scale: torch.Tensor, w2_scale: torch.Tensor, w1_bias: Optional[torch.Tensor],
                           w2_bias: Optional[torch.Tensor]) -> Mxfp4MoEQuantConfig:
    return Mxfp4MoEQuantConfig(quant_dtype=None, w1_bias=w1_bias, w2_bias=w2_bias, w1_scale=w1_scale,
                               w2_scale=w2_scale)


class _Mxfp4ExpertsBase(MoELoRAExpertsMixin, FusedMoEExpertsModular):
    """The unfused pipeline with its two LoRA seams; subclasses supply the two MXFP4 GEMMs (``_gemm``)."""

    @classmethod
    def supports_quant(cls, quant_config: FusedMoEQuantConfig) -> Support:
        if isinstance(quant_config, Mxfp4MoEQuantConfig):
            return Support.yes()
        return Support.no(f"{cls.__name__} runs MXFP4 weights only")

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        return two_gemm_workspace_shapes(self.moe_config, M, N, K, top_k)

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
              ids: torch.Tensor, route: Optional[dict], *, stage: int, top_k_in: int, bias: Optional[torch.Tensor],
              topk_weights: torch.Tensor, weighted: bool) -> None:
        """out = GEMM ``stage`` (1: w13, 2: w2) of the routed pairs, router-weighted when ``weighted``."""
        raise NotImplementedError

    def _route(self, ids: torch.Tensor, pairs: int, E_local: int, N: int, K: int,
               dtype: torch.dtype) -> Optional[dict]:
        """What both GEMMs share (tile configs, the expert sort); None when nothing is shared."""
        return None

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *, activation, global_num_experts,
              expert_map, a1q_scale, workspace13, workspace2, apply_router_weight_on_input,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        E_local, N = w1.shape[0], w1.shape[1]
        if pairs == 0:
            output.zero_()
            return
        qc = self.quant_config
        ids = local_expert_ids(topk_ids, expert_map)
        route = self._route(ids, pairs, E_local, N, H, hidden_states.dtype)

        gemm1 = workspace13[: pairs * N].view(pairs, N)
        self._gemm(gemm1, hidden_states, w1, qc.w1_scale, ids, route, stage=1, top_k_in=top_k, bias=qc.w1_bias,
                   topk_weights=topk_weights, weighted=False)
        routing = None
        if lora_context is not None:
            routing = self.apply_w13_lora(lora_context, y=gemm1, x=hidden_states, topk_ids=topk_ids,
                                          topk_weights=topk_weights, expert_map=expert_map)
        act_n = N // 2 if activation.is_gated else N
        act_out = workspace2[: pairs * act_n].view(pairs, act_n)
        moe_activation(activation, gemm1, out=act_out)

        gemm2 = workspace13[: pairs * H].view(pairs, H)  # gemm1 is dead once the activation has run
        if expert_map is not None:
            gemm2.zero_()  # pairs of other ranks' experts are never written
        weighted = not apply_router_weight_on_input
        self._gemm(gemm2, act_out, w2, qc.w2_scale, ids, route, stage=2, top_k_in=1, bias=qc.w2_bias,
                   topk_weights=topk_weights, weighted=weighted)
        if lora_context is not None:
            self.apply_w2_lora(lora_context, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids,
                               topk_weights=topk_weights, expert_map=expert_map, mul_routed_weight=weighted)
        moe_sum(gemm2.view(M, top_k, H), output)  # one Triton launch on CUDA


class UnfusedOAITritonExperts(_Mxfp4ExpertsBase):
    """MXFP4 grouped GEMMs in Triton (4-bit tiles decoded in registers), LoRA at both seams."""

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def _route(self, ids, pairs, E_local, N, K, dtype):
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import get_mxfp4_moe_config

        top_k = self.moe_config.top_k
        cfg1 = get_mxfp4_moe_config(pairs, E_local, N, K, top_k, dtype)
        act_n = N // 2 if self.moe_config.activation.is_gated else N
        cfg2 = get_mxfp4_moe_config(pairs, E_local, K, act_n, top_k, dtype)
        cfg2["BLOCK_SIZE_M"] = cfg1["BLOCK_SIZE_M"]  # one alignment serves both GEMMs
        align = align_for_experts(ids, cfg1["BLOCK_SIZE_M"], E_local)
        return dict(cfg1=cfg1, cfg2=cfg2, sorted_token_ids=align.sorted_token_ids,
                    block_expert_ids=align.block_expert_ids, num_tokens_post_padded=align.num_tokens_post_padded)

    def _gemm(self, out, a, blocks, scales, ids, route, *, stage, top_k_in, bias, topk_weights, weighted) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import invoke_mxfp4_moe_gemm

        invoke_mxfp4_moe_gemm(a, blocks, scales, out, sorted_token_ids=route["sorted_token_ids"],
                              block_expert_ids=route["block_expert_ids"],
                              num_tokens_post_padded=route["num_tokens_post_padded"], top_k_in=top_k_in,
                              topk_weights=topk_weights, mul_routed_weight=weighted, bias=bias,
                              config=route[f"cfg{stage}"])


class TorchMxfp4Experts(_Mxfp4ExpertsBase):
    """The CPU backend: per-expert matmuls, each expert's weight dequantised on the fly inside apply."""

    def _gemm(self, out, a, blocks, scales, ids, route, *, stage, top_k_in, bias, topk_weights, weighted) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import mxfp4_moe_gemm_torch

        mxfp4_moe_gemm_torch(out, a, blocks, scales, ids, top_k_in=top_k_in, bias=bias)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
