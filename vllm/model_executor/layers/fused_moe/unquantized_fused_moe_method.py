"""Unquantized experts: weights in the activation dtype, backend from the oracle."""
from __future__ import annotations

from typing import Optional, TYPE_CHECKING

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig, biased_moe_quant_config
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
from vllm.model_executor.layers.fused_moe.oracle.unquantized import experts_class, select_unquantized_moe_backend
from vllm.model_executor.layers.fused_moe.prepare_finalize import make_prepare_finalize

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """w13_weight [E_local, w13_out, H], w2_weight [E_local, H, I_part], optional biases."""

    def create_weights(self, layer: "FusedMoE", params_dtype: torch.dtype, device: torch.device) -> None:
        cfg = self.moe_config
        E, H = cfg.local_num_experts, cfg.hidden_dim
        I_part = cfg.intermediate_size_per_partition
        layer.register_parameter("w13_weight", torch.nn.Parameter(
            torch.empty(E, cfg.w13_out_dim, H, dtype=params_dtype, device=device), requires_grad=False))
        layer.register_parameter("w2_weight", torch.nn.Parameter(
            torch.empty(E, H, I_part, dtype=params_dtype, device=device), requires_grad=False))
        if cfg.has_bias:
            layer.register_parameter("w13_bias", torch.nn.Parameter(
                torch.zeros(E, cfg.w13_out_dim, dtype=params_dtype, device=device), requires_grad=False))
            layer.register_parameter("w2_bias", torch.nn.Parameter(
                torch.zeros(E, H, dtype=params_dtype, device=device), requires_grad=False))
        else:
            layer.w13_bias = None
            layer.w2_bias = None

    def get_quant_config(self, layer: "FusedMoE") -> FusedMoEQuantConfig:
        return biased_moe_quant_config(layer.w13_bias, layer.w2_bias)

    def make_kernel(self, layer: "FusedMoE") -> FusedMoEKernel:
        quant_config = self.get_quant_config(layer)
        backend = select_unquantized_moe_backend(self.moe_config, quant_config, layer.w13_weight.device)
        layer.moe_backend = backend
        experts = experts_class(backend)(self.moe_config, quant_config)
        return FusedMoEKernel(make_prepare_finalize(layer), experts)

    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        raise RuntimeError("call FusedMoE.process_weights_after_loading() before the first forward")
