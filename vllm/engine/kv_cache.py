"""Sizing and allocating the paged KV cache of every attention layer."""
from __future__ import annotations

import torch
from torch import nn

from vllm.attention.metadata import allocate_kv_cache
from vllm.config.cache import CacheConfig
from vllm.config.scheduler import SchedulerConfig
from vllm.core.block_manager import cdiv
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import attention_layers, bind_kv_cache

logger = init_logger(__name__)


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * elem for a in attention_layers(model))


def num_kv_blocks(model: nn.Module, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype,
                  device: torch.device) -> int:
    """Blocks for the cache: the override, else what memory allows, capped at what
    max_num_seqs sequences of max_model_len tokens could ever use."""
    per_seq = cdiv(sched.max_model_len, cache.block_size)
    wanted = sched.max_num_seqs * per_seq
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cache.gpu_memory_utilization - (total - free)
    else:
        budget = cache.cpu_kv_cache_space_gib * (1 << 30)
    fits = int(budget // per_block)
    if fits < per_seq:
        raise RuntimeError(
            f"the KV cache fits {fits} blocks of {cache.block_size} tokens, fewer than one sequence of "
            f"max_model_len={sched.max_model_len} needs ({per_seq}); lower max_model_len or raise "
            "gpu_memory_utilization")
    return min(fits, wanted)


def allocate_and_bind(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
    caches = [allocate_kv_cache(num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype, device)
              for a in attention_layers(model)]
    bind_kv_cache(model, caches)
    total = sum(c.numel() * c.element_size() for c in caches)
    logger.info("KV cache: %d blocks of %d tokens (%d tokens), %.1f MiB", num_blocks, block_size,
                num_blocks * block_size, total / (1 << 20))
    return caches
