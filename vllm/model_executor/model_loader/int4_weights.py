"""Decoding an int4 checkpoint's stream before the model's loaders see it.

``decode_int4_weights(weights, quant_config, dtype)`` groups each quantized module's packed
tensors (``<module>.qweight`` / ``.qzeros`` / ``.scales`` / ``.g_idx``, or ``.weight_packed`` /
``.weight_scale`` / ``.weight_shape`` / ``.weight_zero_point`` / ``.weight_g_idx``), decodes them
with the format's config into an ``Int4Weight`` and yields one ``<module>.weight`` entry:

- a per-expert module (``<moe>.experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}``): the
  ``Int4Weight`` itself, which ``load_checkpoint`` hands to the layer's ``Int4MoEMethod.load_int4``;
- any other module (attention, shared experts, dense MLPs, a quantized lm_head): the weight
  dequantised to the model's dtype (a fallback, logged once per load: these run in float).

Every other tensor (norms, embeddings, biases, modules stored in float) passes through as it is.
A module is emitted as soon as all its tensors arrived; one whose optional tensors never come
(GPTQ without ``g_idx``) is emitted at the end of the stream.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Union

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.layers.quantization.int4_config import Int4QuantizationConfig

logger = init_logger(__name__)

_EXPERT_MODULE = re.compile(r"^.+\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w3|w2)$")


def is_expert_module(name: str) -> bool:
    return _EXPERT_MODULE.match(name) is not None


def decode_int4_weights(weights: Iterable[tuple[str, torch.Tensor]], config: Int4QuantizationConfig,
                        dtype: torch.dtype) -> Iterator[tuple[str, Union[torch.Tensor, Int4Weight]]]:
    fmt = config.format_name
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    dense: list[str] = []

    def emit(module: str, tensors: dict[str, torch.Tensor]) -> tuple[str, Union[torch.Tensor, Int4Weight]]:
        scheme = config.module_scheme(module)
        assert scheme is not None
        weight = config.decode(module, tensors, scheme)
        done.add(module)
        if is_expert_module(module):
            return f"{module}.weight", weight
        dense.append(module)
        # fp32 first: (q - z) * scale is exact there for fp16 / bf16 scales, then one rounding
        return f"{module}.weight", weight.dequantize(torch.float32).to(dtype)

    for key, tensor in weights:
        module, _, suffix = key.rpartition(".")
        if not module or suffix not in config.tensor_suffixes:
            yield key, tensor
            continue
        scheme = config.module_scheme(module)
        if scheme is None:
            raise ValueError(f"checkpoint key {key!r}: module {module!r} is stored {fmt}-quantized, but the "
                             "checkpoint's quantization_config lists it as not quantized; the config and the "
                             "weights disagree")
        required, optional = config.tensor_names(scheme)
        if suffix not in required | optional:
            raise ValueError(f"checkpoint key {key!r}: a {fmt} module quantized as {scheme} has no {suffix!r} "
                             f"tensor (expected {sorted(required | optional)})")
        parts = pending.setdefault(module, {})
        if module in done or suffix in parts:
            raise ValueError(f"checkpoint key {key!r} appears twice in the checkpoint")
        parts[suffix] = tensor
        if parts.keys() >= required | optional:
            yield emit(module, pending.pop(module))
    for module, parts in pending.items():
        required, _ = config.tensor_names(config.module_scheme(module))  # type: ignore[arg-type]
        missing = sorted(required - parts.keys())
        if missing:
            raise ValueError(f"{fmt} module {module!r}: the checkpoint has {sorted(parts)} but not {missing}")
        yield emit(module, parts)
    if dense:
        shown = ", ".join(dense[:3]) + (f", ... ({len(dense) - 3} more)" if len(dense) > 3 else "")
        logger.info("%s checkpoint: %d quantized non-expert module(s) dequantised to %s on load (no int4 kernel "
                    "for dense layers; they run in float): %s", fmt, len(dense), str(dtype).replace("torch.", ""),
                    shown)
