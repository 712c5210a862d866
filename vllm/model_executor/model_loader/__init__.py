"""Build a model from a local checkpoint folder.

    model = get_model(model_config, device="cuda", lora_enabled=True)

Resolves the class from ``architectures``, builds it in ``model_config.dtype``
on ``device``, streams the ``*.safetensors`` files through ``load_weights``,
and fails with the list of parameters the checkpoint did not provide.  Then
every layer with ``process_weights_after_loading`` (the MoE layers: their
experts backend is chosen there) runs it, and the MoE backends are logged once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm.config.model import ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.weight_utils import safetensors_files, safetensors_weights_iterator
from vllm.model_executor.models.registry import ModelRegistry

__all__ = ["get_model"]

logger = init_logger(__name__)


def _process_weights_after_loading(model: nn.Module) -> None:
    backends: dict[str, int] = {}
    for module in model.modules():
        process = getattr(module, "process_weights_after_loading", None)
        if callable(process):
            process()
            backend = getattr(module, "moe_backend", None)
            if backend is not None:
                name = getattr(backend, "value", str(backend))
                backends[name] = backends.get(name, 0) + 1
    if backends:
        logger.info("using MoE backend %s", ", ".join(f"{b} ({n} layer{'s' * (n > 1)})" for b, n in backends.items()))


def get_model(model_config: ModelConfig, *, device: torch.device | str = "cpu", lora_enabled: bool = False,
              moe_backend: Optional[str] = None, tp_group: Any = None,
              enable_expert_parallel: bool = False) -> nn.Module:
    """``tp_group``: this rank's tensor-parallel group (None: one rank); each rank keeps its share
    of every parallel layer's weights.  ``enable_expert_parallel``: the MoE layers keep whole
    experts instead (E / tp_size per rank), the other layers stay tensor-parallel."""
    model_cls = ModelRegistry.resolve(model_config.architectures)
    model = model_cls(model_config, dtype=model_config.dtype, device=torch.device(device),
                      lora_enabled=lora_enabled, moe_backend=moe_backend, tp_group=tp_group,
                      enable_expert_parallel=enable_expert_parallel)
    with torch.no_grad():
        loaded = model.load_weights(safetensors_weights_iterator(safetensors_files(model_config.model)))
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        raise ValueError(f"checkpoint {model_config.model!r} does not provide {len(missing)} parameter(s) of "
                         f"{model_cls.__name__}: {shown}")
    with torch.no_grad():
        _process_weights_after_loading(model)
    return model.eval()
