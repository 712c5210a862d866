"""moe_align_with_lora (both alignments of a MoE LoRA step in one pass) against the two separate
aligns and against plain Python references: integer outputs, compared exactly (sorted ids with their
padding sentinels, block ids with their -1 tails, used lengths, padded counts per group and per slot)."""
from __future__ import annotations

import pytest
import torch

from tests.utils import random_topk_ids
from vllm.lora.ops.moe_lora_align import MoELoRAAlignPlan, moe_align_with_lora, moe_lora_align_block_size
from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (
    moe_align_block_size,
    moe_align_block_size_reference,
)


def _routing(m: int, top_k: int, e_global: int, e_local: int, device: torch.device, *, drop: float = 0.0):
    """Global ids covering every expert (the last one included) as far as m allows, and, when
    e_local < e_global, an expert map sending the other experts to -1 (ranks of expert parallelism)."""
    gen = torch.Generator().manual_seed(m * 131 + top_k * 7 + e_global)
    topk = random_topk_ids(m, e_global, top_k, drop=drop, generator=gen)
    if e_local == e_global:
        return topk.to(device), None, topk.to(device)
    local_globals = torch.randperm(e_global, generator=gen)[:e_local]
    if e_global - 1 not in local_globals.tolist():
        local_globals[0] = e_global - 1  # the last global expert is local, at a random local id
        local_globals = local_globals[torch.randperm(e_local, generator=gen)]
    emap = torch.full((e_global,), -1, dtype=torch.int32)
    emap[local_globals] = torch.arange(e_local, dtype=torch.int32)
    local = torch.where(topk >= 0, emap[topk.clamp(min=0).long()], torch.full_like(topk, -1))
    return topk.to(device), emap.to(device), local.to(device)


def _mapping(m: int, max_loras: int, device: torch.device, extra: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(m + 17 * max_loras)
    return torch.randint(-1, max_loras, (m + extra,), generator=gen, dtype=torch.int32).to(device)


def _enabled(max_loras: int, disabled: tuple[int, ...], device: torch.device) -> torch.Tensor:
    en = torch.ones(max_loras + 1, dtype=torch.int32)
    en[-1] = 0
    for s in disabled:
        en[s] = 0
    return en.to(device)


def _reference_lora(local: torch.Tensor, mapping: torch.Tensor, enabled: torch.Tensor, e_local: int, max_loras: int,
                    block: int):
    """Python loops: each pair's virtual id, then the loop reference align; per-slot sums by hand."""
    top_k = local.shape[1]
    slots, en = mapping.cpu().tolist(), enabled.cpu().tolist()
    vids = []
    for p, e in enumerate(local.cpu().reshape(-1).tolist()):
        s = slots[p // top_k]
        ok = 0 <= s < max_loras and en[s] != 0 and 0 <= e < e_local
        vids.append(s * e_local + e if ok else -1)
    ref = moe_align_block_size_reference(torch.tensor(vids, dtype=torch.int32), block, e_local * max_loras)
    padded = ref.group_padded_counts.tolist()
    per_slot = [sum(padded[s * e_local:(s + 1) * e_local]) for s in range(max_loras)]
    return ref, per_slot


def _assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a.cpu(), b.cpu()), f"{what} differs"


def _check(topk, emap, local, mapping, enabled, e_local, max_loras, block, lora_block, use_triton):
    plan = MoELoRAAlignPlan(token_lora_mapping=mapping, adapter_enabled=enabled, num_experts=e_local,
                            max_loras=max_loras, block_size=lora_block)
    base, lora = moe_align_with_lora(local, block, e_local, plan, use_triton=use_triton)

    # 1. the two separate aligns, as the layer ran them before: the base on local ids, LoRA on global ids + map
    sep_base = moe_align_block_size(local, block, e_local, use_triton=use_triton)
    sep_lora = moe_lora_align_block_size(topk, mapping, num_experts=e_local, max_loras=max_loras,
                                         block_size=lora_block, adapter_enabled=enabled, expert_map=emap,
                                         use_triton=use_triton)
    for f in ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded", "group_padded_counts"):
        _assert_equal(getattr(base, f), getattr(sep_base, f), f"base {f}")
    for f in ("sorted_token_ids", "block_virtual_ids", "num_tokens_post_padded", "slot_padded_counts"):
        _assert_equal(getattr(lora, f), getattr(sep_lora, f), f"lora {f}")
    assert (base.block_size, base.numel) == (block, local.numel())
    assert (lora.block_size, lora.numel, lora.num_experts, lora.max_loras) == (lora_block, local.numel(), e_local,
                                                                               max_loras)

    # 2. independent references (Python loops)
    ref = moe_align_block_size_reference(local.cpu(), block, e_local)
    for f in ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded", "group_padded_counts"):
        _assert_equal(getattr(base, f), getattr(ref, f), f"base {f} vs the loop reference")
    lref, per_slot = _reference_lora(local, mapping, enabled, e_local, max_loras, lora_block)
    _assert_equal(lora.sorted_token_ids, lref.sorted_token_ids, "lora sorted ids vs the loop reference")
    _assert_equal(lora.block_virtual_ids, lref.block_expert_ids, "lora block ids vs the loop reference")
    _assert_equal(lora.num_tokens_post_padded, lref.num_tokens_post_padded, "lora length vs the loop reference")
    assert lora.slot_padded_counts.cpu().tolist() == per_slot
    return base, lora


# (tokens, top_k, E_global, E_local, max_loras, base block, LoRA block, disabled slots, pairs per chunk)
CASES = [
    (0, 2, 8, 8, 2, 16, 16, (), None),
    (1, 1, 4, 4, 1, 16, 16, (), None),
    (7, 2, 8, 8, 3, 16, 32, (1,), None),
    (33, 4, 16, 16, 4, 64, 16, (0, 3), None),
    (33, 2, 12, 5, 3, 1, 16, (), None),        # expert map: -1 ids; base block 1
    (33, 2, 12, 5, 3, 16, 16, (), 16),         # the same over five chunks
    (48, 8, 32, 16, 4, 32, 64, (2,), 64),      # expert map, a disabled slot, six chunks
    (64, 8, 32, 32, 4, 16, 16, (), 128),       # four chunks, 128 virtual experts
]


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("m,top_k,e_global,e_local,max_loras,block,lora_block,disabled,chunk", CASES)
def test_matches_separate_aligns(m, top_k, e_global, e_local, max_loras, block, lora_block, disabled, chunk,
                                 use_triton, device, monkeypatch):
    if chunk is not None:  # several programs per count / scatter launch (the interpreter sorts 1024 slowly)
        monkeypatch.setattr(mab, "_CHUNK", chunk)
    topk, emap, local = _routing(m, top_k, e_global, e_local, device, drop=0.1)
    mapping = _mapping(m, max_loras, device, extra=3)  # longer than the batch (a CUDA-graph sized buffer)
    enabled = _enabled(max_loras, disabled, device)
    base, lora = _check(topk, emap, local, mapping, enabled, e_local, max_loras, block, lora_block, use_triton)
    if m * top_k >= e_global:  # the routing reaches the last (local) expert
        assert int(base.group_padded_counts[-1]) > 0


@pytest.mark.parametrize("slots", ["none", "all_disabled", "one"])
def test_mapping_extremes(slots, device):
    m, top_k, e, L = 40, 2, 8, 3
    topk, emap, local = _routing(m, top_k, e, e, device)
    mapping = {"none": torch.full((m,), -1, dtype=torch.int32), "all_disabled": torch.full((m,), 1, dtype=torch.int32),
               "one": torch.full((m,), 2, dtype=torch.int32)}[slots].to(device)
    base, lora = _check(topk, emap, local, mapping, _enabled(L, (1,), device), e, L, 16, 16, True)
    if slots != "one":
        assert int(lora.num_tokens_post_padded[0]) == 0 and (lora.block_virtual_ids == -1).all()
        assert (lora.sorted_token_ids == m * top_k).all()
    assert int(base.num_tokens_post_padded[0]) > 0


def test_bad_plans(device):
    i32 = dict(dtype=torch.int32, device=device)
    ids = torch.zeros(3, 2, **i32)
    plan = MoELoRAAlignPlan(torch.zeros(3, **i32), torch.ones(3, **i32), num_experts=4, max_loras=2, block_size=16)
    with pytest.raises(ValueError, match="local experts"):
        moe_align_with_lora(ids, 16, 8, plan)
    short = MoELoRAAlignPlan(torch.zeros(2, **i32), torch.ones(3, **i32), num_experts=4, max_loras=2, block_size=16)
    with pytest.raises(ValueError, match="token_lora_mapping"):
        moe_align_with_lora(ids, 16, 4, short)
    bad_flags = MoELoRAAlignPlan(torch.zeros(3, **i32), torch.ones(2, **i32), num_experts=4, max_loras=2,
                                 block_size=16)
    with pytest.raises(ValueError, match="adapter_enabled"):
        moe_align_with_lora(ids, 16, 4, bad_flags)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64, 256, 1024])
def test_qwen3_sizes_on_gpu(m):
    """Qwen3-30B-A3B's layer (128 experts, top 8) with 4 slots, the tile sizes the GPU picks."""
    dev = torch.device("cuda")
    topk, emap, local = _routing(m, 8, 128, 128, dev, drop=0.05)
    for block, lora_block in [(16, 16), (64, 16), (16, 64)]:
        _check(topk, emap, local, _mapping(m, 4, dev, extra=5), _enabled(4, (), dev), 128, 4, block, lora_block,
               None)
    topk, emap, local = _routing(m, 8, 128, 64, dev)  # expert parallelism over two ranks
    _check(topk, emap, local, _mapping(m, 4, dev), _enabled(4, (1,), dev), 64, 4, 32, 16, None)
