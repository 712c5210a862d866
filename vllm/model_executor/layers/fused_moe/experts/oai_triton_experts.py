"""MXFP4 experts: ``UnfusedOAITritonExperts`` (Triton) and ``TorchMxfp4Experts`` (CPU).

Both take w1 / w2 as the layer's MXFP4 blocks (uint8 [E_local, N, K/32, 16]) and find
the scales in their ``Mxfp4MoEQuantConfig``.  The pipeline is that of ``TritonExperts``,
left unfused so the LoRA seams sit between its steps:

    GEMM1 (MXFP4, + bias) -> apply_w13_lora -> activation (swigluoai for gpt-oss)
    -> GEMM2 (MXFP4, + bias, router-weighted) -> apply_w2_lora -> top-k sum

At large batches (``dequant_path.use_dequant_path``) ``UnfusedOAITritonExperts``' GEMMs
dequantise their weights once (``ops/mxfp4_expert_dequant.py``) and run the bf16 grouped GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.experts.dequant_path import (
    dense_route,
    dequant_grouped_gemm,
    take_dequant_path,
)
from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.modular_kernel import Support


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


class _Mxfp4ExpertsBase(TwoGemmExperts):
    """MXFP4 weights (w1 / w2: the blocks; scales and biases in the quant config); subclasses
    supply the two GEMMs."""

    @classmethod
    def supports_quant(cls, quant_config: FusedMoEQuantConfig) -> Support:
        if isinstance(quant_config, Mxfp4MoEQuantConfig):
            return Support.yes()
        return Support.no(f"{cls.__name__} runs MXFP4 weights only")

    def _stage(self, stage: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        qc = self.quant_config
        return (qc.w1_scale, qc.w1_bias) if stage == 1 else (qc.w2_scale, qc.w2_bias)


class UnfusedOAITritonExperts(_Mxfp4ExpertsBase):
    """MXFP4 grouped GEMMs in Triton (4-bit tiles decoded in registers), LoRA at both seams; at large
    batches, dequantise once + the bf16 grouped GEMM."""

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def _route(self, ids, pairs, E_local, N, K, act_n, dtype):
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import get_mxfp4_moe_config

        if take_dequant_path(pairs, E_local, "mxfp4", ids.device):
            return dict(dense_route(ids, pairs, E_local, N, K, act_n, dtype), dequant=True)
        top_k = ids.shape[1]
        cfg1 = get_mxfp4_moe_config(pairs, E_local, N, K, top_k, dtype)
        cfg2 = get_mxfp4_moe_config(pairs, E_local, K, act_n, top_k, dtype)
        cfg2["BLOCK_SIZE_M"] = cfg1["BLOCK_SIZE_M"]  # one alignment serves both GEMMs
        align = align_for_experts(ids, cfg1["BLOCK_SIZE_M"], E_local)
        return dict(cfg1=cfg1, cfg2=cfg2, sorted_token_ids=align.sorted_token_ids,
                    block_expert_ids=align.block_expert_ids, num_tokens_post_padded=align.num_tokens_post_padded)

    def _gemm(self, out, a, blocks, ids, route, *, stage, top_k_in, topk_weights, weighted) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import invoke_mxfp4_moe_gemm

        scales, bias = self._stage(stage)
        if route.get("dequant"):
            from vllm.model_executor.layers.fused_moe.ops.mxfp4_expert_dequant import dequantize_mxfp4_experts

            def dequantize(dst: torch.Tensor, e0: int, e1: int) -> None:
                dequantize_mxfp4_experts(blocks, scales, dst, e0, e1, use_triton=True)

            E, N = blocks.shape[:2]
            dequant_grouped_gemm(out, a, dequantize, E, N, a.shape[1], route, stage=stage, top_k_in=top_k_in,
                                 topk_weights=topk_weights, weighted=weighted, bias=bias)
            return
        invoke_mxfp4_moe_gemm(a, blocks, scales, out, sorted_token_ids=route["sorted_token_ids"],
                              block_expert_ids=route["block_expert_ids"],
                              num_tokens_post_padded=route["num_tokens_post_padded"], top_k_in=top_k_in,
                              topk_weights=topk_weights, mul_routed_weight=weighted, bias=bias,
                              config=route[f"cfg{stage}"])


class TorchMxfp4Experts(_Mxfp4ExpertsBase):
    """The CPU backend: per-expert matmuls, each expert's weight dequantised on the fly inside apply."""

    triton_glue = False

    def _gemm(self, out, a, blocks, ids, route, *, stage, top_k_in, topk_weights, weighted) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import mxfp4_moe_gemm_torch

        scales, bias = self._stage(stage)
        mxfp4_moe_gemm_torch(out, a, blocks, scales, ids, top_k_in=top_k_in, bias=bias)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
