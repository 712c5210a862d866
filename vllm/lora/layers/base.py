"""The interface every LoRA-wrapped layer implements."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from vllm.config.lora import LoRAConfig


class BaseLayerWithLoRA(nn.Module):
    """A base layer plus stacked adapter slots.

    create_lora_weights: allocate ``max_loras`` slots once.
    set_lora / reset_lora: copy an adapter into a slot / clear a slot.
    set_mapping: attach the Punica wrapper that holds each step's token mapping.
    can_replace_layer: whether this wrapper applies to a given base layer.
    """

    def create_lora_weights(self, max_loras: int, lora_config: LoRAConfig, model_config: Any = None) -> None:
        raise NotImplementedError

    def reset_lora(self, index: int) -> None:
        raise NotImplementedError

    def set_lora(self, index: int, **weights: Any) -> None:
        raise NotImplementedError

    def set_mapping(self, punica_wrapper: Any) -> None:
        raise NotImplementedError

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig,
                          packed_modules_list: Optional[list] = None, model_config: Any = None) -> bool:
        raise NotImplementedError
