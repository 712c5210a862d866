"""What a checkpoint's ``quantization_config`` says, as one object per model.

A ``QuantizationConfig`` is parsed once from ``config.json`` (``from_config``) and
handed to the layers through ``BuildArgs.quant_config``.  Layers ask it:

- ``get_moe_method(moe_config, prefix)``: the quant method that creates and runs
  this MoE layer's expert weights (None: the experts are not quantized);
- ``is_quantized(prefix)``: whether a dense module's weights are stored quantized
  (modules listed as not converted, or ignored, stay in their float dtype).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase


class QuantizationConfig(ABC):
    #: the ``quant_method`` value of ``quantization_config`` this class parses
    name: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Parse ``quantization_config``; raise ValueError naming what is unsupported."""

    @abstractmethod
    def get_moe_method(self, moe_config: "FusedMoEConfig", prefix: str) -> Optional["FusedMoEMethodBase"]:
        """The quant method of the MoE layer at ``prefix`` (e.g. ``model.layers.0.mlp.experts``)."""

    @abstractmethod
    def is_quantized(self, prefix: str) -> bool:
        """Whether the module at ``prefix`` is stored quantized in the checkpoint."""
