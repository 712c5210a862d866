"""Group the (token, k) pairs of a MoE layer by (adapter slot, local expert).

The MoE LoRA kernels treat every (adapter slot, local expert) combination as
one "virtual expert" ``v = slot * E_local + local_expert`` and run all adapters
in one grouped launch: each M-block of the sorted pair list belongs to a single
virtual expert, so one program multiplies its block by one (A, B) pair.

Pairs that get no LoRA delta are dropped before sorting, so they appear in no
block: tokens with no adapter (slot -1), slots whose ``adapter_enabled`` entry
is 0 (e.g. an adapter removed while its slot id is still mapped), and, with an
``expert_map``, experts that are not local to this rank.

Worked example: E_local = 2, max_loras = 2, block_size = 2, top_k = 2, 3 tokens::

    topk_ids           = [[1, 0], [0, 1], [1, 1]]   flat pairs 0..5
    token_lora_mapping = [1, -1, 0]                 token 1 has no adapter
    adapter_enabled    = [1, 1, 0]                  (last entry: slot -1, always 0)

    virtual ids per pair (slot * 2 + expert): [3, 2, -1, -1, 1, 1]
    v=0 (slot 0, e0): no pairs              -> no block
    v=1 (slot 0, e1): pairs [4, 5]          -> [4, 5]
    v=2 (slot 1, e0): pair  [1]             -> [1, 6]  (6 = numel = sentinel)
    v=3 (slot 1, e1): pair  [0]             -> [0, 6]
    sorted_token_ids     = [4, 5, 1, 6, 0, 6, 6, ...]  (tail: sentinel 6)
    block_virtual_ids    = [1, 2, 3, -1, ...]          (tail: -1)
    num_tokens_post_padded = [6]
    slot_padded_counts   = [2, 4]

Everything is computed on the device (no ``.item()``, no data-dependent shapes),
so the op can be captured in a CUDA graph.  On CUDA (or with ``use_triton``) the
virtual ids are computed inside the align kernels (three launches in all);
elsewhere with torch ops (``lora_virtual_expert_ids``) before the torch align.

``moe_align_with_lora`` makes this alignment and the experts' own one (``moe_align_block_size``)
of a step in one pass: the same three launches give both (``TritonExperts`` uses it when the
step's LoRA takes the sorted path, as ``MoELoRAAlignPlan`` describes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (
    AlignResult,
    LoRAGroups,
    align_with_lora_groups_triton,
    moe_align_block_size,
)


@dataclass
class MoELoRAAlignment:
    """Output of :func:`moe_lora_align_block_size`; input of the sorted MoE LoRA kernels.

    sorted_token_ids: [max_padded] int32. Flat pair ids ``token * top_k + k``
        grouped by virtual expert (slot-major, then local expert), each group
        padded to a multiple of ``block_size``; padding holds the sentinel
        ``numel``. Pairs without LoRA work never appear.
    block_virtual_ids: [max_padded // block_size] int32. The virtual expert
        ``slot * num_experts + local_expert`` of each M-block; -1 for unused blocks.
    num_tokens_post_padded: [1] int32. Length of the used prefix of
        ``sorted_token_ids`` (a device tensor: kernels stop there, no host sync).
    slot_padded_counts: [max_loras] int32. Padded number of entries of each slot
        (sum over its experts of the padded group sizes); 0 for unused slots.
    block_size: the M-block size (``BLOCK_SIZE_M`` of the kernels that read this).
    numel: number of (token, k) pairs, M * top_k; also the padding sentinel.
    num_experts: E_local, experts of this rank (the virtual-id stride).
    max_loras: number of adapter slots L.
    """

    sorted_token_ids: torch.Tensor
    block_virtual_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    slot_padded_counts: torch.Tensor
    block_size: int
    numel: int
    num_experts: int
    max_loras: int


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _check_lora_inputs(topk_ids: torch.Tensor, token_lora_mapping: torch.Tensor, max_loras: int,
                       adapter_enabled: torch.Tensor, expert_map: Optional[torch.Tensor]) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [M, top_k], got shape {tuple(topk_ids.shape)}")
    m = topk_ids.shape[0]
    if token_lora_mapping.dim() != 1 or token_lora_mapping.shape[0] < m:
        raise ValueError(
            f"token_lora_mapping must be 1-D with at least M={m} entries, got shape {tuple(token_lora_mapping.shape)}"
        )
    if adapter_enabled.dim() != 1 or adapter_enabled.shape[0] != max_loras + 1:
        raise ValueError(
            f"adapter_enabled must have max_loras + 1 = {max_loras + 1} entries, got shape {tuple(adapter_enabled.shape)}"
        )
    if expert_map is not None and expert_map.dim() != 1:
        raise ValueError(f"expert_map must be 1-D [E_global], got shape {tuple(expert_map.shape)}")


def lora_virtual_expert_ids(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    *,
    num_experts: int,
    max_loras: int,
    adapter_enabled: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Virtual expert id of every pair, int64 [M * top_k], -1 where the pair gets no delta.

    topk_ids: [M, top_k] int, global expert ids (-1 allowed: already dropped).
    token_lora_mapping: [>= M] int, slot of each token, -1 = no adapter.
    adapter_enabled: [max_loras + 1] int, nonzero = slot active; the last entry is 0.
    expert_map: optional [E_global] int, global -> local expert id, -1 = not local.
    """
    _check_lora_inputs(topk_ids, token_lora_mapping, max_loras, adapter_enabled, expert_map)
    m = topk_ids.shape[0]
    experts = topk_ids.to(torch.int64)
    if expert_map is not None:
        safe = experts.clamp(0, expert_map.shape[0] - 1)
        experts = torch.where(experts >= 0, expert_map.to(torch.int64)[safe], torch.full_like(experts, -1))
    slot = token_lora_mapping[:m].to(torch.int64)
    # Slot -1 (and anything out of range) reads the always-zero last entry.
    in_range = (slot >= 0) & (slot < max_loras)
    slot_idx = torch.where(in_range, slot, torch.full_like(slot, max_loras))
    enabled = (adapter_enabled[slot_idx] != 0) & in_range  # [M]
    valid = enabled[:, None] & (experts >= 0) & (experts < num_experts)
    vids = slot_idx[:, None] * num_experts + experts
    return torch.where(valid, vids, torch.full_like(vids, -1)).reshape(-1)


def moe_lora_align_block_size(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    *,
    num_experts: int,
    max_loras: int,
    block_size: int,
    adapter_enabled: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    use_triton: Optional[bool] = None,
) -> MoELoRAAlignment:
    """Sort the pairs by virtual expert (slot, local expert) and pad each group to ``block_size``.

    topk_ids: [M, top_k] int32/int64 global expert ids.
    token_lora_mapping: [>= M] int32 slot per token, -1 = no adapter.
    num_experts: E_local. max_loras: number of slots L.
    adapter_enabled: [L + 1] int32, nonzero = slot active (last entry always 0).
    expert_map: optional [E_global] int32 global -> local id (-1: not on this rank).
    use_triton: None = the fused Triton kernels on CUDA, torch ops elsewhere (same results).
    See the module docstring for a worked example.
    """
    if num_experts < 1 or max_loras < 1:
        raise ValueError(f"num_experts and max_loras must be positive, got {num_experts}, {max_loras}")
    if use_triton is None:
        use_triton = topk_ids.is_cuda
    if use_triton:
        _check_lora_inputs(topk_ids, token_lora_mapping, max_loras, adapter_enabled, expert_map)
        groups = LoRAGroups(_int32(token_lora_mapping), _int32(adapter_enabled),
                            _int32(expert_map) if expert_map is not None else None, topk_ids.shape[1],
                            num_experts, max_loras)
        res = moe_align_block_size(topk_ids, block_size, max_loras * num_experts, use_triton=True, lora=groups)
    else:
        vids = lora_virtual_expert_ids(topk_ids, token_lora_mapping, num_experts=num_experts, max_loras=max_loras,
                                       adapter_enabled=adapter_enabled, expert_map=expert_map)
        res = moe_align_block_size(vids, block_size, max_loras * num_experts, use_triton=False)
    return _lora_alignment(res, num_experts, max_loras)


def _lora_alignment(res: AlignResult, num_experts: int, max_loras: int) -> MoELoRAAlignment:
    slot_counts = res.slot_padded_counts  # the Triton scan sums them; the torch path does it here
    if slot_counts is None:
        slot_counts = res.group_padded_counts.view(max_loras, num_experts).sum(dim=1, dtype=torch.int32)
    return MoELoRAAlignment(
        sorted_token_ids=res.sorted_token_ids,
        block_virtual_ids=res.block_expert_ids,
        num_tokens_post_padded=res.num_tokens_post_padded,
        slot_padded_counts=slot_counts,
        block_size=res.block_size,
        numel=res.numel,
        num_experts=num_experts,
        max_loras=max_loras,
    )


@dataclass(frozen=True)
class MoELoRAAlignPlan:
    """The (adapter slot, local expert) alignment the sorted w13 LoRA path of a step will read
    (``PunicaWrapperBase.moe_lora_align_plan``): what an experts class needs to make it itself, in
    one pass with its expert alignment (``moe_align_with_lora``), and hand it to ``add_lora_w13``.

    token_lora_mapping: [>= M] int32 slot per row (-1: no adapter); adapter_enabled: [L + 1] int32;
    num_experts: E_local; max_loras: L; block_size: the LoRA kernels' M-block.
    """

    token_lora_mapping: torch.Tensor
    adapter_enabled: torch.Tensor
    num_experts: int
    max_loras: int
    block_size: int


def one_pass_pays(block_size: int, lora_block_size: int) -> bool:
    """Whether ``moe_align_with_lora`` beats the two separate aligns: measured on an H200 (128 experts,
    top-8, 4 adapters), one pass is 0.84-0.91x the two aligns when both use the same block (16, at 1-64
    tokens) and 1.21-1.25x when the expert block is larger (32 / 64 at 256 / 1024 tokens)."""
    return block_size == lora_block_size


def moe_align_with_lora(expert_ids: torch.Tensor, block_size: int, num_experts: int, plan: MoELoRAAlignPlan, *,
                        use_triton: Optional[bool] = None) -> tuple[AlignResult, MoELoRAAlignment]:
    """The expert alignment of the base GEMMs and the (adapter, expert) alignment of the LoRA kernels
    of the same pairs, on CUDA (or with ``use_triton``) in one pass: three launches for both.

    expert_ids: [M, top_k] int local expert ids, -1 for pairs to skip (another rank's expert).
    block_size / num_experts: the base GEMMs' M-block and E_local (must equal ``plan.num_experts``).
    Returns exactly ``moe_align_block_size(expert_ids, block_size, num_experts)`` and
    ``moe_lora_align_block_size(expert_ids, plan.token_lora_mapping, num_experts=..., max_loras=...,
    block_size=plan.block_size, adapter_enabled=...)`` - which equals the LoRA align of the global ids
    with the ``expert_map`` that made ``expert_ids``.  Elsewhere it runs those two torch aligns.
    """
    if plan.num_experts != num_experts:
        raise ValueError(f"the LoRA plan is for {plan.num_experts} local experts, the expert ids for {num_experts}")
    _check_lora_inputs(expert_ids, plan.token_lora_mapping, plan.max_loras, plan.adapter_enabled, None)
    if use_triton is None:
        use_triton = expert_ids.is_cuda
    if not use_triton:
        base = moe_align_block_size(expert_ids, block_size, num_experts, use_triton=False)
        lora = moe_lora_align_block_size(expert_ids, plan.token_lora_mapping, num_experts=num_experts,
                                         max_loras=plan.max_loras, block_size=plan.block_size,
                                         adapter_enabled=plan.adapter_enabled, use_triton=False)
        return base, lora
    base, res = align_with_lora_groups_triton(expert_ids, block_size, num_experts,
                                              token_lora_mapping=_int32(plan.token_lora_mapping),
                                              adapter_enabled=_int32(plan.adapter_enabled),
                                              max_loras=plan.max_loras, lora_block_size=plan.block_size)
    return base, _lora_alignment(res, num_experts, plan.max_loras)
