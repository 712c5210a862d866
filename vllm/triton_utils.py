"""Lazy access to Triton, so that the package imports on machines without it.

Kernel modules import ``triton`` and ``triton.language`` directly (they are only
imported when a Triton path is taken); everything else asks ``HAS_TRITON``.
"""
from __future__ import annotations

from vllm.platforms.interface import has_triton, triton_interpreting

HAS_TRITON = has_triton()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


__all__ = ["HAS_TRITON", "triton_interpreting", "next_power_of_2"]
