"""Architecture name (``config.json`` ``architectures``) -> model class, imported on first use.

    cls = ModelRegistry.resolve(model_config.architectures)
"""
from __future__ import annotations

import importlib
from typing import Iterable

from torch import nn

# architecture -> (module under vllm.model_executor.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
}


class ModelRegistry:
    @staticmethod
    def supported_architectures() -> list[str]:
        return sorted(_MODELS)

    @staticmethod
    def load_model_cls(architecture: str) -> type[nn.Module]:
        if architecture not in _MODELS:
            raise ValueError(f"model architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(ModelRegistry.supported_architectures())}")
        module, name = _MODELS[architecture]
        return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)

    @staticmethod
    def resolve(architectures: Iterable[str]) -> type[nn.Module]:
        """The class of the first supported name in ``architectures``."""
        archs = list(architectures or [])
        for arch in archs:
            if arch in _MODELS:
                return ModelRegistry.load_model_cls(arch)
        raise ValueError(f"none of the model architectures {archs} is supported; supported: "
                         f"{', '.join(ModelRegistry.supported_architectures())}")
