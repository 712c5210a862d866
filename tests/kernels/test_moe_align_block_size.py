"""moe_align_block_size: exact match with the loop reference, plus properties
checked independently of the reference (every pair once, in a block of its own
expert; padding is the sentinel; the padded length; blocks ordered by expert)."""
from __future__ import annotations

import pytest
import torch

from tests.utils import random_expert, random_topk_ids
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (
    max_num_tokens_padded,
    moe_align_block_size,
    moe_align_block_size_reference,
)

TOKENS = [0, 1, 7, 33, 300]
EXPERTS = [1, 5, 64]
TOP_K = [1, 2, 8]
BLOCK_SIZES = [1, 16, 64]


def make_topk_ids(num_tokens: int, num_experts: int, top_k: int, *, drop: float = 0.1,
                  empty_expert: bool = True) -> torch.Tensor:
    """Random routing [num_tokens, top_k]: distinct experts per token when top_k allows,
    about ``drop`` of the pairs set to -1, and (``empty_expert``, E >= 2) one expert, drawn at
    random, left without tokens; every other expert gets a pair as far as the pairs allow."""
    empty = (random_expert(num_experts),) if empty_expert and num_experts >= 2 else ()
    if top_k <= num_experts - len(empty):
        return random_topk_ids(num_tokens, num_experts, top_k, empty=empty, drop=drop)
    ids = torch.randint(0, num_experts, (num_tokens, top_k))
    for e in empty:
        ids[ids == e] = -1
    ids[torch.rand(ids.shape) < drop] = -1
    return ids.to(torch.int32)


def check_properties(ids: torch.Tensor, res, block_size: int, num_experts: int) -> None:
    flat = ids.reshape(-1).long().cpu()
    numel = flat.numel()
    sorted_ids = res.sorted_token_ids.long().cpu()
    blocks = res.block_expert_ids.long().cpu()
    ntp = int(res.num_tokens_post_padded.item())
    assert res.numel == numel and res.block_size == block_size

    # Buffer sizes: the documented worst case, one expert id per block.
    assert sorted_ids.numel() == max_num_tokens_padded(numel, num_experts, block_size)
    assert sorted_ids.numel() % block_size == 0
    assert blocks.numel() == sorted_ids.numel() // block_size

    # Padded length: sum over experts of ceil(count / bs) * bs.
    routed = flat[flat >= 0]
    counts = torch.bincount(routed, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    assert ntp == int(padded.sum())
    assert torch.equal(res.group_padded_counts.long().cpu(), padded)

    # Past the end: sentinel ids and -1 blocks.
    assert (sorted_ids[ntp:] == numel).all()
    assert (blocks[ntp // block_size:] == -1).all()

    # Every routed pair exactly once; dropped pairs never; the rest is sentinel.
    used = sorted_ids[:ntp]
    real = used[used != numel]
    assert real.numel() == routed.numel()
    assert torch.equal(torch.sort(real).values, (flat >= 0).nonzero().flatten())

    # Each pair sits in a block of its own expert; blocks are ordered by expert.
    live_blocks = blocks[: ntp // block_size]
    assert ((live_blocks >= 0) & (live_blocks < num_experts)).all()
    assert (live_blocks[1:] >= live_blocks[:-1]).all()
    owner = live_blocks.repeat_interleave(block_size)
    is_real = used != numel
    assert torch.equal(flat[used[is_real]], owner[is_real])
    for e in range(num_experts):
        assert int((live_blocks == e).sum()) == int(padded[e]) // block_size
        members = used[(owner == e) & is_real]
        assert (members[1:] > members[:-1]).all(), "a group must keep the pairs' original order"


def assert_same(res, ref) -> None:
    assert torch.equal(res.sorted_token_ids.cpu(), ref.sorted_token_ids)
    assert torch.equal(res.block_expert_ids.cpu(), ref.block_expert_ids)
    assert torch.equal(res.num_tokens_post_padded.cpu(), ref.num_tokens_post_padded)
    assert torch.equal(res.group_padded_counts.cpu(), ref.group_padded_counts)
    assert res.block_size == ref.block_size and res.numel == ref.numel
    for t in (res.sorted_token_ids, res.block_expert_ids, res.num_tokens_post_padded, res.group_padded_counts):
        assert t.dtype == torch.int32


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_matches_reference(num_tokens, num_experts, top_k, block_size, device):
    ids = make_topk_ids(num_tokens, num_experts, top_k)
    res = moe_align_block_size(ids.to(device), block_size, num_experts)
    assert res.sorted_token_ids.device.type == device.type
    assert_same(res, moe_align_block_size_reference(ids, block_size, num_experts))
    check_properties(ids, res, block_size, num_experts)


@pytest.mark.parametrize("block_size", [1, 16])
def test_docstring_example(block_size, device):
    ids = torch.tensor([[2, 0], [0, 1], [2, -1]], dtype=torch.int32, device=device)
    res = moe_align_block_size(ids, 4, 3)
    assert res.sorted_token_ids[:12].tolist() == [1, 2, 6, 6, 3, 6, 6, 6, 0, 4, 6, 6]
    assert res.block_expert_ids[:4].tolist() == [0, 1, 2, -1]
    assert res.num_tokens_post_padded.tolist() == [12]
    check_properties(ids, moe_align_block_size(ids, block_size, 3), block_size, 3)


@pytest.mark.parametrize("num_experts", [1, 8])
def test_all_pairs_dropped(num_experts, device):
    ids = torch.full((5, 2), -1, dtype=torch.int32, device=device)
    res = moe_align_block_size(ids, 16, num_experts)
    assert int(res.num_tokens_post_padded.item()) == 0
    assert (res.block_expert_ids == -1).all() and (res.sorted_token_ids == 10).all()
    assert_same(res, moe_align_block_size_reference(ids.cpu(), 16, num_experts))


def test_skewed_routing(device):
    """Everything on the last expert, plus one pair on the first."""
    ids = torch.full((40, 2), 7, dtype=torch.int32)
    ids[3, 1] = 0
    res = moe_align_block_size(ids.to(device), 16, 8)
    assert_same(res, moe_align_block_size_reference(ids, 16, 8))
    check_properties(ids, res, 16, 8)


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        moe_align_block_size(torch.zeros(2, 2, dtype=torch.int32), 0, 4)


# (tokens, experts, top_k, block_size): both implementations, including a batch
# larger than one chunk of the Triton kernels (1024 pairs) and 513 groups
# (LoRA virtual experts: 4 adapters x 128 experts + 1).
PATH_CASES = [(0, 5, 2, 16), (1, 64, 8, 16), (7, 5, 2, 1), (33, 64, 8, 64), (700, 8, 2, 16), (40, 513, 8, 16)]


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_size", PATH_CASES)
def test_triton_and_torch_paths(num_tokens, num_experts, top_k, block_size, use_triton, device):
    ids = make_topk_ids(num_tokens, num_experts, top_k)
    res = moe_align_block_size(ids.to(device), block_size, num_experts, use_triton=use_triton)
    assert_same(res, moe_align_block_size_reference(ids, block_size, num_experts))
    check_properties(ids, res, block_size, num_experts)
