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
from vllm.platforms.pdl import pdl_launch_kwargs


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
    slot_padded_counts: [max_loras] int32, the Triton align of (adapter slot, expert) groups only
        (``lora``): the sum of ``group_padded_counts`` over each slot's experts; None otherwise.
    """

    sorted_token_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    group_padded_counts: Optional[torch.Tensor]
    block_size: int
    numel: int
    slot_padded_counts: Optional[torch.Tensor] = None


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

    total = (ends[num_experts - 1 : num_experts].to(torch.int32) if num_experts > 0
             else torch.zeros(1, dtype=torch.int32, device=device))
    return AlignResult(
        sorted_token_ids=sorted_token_ids,
        block_expert_ids=block_expert_ids,
        num_tokens_post_padded=total,
        group_padded_counts=padded[:num_experts].to(torch.int32),
        block_size=block_size,
        numel=numel,
    )


# pairs per program of the count / scatter kernels: 256 (H200, benchmark_moe_lora_align.py --chunks, 128
# experts top-8, 4 adapters: expert / LoRA align 13.7 / 21.3 us at 256 tokens vs 18.6 / 29.1 with 1024, 17.9 /
# 23.9 vs 20.9 / 29.8 at 1024 tokens, equal at 1-16 tokens)
_CHUNK = 256
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


@dataclass
class _Buffers:
    """The outputs of one grouping and the per-chunk tables of its scan (sizes from shapes only)."""

    chunk_counts: torch.Tensor
    chunk_offsets: torch.Tensor
    sorted_ids: torch.Tensor
    block_ids: torch.Tensor
    total: torch.Tensor
    padded: torch.Tensor
    size: int
    num_blocks: int
    g_pad: int

    @classmethod
    def make(cls, numel: int, num_groups: int, block_size: int, num_chunks: int, device: torch.device) -> "_Buffers":
        from vllm.triton_utils import next_power_of_2

        size = max_num_tokens_padded(numel, num_groups, block_size)
        counts = torch.empty(max(num_chunks, 1), num_groups, dtype=torch.int32, device=device)
        return cls(chunk_counts=counts, chunk_offsets=torch.empty_like(counts),
                   sorted_ids=torch.empty(size, dtype=torch.int32, device=device),
                   block_ids=torch.empty(size // block_size, dtype=torch.int32, device=device),
                   total=torch.empty(1, dtype=torch.int32, device=device),
                   padded=torch.empty(num_groups, dtype=torch.int32, device=device), size=size,
                   num_blocks=size // block_size, g_pad=next_power_of_2(num_groups + 1))

    def result(self, block_size: int, numel: int, slot_counts: Optional[torch.Tensor] = None) -> AlignResult:
        return AlignResult(sorted_token_ids=self.sorted_ids, block_expert_ids=self.block_ids,
                           num_tokens_post_padded=self.total, group_padded_counts=self.padded,
                           block_size=block_size, numel=numel, slot_padded_counts=slot_counts)


def _flat_ids(group_ids: torch.Tensor) -> torch.Tensor:
    if not group_ids.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton moe_align_block_size needs a CUDA tensor or TRITON_INTERPRET=1")
    ids = group_ids.reshape(-1)
    return ids if ids.is_contiguous() else ids.contiguous()


def _chunking(numel: int) -> tuple[int, int]:
    from vllm.triton_utils import next_power_of_2

    chunk = min(_CHUNK, max(16, next_power_of_2(numel)))
    return chunk, -(-numel // chunk)


def _scan_warps(g_pad: int) -> int:
    return next(w for limit, w in sorted(SCAN_WARPS.items()) if g_pad <= limit)


def _pad_w(block_size: int) -> int:
    from vllm.triton_utils import next_power_of_2

    return min(16, next_power_of_2(block_size))


def _moe_align_block_size_triton(group_ids: torch.Tensor, block_size: int, num_experts: int,
                                 lora: Optional[LoRAGroups] = None) -> AlignResult:
    from vllm.model_executor.layers.fused_moe.ops import _moe_align_kernel as k

    ids = _flat_ids(group_ids)
    numel = ids.numel()
    chunk, num_chunks = _chunking(numel)
    buf = _Buffers.make(numel, num_experts, block_size, num_chunks, ids.device)
    slot_counts = None
    if lora is None:
        lora_args = (ids, ids, ids, 1, 0, 0, 1)
        lora_flags = dict(LORA=False, HAS_EMAP=False)
    else:
        emap = lora.expert_map
        lora_args = (lora.token_lora_mapping, lora.adapter_enabled, emap if emap is not None else ids, lora.top_k,
                     lora.num_local_experts, lora.max_loras, emap.shape[0] if emap is not None else 1)
        lora_flags = dict(LORA=True, HAS_EMAP=emap is not None)
        slot_counts = torch.empty(lora.max_loras, dtype=torch.int32, device=ids.device)
    slots = (lora.num_local_experts, lora.max_loras) if lora is not None else (1, 0)  # experts per slot, slots
    if num_chunks:
        k._count_kernel[(num_chunks,)](ids, buf.chunk_counts, numel, num_experts, *lora_args, CHUNK=chunk,
                                       G_PAD=buf.g_pad, **lora_flags, **pdl_launch_kwargs(ids.device))
    k._scan_kernel[(1,)](buf.chunk_counts, buf.chunk_offsets, buf.sorted_ids, buf.block_ids, buf.total, buf.padded,
                         slot_counts if slot_counts is not None else buf.padded, numel, num_experts, num_chunks,
                         buf.size, buf.num_blocks, *slots, BLOCK_SIZE=block_size, G_PAD=buf.g_pad,
                         PAD_W=_pad_w(block_size), FILL=1024, SLOT_SUMS=lora is not None,
                         num_warps=_scan_warps(buf.g_pad), **pdl_launch_kwargs(buf.chunk_counts.device))
    if num_chunks:
        k._scatter_kernel[(num_chunks,)](ids, buf.chunk_offsets, buf.sorted_ids, numel, num_experts, *lora_args,
                                         CHUNK=chunk, G_PAD=buf.g_pad, **lora_flags, **pdl_launch_kwargs(ids.device))
    return buf.result(block_size, numel, slot_counts)


def align_with_lora_groups_triton(expert_ids: torch.Tensor, block_size: int, num_experts: int, *,
                                  token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor, max_loras: int,
                                  lora_block_size: int) -> tuple[AlignResult, AlignResult]:
    """Both groupings of the same pairs in three launches: by expert (``block_size``, as
    ``moe_align_block_size(expert_ids, block_size, num_experts)``) and by (adapter slot, expert)
    (``lora_block_size``, as the LoRA align of ``LoRAGroups(token_lora_mapping, adapter_enabled, None,
    top_k, num_experts, max_loras)``, with ``slot_padded_counts``).  ``expert_ids``: [M, top_k] local
    expert ids (-1: skipped); mapping and flags int32 contiguous.  Bit for bit the two separate aligns."""
    from vllm.model_executor.layers.fused_moe.ops import _moe_align_kernel as k

    if block_size < 1 or lora_block_size < 1:
        raise ValueError(f"block sizes must be positive, got {block_size} and {lora_block_size}")
    if num_experts < 1 or max_loras < 1:
        raise ValueError(f"num_experts and max_loras must be positive, got {num_experts}, {max_loras}")
    top_k = expert_ids.shape[-1] if expert_ids.dim() else 1
    ids = _flat_ids(expert_ids)
    numel = ids.numel()
    chunk, num_chunks = _chunking(numel)
    dev = ids.device
    base = _Buffers.make(numel, num_experts, block_size, num_chunks, dev)
    lora = _Buffers.make(numel, num_experts * max_loras, lora_block_size, num_chunks, dev)
    slot_counts = torch.empty(max_loras, dtype=torch.int32, device=dev)
    mapping_args = (token_lora_mapping, adapter_enabled, top_k, max_loras)
    if num_chunks:
        k._count2_kernel[(num_chunks,)](ids, base.chunk_counts, lora.chunk_counts, numel, num_experts,
                                        *mapping_args, CHUNK=chunk, G_PAD=base.g_pad, LG_PAD=lora.g_pad,
                                        **pdl_launch_kwargs(ids.device))
    k._scan2_kernel[(1,)](base.chunk_counts, base.chunk_offsets, base.sorted_ids, base.block_ids, base.total,
                          base.padded, lora.chunk_counts, lora.chunk_offsets, lora.sorted_ids, lora.block_ids,
                          lora.total, lora.padded, slot_counts, numel, num_experts, max_loras, num_chunks, base.size,
                          base.num_blocks, lora.size, lora.num_blocks, BLOCK_SIZE=block_size,
                          LORA_BLOCK_SIZE=lora_block_size, G_PAD=base.g_pad, LG_PAD=lora.g_pad,
                          PAD_W=_pad_w(block_size), LORA_PAD_W=_pad_w(lora_block_size), FILL=1024,
                          num_warps=_scan_warps(max(base.g_pad, lora.g_pad)),
                          **pdl_launch_kwargs(base.chunk_counts.device))
    if num_chunks:
        k._scatter2_kernel[(num_chunks,)](ids, base.chunk_offsets, base.sorted_ids, lora.chunk_offsets,
                                          lora.sorted_ids, numel, num_experts, *mapping_args, CHUNK=chunk,
                                          G_PAD=base.g_pad, LG_PAD=lora.g_pad, **pdl_launch_kwargs(ids.device))
    return base.result(block_size, numel), lora.result(lora_block_size, numel, slot_counts)


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
