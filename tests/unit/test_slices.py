"""``slice_offsets``: the one rule for where LoRA slices' output columns start."""
from __future__ import annotations

import random

import pytest

from vllm.lora.ops.slices import slice_offsets


def test_packed_slices_start_after_the_previous_ones():
    rng = random.Random(0)
    for _ in range(20):
        widths = [rng.randrange(0, 300) for _ in range(rng.randrange(1, 5))]
        start = rng.randrange(0, 100)
        expect = [start + sum(widths[:s]) for s in range(len(widths))]
        assert slice_offsets(widths, None, start) == expect
    assert slice_offsets([3, 5]) == [0, 3]


def test_given_offsets_win_and_must_match_the_slices():
    assert slice_offsets([4, 4], [10, 2], offset_start=7) == [10, 2]
    with pytest.raises(ValueError, match="3 output offsets for 2 slices"):
        slice_offsets([4, 4], [0, 4, 8])


def test_the_moe_lora_torch_columns_use_it():
    from vllm.lora.ops.torch_ops.moe_lora import _columns

    assert _columns([8, 6, 6], 5, None) == [5, 13, 19]
    assert _columns([8, 6, 6], 5, 10) == [5, 15, 25]  # slices a fixed stride apart
