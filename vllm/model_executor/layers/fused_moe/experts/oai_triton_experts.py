"""MXFP4 experts as Triton grouped GEMMs: ``UnfusedOAITritonExperts``.

Weights, quant config and pipeline: ``mxfp4_experts_base.py``; the torch backend is
``TorchMxfp4Experts`` (``torch_mxfp4_experts.py``).

At large batches (``dequant_path.use_dequant_path``) ``UnfusedOAITritonExperts``' GEMMs
dequantise their weights once (``ops/mxfp4_expert_dequant.py``) and run the bf16 grouped GEMM.

On CUDA, weights repacked at load for the tensor-core kernel (``Mxfp4FusedMoEMethod._repack_for_tensor_cores``,
``VLLM_MXFP4_MMA``, on by default) run every launch of up to ``MMA_MAX_ROWS`` expected rows per expert on
``ops/mxfp4_mma_moe.py`` (``csrc/capi/mxfp4_mma_moe.cu``), and beyond on the dequant path from those words
(inside a graph capture: the kernel with its widest blocks); the LoRA seams are the same.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.dequant_path import (
    dense_route,
    dequant_grouped_gemm,
    take_dequant_path,
)
from vllm.model_executor.layers.fused_moe.experts.mxfp4_experts_base import Mxfp4ExpertsBase
from vllm.model_executor.layers.fused_moe.modular_kernel import Support


class UnfusedOAITritonExperts(Mxfp4ExpertsBase):
    """MXFP4 grouped GEMMs in Triton (4-bit tiles decoded in registers), LoRA at both seams; at large
    batches, dequantise once + the bf16 grouped GEMM."""


    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def _route(self, ids: torch.Tensor, pairs: int, E_local: int, N: int, K: int, act_n: int,
               dtype: torch.dtype) -> dict:
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import get_mxfp4_moe_config

        if self.quant_config.w1_mma is not None:
            return self._mma_route(ids, pairs, E_local, N, K, act_n, dtype)
        if take_dequant_path(pairs, E_local, "mxfp4", ids.device):
            return dict(dense_route(ids, pairs, E_local, N, K, act_n, dtype), dequant=True)
        top_k = ids.shape[1]
        cfg1 = get_mxfp4_moe_config(pairs, E_local, N, K, top_k, dtype)
        cfg2 = dataclasses.replace(get_mxfp4_moe_config(pairs, E_local, K, act_n, top_k, dtype),
                                   block_size_m=cfg1.block_size_m)  # one alignment serves both GEMMs
        align = align_for_experts(ids, cfg1.block_size_m, E_local)
        return dict(cfg1=cfg1, cfg2=cfg2, sorted_token_ids=align.sorted_token_ids,
                    block_expert_ids=align.block_expert_ids, num_tokens_post_padded=align.num_tokens_post_padded)

    def _mma_route(self, ids: torch.Tensor, pairs: int, E_local: int, N: int, K: int, act_n: int,
                   dtype: torch.dtype) -> dict:
        """The tensor-core kernel's routing (sorted blocks of 8-64 rows, stage widths and splits per GEMM), or
        the dequant path's beyond ``MMA_MAX_ROWS`` expected rows per expert (outside graph capture)."""
        from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import block_m_or_dequant, expected_blocks
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import mx_launch_shape

        bm = block_m_or_dequant(pairs, E_local, False, lambda: take_dequant_path(pairs, E_local, "mxfp4", ids.device))
        if bm is None:
            return dict(dense_route(ids, pairs, E_local, N, K, act_n, dtype), dequant=True)
        qc = self.quant_config
        blocks = expected_blocks(pairs, E_local, bm, False)
        shapes = [mx_launch_shape(blocks, w.n, w.k, bm) for w in (qc.w1_mma, qc.w2_mma)]
        align = align_for_experts(ids, bm, E_local)
        return dict(mma=bm, stages=(shapes[0][0], shapes[1][0]), splits=(shapes[0][1], shapes[1][1]),
                    sorted_token_ids=align.sorted_token_ids, block_expert_ids=align.block_expert_ids,
                    num_tokens_post_padded=align.num_tokens_post_padded)

    def _mma_gemm(self, out: torch.Tensor, a: torch.Tensor, route: dict, *, stage: int, top_k_in: int,
                  topk_weights: Optional[torch.Tensor], weighted: bool, **epilogue: Any) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import invoke_mxfp4_mma_moe_gemm

        qc = self.quant_config
        invoke_mxfp4_mma_moe_gemm(a, qc.w1_mma if stage == 1 else qc.w2_mma, out, top_k_in=top_k_in,
                                  block_m=route["mma"], sorted_token_ids=route["sorted_token_ids"],
                                  block_expert_ids=route["block_expert_ids"],
                                  num_tokens_post_padded=route["num_tokens_post_padded"],
                                  topk_weights=topk_weights, mul_routed_weight=weighted, bias=self._stage(stage)[1],
                                  split_k=route["splits"][stage - 1], stage=route["stages"][stage - 1],
                                  # split partials are zeroed only where an expert map may drop pairs (EP)
                                  may_drop_pairs=self.moe_config.parallel_config.ep_size > 1, **epilogue)

    def _gemm1_activated(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                         route: Optional[dict], *, activation: MoEActivation, top_k_in: int) -> bool:
        """On the tensor-core kernel with split K: the split reduction applies the activation (one launch fewer;
        swigluoai bit for bit the unfused one)."""
        if not route or not route.get("mma") or route["splits"][0] < 2:
            return False
        self._mma_gemm(out, a, route, stage=1, top_k_in=top_k_in, topk_weights=None, weighted=False,
                       epilogue_activation=activation)
        return True

    def _gemm2_summed(self, output: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                      route: Optional[dict], *, top_k: int, topk_weights: torch.Tensor, weighted: bool) -> bool:
        """On the tensor-core kernel with split K: the split reduction sums the top-k rows into ``output``."""
        if not route or not route.get("mma") or route["splits"][1] < 2:
            return False
        self._mma_gemm(output, a, route, stage=2, top_k_in=1, topk_weights=topk_weights, weighted=weighted,
                       epilogue_top_k=top_k)
        return True

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, ids: torch.Tensor,
              route: dict | None, *, stage: int, top_k_in: int, topk_weights: torch.Tensor,
              weighted: bool) -> None:
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import invoke_mxfp4_moe_gemm

        scales, bias = self._stage(stage)
        mma = self.quant_config.w1_mma if stage == 1 else self.quant_config.w2_mma
        if route.get("mma"):
            self._mma_gemm(out, a, route, stage=stage, top_k_in=top_k_in, topk_weights=topk_weights,
                           weighted=weighted)
            return
        if route.get("dequant"):
            from vllm.model_executor.layers.fused_moe.ops.mxfp4_expert_dequant import dequantize_mxfp4_experts

            def dequantize(dst: torch.Tensor, e0: int, e1: int) -> None:
                if mma is not None:  # only the tensor-core copy is kept
                    mma.dequantize(dst, e0, e1)
                else:
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
