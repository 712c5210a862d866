"""Scheduler configuration: how big one step's batch may be."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


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
