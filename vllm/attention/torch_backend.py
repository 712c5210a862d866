"""Paged attention in plain torch: write the new K/V into the cache, then attend.

Reference-quality and used on CPU (and on GPU until a Triton kernel replaces
it): per sequence, gather its context from the cache, float32 softmax with a
causal mask offset by the already-cached context, grouped-query heads.
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


def paged_attention_torch(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """query: [T, num_heads, head_dim] -> output [T, num_heads, head_dim]."""
    T, H, D = query.shape
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
