"""Experts as Triton grouped GEMMs over expert-sorted (token, k) pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.experts import lora_overlap
from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.modular_kernel import Support

if TYPE_CHECKING:
    from vllm.kernel_configs.tile_config import TileConfig
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.lora.ops.moe_lora_align import MoELoRAAlignment
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import AlignResult


@dataclass(frozen=True)
class TritonRoute:
    """What both GEMMs of one ``apply`` share: their tiles (one block_size_m) and the expert alignment
    (``pairwise``: ``pairwise_alignment``'s, one pair per block, which a ``gemv=1`` config needs)."""

    cfg1: "TileConfig"
    cfg2: "TileConfig"
    align: "AlignResult"
    pairwise: bool = False


class TritonExperts(TwoGemmExperts):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum
    (``TwoGemmExperts``), the GEMMs as Triton grouped GEMMs.

    Pairs are sorted by expert once (``moe_align_block_size``), or, for a few pairs among many
    experts (decode), each pair gets its own block without a launch (``pairwise_alignment``);
    both GEMMs walk the same order.  When the step's LoRA sorts too, the same pass sorts the
    pairs by (adapter, expert) for it (``moe_align_with_lora``).  Supports SiLU/GELU-gated, non-gated
    and the gpt-oss clamped SwiGLU on interleaved gate/up, and per-expert biases.
    """

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def _route(self, ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
               dtype: torch.dtype) -> TritonRoute:
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import get_two_gemm_configs
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (align_for_experts,
                                                                                   use_pairwise_alignment)

        pairwise = use_pairwise_alignment(ids.numel(), num_experts)  # align_for_experts' test
        cfg1, cfg2 = get_two_gemm_configs(pairs, num_experts, N, K, act_n, ids.shape[1], dtype,
                                          pairwise=pairwise)  # one block_size_m
        return TritonRoute(cfg1=cfg1, cfg2=cfg2, align=align_for_experts(ids, cfg1.block_size_m, num_experts),
                           pairwise=pairwise)

    def _route_and_lora_align(self, ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
                              x: torch.Tensor, lora_context: Optional["MoELoRAContext"]
                              ) -> tuple[TritonRoute, Optional["MoELoRAAlignment"]]:
        """With LoRA on its sorted path and the expert sort (not ``pairwise_alignment``), both alignments
        come from one ``moe_align_with_lora`` (three launches instead of six) where that is faster: both
        with the same block size (``one_pass_pays``), and the LoRA one is not made beside GEMM1 instead
        (``lora_overlap.ALIGN_BESIDE``)."""
        from vllm.lora.ops.moe_lora_align import moe_align_with_lora, one_pass_pays
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import get_two_gemm_configs
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import use_pairwise_alignment

        plan = None
        sorted_routing = not use_pairwise_alignment(pairs, num_experts)
        if lora_context is not None and sorted_routing and not lora_overlap.ALIGN_BESIDE:  # else beside GEMM1
            plan = self.lora_align_plan(lora_context, x)
        if plan is None:
            return self._route(ids, pairs, num_experts, N, K, act_n, x.dtype), None
        cfg1, cfg2 = get_two_gemm_configs(pairs, num_experts, N, K, act_n, ids.shape[1], x.dtype)
        if not one_pass_pays(cfg1.block_size_m, plan.block_size):
            return self._route(ids, pairs, num_experts, N, K, act_n, x.dtype), None
        align, lora_align = moe_align_with_lora(ids, cfg1.block_size_m, num_experts, plan)
        return TritonRoute(cfg1=cfg1, cfg2=cfg2, align=align), lora_align

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
              route: Optional[TritonRoute], *, stage: int, top_k_in: int, topk_weights: torch.Tensor,
              weighted: bool) -> None:
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import invoke_fused_moe_gemm

        assert route is not None  # _route always makes one
        qc = self.quant_config
        al = route.align
        invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                              num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in,
                              topk_weights=topk_weights, mul_routed_weight=weighted,
                              bias=qc.w1_bias if stage == 1 else qc.w2_bias,
                              config=route.cfg1 if stage == 1 else route.cfg2, pairwise=route.pairwise)

    def _gemm1_activated(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                         route: Optional[TritonRoute], *, activation: MoEActivation, top_k_in: int) -> bool:
        from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm

        assert route is not None
        if not gemm.FUSED_ACTIVATION or not activation.is_gated or route.cfg1.gemv:
            return False
        al = route.align
        gemm.invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids,
                                   block_expert_ids=al.block_expert_ids,
                                   num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in,
                                   bias=self.quant_config.w1_bias, config=route.cfg1, pairwise=route.pairwise,
                                   fused_activation=activation)
        return True

