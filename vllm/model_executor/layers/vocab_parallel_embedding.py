"""Token embedding and LM head, sharded over the vocabulary.

With tp_size ranks, rank r holds rows ``[r * Vp, (r + 1) * Vp)`` of the
embedding, where ``Vp = ceil(V / tp_size)``; rows past the vocabulary (only on
the last ranks) are zero padding.  A lookup zeroes the tokens another rank owns
and sums the partial results over the TP group.  ``ParallelLMHead`` is the same
table used as the output projection (see ``LogitsProcessor``); ``tie_weights``
shares the embedding's parameter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, params_dtype: Optional[torch.dtype] = None,
                 device: torch.device | str | None = None, tp_size: int = 1, tp_rank: int = 0, tp_group=None,
                 prefix: str = "") -> None:
        super().__init__()
        if tp_size > 1 and tp_group is None:
            raise ValueError(f"{prefix or type(self).__name__}: tp_size {tp_size} needs a tp_group")
        self.num_embeddings = num_embeddings  # the real vocabulary size
        self.embedding_dim = embedding_dim
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.tp_group = tp_group
        self.prefix = prefix
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start_index = tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.zeros(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype or torch.get_default_dtype(), device=device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        if loaded_shard_id is not None:
            raise ValueError(f"{self.prefix}: embeddings take no shard id (got {loaded_shard_id!r})")
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"{self.prefix or type(self).__name__}.weight: expected shape {expected}, "
                             f"got {tuple(loaded_weight.shape)}")
        n = self.vocab_end_index - self.vocab_start_index
        param.data[:n].copy_(loaded_weight[self.vocab_start_index:self.vocab_end_index])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local = torch.where(mine, input_ids - self.vocab_start_index, torch.zeros_like(input_ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp_group.all_reduce(out)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tp={self.tp_rank}/{self.tp_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [V, H] (sharded like the embedding); ``LogitsProcessor`` applies it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bias: bool = False, **kw) -> None:
        super().__init__(num_embeddings, embedding_dim, **kw)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.num_embeddings_per_partition, dtype=self.weight.dtype,
                                                 device=self.weight.device), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        n = self.vocab_end_index - self.vocab_start_index
        param.data[:n].copy_(loaded_weight[self.vocab_start_index:self.vocab_end_index])

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share ``embed_tokens``'s weight (tie_word_embeddings); the head then holds no weight of its own."""
        if embed_tokens.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie lm_head {tuple(self.weight.shape)} to embedding "
                             f"{tuple(embed_tokens.weight.shape)}")
        self.weight = embed_tokens.weight
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor(lm_head, hidden_states), not called")
