"""Paged KV-cache block manager: which cache blocks each sequence owns.

The cache holds ``num_blocks`` blocks of ``block_size`` token slots. A sequence
owns the blocks in ``seq.block_table`` (in position order); token position p
lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Worked example (block_size 4): a 6-token prompt gets 2 blocks, say [7, 2];
positions 0..5 map to slots [28, 29, 30, 31, 8, 9]. After sampling token 7
(position 6) ``append_slot`` needs nothing (block 2 has room up to position 7);
the token at position 8 starts a third block.

No prefix caching: every block has exactly one owner. Ownership is tracked so
that double frees and blocks leaked by a finished sequence raise instead of
silently corrupting another sequence's cache.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence as Seq

from vllm.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compute_slot_mapping(block_table: Seq[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat cache slots of token positions ``start..end-1`` (end exclusive)."""
    if not 0 <= start <= end <= len(block_table) * block_size:
        raise ValueError(f"positions {start}..{end} are outside the {len(block_table)} blocks "
                         f"(block_size {block_size}) of the block table")
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class BlockManager:
    """Hands out KV-cache blocks to sequences and takes them back.

    Contract with the scheduler: before a step feeds a sequence's uncomputed
    tokens, the sequence owns blocks for all of its ``num_tokens`` positions
    (``allocate`` at prefill, ``append_slot`` before each decode).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}; the KV cache has no room")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}  # block id -> seq_id

    # ---- queries -----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owner)

    @property
    def num_slots(self) -> int:
        """Token capacity of the whole cache."""
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _missing_blocks(self, seq: Sequence) -> int:
        return max(0, self.num_blocks_for(seq.num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all ``seq.num_tokens`` positions are free now."""
        return self.num_blocks_for(seq.num_tokens) <= len(self._free)

    def can_append_slot(self, seq: Sequence) -> bool:
        """Whether the block for position ``num_tokens - 1`` exists or is free."""
        return self._missing_blocks(seq) <= len(self._free)

    # ---- changes -----------------------------------------------------------
    def _take(self, seq: Sequence, count: int) -> None:
        if count > len(self._free):
            raise RuntimeError(f"out of KV-cache blocks: {seq!r} needs {count}, {len(self._free)} are free; "
                               "check can_allocate / can_append_slot first")
        for _ in range(count):
            block = self._free.popleft()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for its whole current token count (prefill)."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already owns blocks {seq.block_table}; free it before allocating again")
        self._take(seq, self.num_blocks_for(seq.num_tokens))

    def append_slot(self, seq: Sequence) -> None:
        """Make sure ``seq`` owns the block of position ``num_tokens - 1`` (decode).

        Takes a new block only when that position starts one."""
        if not seq.block_table:
            raise RuntimeError(f"{seq!r} owns no blocks; allocate it (prefill) before appending slots")
        self._take(seq, self._missing_blocks(seq))

    def free(self, seq: Sequence) -> None:
        """Return all blocks of ``seq`` and clear its block table (no-op when empty)."""
        for block in seq.block_table:
            owner = self._owner.get(block)
            if owner != seq.seq_id:
                what = "is already free" if owner is None else f"belongs to seq {owner}"
                raise RuntimeError(f"double free: block {block} of {seq!r} {what}")
        for block in seq.block_table:
            del self._owner[block]
            self._free.append(block)
        seq.block_table = []

    # ---- slot mapping ------------------------------------------------------
    def get_slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token ``position`` of ``seq``."""
        return compute_slot_mapping(seq.block_table, self.block_size, position, position + 1)[0]

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Slots of positions ``start..end-1`` of ``seq`` (e.g. a step's new tokens:
        ``start = seq.num_computed_tokens``, ``end = seq.num_tokens``)."""
        return compute_slot_mapping(seq.block_table, self.block_size, start, end)

    def check_no_leaks(self) -> None:
        """Raise when any block is still owned (call when no sequence is live)."""
        if self._owner or len(self._free) != self.num_blocks:
            owners = sorted(set(self._owner.values()))
            raise RuntimeError(f"{len(self._owner)} KV-cache blocks are still owned by seqs {owners}")
