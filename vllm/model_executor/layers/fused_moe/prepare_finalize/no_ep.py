"""Prepare/finalize without expert parallelism: everything stays on this rank."""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import (
    FusedMoEPrepareAndFinalize,
    PrepareResult,
    TopKWeightAndReduce,
)


def prepare_input(a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  quant_config: FusedMoEQuantConfig, apply_router_weight_on_input: bool) -> torch.Tensor:
    """The experts' input before any dispatch (every prepare/finalize pair starts here): activation
    quantization is refused (not implemented); with ``apply_router_weight_on_input`` (top_k must be
    1) the router weight scales the activations, and the experts must not apply it again."""
    if quant_config.is_quantized:
        raise NotImplementedError(f"activation quantization to {quant_config.quant_dtype} is not implemented")
    if apply_router_weight_on_input:
        if topk_ids.shape[1] != 1:
            raise ValueError("apply_router_weight_on_input needs top_k == 1 "
                             f"(got top_k={topk_ids.shape[1]}): weighting the input is only exact for one expert")
        a1 = a1 * topk_weights.to(a1.dtype)
    return a1


class MoEPrepareAndFinalizeNoEP(FusedMoEPrepareAndFinalize):
    """No dispatch.  With ``apply_router_weight_on_input`` (top_k must be 1) the
    router weight scales the activations here, and the experts must not apply it again."""

    finalizes_in_place = True

    def prepare(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                num_experts: int, expert_map: Optional[torch.Tensor], apply_router_weight_on_input: bool,
                quant_config: FusedMoEQuantConfig,
                token_lora_mapping: Optional[torch.Tensor] = None) -> PrepareResult:
        a1 = prepare_input(a1, topk_weights, topk_ids, quant_config, apply_router_weight_on_input)
        return PrepareResult(a1q=a1, a1q_scale=None, topk_ids=topk_ids, topk_weights=topk_weights,
                             token_lora_mapping=token_lora_mapping)

    def finalize(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, *, apply_router_weight_on_input: bool,
                 weight_and_reduce: TopKWeightAndReduce, handle: Any = None) -> None:
        weight_and_reduce.apply(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input)
