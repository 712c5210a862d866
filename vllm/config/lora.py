"""LoRA serving configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoRAConfig:
    """How many adapters are resident and how big they may be.

    max_loras: adapter slots on the device (adapters in one batch at most).
    max_lora_rank: every slot is allocated for this rank; smaller adapters are zero-padded.
    max_cpu_loras: adapters kept in the CPU cache (LRU); defaults to max_loras.
    fully_sharded_loras: shard the rank dimension across TP ranks (S-LoRA style).
    lora_dtype: dtype of the LoRA buffers; None = the model's dtype.
    use_tuned_config: look up tuned kernel tiles before the heuristic.
    """

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    fully_sharded_loras: bool = False
    lora_dtype: Optional[torch.dtype] = None
    use_tuned_config: bool = True

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be positive, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
