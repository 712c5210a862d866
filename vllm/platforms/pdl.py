"""Programmatic dependent launch (PDL): whether a Triton launch on a device may use it.

On sm_90+ a kernel launched with the ``launch_pdl`` option may start while the kernel before it on the
stream is still draining; it must then wait (``griddepcontrol.wait``) before touching memory the earlier
kernels wrote or read.  The decode path's kernels take a ``USE_PDL`` constexpr and call
``ops/_pdl.py``'s ``pdl_wait`` before their first dependent memory access, so a launch with
``**pdl_launch_kwargs(device)`` overlaps its launch latency and prologue with the previous kernel's tail
(in eager steps and inside CUDA graphs alike).  Off on CPUs, under the Triton interpreter, below sm_90,
with ``VLLM_PDL=0``, or when the installed Triton has no ``launch_pdl`` option.
"""
from __future__ import annotations

import functools

import torch

from vllm import envs
from vllm.platforms.interface import triton_interpreting

# The int4 / MXFP4 launchers (int4_moe_gemm.py, mxfp4_moe_gemm.py, the tensor-core *_mma_moe.py) pass this as
# ``enabled``: their kernels wait first like the others.  On since the eighteenth session, after their cuda tests
# (test_int4_* / test_mxfp4_*, the tensor-core kernel and layer tests) passed with it on an H200 (1-5 % at 1 and
# 16 tokens, docs/performance.md); False launches them plainly.
PDL_4BIT = True

_OFF: dict[str, bool] = {"USE_PDL": False}
_ON: dict[str, bool] = {"USE_PDL": True, "launch_pdl": True}


def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except Exception:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _enabled(device_type: str, index: int, interpreting: bool) -> bool:
    if device_type != "cuda" or interpreting or not torch.cuda.is_available():
        return False
    if not envs.VLLM_PDL:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9 and _triton_has_pdl()


def pdl_enabled(device: torch.device) -> bool:
    """True when a Triton kernel launched on ``device`` may use programmatic dependent launch."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    return _enabled(device.type, index, triton_interpreting())


def pdl_launch_kwargs(device: torch.device, enabled: bool = True) -> dict[str, bool]:
    """The launch keywords of a PDL-aware kernel: ``USE_PDL`` (its constexpr) and, when on, ``launch_pdl``.
    ``enabled=False``: a plain launch (a launcher whose kernels have not yet passed their GPU tests with PDL)."""
    return _ON if enabled and pdl_enabled(device) else _OFF


def reset_pdl_cache() -> None:
    """Forget the per-device decisions (tests that change ``VLLM_PDL``)."""
    _enabled.cache_clear()
