"""MoERunner: routing, shared experts and the tensor-parallel reduce around the experts.

    FusedMoE.forward(x, router_logits)
      -> MoERunner.forward(x, router_logits, lora_context=layer._lora_context)
           topk_weights, topk_ids = router(router_logits)
           out = layer.quant_method.apply(layer, x, topk_weights, topk_ids, lora_context=...)
           out += shared_experts(x)            (when the layer has them)
           out = tp_group.all_reduce(out)      (when tp_size > 1 and reduce_results)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE


class MoERunner:
    def __init__(self, layer: "FusedMoE") -> None:
        self.layer = layer

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layer
        if layer.custom_routing_function is not None:
            return layer.custom_routing_function(router_logits, layer.top_k, layer.renormalize)
        return fused_topk(router_logits, layer.top_k, renormalize=layer.renormalize,
                          scoring_func=layer.scoring_func, topk_then_softmax=layer.topk_then_softmax,
                          correction_bias=layer.e_score_correction_bias)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        layer = self.layer
        if hidden_states.dim() != 2 or hidden_states.shape[1] != layer.hidden_size:
            raise ValueError(f"hidden_states must be [tokens, {layer.hidden_size}], got {tuple(hidden_states.shape)}")
        if router_logits.shape != (hidden_states.shape[0], layer.global_num_experts):
            raise ValueError(f"router_logits must be [{hidden_states.shape[0]}, {layer.global_num_experts}], "
                             f"got {tuple(router_logits.shape)}")
        topk_weights, topk_ids = self.select_experts(router_logits)
        out = layer.quant_method.apply(layer, hidden_states, topk_weights, topk_ids, lora_context=lora_context)
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(hidden_states)
        if layer.reduce_results and layer.tp_group is not None and layer.moe_config.parallel_config.tp_size > 1:
            out = layer.tp_group.all_reduce(out)
        return out
