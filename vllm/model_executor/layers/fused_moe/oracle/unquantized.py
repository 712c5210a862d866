"""Backend selection for unquantized (bf16/fp16/fp32) experts.

Automatic selection walks the platform's priority list and takes the first
experts class whose ``check_config`` says yes; every skipped backend is logged
with its reason (with LoRA on, backends whose experts do not support LoRA are
skipped this way).  These lines are per layer, so at DEBUG; the model loader
logs the outcome once per model at INFO.  An explicit request (``FusedMoEConfig.moe_backend`` or
``VLLM_FUSED_MOE_BACKEND``) that cannot run the layer is an error at start-up
naming the backend, the reason and the backends that can.
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

from vllm import envs
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular

logger = init_logger(__name__)


class UnquantizedMoEBackend(str, enum.Enum):
    TRITON = "triton"
    TORCH = "torch"
    NAIVE_DENSE = "naive_dense"


def experts_class(backend: UnquantizedMoEBackend) -> type[FusedMoEExpertsModular]:
    if backend is UnquantizedMoEBackend.TRITON:
        from vllm.model_executor.layers.fused_moe.experts.triton_experts import TritonExperts

        return TritonExperts
    if backend is UnquantizedMoEBackend.TORCH:
        from vllm.model_executor.layers.fused_moe.experts.torch_experts import TorchExperts

        return TorchExperts
    from vllm.model_executor.layers.fused_moe.experts.naive_dense import NaiveDenseExperts

    return NaiveDenseExperts


def default_priority(device: torch.device) -> list[UnquantizedMoEBackend]:
    B = UnquantizedMoEBackend
    if device.type == "cuda":
        return [B.TRITON, B.TORCH, B.NAIVE_DENSE]
    return [B.TORCH, B.NAIVE_DENSE]


def _parse(name: str) -> UnquantizedMoEBackend:
    try:
        return UnquantizedMoEBackend(name.strip().lower())
    except ValueError:
        valid = ", ".join(b.value for b in UnquantizedMoEBackend)
        raise ValueError(f"unknown MoE backend {name!r}; valid backends: {valid}") from None


def select_unquantized_moe_backend(moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig,
                                   device: torch.device | str,
                                   priority: Optional[Sequence[UnquantizedMoEBackend]] = None,
                                   ) -> UnquantizedMoEBackend:
    """The backend that will run this layer's experts."""
    device = torch.device(device)
    candidates = list(priority) if priority is not None else default_priority(device)
    requested = moe_config.moe_backend or envs.VLLM_FUSED_MOE_BACKEND
    if requested:
        backend = _parse(requested)
        answer = experts_class(backend).check_config(moe_config, quant_config, device)
        if not answer:
            able = [b.value for b in UnquantizedMoEBackend
                    if experts_class(b).check_config(moe_config, quant_config, device)]
            raise ValueError(
                f"MoE backend {backend.value!r} was requested but cannot run this layer: {answer.reason}. "
                f"Backends that can: {', '.join(able) or 'none'}"
                + ("; or start without LoRA" if moe_config.lora_enabled else ""))
        logger.debug("using MoE backend %s (requested)", backend.value)
        return backend
    reasons = []
    for backend in candidates:
        answer = experts_class(backend).check_config(moe_config, quant_config, device)
        if answer:
            logger.debug("using MoE backend %s", backend.value)
            return backend
        logger.debug("skipping MoE backend %s: %s", backend.value, answer.reason)
        reasons.append(f"{backend.value}: {answer.reason}")
    raise ValueError("no MoE backend can run this layer; " + "; ".join(reasons))
