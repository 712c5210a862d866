"""Backend selection for MXFP4 experts (gpt-oss checkpoints as released).

    triton: ``UnfusedOAITritonExperts`` - CUDA (and CPU tensors under TRITON_INTERPRET=1
            when requested: how the tests run it);
    torch:  ``TorchMxfp4Experts`` - any device; dequantises one expert at a time inside apply.

Automatic: CUDA -> triton, else torch.  Each choice and each skipped backend is logged
with its reason (per layer, so at DEBUG, as the unquantized oracle does).  A requested
backend (``moe_backend`` / ``VLLM_FUSED_MOE_BACKEND``) that cannot run MXFP4 weights here
is an error naming the reason and the backends that can.
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


class Mxfp4MoEBackend(str, enum.Enum):
    TRITON = "triton"
    TORCH = "torch"


def mxfp4_experts_class(backend: Mxfp4MoEBackend) -> type[FusedMoEExpertsModular]:
    if backend is Mxfp4MoEBackend.TRITON:
        from vllm.model_executor.layers.fused_moe.experts.oai_triton_experts import UnfusedOAITritonExperts

        return UnfusedOAITritonExperts
    from vllm.model_executor.layers.fused_moe.experts.torch_mxfp4_experts import TorchMxfp4Experts

    return TorchMxfp4Experts


def default_priority(device: torch.device) -> list[Mxfp4MoEBackend]:
    if device.type == "cuda":
        return [Mxfp4MoEBackend.TRITON, Mxfp4MoEBackend.TORCH]
    return [Mxfp4MoEBackend.TORCH]


def select_mxfp4_moe_backend(moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig,
                             device: torch.device | str,
                             priority: Optional[Sequence[Mxfp4MoEBackend]] = None) -> Mxfp4MoEBackend:
    """The backend that will run this MXFP4 layer's experts."""
    device = torch.device(device)
    requested = moe_config.moe_backend or envs.VLLM_FUSED_MOE_BACKEND
    if requested:
        name = requested.strip().lower()
        able = [b.value for b in Mxfp4MoEBackend
                if mxfp4_experts_class(b).check_config(moe_config, quant_config, device)]
        try:
            backend = Mxfp4MoEBackend(name)
        except ValueError:
            raise ValueError(f"MoE backend {requested!r} was requested, but it cannot run MXFP4 experts; "
                             f"backends that can: {', '.join(able) or 'none'}") from None
        answer = mxfp4_experts_class(backend).check_config(moe_config, quant_config, device)
        if not answer:
            raise ValueError(f"MoE backend {backend.value!r} was requested but cannot run this MXFP4 layer: "
                             f"{answer.reason}. Backends that can: {', '.join(able) or 'none'}")
        logger.debug("MXFP4 experts: using backend %s (requested)", backend.value)
        return backend
    reasons = []
    for backend in (list(priority) if priority is not None else default_priority(device)):
        answer = mxfp4_experts_class(backend).check_config(moe_config, quant_config, device)
        if answer:
            why = ("Triton grouped GEMM decoding MXFP4 tiles in registers" if backend is Mxfp4MoEBackend.TRITON
                   else f"no Triton path on {device.type}: torch, one expert dequantised at a time")
            logger.debug("MXFP4 experts: using backend %s (%s)", backend.value, why)
            return backend
        logger.debug("MXFP4 experts: skipping backend %s: %s", backend.value, answer.reason)
        reasons.append(f"{backend.value}: {answer.reason}")
    raise ValueError("no MoE backend can run this MXFP4 layer; " + "; ".join(reasons))
