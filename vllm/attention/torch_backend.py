"""Paged attention in plain torch: write the new K/V into the cache, then attend.

Used on CPU (the Triton kernel is the CUDA default): float32 softmax, a
causal mask offset by the already-cached context, grouped-query heads.  A
decode step (one new token per sequence) is batched: the sequences' contexts
are gathered from the cache into a padded [B, L, kv_heads, D] block (a chunk of
sequences at a time, to bound memory) and attended with two batched matmuls.
Other steps go sequence by sequence.

Two options (gpt-oss): ``sinks`` [num_heads], one learned logit per head that joins the
softmax denominator (a virtual key whose value is zero); ``sliding_window`` W, a query at
position p attends to positions p - W + 1 .. p only.  Context wholly before the window is
never gathered (the decode path gathers the last W positions, the prefill path starts at
the first block the earliest query row needs).
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.attention.metadata import AttentionMetadata


def check_attention_options(num_heads: int, sinks: Optional[torch.Tensor], sliding_window: Optional[int],
                            device: torch.device) -> None:
    """Both backends: ``sinks`` is [num_heads] on the query's device; the window is None or >= 1."""
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.device != device):
        raise ValueError(f"sinks must be [{num_heads}] on {device}, got {tuple(sinks.shape)} on {sinks.device}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


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


def _softmax(scores: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim of fp32 ``scores`` [..., H, Q, L] (heads at dim -3); with ``sinks`` [H],
    each head's sink logit joins the denominator (and gets no value)."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.float().view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]


def _decode_batched(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    out: torch.Tensor, sinks: Optional[torch.Tensor], window: Optional[int]) -> None:
    """One query token per sequence (query row b = sequence b); with a window, only the last
    ``window`` positions of each context are gathered."""
    B, H, D = query.shape
    kv_heads, bs = kv_cache.shape[3], meta.block_size
    group = H // kv_heads
    flat = kv_cache.view(2, -1, kv_heads, D)
    lens = meta.seq_lens.to(torch.long)
    spans = [min(s, window) if window else s for s in meta.seq_lens_cpu]  # positions each row attends to
    first = (lens - torch.tensor(spans, device=lens.device)) if window else torch.zeros_like(lens)
    per_seq = max(1, max(spans) * kv_heads * D)
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // per_seq)
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        L = max(spans[lo:hi])
        pos = first[lo:hi, None] + torch.arange(L, device=query.device)[None, :]  # [b, L]
        valid = pos < lens[lo:hi, None]
        pos = torch.where(valid, pos, first[lo:hi, None])  # padding reads the row's first seen position
        blocks = torch.gather(meta.block_tables[lo:hi].to(torch.long), 1, pos // bs)  # [b, L]
        slots = blocks * bs + pos % bs
        k = flat[0][slots].float()  # [b, L, kvH, D]
        v = flat[1][slots].float()
        q = query[lo:hi].float().view(hi - lo, kv_heads, group, D)
        scores = torch.einsum("bgrd,blgd->bgrl", q, k) * scale
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = _softmax(scores.reshape(hi - lo, H, 1, L), sinks).view(hi - lo, kv_heads, group, L)
        o = torch.einsum("bgrl,blgd->bgrd", probs, v)
        out[lo:hi] = o.reshape(hi - lo, H, D).to(out.dtype)


def paged_attention_torch(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float, *, sinks: Optional[torch.Tensor] = None,
                          sliding_window: Optional[int] = None) -> torch.Tensor:
    """query: [T, num_heads, head_dim] -> output [T, num_heads, head_dim].

    ``sinks``: [num_heads] logits joining each head's softmax denominator; ``sliding_window``:
    None (full causal) or W >= 1 (a query attends to its last W positions, itself included).
    """
    T, H, D = query.shape
    check_attention_options(H, sinks, sliding_window, query.device)
    if meta.num_seqs and meta.max_query_len == 1:
        out = torch.empty_like(query)
        _decode_batched(query, kv_cache, meta, scale, out, sinks, sliding_window)
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
        # blocks wholly before the window of the first query row are skipped
        b0 = max(0, s_len - q_len - sliding_window + 1) // bs if sliding_window else 0
        lo = b0 * bs  # first gathered position
        blocks = torch.tensor(tables[b][b0:n_blocks], device=kv_cache.device, dtype=torch.long)
        k = kv_cache[0, blocks].reshape(-1, kv_heads, D)[:s_len - lo].float()  # [S - lo, kvH, D]
        v = kv_cache[1, blocks].reshape(-1, kv_heads, D)[:s_len - lo].float()
        q = query[start:start + q_len].float()  # [Q, H, D]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(s_len - q_len, s_len, device=query.device)
        k_pos = torch.arange(lo, s_len, device=query.device)
        hidden = k_pos[None, :] > q_pos[:, None]
        if sliding_window:
            hidden |= k_pos[None, :] <= q_pos[:, None] - sliding_window
        scores.masked_fill_(hidden[None], float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", _softmax(scores, sinks), v).to(out.dtype)
        start += q_len
    return out
