"""Prefix caching in the BlockManager: hashes, ref counts, the LRU list of free cached blocks,
and a random walk checked against a fake KV store (what each slot would hold)."""
import hashlib
import random
import struct

import pytest

from vllm.core.block_manager import BlockManager
from vllm.core.prefix_cache import block_hashes, hash_block
from vllm.sequence import Sequence, adapter_cache_key

BS = 4


def make_seq(seq_id: int, tokens: list[int], cache_key: str = "") -> Sequence:
    return Sequence(seq_id, f"req{seq_id}", tokens, cache_key=cache_key)


def computed(bm: BlockManager, seq: Sequence) -> None:
    """As after a step that fed all of ``seq``'s tokens."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed(seq)


def test_hash_chain_matches_a_hand_computed_sha256():
    toks = list(range(100, 112))
    seq = make_seq(0, toks, cache_key="k")
    parent = b""
    for i, h in enumerate(block_hashes(seq, BS, 3)):
        body = struct.pack("<Q", 1) + b"k" + b"".join(struct.pack("<q", t) for t in toks[i * BS:(i + 1) * BS])
        parent = hashlib.sha256(parent + body).digest()
        assert h == parent
    assert len(seq.block_hashes) == 3
    with pytest.raises(ValueError, match="full blocks"):
        block_hashes(seq, BS, 4)


def test_hashes_depend_on_the_adapter_and_on_every_earlier_token():
    toks = list(range(12))
    base = block_hashes(make_seq(0, toks), BS, 3)
    assert block_hashes(make_seq(1, toks), BS, 3) == base
    a1 = adapter_cache_key(type("R", (), {"lora_int_id": 1, "lora_name": "a", "lora_path": "/p"})())
    a1_reloaded = adapter_cache_key(type("R", (), {"lora_int_id": 1, "lora_name": "a", "lora_path": "/p"})(), 2)
    for key in (a1, a1_reloaded):
        assert set(block_hashes(make_seq(2, toks, key), BS, 3)).isdisjoint(base)
    reloaded = block_hashes(make_seq(4, toks, a1_reloaded), BS, 3)
    assert set(block_hashes(make_seq(3, toks, a1), BS, 3)).isdisjoint(reloaded)
    changed = block_hashes(make_seq(5, [99] + toks[1:]), BS, 3)  # first token differs: every block differs
    assert all(x != y for x, y in zip(changed, base))
    assert hash_block(None, "", [1, 2]) != hash_block(None, "", [2, 1])


def test_reuse_ref_counts_and_frees():
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    a = make_seq(0, list(range(10)))  # 2 full blocks + 2 tokens
    bm.allocate(a)
    assert bm.cached_blocks(a, 9) == []  # nothing registered before it is computed
    computed(bm, a)
    assert bm.num_cached_blocks == 2  # the partial third block is not registered
    b = make_seq(1, list(range(8)) + [50, 51, 52])
    hits = bm.cached_blocks(b, (b.num_tokens - 1) // BS)
    assert hits == a.block_table[:2]
    assert bm.can_allocate(b, hits)
    bm.allocate(b, hits)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 6
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1] and bm.num_free_blocks == 7
    with pytest.raises(RuntimeError, match="double free"):
        a.block_table = [b.block_table[0]]
        bm.free(a)
    a.block_table = []
    bm.free(b)
    bm.check_no_leaks()
    assert bm.num_cached_blocks == 2  # free, still reusable
    c = make_seq(2, list(range(8)) + [7])
    hits = bm.cached_blocks(c, 2)
    assert len(hits) == 2
    bm.allocate(c, hits)
    assert bm.num_free_blocks == 7  # the two cached blocks left the pool, one fresh block taken


def test_can_allocate_counts_reused_free_blocks_against_the_pool():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = make_seq(0, list(range(8)))
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)  # 2 cached free blocks + 1 plain
    b = make_seq(1, list(range(8)) + [1, 2, 3, 4, 5])  # 4 blocks, 2 of them cached
    hits = bm.cached_blocks(b, 3)
    assert len(hits) == 2 and not bm.can_allocate(b, hits)
    c = make_seq(2, list(range(8)) + [1, 2, 3])  # 3 blocks, 2 cached: fits exactly
    assert bm.can_allocate(c, bm.cached_blocks(c, 2))
    bm.allocate(c, bm.cached_blocks(c, 2))
    assert bm.num_free_blocks == 0


def test_lru_eviction_order():
    """Fresh blocks come from plain free blocks first, then evict cached ones least recently
    freed first, and a freed sequence's tail before its head."""
    bm = BlockManager(7, BS, enable_prefix_caching=True)
    seqs = [make_seq(i, [100 * i + t for t in range(8)]) for i in range(3)]  # 2 blocks each: 6 used, 1 plain
    for s in seqs:
        bm.allocate(s)
        computed(bm, s)
    tables = [list(s.block_table) for s in seqs]
    for i in (0, 2, 1):  # free order: A, C, B
        bm.free(seqs[i])
    want = [tables[0][1], tables[0][0], tables[2][1], tables[2][0], tables[1][1], tables[1][0]]
    taken = []
    for j in range(7):
        s = make_seq(10 + j, [7000 + j])
        bm.allocate(s)
        taken.append(s.block_table[0])
        # what is still cached of each prompt: a prefix ends at the first evicted block
        alive = [len(bm.cached_blocks(make_seq(99, [100 * i + t for t in range(8)] + [0]), 2)) for i in range(3)]
        if j == 0:
            assert alive == [2, 2, 2]
    assert taken[0] not in sum(tables, []) and taken[1:] == want
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0


def test_hit_moves_a_block_out_of_the_lru_and_refreeing_renews_it():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a, b = make_seq(0, list(range(4))), make_seq(1, list(range(10, 14)))
    for s in (a, b):
        bm.allocate(s)
        computed(bm, s)
    block_a, block_b = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)  # LRU: a, b
    again = make_seq(2, list(range(4)) + [9])
    bm.allocate(again, bm.cached_blocks(again, 1))
    bm.free(again)  # a's block is now the most recently freed: b goes first
    fresh = [make_seq(3 + i, [1]) for i in range(4)]
    for s in fresh:
        bm.allocate(s)
    assert [s.block_table[0] for s in fresh][-2:] == [block_b, block_a]


def test_duplicate_blocks_stay_plain_and_caching_off_registers_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = make_seq(0, list(range(8))), make_seq(1, list(range(8)))  # computed side by side, same tokens
    bm.allocate(a)
    bm.allocate(b)
    computed(bm, a)
    computed(bm, b)
    assert bm.num_cached_blocks == 2 and bm.cached_blocks(make_seq(2, list(range(9))), 2) == a.block_table
    bm.free(a)
    bm.free(b)
    bm.check_no_leaks()
    off = BlockManager(8, BS)
    c = make_seq(3, list(range(8)))
    off.allocate(c)
    computed(off, c)
    assert off.num_cached_blocks == 0 and off.cached_blocks(make_seq(4, list(range(9))), 2) == []


@pytest.mark.parametrize("seed", range(4))
def test_random_walk_against_a_fake_kv_store(seed):
    """Sequences of a few shared prefixes and adapters come and go, decode, get freed; every slot
    of a fake KV store holds what the model would write there (adapter, tokens up to it).  Whatever
    a sequence reuses must hold exactly what it would have computed."""
    rng = random.Random(seed)
    bm = BlockManager(24, BS, enable_prefix_caching=True)
    store: dict[int, tuple] = {}
    tail = [rng.randrange(50) for _ in range(2 * BS)]  # same later blocks after different first blocks
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(2)]
    prefixes += [[rng.randrange(50) for _ in range(BS)] + tail for _ in range(2)]
    live: list[Sequence] = []

    def write(seq: Sequence, start: int) -> None:
        for p in range(start, seq.num_tokens):
            store[bm.get_slot(seq, p)] = (seq.cache_key, tuple(seq.token_ids[:p + 1]))

    def check(seq: Sequence, upto: int) -> None:
        for p in range(upto):
            assert store.get(bm.get_slot(seq, p)) == (seq.cache_key, tuple(seq.token_ids[:p + 1])), (seq, p)

    for step in range(300):
        op = rng.random()
        if op < 0.4 or not live:
            toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            seq = make_seq(step, toks or [1], cache_key=rng.choice(["", "a", "b"]))
            hits = bm.cached_blocks(seq, (seq.num_tokens - 1) // BS)
            if not bm.can_allocate(seq, hits):
                continue
            bm.allocate(seq, hits)
            check(seq, len(hits) * BS)  # reused KV is what this sequence would compute
            write(seq, len(hits) * BS)
            computed(bm, seq)
            live.append(seq)
        elif op < 0.8:
            seq = rng.choice(live)
            if seq.num_tokens % BS == 0 and bm.num_free_blocks == 0:
                continue  # the next token would need a block
            seq.append_token_id(rng.randrange(50))
            assert bm.can_append_slot(seq)
            bm.append_slot(seq)
            write(seq, seq.num_tokens - 1)
            computed(bm, seq)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        held = set().union(*(s.block_table for s in live)) if live else set()
        assert bm.num_used_blocks == len(held) and bm.num_free_blocks == 24 - len(held)
        for s in live:
            check(s, s.num_tokens)  # nobody overwrote a block another sequence holds
    for s in live:
        bm.free(s)
    bm.check_no_leaks()


def test_reset_forgets_cached_blocks_and_keeps_held_ones():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    a, b = make_seq(0, list(range(8))), make_seq(1, list(range(20, 28)))
    for s in (a, b):
        bm.allocate(s)
        computed(bm, s)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 4 and bm.num_used_blocks == 2
    assert bm.cached_blocks(make_seq(2, list(range(9))), 2) == []
    b.append_token_id(5)
    bm.append_slot(b)
    computed(bm, b)  # its earlier blocks are not registered again
    assert bm.num_cached_blocks == 0
    bm.free(b)
    bm.check_no_leaks()
