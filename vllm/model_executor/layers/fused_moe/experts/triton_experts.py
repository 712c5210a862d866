"""Experts as Triton grouped GEMMs over expert-sorted (token, k) pairs."""
from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.modular_kernel import Support


class TritonExperts(TwoGemmExperts):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum
    (``TwoGemmExperts``), the GEMMs as Triton grouped GEMMs.

    Pairs are sorted by expert once (``moe_align_block_size``), or, for a few pairs among many
    experts (decode), each pair gets its own block without a launch (``pairwise_alignment``);
    both GEMMs walk the same order.  Supports SiLU/GELU-gated, non-gated and the gpt-oss
    clamped SwiGLU on interleaved gate/up, and per-expert biases.
    """

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def _route(self, ids, pairs, num_experts, N, K, act_n, dtype):
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import get_fused_moe_config
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

        top_k = ids.shape[1]
        cfg1 = get_fused_moe_config(pairs, num_experts, N, K, top_k, dtype)
        cfg2 = dict(cfg1)  # same BLOCK_SIZE_M: the alignment is shared
        cfg2.update({k: v for k, v in get_fused_moe_config(pairs, num_experts, K, act_n, 1, dtype).items()
                     if k != "BLOCK_SIZE_M"})
        align = align_for_experts(ids, cfg1["BLOCK_SIZE_M"], num_experts)
        return dict(cfg1=cfg1, cfg2=cfg2, sorted_token_ids=align.sorted_token_ids,
                    block_expert_ids=align.block_expert_ids, num_tokens_post_padded=align.num_tokens_post_padded)

    def _gemm(self, out, a, w, ids, route, *, stage, top_k_in, topk_weights, weighted) -> None:
        from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import invoke_fused_moe_gemm

        qc = self.quant_config
        invoke_fused_moe_gemm(a, w, out, sorted_token_ids=route["sorted_token_ids"],
                              block_expert_ids=route["block_expert_ids"],
                              num_tokens_post_padded=route["num_tokens_post_padded"], top_k_in=top_k_in,
                              topk_weights=topk_weights, mul_routed_weight=weighted,
                              bias=qc.w1_bias if stage == 1 else qc.w2_bias, config=route[f"cfg{stage}"])
