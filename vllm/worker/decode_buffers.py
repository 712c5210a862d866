"""``DecodeBuffers``: the static inputs that captured decode steps read (see ``cuda_graphs.py``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vllm.attention.metadata import AttentionMetadata


class DecodeBuffers:
    """Static inputs of captured decode steps, for batches of up to ``max_size`` sequences.

    For a padded size p the graph reads: ``ids`` [p] / ``positions`` [p] /
    ``slots`` [p] (int64, packed in one buffer so that one copy fills them),
    ``seq_lens`` [p] int32, ``block_tables`` [p, max_blocks] int32 and the
    constant ``query_start_loc`` [p + 1] = 0..p.
    """

    def __init__(self, max_size: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.max_size, self.max_blocks, self.block_size = max_size, max_blocks, block_size
        self.device = torch.device(device)
        self._i64: Optional[torch.Tensor] = None

    def allocate(self) -> None:
        dev, p = self.device, self.max_size
        self._i64 = torch.zeros(3 * p, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(p, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(p, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(p + 1, dtype=torch.int32, device=dev)
        self.fill_dummy(p)

    def views(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, positions, slot mapping) of size p: consecutive slices of one buffer."""
        assert self._i64 is not None, "call allocate() first"
        return self._i64[:p], self._i64[p:2 * p], self._i64[2 * p:3 * p]

    def metadata(self, p: int, seq_lens_cpu: Optional[list[int]] = None) -> AttentionMetadata:
        """Attention metadata over the buffers for size p.  The host lengths are placeholders
        (1) unless given: the Triton backend reads lengths from the device only."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:p + 1], seq_lens=self.seq_lens[:p],
            slot_mapping=self.views(p)[2], block_tables=self.block_tables[:p],
            query_lens_cpu=[1] * p, seq_lens_cpu=list(seq_lens_cpu) if seq_lens_cpu else [1] * p,
            block_size=self.block_size)

    def fill_dummy(self, p: int) -> None:
        """Inputs for capturing size p: token 0 at position 0, slot -1 (no KV write), seq_len 1."""
        self.prepare([0] * 0, [], [], [], [], p)

    def prepare(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
                seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], p: int) -> None:
        """Copy one decode step of n <= p sequences into the buffers of size p; rows n..p-1 are padding."""
        n = len(input_ids)
        if not (len(positions) == len(slot_mapping) == len(seq_lens) == len(block_tables) == n) or n > p:
            raise ValueError(f"a decode step of {n} sequences needs one position, slot, seq_len and block table "
                             f"each, and at most {p} sequences")
        pad = p - n
        flat = torch.tensor([*input_ids, *[0] * pad, *positions, *[0] * pad, *slot_mapping, *[-1] * pad],
                            dtype=torch.int64)
        self._i64[:3 * p].copy_(flat, non_blocking=True)
        self.seq_lens[:p].copy_(torch.tensor([*seq_lens, *[1] * pad], dtype=torch.int32), non_blocking=True)
        if n:
            width = max(len(bt) for bt in block_tables)
            if width > self.max_blocks:
                raise ValueError(f"a block table of {width} blocks exceeds the {self.max_blocks} the graphs were "
                                 "captured for")
            if width:
                tables = torch.tensor([[*bt, *[0] * (width - len(bt))] for bt in block_tables], dtype=torch.int32)
                # Entries past a row's seq_len are never read; padding rows read entry 0, a valid block.
                self.block_tables[:n, :width].copy_(tables, non_blocking=True)
