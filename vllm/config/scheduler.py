"""Scheduler configuration: how big one step's batch may be."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
_LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 16384  # vLLM's default for the offline LLM class on a large GPU
_LARGE_GPU_BYTES = 70 * 2**30


def default_max_num_batched_tokens(usage_context: Optional[str], tensor_parallel_size: int) -> int:
    """vLLM's step-size default by use: the offline ``LLM`` class on one GPU of >= 70 GiB other than an
    A100 (H100, H200, ...) gets 16384 tokens a step, everything else 8192 (vLLM gives its API server 8192
    on such GPUs; on smaller ones it gives 2048 with chunked prefill, which this engine does not have, so
    8192 stays).  With tensor parallelism the device is not queried (the workers are forked before CUDA
    starts), so 8192."""
    if usage_context == "llm_class" and tensor_parallel_size == 1:
        from vllm.platforms import current_platform

        platform = current_platform()
        if (platform.is_cuda() and platform.total_memory() >= _LARGE_GPU_BYTES
                and "a100" not in platform.device_name().lower()):
            return _LARGE_GPU_MAX_NUM_BATCHED_TOKENS
    return _DEFAULT_MAX_NUM_BATCHED_TOKENS


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of continuous batching (no chunked prefill: a prompt runs whole).

    max_num_seqs: sequences running at once (a decode step runs all of them).
    max_num_batched_tokens: tokens in one step; None = max(8192, max_model_len).
        Must be >= max_model_len (a prompt is never split) and >= max_num_seqs.
    max_model_len: most tokens (prompt + output) of one sequence; longer
        prompts are finished as ignored, sequences reaching it stop with 'length'.
    max_loras: distinct adapters among the running sequences (so also in any
        one batch); None = no limit (LoRA off).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_model_len: int = 8192
    max_loras: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens",
                               max(_DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len))
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}): without chunked prefill a prompt of max_model_len tokens could "
                "never be scheduled; raise max_num_batched_tokens or lower max_model_len")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): a decode step feeds one token per running sequence")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 or None, got {self.max_loras}")
