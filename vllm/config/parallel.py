"""Checks of the parallel layout (tensor parallelism, expert parallelism) against a model.

Expert parallelism (``enable_expert_parallel``) splits every MoE layer's experts over
the ranks of the tensor-parallel group, whole experts per rank; attention and the
dense layers stay tensor-parallel.  It is checked here, on rank 0 before any worker
process starts, so that a layout the model cannot take fails with one clear message.
"""
from __future__ import annotations

from typing import Any, Optional

from vllm.logger import init_logger

logger = init_logger(__name__)

# where the four supported architectures keep their routed-expert count
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")


def num_routed_experts(hf_config: Any) -> Optional[int]:
    """Routed experts per MoE layer (None: the config names none)."""
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_expert_parallel(hf_config: Any, tensor_parallel_size: int, *, fully_sharded_loras: bool = False) -> None:
    """Refuse an expert-parallel layout the model cannot take, naming it and what to change."""
    experts = num_routed_experts(hf_config)
    if experts is None:
        raise ValueError("enable_expert_parallel needs a mixture-of-experts model, but this config names no "
                         f"routed experts ({' / '.join(_EXPERT_COUNT_KEYS)}); start without it")
    if tensor_parallel_size == 1:
        logger.info("enable_expert_parallel with tensor_parallel_size=1: the one rank holds all %d experts",
                    experts)
        return
    if experts % tensor_parallel_size:
        sizes = [n for n in range(2, experts + 1) if experts % n == 0]
        raise ValueError(f"enable_expert_parallel splits the model's {experts} experts over "
                         f"tensor_parallel_size={tensor_parallel_size} ranks, but {experts} is not divisible by "
                         f"{tensor_parallel_size}; use a tensor_parallel_size that divides it "
                         f"({', '.join(map(str, sizes[:8]))}) or start without enable_expert_parallel")
    logger.info("expert parallelism: %d experts per MoE layer over %d ranks, %d whole experts each",
                experts, tensor_parallel_size, experts // tensor_parallel_size)
    if fully_sharded_loras:
        logger.info("fully_sharded_loras with enable_expert_parallel: each rank holds the MoE LoRA A and B of its "
                    "own %d experts only (the adapters are split by expert, 1/%d of them per rank); the LoRA rank "
                    "dimension is not split further", experts // tensor_parallel_size, tensor_parallel_size)
