"""BlockManager: allocation, appending across block boundaries, frees, leaks, slots."""
import pytest

from vllm.core.block_manager import BlockManager, compute_slot_mapping
from vllm.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, f"req{seq_id}", list(range(1, num_tokens + 1)))


def test_allocate_takes_blocks_for_all_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(0, 9)  # 9 tokens -> 3 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 3
    with pytest.raises(RuntimeError, match="already owns blocks"):
        bm.allocate(seq)


def test_can_allocate_exact_fit_and_one_over():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.can_allocate(make_seq(0, 8))
    assert not bm.can_allocate(make_seq(1, 9))


def test_append_slot_only_at_block_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(0, 4)
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    # The 5th token (position 4) starts a new block.
    seq.append_token_id(99)
    assert bm.can_append_slot(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    # Positions 5, 6, 7 fit in the second block.
    for t in range(3):
        seq.append_token_id(100 + t)
        bm.append_slot(seq)
        assert len(seq.block_table) == 2
    seq.append_token_id(200)  # position 8
    bm.append_slot(seq)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 1


def test_can_append_slot_false_when_full():
    bm = BlockManager(num_blocks=1, block_size=2)
    seq = make_seq(0, 2)
    bm.allocate(seq)
    seq.append_token_id(5)
    assert not bm.can_append_slot(seq)
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.append_slot(seq)


def test_append_without_allocate_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="allocate it"):
        bm.append_slot(make_seq(0, 3))


def test_free_returns_blocks_and_guards_double_free():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(0, 5), make_seq(1, 3)
    bm.allocate(a)
    bm.allocate(b)
    stolen = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.free(a)  # empty table: no-op
    a.block_table = stolen  # a stale copy of the freed table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(a)
    a.block_table = [b.block_table[0]]  # someone else's block
    with pytest.raises(RuntimeError, match="belongs to seq 1"):
        bm.free(a)
    a.block_table = []
    bm.free(b)
    bm.check_no_leaks()


def test_check_no_leaks_reports_owner():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate(make_seq(7, 3))
    with pytest.raises(RuntimeError, match=r"seqs \[7\]"):
        bm.check_no_leaks()


def test_slot_mapping_exact():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, 6)
    seq.block_table = [7, 2]  # hand-made table (the docstring's worked example)
    assert bm.slot_mapping(seq, 0, 6) == [28, 29, 30, 31, 8, 9]
    assert bm.get_slot(seq, 5) == 9
    assert bm.slot_mapping(seq, 4, 4) == []
    assert compute_slot_mapping([3], 1, 0, 1) == [3]
    with pytest.raises(ValueError, match="outside"):
        bm.slot_mapping(seq, 0, 9)


def test_slots_of_live_sequences_never_overlap():
    bm = BlockManager(num_blocks=16, block_size=3)
    seqs = [make_seq(i, n) for i, n in enumerate([1, 3, 4, 7, 10])]
    for s in seqs:
        bm.allocate(s)
    slots = [x for s in seqs for x in bm.slot_mapping(s, 0, s.num_tokens)]
    assert len(slots) == len(set(slots)) == sum(s.num_tokens for s in seqs)
    assert all(0 <= x < bm.num_slots for x in slots)
    for s in seqs:
        bm.free(s)
    bm.check_no_leaks()


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_slot_mapping_matches_a_per_position_reference():
    """Random block tables, block sizes and ranges (empty, inside one block, across many, to the end)."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        bs = rng.choice([1, 2, 4, 16])
        table = rng.sample(range(64), rng.randint(1, 9))
        end = rng.randint(0, len(table) * bs)
        start = rng.randint(0, end)
        want = [table[p // bs] * bs + p % bs for p in range(start, end)]
        assert compute_slot_mapping(table, bs, start, end) == want, (table, bs, start, end)
