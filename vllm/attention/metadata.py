"""Attention metadata of one step over a paged KV cache.

A step runs T new tokens from B sequences, flattened in sequence order.  For
sequence b, its new tokens are rows ``query_start_loc[b]:query_start_loc[b+1]``
and are the last ``query_len`` tokens of its ``seq_len`` tokens of context, so
query row i of b sits at position ``seq_len - query_len + i`` and attends to
positions ``0..`` that position (causal).  A prefill has query_len == seq_len
(or less when part of the prompt is already cached); a decode step has
query_len == 1.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values).  Token position p of sequence b lives in block
``block_tables[b, p // block_size]`` at offset ``p % block_size``; its flat slot
is ``block * block_size + offset``, which is what ``slot_mapping`` holds for the
new tokens (-1: do not store, e.g. padding rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vllm.platforms.host_copy import to_device


@dataclass
class AttentionMetadata:
    """query_start_loc: [B+1] int32; seq_lens: [B] int32; slot_mapping: [T] int64;
    block_tables: [B, max_blocks] int32 (unused entries 0); host copies of the
    lengths for the torch backend's loop."""

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


def build_metadata(query_lens: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                   block_size: int, device: torch.device | str,
                   slot_mapping: Optional[Sequence[int]] = None) -> AttentionMetadata:
    """Metadata from plain lists (the model runner and tests both use this).

    ``slot_mapping`` defaults to the slots of each sequence's last query_len positions.
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    for q, s, bt in zip(query_lens, seq_lens, block_tables):
        if not 0 < q <= s:
            raise ValueError(f"query_len {q} must be in 1..seq_len ({s})")
        if len(bt) * block_size < s:
            raise ValueError(f"block table of {len(bt)} blocks is too short for {s} tokens (block_size {block_size})")
    if slot_mapping is None:
        slot_mapping = [bt[p // block_size] * block_size + p % block_size
                        for q, s, bt in zip(query_lens, seq_lens, block_tables) for p in range(s - q, s)]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    width = max(1, max((len(bt) for bt in block_tables), default=0))
    # one padded list -> one tensor (a tensor per row cost ~1 ms per step at 64 sequences)
    tables = torch.tensor([list(bt) + [0] * (width - len(bt)) for bt in block_tables], dtype=torch.int32)
    tables = tables.view(len(block_tables), width)
    dev = torch.device(device)
    return AttentionMetadata(
        query_start_loc=to_device(starts, torch.int32, dev),
        seq_lens=to_device(list(seq_lens), torch.int32, dev),
        slot_mapping=to_device(list(slot_mapping), torch.int64, dev),
        block_tables=to_device(tables, torch.int32, dev),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens), block_size=block_size)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """One layer's cache: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
