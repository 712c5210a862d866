"""Paged KV-cache block manager: which cache blocks each sequence holds.

The cache holds ``num_blocks`` blocks of ``block_size`` token slots. A sequence
holds the blocks in ``seq.block_table`` (in position order); token position p
lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Worked example (block_size 4): a 6-token prompt gets 2 blocks, say [7, 2];
positions 0..5 map to slots [28, 29, 30, 31, 8, 9]. After sampling token 7
(position 6) ``append_slot`` needs nothing (block 2 has room up to position 7);
the token at position 8 starts a third block.

Prefix caching (``enable_prefix_caching``): a full block whose K/V are computed is
registered under its hash (``vllm.core.prefix_cache``: the tokens so far and the
adapter). A later sequence with the same leading blocks takes the registered blocks
instead of computing them (``cached_blocks`` then ``allocate(seq, shared)``); a block
is then held by several sequences (ref count = its holders) and is never written
again (it is full). A block nobody holds any more goes back to the free pool: plain
blocks to ``_free``, registered ones to an LRU list (``_cached_free``) where they stay
reusable until a fresh block is needed and none is plain; then the least recently
freed one is evicted (its hash forgotten). Holders are tracked per block, so double
frees and blocks leaked by a finished sequence raise instead of silently corrupting
another sequence's cache.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional, Sequence as Seq

from vllm.core.prefix_cache import block_hashes
from vllm.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compute_slot_mapping(block_table: Seq[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat cache slots of token positions ``start..end-1`` (end exclusive)."""
    if not 0 <= start <= end <= len(block_table) * block_size:
        raise ValueError(f"positions {start}..{end} are outside the {len(block_table)} blocks "
                         f"(block_size {block_size}) of the block table")
    slots: list[int] = []
    for j in range(start // block_size, -(-end // block_size)):  # a range of slots per block
        base = block_table[j] * block_size - j * block_size
        slots += range(base + max(start, j * block_size), base + min(end, (j + 1) * block_size))
    return slots


class BlockManager:
    """Hands out KV-cache blocks to sequences and takes them back.

    Contract with the scheduler: before a step feeds a sequence's uncomputed
    tokens, the sequence holds blocks for all of its ``num_tokens`` positions
    (``allocate`` at prefill, ``append_slot`` before each decode); after the step,
    ``cache_computed`` registers its newly computed full blocks (prefix caching).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}; the KV cache has no room")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # free, holding no registered KV
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, registered; least recently freed first
        self._holders: dict[int, set[int]] = {}  # block id -> seq_ids holding it (ref count = size)
        self._hash_of: dict[int, bytes] = {}  # registered block -> its hash
        self._by_hash: dict[bytes, int] = {}  # hash -> registered block
        self._checked: dict[int, int] = {}  # seq_id -> leading blocks already considered for registration

    # ---- queries -----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (plain, and cached ones that may be evicted)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._holders)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._by_hash)

    @property
    def num_slots(self) -> int:
        """Token capacity of the whole cache."""
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def ref_count(self, block: int) -> int:
        return len(self._holders.get(block, ()))

    def _missing_blocks(self, seq: Sequence) -> int:
        return max(0, self.num_blocks_for(seq.num_tokens) - len(seq.block_table))

    def cached_blocks(self, seq: Sequence, max_blocks: int) -> list[int]:
        """The registered blocks holding the first full blocks of ``seq``, at most ``max_blocks``
        (stops at the first miss); [] without prefix caching. Changes nothing."""
        if not self.enable_prefix_caching or max_blocks <= 0:
            return []
        hits = []
        for h in block_hashes(seq, self.block_size, min(max_blocks, seq.num_tokens // self.block_size)):
            block = self._by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, shared: Seq[int] = ()) -> bool:
        """Whether ``allocate(seq, shared)`` would find its fresh blocks free now."""
        from_pool = self.num_blocks_for(seq.num_tokens) - len(shared)
        from_pool += sum(1 for b in shared if b in self._cached_free)  # reusing those takes them from the pool
        return from_pool <= self.num_free_blocks

    def can_append_slot(self, seq: Sequence) -> bool:
        """Whether the block for position ``num_tokens - 1`` exists or is free."""
        return self._missing_blocks(seq) <= self.num_free_blocks

    # ---- changes -----------------------------------------------------------
    def _hold(self, seq: Sequence, block: int) -> None:
        holders = self._holders.setdefault(block, set())
        if seq.seq_id in holders:
            raise RuntimeError(f"{seq!r} would hold block {block} twice")
        holders.add(seq.seq_id)
        seq.block_table.append(block)

    def _take(self, seq: Sequence, count: int) -> None:
        if count > self.num_free_blocks:
            raise RuntimeError(f"out of KV-cache blocks: {seq!r} needs {count}, {self.num_free_blocks} are free; "
                               "check can_allocate / can_append_slot first")
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently freed cached block
                block, _ = self._cached_free.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._hold(seq, block)

    def allocate(self, seq: Sequence, shared: Seq[int] = ()) -> None:
        """Give ``seq`` blocks for its whole current token count (prefill): first the blocks
        ``shared`` (its leading full blocks, computed or being computed by another holder:
        ``cached_blocks``), then fresh ones."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already owns blocks {seq.block_table}; free it before allocating again")
        if len(shared) * self.block_size > seq.num_tokens:
            raise ValueError(f"{len(shared)} shared blocks are more than the {seq.num_tokens} tokens of {seq!r} fill")
        if not self.can_allocate(seq, shared):
            raise RuntimeError(f"out of KV-cache blocks for {seq!r}; check can_allocate first")
        for block in shared:
            if block in self._cached_free:
                del self._cached_free[block]
            elif block not in self._holders:
                raise RuntimeError(f"block {block} shared with {seq!r} is neither held nor cached")
            self._hold(seq, block)
        self._checked[seq.seq_id] = len(shared)
        self._take(seq, self.num_blocks_for(seq.num_tokens) - len(shared))

    def append_slot(self, seq: Sequence, num_tokens: Optional[int] = None) -> None:
        """Make sure ``seq`` holds the block of position ``num_tokens - 1`` (decode; default: its
        current ``num_tokens``; async scheduling reserves the position of a token not sampled yet).

        Takes a new block only when that position starts one."""
        if not seq.block_table:
            raise RuntimeError(f"{seq!r} holds no blocks; allocate it (prefill) before appending slots")
        wanted = seq.num_tokens if num_tokens is None else num_tokens
        self._take(seq, max(0, self.num_blocks_for(wanted) - len(seq.block_table)))

    def cache_computed(self, seq: Sequence) -> None:
        """Register the full blocks of ``seq`` whose K/V are all computed (its first
        ``num_computed_tokens``), so that later sequences can reuse them. A block whose
        hash another block already holds stays a plain block."""
        if not self.enable_prefix_caching:
            return
        done = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = self._checked.get(seq.seq_id, 0)
        if done <= first:
            return
        hashes = block_hashes(seq, self.block_size, done)
        for i in range(first, done):
            block, h = seq.block_table[i], hashes[i]
            if block not in self._hash_of and h not in self._by_hash:
                self._hash_of[block] = h
                self._by_hash[h] = block
        self._checked[seq.seq_id] = done

    def free(self, seq: Sequence) -> None:
        """Release all blocks of ``seq`` and clear its block table (no-op when empty).

        Blocks nobody holds any more become free: registered ones join the LRU end of the
        cached list last block first (a prefix's tail is evicted before its head)."""
        for block in seq.block_table:
            holders = self._holders.get(block)
            if holders is None or seq.seq_id not in holders:
                what = "is already free" if not holders else f"belongs to seq {', '.join(map(str, sorted(holders)))}"
                raise RuntimeError(f"double free: block {block} of {seq!r} {what}")
        for block in reversed(seq.block_table):
            holders = self._holders[block]
            holders.discard(seq.seq_id)
            if holders:
                continue
            del self._holders[block]
            if block in self._hash_of:
                self._cached_free[block] = None
            else:
                self._free.append(block)
        self._checked.pop(seq.seq_id, None)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (held ones stay held, as plain blocks)."""
        self._free.extend(self._cached_free)
        self._cached_free.clear()
        self._hash_of.clear()
        self._by_hash.clear()

    # ---- slot mapping ------------------------------------------------------
    def get_slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token ``position`` of ``seq``."""
        return compute_slot_mapping(seq.block_table, self.block_size, position, position + 1)[0]

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Slots of positions ``start..end-1`` of ``seq`` (e.g. a step's new tokens:
        ``start = seq.num_computed_tokens``, ``end = seq.num_tokens``)."""
        return compute_slot_mapping(seq.block_table, self.block_size, start, end)

    def check_no_leaks(self) -> None:
        """Raise when any block is still held (call when no sequence is live)."""
        if self._holders or self.num_free_blocks != self.num_blocks:
            holders = sorted(set().union(*self._holders.values())) if self._holders else []
            raise RuntimeError(f"{len(self._holders)} KV-cache blocks are still held by seqs {holders}")
