"""KV-cache configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CacheConfig:
    """block_size: tokens per KV block.  num_gpu_blocks_override: exact number of
    blocks (tests, small machines); otherwise sized from ``gpu_memory_utilization``
    of the GPU's memory, or from ``cpu_kv_cache_space_gib`` on CPU.
    enable_prefix_caching: reuse the KV of full blocks already computed for the same
    tokens under the same adapter (``vllm.core.prefix_cache``); on by default, as in vLLM."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    cpu_kv_cache_space_gib: float = 2.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be >= 1")
