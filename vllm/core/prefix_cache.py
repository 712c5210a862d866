"""Prefix-cache block hashes: which full KV block holds which tokens under which adapter.

The K/V of a token depend on every token before it and on the adapter (LoRA changes
the layers' outputs, hence the keys and values of the layers after them). So the hash
of full block i of a sequence chains:

    hash_i = sha256(hash_{i-1} | len(cache_key) | cache_key | token ids of block i)

with ``hash_{-1}`` empty and ``cache_key`` the sequence's ``Sequence.cache_key``: '' for
the base model, else the adapter's id, name, path and load generation
(``LoRARegistry.cache_key``), so KV computed under one adapter is never reused for
another, nor for a later load of different weights under the same id and path.
Two blocks with equal hashes hold the same tokens after the same prefix under the
same adapter: their K/V are the same, and one can stand for the other.

The encoding is fixed (little-endian 64-bit token ids, UTF-8 key), so a hash does not
depend on the process; SHA-256 makes accidental collisions negligible.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Optional, Sequence as Seq

from vllm.sequence import Sequence


def hash_block(parent: Optional[bytes], cache_key: str, token_ids: Seq[int]) -> bytes:
    """The hash of one full block of ``token_ids`` after the block hashed ``parent`` (None: the first)."""
    key = cache_key.encode("utf-8")
    h = hashlib.sha256()
    h.update(parent or b"")
    h.update(struct.pack("<Q", len(key)))
    h.update(key)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> list[bytes]:
    """The hashes of the first ``num_blocks`` full blocks of ``seq`` (computed once, kept in
    ``seq.block_hashes``). ``num_blocks`` must not exceed ``seq.num_tokens // block_size``."""
    if num_blocks * block_size > seq.num_tokens:
        raise ValueError(f"{seq!r} has {seq.num_tokens} tokens: fewer than {num_blocks} full blocks "
                         f"of {block_size}")
    hashes = seq.block_hashes
    tokens = seq.token_ids
    while len(hashes) < num_blocks:
        i = len(hashes)
        hashes.append(hash_block(hashes[-1] if hashes else None, seq.cache_key,
                                 tokens[i * block_size:(i + 1) * block_size]))
    return hashes[:num_blocks]
