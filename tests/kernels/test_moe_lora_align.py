"""moe_lora_align_block_size against a plain Python reference (integer outputs: exact)."""
from __future__ import annotations

import pytest
import torch

from tests.utils import random_expert, random_topk_ids
from vllm.lora.ops.moe_lora_align import MoELoRAAlignment, moe_lora_align_block_size


def _routing(m, top_k, e_global, device, exclude=()):
    """Distinct experts per token; the experts in ``exclude`` get none, every other one some (as far as m allows)."""
    return random_topk_ids(m, e_global, top_k, empty=exclude).to(device)


def _expected_vids(topk_ids, mapping, enabled, num_experts, max_loras, expert_map):
    """Python loop: virtual id of each flat pair, -1 when dropped."""
    top_k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).tolist()
    slots = mapping.tolist()
    en = enabled.tolist()
    emap = None if expert_map is None else expert_map.tolist()
    out = []
    for p, g in enumerate(ids):
        slot = slots[p // top_k]
        e = g if emap is None or g < 0 else emap[g]
        ok = 0 <= slot < max_loras and en[slot] != 0 and 0 <= e < num_experts
        out.append(slot * num_experts + e if ok else -1)
    return out


def _check(al: MoELoRAAlignment, vids: list[int], num_experts: int, max_loras: int, block: int) -> None:
    numel = len(vids)
    sorted_ids = al.sorted_token_ids.cpu().tolist()
    blocks = al.block_virtual_ids.cpu().tolist()
    total = int(al.num_tokens_post_padded.cpu()[0])
    assert al.numel == numel and al.block_size == block
    assert al.num_experts == num_experts and al.max_loras == max_loras
    assert al.sorted_token_ids.dtype == torch.int32 and al.block_virtual_ids.dtype == torch.int32
    assert len(blocks) * block == len(sorted_ids)

    # Exact layout: groups in virtual-id order, pairs in their original order, then padding.
    exp_ids, exp_blocks, exp_slot = [], [], [0] * max_loras
    for v in range(num_experts * max_loras):
        members = [p for p, x in enumerate(vids) if x == v]
        padded = -(-len(members) // block) * block
        exp_ids += members + [numel] * (padded - len(members))
        exp_blocks += [v] * (padded // block)
        exp_slot[v // num_experts] += padded
    assert total == len(exp_ids)
    assert sorted_ids[:total] == exp_ids
    assert all(t == numel for t in sorted_ids[total:]), "padding past the end must be the sentinel"
    assert blocks[: total // block] == exp_blocks
    assert all(b == -1 for b in blocks[total // block:])
    assert al.slot_padded_counts.cpu().tolist() == exp_slot

    # The contract the kernels rely on, stated directly.
    seen = [p for p in sorted_ids[:total] if p != numel]
    assert sorted(seen) == sorted(p for p, v in enumerate(vids) if v >= 0), "each real pair exactly once"
    for i in range(total // block):
        for p in sorted_ids[i * block:(i + 1) * block]:
            assert p == numel or vids[p] == blocks[i], "pair in a block of another virtual expert"


def _run(topk_ids, mapping, enabled, num_experts, max_loras, block, expert_map=None):
    """Both paths: torch ops, and the Triton kernels that compute the virtual ids themselves."""
    vids = _expected_vids(topk_ids.cpu(), mapping.cpu(), enabled.cpu(), num_experts, max_loras,
                          None if expert_map is None else expert_map.cpu())
    for use_triton in (False, True):
        al = moe_lora_align_block_size(topk_ids, mapping, num_experts=num_experts, max_loras=max_loras,
                                       block_size=block, adapter_enabled=enabled, expert_map=expert_map,
                                       use_triton=use_triton)
        _check(al, vids, num_experts, max_loras, block)
    return al, vids


@pytest.mark.parametrize("m", [0, 1, 7, 33, 300])
@pytest.mark.parametrize("top_k,num_experts,max_loras,block", [(1, 4, 1, 4), (2, 8, 3, 16), (8, 16, 4, 32)])
def test_random_mapping(device, m, top_k, num_experts, max_loras, block):
    topk_ids = _routing(m, top_k, num_experts, device, exclude=(random_expert(num_experts),))  # one unused
    mapping = torch.randint(-1, max_loras, (m,), dtype=torch.int32, device=device)
    enabled = torch.ones(max_loras + 1, dtype=torch.int32, device=device)
    enabled[-1] = 0
    _run(topk_ids, mapping, enabled, num_experts, max_loras, block)


@pytest.mark.parametrize("m", [1, 33])
def test_all_tokens_on_one_adapter(device, m):
    topk_ids = _routing(m, 2, 6, device)
    mapping = torch.full((m,), 2, dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 1, 1, 1, 0], dtype=torch.int32, device=device)
    al, _ = _run(topk_ids, mapping, enabled, 6, 4, 16)
    counts = al.slot_padded_counts.cpu().tolist()
    assert counts[0] == counts[1] == counts[3] == 0 and counts[2] > 0


def test_no_adapter_at_all(device):
    topk_ids = _routing(33, 2, 8, device)
    mapping = torch.full((33,), -1, dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 1, 0], dtype=torch.int32, device=device)
    al, _ = _run(topk_ids, mapping, enabled, 8, 2, 16)
    assert int(al.num_tokens_post_padded[0]) == 0
    assert (al.block_virtual_ids == -1).all() and (al.sorted_token_ids == 66).all()


def test_disabled_slot_is_dropped(device):
    topk_ids = _routing(40, 2, 4, device)
    mapping = (torch.arange(40, device=device) % 3).to(torch.int32)
    enabled = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=device)
    al, vids = _run(topk_ids, mapping, enabled, 4, 3, 8)
    assert al.slot_padded_counts.cpu().tolist()[1] == 0
    assert all(v == -1 for p, v in enumerate(vids) if p // 2 % 3 == 1)


def test_mapping_longer_than_batch(device):
    """A CUDA-graph sized mapping buffer: only the first M entries count."""
    topk_ids = _routing(5, 2, 4, device)
    mapping = torch.tensor([0, 1, -1, 1, 0, 1, 1, 1], dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 1, 0], dtype=torch.int32, device=device)
    _run(topk_ids, mapping, enabled, 4, 2, 4)


@pytest.mark.parametrize("m", [1, 7, 100])
def test_expert_map_drops_non_local_experts(device, m):
    e_global, e_local = 12, 5
    local_globals = torch.randperm(e_global)[:e_local]
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[local_globals] = torch.arange(e_local, dtype=torch.int32)
    topk_ids = _routing(m, 4, e_global, device)
    topk_ids[0, 0] = -1  # an already dropped pair
    mapping = torch.randint(-1, 3, (m,), dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 1, 1, 0], dtype=torch.int32, device=device)
    al, vids = _run(topk_ids, mapping, enabled, e_local, 3, 16, expert_map.to(device))
    flat = topk_ids.reshape(-1).cpu().tolist()
    assert all(vids[p] == -1 for p, g in enumerate(flat) if g < 0 or int(expert_map[g]) < 0)


def test_worked_example(device):
    i32 = dict(dtype=torch.int32, device=device)
    al = moe_lora_align_block_size(torch.tensor([[1, 0], [0, 1], [1, 1]], **i32), torch.tensor([1, -1, 0], **i32),
                                   num_experts=2, max_loras=2, block_size=2,
                                   adapter_enabled=torch.tensor([1, 1, 0], **i32))
    total = int(al.num_tokens_post_padded[0])
    assert total == 6
    assert al.sorted_token_ids[:7].cpu().tolist() == [4, 5, 1, 6, 0, 6, 6]
    assert al.block_virtual_ids[:4].cpu().tolist() == [1, 2, 3, -1]
    assert al.slot_padded_counts.cpu().tolist() == [2, 4]


def test_bad_arguments(device):
    i32 = dict(dtype=torch.int32, device=device)
    ids = torch.zeros(3, 2, **i32)
    with pytest.raises(ValueError, match="adapter_enabled"):
        moe_lora_align_block_size(ids, torch.zeros(3, **i32), num_experts=4, max_loras=2, block_size=16,
                                  adapter_enabled=torch.ones(2, **i32))
    with pytest.raises(ValueError, match="token_lora_mapping"):
        moe_lora_align_block_size(ids, torch.zeros(2, **i32), num_experts=4, max_loras=2, block_size=16,
                                  adapter_enabled=torch.ones(3, **i32))
    with pytest.raises(ValueError, match="topk_ids"):
        moe_lora_align_block_size(ids.reshape(-1), torch.zeros(3, **i32), num_experts=4, max_loras=2,
                                  block_size=16, adapter_enabled=torch.ones(3, **i32))
