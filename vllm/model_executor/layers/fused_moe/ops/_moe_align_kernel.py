"""Triton bodies of ``moe_align_block_size``: three launches, no host sync.

1. ``_count_kernel``: one program per chunk of pairs writes its per-group histogram.
2. ``_scan_kernel`` (one program): group totals, padded offsets, each chunk's
   write offset per group, the block -> group table, and the sentinel padding.
3. ``_scatter_kernel``: one program per chunk sorts its pairs by (group,
   position) and writes each pair id to its group's next free slots.

The result equals the torch path exactly (groups keep the pairs' order).

With ``LORA`` the count and scatter kernels compute each pair's group themselves:
the (adapter slot, local expert) "virtual expert" ``slot * E_local + expert`` from
``topk_ids``, the token's slot, ``adapter_enabled`` and the optional ``expert_map``
(see ``vllm/lora/ops/moe_lora_align.py``), so the LoRA align is three
launches with no torch ops before them; the scan also sums the padded groups per slot.

``_count2_kernel`` / ``_scan2_kernel`` / ``_scatter2_kernel`` make both alignments of a
MoE LoRA step in the same three launches: the expert groups (the base GEMMs) and the
virtual-expert groups (the LoRA kernels) of the same local expert ids, each with its own
block size.  They run the same per-group bodies as the single align, once per grouping,
so each result is bit for bit the one the single align gives.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _lora_group(g, offs, inside, map_ptr, enabled_ptr, top_k, e_local, max_loras):
    """Virtual expert ``slot * e_local + g`` of the pairs ``offs`` whose local expert is ``g``; -1 where
    the pair gets no LoRA delta (no slot, a disabled slot, no local expert)."""
    slot = tl.load(map_ptr + offs // top_k, mask=inside, other=-1).to(tl.int32)
    slot_ok = (slot >= 0) & (slot < max_loras)
    on = tl.load(enabled_ptr + tl.where(slot_ok, slot, max_loras), mask=inside, other=0)
    keep = slot_ok & (on != 0) & (g >= 0) & (g < e_local)
    return tl.where(keep, slot * e_local + g, -1)


@triton.jit
def _bin(g, inside, num_groups, G_PAD: tl.constexpr):
    valid = inside & (g >= 0) & (g < num_groups)
    return tl.where(valid, g, G_PAD - 1)  # bin G_PAD - 1 >= num_groups collects dropped pairs


@triton.jit
def _bucket(ids_ptr, c, numel, num_groups, map_ptr, enabled_ptr, emap_ptr, top_k, e_local, max_loras, e_global,
            CHUNK: tl.constexpr, G_PAD: tl.constexpr, LORA: tl.constexpr, HAS_EMAP: tl.constexpr):
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inside = offs < numel
    g = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int32)
    if LORA:  # ids are global expert ids: make them virtual experts, -1 where the pair gets no delta
        if HAS_EMAP:
            safe = tl.minimum(tl.maximum(g, 0), e_global - 1)
            local = tl.load(emap_ptr + safe, mask=inside & (g >= 0), other=-1).to(tl.int32)
            g = tl.where(g >= 0, local, -1)
        g = _lora_group(g, offs, inside, map_ptr, enabled_ptr, top_k, e_local, max_loras)
    return _bin(g, inside, num_groups, G_PAD)


@triton.jit
def _store_hist(chunk_counts_ptr, c, b, num_groups, G_PAD: tl.constexpr):
    hist = tl.histogram(b, G_PAD)
    gi = tl.arange(0, G_PAD)
    tl.store(chunk_counts_ptr + c * num_groups + gi, hist, mask=gi < num_groups)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, numel, num_groups, map_ptr, enabled_ptr, emap_ptr, top_k, e_local,
                  max_loras, e_global, CHUNK: tl.constexpr, G_PAD: tl.constexpr, LORA: tl.constexpr,
                  HAS_EMAP: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    c = tl.program_id(0)
    b = _bucket(ids_ptr, c, numel, num_groups, map_ptr, enabled_ptr, emap_ptr, top_k, e_local, max_loras, e_global,
                CHUNK, G_PAD, LORA, HAS_EMAP)
    _store_hist(chunk_counts_ptr, c, b, num_groups, G_PAD)


@triton.jit
def _scan_groups(chunk_counts_ptr, chunk_offsets_ptr, sorted_ptr, block_ids_ptr, total_ptr, padded_ptr,
                 slot_counts_ptr, numel, num_groups, num_chunks, size, num_blocks, e_local, num_slots,
                 BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, PAD_W: tl.constexpr, FILL: tl.constexpr,
                 SLOT_SUMS: tl.constexpr):
    """The scan of one grouping (see the module docstring); with ``SLOT_SUMS`` also the padded length of
    each run of ``e_local`` groups (one adapter slot's virtual experts) into ``slot_counts_ptr``."""
    gi = tl.arange(0, G_PAD)
    gmask = gi < num_groups
    counts = tl.zeros([G_PAD], dtype=tl.int32)
    for c in range(num_chunks):
        counts += tl.load(chunk_counts_ptr + c * num_groups + gi, mask=gmask, other=0)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    tl.store(padded_ptr + gi, padded, mask=gmask)
    if SLOT_SUMS:
        slot_of = gi // e_local
        for s in range(num_slots):
            tl.store(slot_counts_ptr + s, tl.sum(tl.where(slot_of == s, padded, 0), 0))
    run = starts
    for c in range(num_chunks):
        tl.store(chunk_offsets_ptr + c * num_groups + gi, run, mask=gmask)
        run += tl.load(chunk_counts_ptr + c * num_groups + gi, mask=gmask, other=0)
    # sentinel in each group's padding (fewer than BLOCK_SIZE slots per group)
    w = tl.arange(0, PAD_W)
    for j0 in range(0, BLOCK_SIZE, PAD_W):
        slot = counts[:, None] + j0 + w[None, :]
        m = gmask[:, None] & (slot < padded[:, None])
        tl.store(sorted_ptr + starts[:, None] + slot, numel, mask=m)
    # block -> group table
    first = starts // BLOCK_SIZE
    nblk = padded // BLOCK_SIZE
    max_nblk = tl.max(nblk, 0)
    for j0 in range(0, max_nblk, PAD_W):
        j = j0 + w[None, :]
        m = gmask[:, None] & (j < nblk[:, None])
        tl.store(block_ids_ptr + first[:, None] + j, gi[:, None] + tl.zeros([G_PAD, PAD_W], tl.int32), mask=m)
    # unused tails
    f = tl.arange(0, FILL)
    for t0 in range(total, size, FILL):
        tl.store(sorted_ptr + t0 + f, numel, mask=t0 + f < size)
    for b0 in range(total // BLOCK_SIZE, num_blocks, FILL):
        tl.store(block_ids_ptr + b0 + f, -1, mask=b0 + f < num_blocks)


@triton.jit
def _scan_kernel(chunk_counts_ptr, chunk_offsets_ptr, sorted_ptr, block_ids_ptr, total_ptr, padded_ptr,
                 slot_counts_ptr, numel, num_groups, num_chunks, size, num_blocks, e_local, num_slots,
                 BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, PAD_W: tl.constexpr, FILL: tl.constexpr,
                 SLOT_SUMS: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    _scan_groups(chunk_counts_ptr, chunk_offsets_ptr, sorted_ptr, block_ids_ptr, total_ptr, padded_ptr,
                 slot_counts_ptr, numel, num_groups, num_chunks, size, num_blocks, e_local, num_slots,
                 BLOCK_SIZE, G_PAD, PAD_W, FILL, SLOT_SUMS)


@triton.jit
def _scatter_groups(b, c, chunk_offsets_ptr, sorted_ptr, num_groups, CHUNK: tl.constexpr, G_PAD: tl.constexpr):
    """Write the pair ids of chunk ``c``, binned ``b``, to their groups' slots (in pair order)."""
    pos = tl.arange(0, CHUNK)
    keys = tl.sort(b * CHUNK + pos)  # stable: by group, then by position in the chunk
    sg = keys // CHUNK
    hist = tl.histogram(b, G_PAD)
    group_first = tl.cumsum(hist, 0) - hist  # first sorted index of each group in this chunk
    rank = pos - tl.gather(group_first, sg, 0)
    real = sg < num_groups
    base = tl.load(chunk_offsets_ptr + c * num_groups + sg, mask=real, other=0)
    tl.store(sorted_ptr + base + rank, c * CHUNK + keys % CHUNK, mask=real)


@triton.jit
def _scatter_kernel(ids_ptr, chunk_offsets_ptr, sorted_ptr, numel, num_groups, map_ptr, enabled_ptr, emap_ptr,
                    top_k, e_local, max_loras, e_global, CHUNK: tl.constexpr, G_PAD: tl.constexpr,
                    LORA: tl.constexpr, HAS_EMAP: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    c = tl.program_id(0)
    b = _bucket(ids_ptr, c, numel, num_groups, map_ptr, enabled_ptr, emap_ptr, top_k, e_local, max_loras, e_global,
                CHUNK, G_PAD, LORA, HAS_EMAP)
    _scatter_groups(b, c, chunk_offsets_ptr, sorted_ptr, num_groups, CHUNK, G_PAD)


# ---- both alignments of a MoE LoRA step in one pass ----------------------------------------------------
@triton.jit
def _both_bins(ids_ptr, c, numel, num_experts, map_ptr, enabled_ptr, top_k, max_loras, CHUNK: tl.constexpr,
               G_PAD: tl.constexpr, LG_PAD: tl.constexpr):
    """The expert bin and the virtual-expert bin of each pair of chunk ``c`` (ids: local expert ids)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inside = offs < numel
    g = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int32)
    v = _lora_group(g, offs, inside, map_ptr, enabled_ptr, top_k, num_experts, max_loras)
    return _bin(g, inside, num_experts, G_PAD), _bin(v, inside, num_experts * max_loras, LG_PAD)


@triton.jit
def _count2_kernel(ids_ptr, chunk_counts_ptr, lora_chunk_counts_ptr, numel, num_experts, map_ptr, enabled_ptr,
                   top_k, max_loras, CHUNK: tl.constexpr, G_PAD: tl.constexpr, LG_PAD: tl.constexpr,
                   USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    c = tl.program_id(0)
    b, lb = _both_bins(ids_ptr, c, numel, num_experts, map_ptr, enabled_ptr, top_k, max_loras, CHUNK, G_PAD, LG_PAD)
    _store_hist(chunk_counts_ptr, c, b, num_experts, G_PAD)
    _store_hist(lora_chunk_counts_ptr, c, lb, num_experts * max_loras, LG_PAD)


@triton.jit
def _scan2_kernel(chunk_counts_ptr, chunk_offsets_ptr, sorted_ptr, block_ids_ptr, total_ptr, padded_ptr,
                  lora_chunk_counts_ptr, lora_chunk_offsets_ptr, lora_sorted_ptr, lora_block_ids_ptr, lora_total_ptr,
                  lora_padded_ptr, slot_counts_ptr, numel, num_experts, max_loras, num_chunks, size, num_blocks,
                  lora_size, lora_num_blocks, BLOCK_SIZE: tl.constexpr, LORA_BLOCK_SIZE: tl.constexpr,
                  G_PAD: tl.constexpr, LG_PAD: tl.constexpr, PAD_W: tl.constexpr, LORA_PAD_W: tl.constexpr,
                  FILL: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    _scan_groups(chunk_counts_ptr, chunk_offsets_ptr, sorted_ptr, block_ids_ptr, total_ptr, padded_ptr,
                 padded_ptr, numel, num_experts, num_chunks, size, num_blocks, num_experts, 0,
                 BLOCK_SIZE, G_PAD, PAD_W, FILL, False)
    _scan_groups(lora_chunk_counts_ptr, lora_chunk_offsets_ptr, lora_sorted_ptr, lora_block_ids_ptr, lora_total_ptr,
                 lora_padded_ptr, slot_counts_ptr, numel, num_experts * max_loras, num_chunks, lora_size,
                 lora_num_blocks, num_experts, max_loras, LORA_BLOCK_SIZE, LG_PAD, LORA_PAD_W, FILL, True)


@triton.jit
def _scatter2_kernel(ids_ptr, chunk_offsets_ptr, sorted_ptr, lora_chunk_offsets_ptr, lora_sorted_ptr, numel,
                     num_experts, map_ptr, enabled_ptr, top_k, max_loras, CHUNK: tl.constexpr, G_PAD: tl.constexpr,
                     LG_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    c = tl.program_id(0)
    b, lb = _both_bins(ids_ptr, c, numel, num_experts, map_ptr, enabled_ptr, top_k, max_loras, CHUNK, G_PAD, LG_PAD)
    _scatter_groups(b, c, chunk_offsets_ptr, sorted_ptr, num_experts, CHUNK, G_PAD)
    _scatter_groups(lb, c, lora_chunk_offsets_ptr, lora_sorted_ptr, num_experts * max_loras, CHUNK, LG_PAD)
