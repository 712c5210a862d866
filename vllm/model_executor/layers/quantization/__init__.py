"""Quantized checkpoints: ``quantization_config`` -> a ``QuantizationConfig``.

Each format lives in its own module and is imported only when a checkpoint
uses it.  ``get_quantization_config`` is the one entry point the models use.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

__all__ = ["QuantizationConfig", "get_quantization_config", "SUPPORTED_QUANTIZATION"]

# quant_method -> "module:Class" under this package
_REGISTRY: dict[str, str] = {
    "gptq": "gptq:GPTQConfig",
    "awq": "awq:AWQConfig",
    "compressed-tensors": "compressed_tensors:CompressedTensorsConfig",
    "mxfp4": "mxfp4:Mxfp4Config",
}
SUPPORTED_QUANTIZATION = tuple(_REGISTRY)


def _config_class(method: str) -> type[QuantizationConfig]:
    target = _REGISTRY.get(method)
    if target is None:
        raise ValueError(f"quantization method {method!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_QUANTIZATION)}")
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise
        raise ValueError(f"quantization method {method!r} is not implemented yet") from None
    return getattr(mod, cls)


def get_quantization_config(hf_config: Any, requested: Optional[str] = None) -> Optional[QuantizationConfig]:
    """The checkpoint's quantization, or None for a float checkpoint.

    ``requested`` is the user's ``quantization=`` / ``--quantization``: it must match
    what the checkpoint says (a float checkpoint is not quantized on the fly).
    """
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(vars(raw))
    method = str(raw.get("quant_method", "")).lower() if raw else None
    if requested is not None:
        requested = requested.lower()
        if method is None:
            raise ValueError(f"quantization={requested!r} was requested, but the checkpoint has no "
                             "quantization_config: only quantized checkpoints can be served quantized "
                             "(quantizing a float checkpoint on load is not supported); drop the option")
        if requested != method:
            raise ValueError(f"quantization={requested!r} was requested, but the checkpoint is quantized "
                             f"with {method!r}; drop the option or pass {method!r}")
    if method is None:
        return None
    if not method:
        raise ValueError("the checkpoint's quantization_config has no quant_method; supported: "
                         f"{', '.join(SUPPORTED_QUANTIZATION)}")
    return _config_class(method).from_config(dict(raw))
