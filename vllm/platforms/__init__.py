"""The platform the engine runs on, detected once.

``current_platform()`` returns a ``CudaPlatform`` when a CUDA device is usable
(or ``VLLM_TARGET_DEVICE=cuda``), a ``CpuPlatform`` otherwise.  Code asks the
platform what is available instead of probing torch itself.
"""
from __future__ import annotations

import functools

from vllm.platforms.interface import CpuPlatform, CudaPlatform, Platform

__all__ = ["Platform", "CpuPlatform", "CudaPlatform", "current_platform"]


@functools.lru_cache(maxsize=1)
def current_platform() -> Platform:
    import torch

    from vllm import envs

    forced = envs.VLLM_TARGET_DEVICE
    if forced == "cpu":
        return CpuPlatform()
    # device_count(), not is_available(): it asks NVML where it can, which leaves CUDA unqueried, so
    # tensor-parallel workers can still be forked (vllm.executor.multiproc)
    if forced == "cuda" or torch.cuda.device_count() > 0:
        return CudaPlatform()
    return CpuPlatform()
