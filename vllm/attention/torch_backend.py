"""Paged attention in plain torch: write the new K/V into the cache, then attend.

Used on CPU (the Triton kernel is the CUDA default): float32 softmax, a
causal mask offset by the already-cached context, grouped-query heads.  A
decode step (one new token per sequence) is batched: the sequences' contexts
are gathered from the cache into a padded [B, L, kv_heads, D] block (a chunk of
sequences at a time, to bound memory) and attended with two batched matmuls.
Other steps go sequence by sequence.
"""
from __future__ import annotations

import torch

from vllm.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key / value: [T, num_kv_heads, head_dim] into the slots (slot -1 skipped)."""
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


# Elements of one chunk's gathered K (or V) in the batched decode path (float32: 64 MiB).
_DECODE_CHUNK_ELEMENTS = 1 << 24


def _decode_batched(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    out: torch.Tensor) -> None:
    """One query token per sequence (query row b = sequence b)."""
    B, H, D = query.shape
    kv_heads, bs = kv_cache.shape[3], meta.block_size
    group = H // kv_heads
    flat = kv_cache.view(2, -1, kv_heads, D)
    lens = meta.seq_lens.to(torch.long)
    per_seq = max(1, meta.max_seq_len * kv_heads * D)
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // per_seq)
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        L = max(meta.seq_lens_cpu[lo:hi])
        pos = torch.arange(L, device=query.device)
        blocks = meta.block_tables[lo:hi, pos // bs].to(torch.long)  # [b, L]
        slots = blocks * bs + pos % bs
        valid = pos[None, :] < lens[lo:hi, None]  # [b, L]
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        k = flat[0][slots].float()  # [b, L, kvH, D]
        v = flat[1][slots].float()
        q = query[lo:hi].float().view(hi - lo, kv_heads, group, D)
        scores = torch.einsum("bgrd,blgd->bgrl", q, k) * scale
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        o = torch.einsum("bgrl,blgd->bgrd", scores.softmax(-1), v)
        out[lo:hi] = o.reshape(hi - lo, H, D).to(out.dtype)


def paged_attention_torch(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """query: [T, num_heads, head_dim] -> output [T, num_heads, head_dim]."""
    T, H, D = query.shape
    if meta.num_seqs and meta.max_query_len == 1:
        out = torch.empty_like(query)
        _decode_batched(query, kv_cache, meta, scale, out)
        return out
    kv_heads = kv_cache.shape[3]
    group = H // kv_heads
    bs = meta.block_size
    out = torch.empty_like(query)
    tables = meta.block_tables.tolist() if meta.num_seqs else []
    start = 0
    for b in range(meta.num_seqs):
        q_len, s_len = meta.query_lens_cpu[b], meta.seq_lens_cpu[b]
        n_blocks = -(-s_len // bs)
        blocks = torch.tensor(tables[b][:n_blocks], device=kv_cache.device, dtype=torch.long)
        k = kv_cache[0, blocks].reshape(-1, kv_heads, D)[:s_len].float()  # [S, kvH, D]
        v = kv_cache[1, blocks].reshape(-1, kv_heads, D)[:s_len].float()
        q = query[start:start + q_len].float()  # [Q, H, D]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(s_len - q_len, s_len, device=query.device)
        k_pos = torch.arange(s_len, device=query.device)
        scores.masked_fill_((k_pos[None, :] > q_pos[:, None])[None], float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
        start += q_len
    return out
