"""Build a model from a local checkpoint folder.

    model = get_model(model_config, device="cuda", lora_enabled=True)

Resolves the class from ``architectures``, builds it in ``model_config.dtype``
on ``device``, streams the ``*.safetensors`` files through ``load_weights``,
and fails with the list of parameters the checkpoint did not provide.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm.config.model import ModelConfig
from vllm.model_executor.model_loader.weight_utils import safetensors_files, safetensors_weights_iterator
from vllm.model_executor.models.registry import ModelRegistry

__all__ = ["get_model"]


def get_model(model_config: ModelConfig, *, device: torch.device | str = "cpu", lora_enabled: bool = False,
              moe_backend: Optional[str] = None, tp_group: Any = None) -> nn.Module:
    """``tp_group``: this rank's tensor-parallel group (None: one rank); each rank keeps its share
    of every parallel layer's weights."""
    model_cls = ModelRegistry.resolve(model_config.architectures)
    model = model_cls(model_config, dtype=model_config.dtype, device=torch.device(device),
                      lora_enabled=lora_enabled, moe_backend=moe_backend, tp_group=tp_group)
    with torch.no_grad():
        loaded = model.load_weights(safetensors_weights_iterator(safetensors_files(model_config.model)))
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        raise ValueError(f"checkpoint {model_config.model!r} does not provide {len(missing)} parameter(s) of "
                         f"{model_cls.__name__}: {shown}")
    return model.eval()
