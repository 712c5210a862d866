"""Quant methods: how a ``FusedMoE`` layer's expert weights are stored and run.

``FusedMoEMethodBase`` creates the weights (``create_weights``), converts them
once after loading (``process_weights_after_loading``), builds the modular
kernel (``make_kernel``) and runs it (``apply``).  After loading, the layer
swaps its method for a ``FusedMoEModularMethod`` holding that kernel, so every
forward goes  quant_method.apply -> FusedMoEKernel.apply -> experts.apply  with
``lora_context`` passed along explicitly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE


class FusedMoEMethodBase(ABC):
    def __init__(self, moe_config: FusedMoEConfig) -> None:
        self.moe_config = moe_config

    @abstractmethod
    def create_weights(self, layer: "FusedMoE", params_dtype: torch.dtype, device: torch.device) -> None: ...

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        """One-time conversion of loaded weights (layout, quantization)."""

    @abstractmethod
    def get_quant_config(self, layer: "FusedMoE") -> FusedMoEQuantConfig: ...

    @abstractmethod
    def make_kernel(self, layer: "FusedMoE") -> FusedMoEKernel: ...

    def supports_lora(self) -> bool:
        return False

    @abstractmethod
    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor: ...


class FusedMoEModularMethod(FusedMoEMethodBase):
    """Runs a ready ``FusedMoEKernel``; weight handling stays with the original method."""

    def __init__(self, old_method: FusedMoEMethodBase, kernel: FusedMoEKernel) -> None:
        super().__init__(old_method.moe_config)
        self.old_method = old_method
        self.kernel = kernel

    def create_weights(self, layer, params_dtype, device) -> None:
        raise RuntimeError("FusedMoEModularMethod is installed after the weights exist")

    def get_quant_config(self, layer) -> FusedMoEQuantConfig:
        return self.kernel.fused_experts.quant_config

    def make_kernel(self, layer) -> FusedMoEKernel:
        return self.kernel

    def supports_lora(self) -> bool:
        return self.kernel.supports_lora()

    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        return self.kernel.apply(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                 activation=self.moe_config.activation,
                                 global_num_experts=self.moe_config.num_experts, expert_map=layer.expert_map,
                                 apply_router_weight_on_input=layer.apply_router_weight_on_input,
                                 lora_context=lora_context)
