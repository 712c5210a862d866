"""Group the flat (token, k) pairs by expert and pad each group to a block multiple.

The grouped GEMMs walk the output of this op one M-block at a time: every block
holds pairs of a single expert (or a single (adapter, expert) "virtual expert"
for the LoRA kernels), so one program multiplies one block by one weight matrix.

Worked example: top_k = 2, block_size = 4, 3 experts, 3 tokens,
``topk_ids = [[2, 0], [0, 1], [2, -1]]`` (-1: pair dropped, e.g. a non-local
expert).  Flat pair ids are 0..5 and the sentinel is numel = 6.

    expert 0 gets pairs [1, 2]  -> padded to 4: [1, 2, 6, 6]
    expert 1 gets pair  [3]     -> padded to 4: [3, 6, 6, 6]
    expert 2 gets pairs [0, 4]  -> padded to 4: [0, 4, 6, 6]
    sorted_token_ids = [1, 2, 6, 6, 3, 6, 6, 6, 0, 4, 6, 6, 6, ...]  (tail: sentinel)
    block_expert_ids = [0, 1, 2, -1, ...]                            (tail: -1)
    num_tokens_post_padded = [12]

Groups keep the pairs' original order.  The buffers are sized for the worst
case (numel + num_experts * (block_size - 1), rounded up to a block), so the op
never synchronises with the host and can be captured in a CUDA graph; kernels
stop at ``num_tokens_post_padded``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AlignResult:
    """Output of ``moe_align_block_size``.

    sorted_token_ids: [max_num_tokens_padded] int32, flat pair ids (token * top_k + k)
        grouped by expert; padding entries hold the sentinel ``numel``.
    block_expert_ids: [max_num_tokens_padded // block_size] int32, the group id of each
        M-block; -1 for blocks past the end.
    num_tokens_post_padded: [1] int32, total padded length actually used.
    group_padded_counts: [num_experts] int32, padded length of each group (None for
        ``pairwise_alignment``, which does not count).
    block_size: the M-block size the padding was made for.
    numel: number of (token, k) pairs; also the sentinel value.
    """

    sorted_token_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    group_padded_counts: Optional[torch.Tensor]
    block_size: int
    numel: int


# Pairwise alignment: at most this many pairs, and at most one pair per 4 experts.
PAIRWISE_MAX_PAIRS = 64
_pairwise_cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def use_pairwise_alignment(num_pairs: int, num_experts: int) -> bool:
    """Whether the pairs are so few among the experts that sorting would put one pair per block anyway
    (decode of a fine-grained MoE: 8 pairs among 128 experts), so ``pairwise_alignment`` loses nothing."""
    return 0 < num_pairs <= PAIRWISE_MAX_PAIRS and num_pairs * 4 <= num_experts


def pairwise_alignment(group_ids: torch.Tensor, block_size: int) -> AlignResult:
    """One M-block per pair, in pair order, without sorting and without a launch.

    Block p holds pair p followed by sentinels, and its group is ``group_ids[p]`` (-1: skipped), so
    ``block_expert_ids`` is the flattened ids themselves.  ``sorted_token_ids`` and the used length
    depend on the pair count only: they are made once per (pairs, block size, device) and reused,
    also by CUDA graphs.  Two pairs of one expert get two blocks (the weights are read twice), which
    ``use_pairwise_alignment`` makes rare.  The GEMMs give the same rows as with the sorted layout.
    """
    flat = group_ids.reshape(-1)
    if flat.dtype != torch.int32 or not flat.is_contiguous():
        flat = flat.to(torch.int32).contiguous()
    numel = flat.numel()
    key = (numel, block_size, str(flat.device))
    hit = _pairwise_cache.get(key)
    if hit is None:
        rows = torch.full((numel, block_size), numel, dtype=torch.int32, device=flat.device)
        rows[:, 0] = torch.arange(numel, dtype=torch.int32, device=flat.device)
        hit = (rows.reshape(-1), torch.full((1,), numel * block_size, dtype=torch.int32, device=flat.device))
        _pairwise_cache[key] = hit
    return AlignResult(sorted_token_ids=hit[0], block_expert_ids=flat, num_tokens_post_padded=hit[1],
                       group_padded_counts=None, block_size=block_size, numel=numel)


def align_for_experts(group_ids: torch.Tensor, block_size: int, num_experts: int) -> AlignResult:
    """The routing the grouped GEMMs walk: ``pairwise_alignment`` for a few pairs among many experts,
    else ``moe_align_block_size``."""
    if use_pairwise_alignment(group_ids.numel(), num_experts):
        return pairwise_alignment(group_ids, block_size)
    return moe_align_block_size(group_ids, block_size, num_experts)


def max_num_tokens_padded(numel: int, num_experts: int, block_size: int) -> int:
    raw = numel + num_experts * (block_size - 1)
    return max(block_size, -(-raw // block_size) * block_size)


def moe_align_block_size(group_ids: torch.Tensor, block_size: int, num_experts: int, *,
                         use_triton: Optional[bool] = None, lora: Optional["LoRAGroups"] = None) -> AlignResult:
    """Sort pairs by group id (expert, or virtual expert) and pad each group to ``block_size``.

    group_ids: int tensor of any shape (usually topk_ids [M, top_k]); flattened in
        row-major order, values in [0, num_experts) or -1 for pairs to skip.
    use_triton: None = the Triton kernels on CUDA, torch ops elsewhere; True on a
        CPU tensor needs TRITON_INTERPRET=1.  Both give identical results.
    lora: group_ids are global expert ids and the kernels make the (adapter slot, local
        expert) groups themselves (``LoRAGroups``; Triton only).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if use_triton is None:
        use_triton = group_ids.is_cuda
    if use_triton:
        return _moe_align_block_size_triton(group_ids, block_size, num_experts, lora)
    if lora is not None:
        raise ValueError("LoRA groups are made by the Triton align only; on CPU make the virtual ids first")
    device = group_ids.device
    ids = group_ids.reshape(-1).to(torch.int64)
    numel = ids.numel()
    size = max_num_tokens_padded(numel, num_experts, block_size)
    num_blocks = size // block_size

    # Dropped pairs go to an extra bucket num_experts, sorted last and written
    # to a scratch slot that is cut off.
    bucket = torch.where(ids >= 0, ids, torch.full_like(ids, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts[num_experts:].zero_()  # the drop bucket takes no room (no host scalar: graph-capturable)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # first position of each bucket among the sorted pairs

    order = torch.sort(bucket, stable=True).indices
    sorted_bucket = bucket[order]
    rank = torch.arange(numel, device=device) - first[sorted_bucket]
    dest = torch.where(sorted_bucket < num_experts, starts[sorted_bucket] + rank, torch.full_like(rank, size))

    sorted_token_ids = torch.full((size + 1,), numel, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_token_ids = sorted_token_ids[:size]

    block_starts = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_size
    owner = torch.searchsorted(ends[:num_experts].contiguous(), block_starts, right=True)
    block_expert_ids = torch.where(owner < num_experts, owner, torch.full_like(owner, -1)).to(torch.int32)

    total = ends[num_experts - 1 : num_experts].to(torch.int32) if num_experts > 0 else torch.zeros(1, dtype=torch.int32, device=device)
    return AlignResult(
        sorted_token_ids=sorted_token_ids,
        block_expert_ids=block_expert_ids,
        num_tokens_post_padded=total,
        group_padded_counts=padded[:num_experts].to(torch.int32),
        block_size=block_size,
        numel=numel,
    )


_CHUNK = 1024  # pairs per program of the count / scatter kernels
# group-table size (padded) -> warps of the one-program scan; 16 for the LoRA align's 512+ groups
# (H200, benchmark_moe_lora_align.py: 21-31 us vs 68-81 us with 4 warps at 1-256 tokens)
SCAN_WARPS = {256: 4, 1 << 30: 16}


@dataclass
class LoRAGroups:
    """Makes the Triton align group pairs by (adapter slot, local expert) itself (``moe_lora_align``).

    token_lora_mapping: [>= M] int32 slot per token (-1: none); adapter_enabled: [max_loras + 1]
    int32 (last entry 0); expert_map: optional [E_global] int32 global -> local expert (-1: remote).
    """

    token_lora_mapping: torch.Tensor
    adapter_enabled: torch.Tensor
    expert_map: Optional[torch.Tensor]
    top_k: int
    num_local_experts: int
    max_loras: int


def _moe_align_block_size_triton(group_ids: torch.Tensor, block_size: int, num_experts: int,
                                 lora: Optional[LoRAGroups] = None) -> AlignResult:
    from vllm.model_executor.layers.fused_moe.ops import _moe_align_kernel as k
    from vllm.triton_utils import next_power_of_2

    if not group_ids.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton moe_align_block_size needs a CUDA tensor or TRITON_INTERPRET=1")
    device = group_ids.device
    ids = group_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    numel = ids.numel()
    size = max_num_tokens_padded(numel, num_experts, block_size)
    num_blocks = size // block_size
    chunk = min(_CHUNK, max(16, next_power_of_2(numel)))
    num_chunks = -(-numel // chunk)
    g_pad = next_power_of_2(num_experts + 1)
    chunk_counts = torch.empty(max(num_chunks, 1), num_experts, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    sorted_ids = torch.empty(size, dtype=torch.int32, device=device)
    block_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    padded = torch.empty(num_experts, dtype=torch.int32, device=device)
    if lora is None:
        lora_args = (ids, ids, ids, 1, 0, 0, 1)
        lora_flags = dict(LORA=False, HAS_EMAP=False)
    else:
        emap = lora.expert_map
        lora_args = (lora.token_lora_mapping, lora.adapter_enabled, emap if emap is not None else ids, lora.top_k,
                     lora.num_local_experts, lora.max_loras, emap.shape[0] if emap is not None else 1)
        lora_flags = dict(LORA=True, HAS_EMAP=emap is not None)
    if num_chunks:
        k._count_kernel[(num_chunks,)](ids, chunk_counts, numel, num_experts, *lora_args, CHUNK=chunk, G_PAD=g_pad,
                                       **lora_flags)
    warps = next(w for limit, w in sorted(SCAN_WARPS.items()) if g_pad <= limit)
    k._scan_kernel[(1,)](chunk_counts, chunk_offsets, sorted_ids, block_ids, total, padded, numel, num_experts,
                         num_chunks, size, num_blocks, BLOCK_SIZE=block_size, G_PAD=g_pad,
                         PAD_W=min(16, next_power_of_2(block_size)), FILL=1024, num_warps=warps)
    if num_chunks:
        k._scatter_kernel[(num_chunks,)](ids, chunk_offsets, sorted_ids, numel, num_experts, *lora_args,
                                         CHUNK=chunk, G_PAD=g_pad, **lora_flags)
    return AlignResult(sorted_token_ids=sorted_ids, block_expert_ids=block_ids, num_tokens_post_padded=total,
                       group_padded_counts=padded, block_size=block_size, numel=numel)


def moe_align_block_size_reference(group_ids: torch.Tensor, block_size: int, num_experts: int) -> AlignResult:
    """Plain Python loops: obviously right, slow.  Tests compare the op against this."""
    ids = [int(v) for v in group_ids.reshape(-1).tolist()]
    numel = len(ids)
    size = max_num_tokens_padded(numel, num_experts, block_size)
    sorted_ids: list[int] = []
    blocks: list[int] = []
    padded_counts = []
    for e in range(num_experts):
        members = [p for p, g in enumerate(ids) if g == e]
        n_pad = -(-len(members) // block_size) * block_size
        padded_counts.append(n_pad)
        sorted_ids += members + [numel] * (n_pad - len(members))
        blocks += [e] * (n_pad // block_size)
    total = len(sorted_ids)
    sorted_ids += [numel] * (size - total)
    blocks += [-1] * (size // block_size - len(blocks))
    dev = group_ids.device
    return AlignResult(
        sorted_token_ids=torch.tensor(sorted_ids, dtype=torch.int32, device=dev),
        block_expert_ids=torch.tensor(blocks, dtype=torch.int32, device=dev),
        num_tokens_post_padded=torch.tensor([total], dtype=torch.int32, device=dev),
        group_padded_counts=torch.tensor(padded_counts, dtype=torch.int32, device=dev),
        block_size=block_size,
        numel=numel,
    )
