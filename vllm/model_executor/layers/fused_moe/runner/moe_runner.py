"""MoERunner: routing, shared experts and the tensor-parallel reduce around the experts.

    FusedMoE.forward(x, router_logits)            FusedMoE.forward_gate(x, gate)
      -> MoERunner.forward(x, router_logits, lora_context=layer._lora_context)   (or routed=(weights, ids))
           topk_weights, topk_ids = router(router_logits)     (route_with_gate: the gate GEMV + top-k, one launch)
           out = layer.quant_method.apply(layer, x, topk_weights, topk_ids, lora_context=...)
           out += shared_experts(x)            (when the layer has them)
           out = tp_group.all_reduce(out)      (when tp_size > 1 and reduce_results)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from vllm.model_executor.layers.fused_moe.router.fused_topk import _TRITON_MAX_EXPERTS, _TRITON_MAX_TOP_K, fused_topk
from vllm.model_executor.layers.ops import dense_gemv

# The router GEMV and its top-k in one launch (ops/dense_gemv.router_gemv_topk) where the dense GEMV serves the
# router (one token on CUDA): off until timed on a GPU (benchmark_decode.py --router-fused-topk).
ROUTER_FUSED_TOPK = False

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

    def fused_router_applies(self, hidden_states: torch.Tensor, gate_weight: torch.Tensor) -> bool:
        """Whether ``route_with_gate`` runs the router GEMV and the top-k in one launch: ROUTER_FUSED_TOPK,
        the dense GEMV's token range, softmax routing without a custom function or a correction bias."""
        layer = self.layer
        return (ROUTER_FUSED_TOPK and not dense_gemv.GEMV_DELAYED and dense_gemv.gemv_applies(hidden_states, gate_weight)
                and layer.custom_routing_function is None and layer.scoring_func == "softmax"
                and layer.e_score_correction_bias is None and gate_weight.shape[0] == layer.global_num_experts
                and layer.top_k <= _TRITON_MAX_TOP_K and gate_weight.shape[0] <= _TRITON_MAX_EXPERTS)

    def route_with_gate(self, hidden_states: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor],
                        gate_params: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights, topk_ids) of the router ``gate``: one launch where ``fused_router_applies``
        (gate_params: the gate's plain [E, H] weight and [E] bias or None; None when the gate is not a plain
        linear layer), else gate then ``select_experts``."""
        if gate_params is not None and self.fused_router_applies(hidden_states, gate_params[0]):
            layer = self.layer
            return dense_gemv.router_gemv_topk(hidden_states, gate_params[0], layer.top_k,
                                               renormalize=layer.renormalize,
                                               topk_then_softmax=layer.topk_then_softmax, bias=gate_params[1])
        return self.select_experts(self._checked_logits(hidden_states, gate(hidden_states)))

    def _checked_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if router_logits.shape != (hidden_states.shape[0], self.layer.global_num_experts):
            raise ValueError(f"router_logits must be [{hidden_states.shape[0]}, {self.layer.global_num_experts}], "
                             f"got {tuple(router_logits.shape)}")
        return router_logits

    def forward(self, hidden_states: torch.Tensor, router_logits: Optional[torch.Tensor], *,
                lora_context: Optional["MoELoRAContext"] = None,
                routed: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """``routed``: (topk_weights, topk_ids) already chosen (``route_with_gate``), instead of router_logits."""
        layer = self.layer
        if hidden_states.dim() != 2 or hidden_states.shape[1] != layer.hidden_size:
            raise ValueError(f"hidden_states must be [tokens, {layer.hidden_size}], got {tuple(hidden_states.shape)}")
        if (routed is None) == (router_logits is None):
            raise ValueError("pass either router_logits or routed (topk_weights, topk_ids), not both or neither")
        if routed is None:
            topk_weights, topk_ids = self.select_experts(self._checked_logits(hidden_states, router_logits))
        else:
            topk_weights, topk_ids = routed
        out = layer.quant_method.apply(layer, hidden_states, topk_weights, topk_ids, lora_context=lora_context)
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(hidden_states)
        if layer.reduce_results and layer.tp_group is not None and layer.moe_config.parallel_config.tp_size > 1:
            out = layer.tp_group.all_reduce(out)
        return out
