"""Backend selection for int4 (W4A16) experts.

``marlin`` (``MarlinExperts``, Triton grouped GEMMs that dequantise packed int4 tiles in
registers) on CUDA; ``torch`` (``TorchInt4Experts``, one expert dequantised at a time) elsewhere.
Both add LoRA at the two seams.  Skipped backends are logged with their reason (DEBUG, per layer;
the model loader logs the outcome once at INFO).  A requested backend (``FusedMoEConfig.moe_backend``
or ``VLLM_FUSED_MOE_BACKEND``) that cannot run the layer is an error naming the reason and the
backends that can; MarlinExperts can be requested under ``TRITON_INTERPRET=1`` on CPU (tests).
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

from vllm import envs
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular

logger = init_logger(__name__)


class Int4MoEBackend(str, enum.Enum):
    MARLIN = "marlin"
    TORCH = "torch"


def int4_experts_class(backend: Int4MoEBackend) -> type[FusedMoEExpertsModular]:
    if backend is Int4MoEBackend.MARLIN:
        from vllm.model_executor.layers.fused_moe.experts.marlin_experts import MarlinExperts

        return MarlinExperts
    from vllm.model_executor.layers.fused_moe.experts.torch_int4_experts import TorchInt4Experts

    return TorchInt4Experts


def default_int4_priority(device: torch.device) -> list[Int4MoEBackend]:
    if device.type == "cuda":
        return [Int4MoEBackend.MARLIN, Int4MoEBackend.TORCH]
    return [Int4MoEBackend.TORCH]


def select_int4_moe_backend(moe_config: FusedMoEConfig, quant_config: Int4MoEQuantConfig, device: torch.device | str,
                            priority: Optional[Sequence[Int4MoEBackend]] = None) -> Int4MoEBackend:
    """The backend that will run this int4 layer's experts."""
    device = torch.device(device)
    requested = moe_config.moe_backend or envs.VLLM_FUSED_MOE_BACKEND
    if requested:
        name = requested.strip().lower()
        valid = ", ".join(b.value for b in Int4MoEBackend)
        try:
            backend = Int4MoEBackend(name)
        except ValueError:
            raise ValueError(f"MoE backend {requested!r} was requested, but this layer's experts are int4 "
                             f"(W4A16) and {requested!r} runs unquantized weights only; int4 backends: {valid}"
                             ) from None
        answer = int4_experts_class(backend).check_config(moe_config, quant_config, device)
        if not answer:
            able = [b.value for b in Int4MoEBackend
                    if int4_experts_class(b).check_config(moe_config, quant_config, device)]
            raise ValueError(f"MoE backend {backend.value!r} was requested but cannot run this int4 layer: "
                             f"{answer.reason}. Backends that can: {', '.join(able) or 'none'}")
        logger.debug("using int4 MoE backend %s (requested)", backend.value)
        return backend
    reasons = []
    for backend in (list(priority) if priority is not None else default_int4_priority(device)):
        answer = int4_experts_class(backend).check_config(moe_config, quant_config, device)
        if answer:
            logger.debug("using int4 MoE backend %s", backend.value)
            return backend
        logger.debug("skipping int4 MoE backend %s: %s", backend.value, answer.reason)
        reasons.append(f"{backend.value}: {answer.reason}")
    raise ValueError("no int4 MoE backend can run this layer; " + "; ".join(reasons))
