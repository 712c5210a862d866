"""Platform descriptions: what a device offers, asked in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Platform:
    device_type: str

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def can_run_triton(self) -> bool:
        """Triton kernels run here: on a GPU, or on CPU tensors under the interpreter."""
        raise NotImplementedError

    def device_name(self) -> str:
        raise NotImplementedError

    def total_memory(self) -> int:
        """Bytes of memory of device 0 (0 when unknown)."""
        return 0


class CudaPlatform(Platform):
    def __init__(self) -> None:
        super().__init__(device_type="cuda")

    def can_run_triton(self) -> bool:
        return has_triton()

    def device_name(self) -> str:
        return torch.cuda.get_device_name()

    def total_memory(self) -> int:
        return int(torch.cuda.get_device_properties(0).total_memory)


class CpuPlatform(Platform):
    def __init__(self) -> None:
        super().__init__(device_type="cpu")

    def can_run_triton(self) -> bool:
        return triton_interpreting() and has_triton()

    def device_name(self) -> str:
        return "cpu"
