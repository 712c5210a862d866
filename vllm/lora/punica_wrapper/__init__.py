"""Punica wrappers: per-step LoRA mapping plus the LoRA compute, chosen per platform."""
from __future__ import annotations

from typing import Optional

import torch

from vllm.lora.punica_wrapper.punica_base import MoELoRARouting, PunicaWrapperBase, TPGroup

__all__ = ["PunicaWrapperBase", "MoELoRARouting", "TPGroup", "get_punica_wrapper"]


def get_punica_wrapper(max_num_batched_tokens: int, max_loras: int, device: torch.device | str,
                       *, kind: Optional[str] = None, tp_group: Optional[TPGroup] = None) -> PunicaWrapperBase:
    """The wrapper for ``device``: Triton ("gpu") where Triton can run, torch ("cpu") otherwise.

    ``kind`` forces one ("gpu" runs the Triton kernels, on CPU tensors only under
    TRITON_INTERPRET=1).
    """
    from vllm.platforms.interface import has_triton, triton_interpreting

    device = torch.device(device)
    if kind is None:
        kind = "gpu" if device.type == "cuda" and has_triton() else "cpu"
    if kind == "gpu":
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError("the Triton Punica wrapper needs a CUDA device or TRITON_INTERPRET=1")
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

        return PunicaWrapperGPU(max_num_batched_tokens, max_loras, device, tp_group=tp_group)
    if kind == "cpu":
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        return PunicaWrapperCPU(max_num_batched_tokens, max_loras, device, tp_group=tp_group)
    raise ValueError(f"unknown Punica wrapper kind {kind!r}; expected 'gpu' or 'cpu'")
