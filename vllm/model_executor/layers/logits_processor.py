"""Hidden states -> vocabulary logits.

``LogitsProcessor(vocab_size)(lm_head, hidden_states)`` multiplies by the
head's (sharded) weight in the model dtype, gathers the vocabulary shards over
the TP group, drops the padding rows, applies ``scale`` and an optional soft cap
(in float32), and returns [T, vocab_size] logits: float32 where a scale or soft cap
applies, else the projection's own numbers in the model dtype.  Every consumer (the
sampler, logprobs, the grammar mask) widens them to float32 first - exactly, so with
the same numbers - and a decode step at batch 256 with a 152k vocabulary then skips
a float32 copy of its logits (78 MB read, 156 MB written) and reads half the bytes
after it (vLLM's logits are in the model dtype too).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vllm.model_executor.layers.ops.dense_gemv import linear
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, *, scale: float = 1.0, soft_cap: Optional[float] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(self, lm_head: ParallelLMHead, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, lm_head.weight, lm_head.bias)
        if lm_head.tp_size > 1:
            logits = lm_head.tp_group.all_gather(logits, dim=-1)
        logits = logits[..., :self.vocab_size]
        if self.scale == 1.0 and self.soft_cap is None:
            return logits
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, scale={self.scale}, soft_cap={self.soft_cap}"
