"""The order in which the MoE LoRA per-pair kernels visit their pairs: grouped by (adapter slot, expert).

The small-batch path runs one program per (token, expert) pair (no alignment), and each program reads its
(slot, expert)'s A and B.  At decode batches of tens of tokens many pairs share a (slot, expert) - 64 tokens x
top-8 over 128 experts x 4 adapters give ~512 pairs in ~330 groups - and in token order those programs run far
apart, so each reads the weights from memory again.  Launched in the order this module gives, the programs of one
group run next to each other and the repeats are served from L2: fewer bytes where the MoE GEMMs beside them
already read at the memory roofline.  The order changes which program computes a pair, not what it computes: the
output is the same bits with or without it.

``pair_order(...)`` is a permutation of the pairs, stable, sorted by the key slot * E + local expert (pairs without
a live route - no adapter, an expert of another rank - last): one launch, ``moe_lora_pair_order_kernel``
(``_moe_lora_pair_order_kernel.py``), whose program ranks BLOCK_I pairs against all pairs (numel^2 comparisons; the
path is for a few thousand pairs at most).
No host synchronisation, no allocation beyond the result: CUDA-graph safe.
"""
from __future__ import annotations

from typing import Optional

import torch

#: order the per-pair kernels' programs by (slot, expert) (False: token order)
PAIR_ORDER = True
#: from this many pairs on (below, repeats of a (slot, expert) are rare and the launch would cost more)
PAIR_ORDER_MIN_PAIRS = 64
#: up to this many pairs (the ranking is quadratic)
PAIR_ORDER_MAX_PAIRS = 4096


def orders(num_pairs: int, device: torch.device) -> bool:
    """Whether a per-pair MoE LoRA launch of ``num_pairs`` pairs on ``device`` takes an order."""
    return PAIR_ORDER and device.type == "cuda" and PAIR_ORDER_MIN_PAIRS <= num_pairs <= PAIR_ORDER_MAX_PAIRS


def pair_keys(topk_ids: torch.Tensor, token_lora_mapping: torch.Tensor, num_experts: int, max_loras: int,
              expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [M * top_k]: the kernel's keys, in torch (the reference of the tests)."""
    m, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0)], -1)
    slot = token_lora_mapping[:m].long().repeat_interleave(top_k)
    live = (slot >= 0) & (slot < max_loras) & (ids >= 0) & (ids < num_experts)
    return torch.where(live, slot * num_experts + ids, max_loras * num_experts)


def pair_order(topk_ids: torch.Tensor, token_lora_mapping: torch.Tensor, num_experts: int, max_loras: int,
               expert_map: Optional[torch.Tensor] = None, *, use_triton: Optional[bool] = None) -> torch.Tensor:
    """int32 [M * top_k]: the pairs grouped by (slot, local expert), stable (the module docstring); on CUDA (or
    with ``use_triton``) one launch, elsewhere torch's stable sort of ``pair_keys``."""
    import triton

    from vllm.lora.ops.triton_ops._moe_lora_pair_order_kernel import moe_lora_pair_order_kernel

    numel = topk_ids.numel()
    if not (topk_ids.is_cuda if use_triton is None else use_triton):
        keys = pair_keys(topk_ids, token_lora_mapping, num_experts, max_loras, expert_map)
        return torch.sort(keys, stable=True).indices.to(torch.int32)
    order = torch.empty(numel, dtype=torch.int32, device=topk_ids.device)
    if numel:
        block_i = 64
        moe_lora_pair_order_kernel[(triton.cdiv(numel, block_i),)](
            topk_ids.reshape(-1), token_lora_mapping, expert_map if expert_map is not None else token_lora_mapping,
            order, numel, topk_ids.shape[1], num_experts, max_loras, HAS_EXPERT_MAP=expert_map is not None,
            BLOCK_I=block_i, BLOCK_J=256, num_warps=4)
    return order
