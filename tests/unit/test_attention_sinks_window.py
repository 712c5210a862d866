"""Attention sinks and sliding windows (gpt-oss) in both paged backends, vs a dense float64 reference.

Random data; windows smaller than the contexts; contexts spanning several cache blocks and several
kernel tiles; sinks random and large (a sink of +-30 outweighs or vanishes against every score).
Positions in blocks wholly before every query's window are filled with NaN: a backend that loaded
them (even masked) would return NaN, so the tests also check those blocks are skipped.
On CPU the Triton kernels run under TRITON_INTERPRET=1 at small sizes; ``cuda`` tests use real sizes.
"""
import math
from typing import Optional

import pytest
import torch

from tests.utils import assert_close, poison_
from vllm.attention import allocate_kv_cache, build_metadata
from vllm.attention.torch_backend import paged_attention_torch, write_kv
from vllm.attention.triton_backend import paged_attention_triton
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention, bind_kv_cache

# positions before a multiple of this (below every query's window) are poisoned: a multiple of every
# backend's context tile (the Triton kernels' BLOCK_N is 32 or 64) and of the test block sizes
_SKIP_GRAIN = 64


def dense_reference(q, k, v, scale: float, window: Optional[int], sinks: Optional[torch.Tensor]):
    """q: [S, H, D], k/v: [S, kvH, D] (float64) -> [S, H, D]: causal, last ``window`` positions, sink
    logits [H] joining each head's denominator (transformers' eager gpt-oss attention)."""
    S, H, _ = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(S)
    hidden = pos[None, :] > pos[:, None]
    if window is not None:
        hidden |= pos[None, :] <= pos[:, None] - window
    s = s.masked_fill(hidden[None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(H, 1, 1).expand(H, S, 1)], dim=-1)
    p = s.softmax(-1)[..., :S]
    return torch.einsum("hqk,khd->qhd", p, v)


def _run(backend: str, query_lens, seq_lens, H, kvH, D, bs, dtype, device, window, sinks_scale,
         num_splits=None):
    gen = torch.Generator().manual_seed(7)
    blocks_per = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(blocks_per) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in blocks_per:
        tables.append(perm[i:i + n])
        i += n
    scale = 1 / math.sqrt(D)
    qs = [torch.randn(s, H, D, generator=gen).to(dtype) for s in seq_lens]
    ks = [torch.randn(s, kvH, D, generator=gen).to(dtype) for s in seq_lens]
    vs = [torch.randn(s, kvH, D, generator=gen).to(dtype) for s in seq_lens]
    sinks = None if sinks_scale is None else (torch.randn(H, generator=gen) * sinks_scale).to(device)
    cache = allocate_kv_cache(num_blocks, bs, kvH, D, dtype, device)
    # the whole context in the cache (this step's K/V included: the layer writes it before attending)
    full = build_metadata(list(seq_lens), list(seq_lens), tables, bs, device)
    write_kv(cache, torch.cat(ks).to(device), torch.cat(vs).to(device), full.slot_mapping)
    if window is not None:
        for q_len, s_len, table in zip(query_lens, seq_lens, tables):
            first_seen = max(0, s_len - q_len - window + 1)  # the earliest query row's window start
            for p in range(first_seen // _SKIP_GRAIN * _SKIP_GRAIN):
                cache[:, table[p // bs], p % bs] = float("nan")
    meta = build_metadata(query_lens, seq_lens, tables, bs, device)
    query = torch.cat([q[s - n:] for q, n, s in zip(qs, query_lens, seq_lens)]).to(device)
    if backend == "triton":
        out = paged_attention_triton(query, cache, meta, scale, out=poison_(torch.empty_like(query)),
                                     num_splits=num_splits, sinks=sinks, sliding_window=window)
    else:
        out = paged_attention_torch(query, cache, meta, scale, sinks=sinks, sliding_window=window)
    assert torch.isfinite(out).all(), "a row was not written, or a block outside the window was read"
    ref = torch.cat([dense_reference(q.double(), k.double(), v.double(), scale, window,
                                     None if sinks is None else sinks.cpu())[s - n:]
                     for q, k, v, n, s in zip(qs, ks, vs, query_lens, seq_lens)])
    assert_close(out, ref.to(device=device, dtype=torch.float32), dtype, name=f"{backend} vs dense")
    return out


# a fresh prefill longer than the window, chunked prefills with cached context, decodes
_MIXED = ([70, 5, 1, 1, 33], [70, 150, 141, 9, 100])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window,sinks_scale", [(None, 30.0), (24, None), (24, 30.0), (5, 3.0), (1, 3.0)])
@pytest.mark.parametrize("dtype,H,kvH,D,bs", [(torch.float32, 4, 2, 32, 4), (torch.float16, 4, 1, 32, 16)])
def test_mixed_batch_sinks_window(backend, window, sinks_scale, dtype, H, kvH, D, bs, device):
    _run(backend, *_MIXED, H, kvH, D, bs, dtype, device, window, sinks_scale)


@pytest.mark.parametrize("backend,num_splits", [("torch", None), ("triton", 1), ("triton", 3), ("triton", 16)])
@pytest.mark.parametrize("window,sinks_scale", [(None, 30.0), (40, None), (40, 30.0), (7, 3.0)])
def test_decode_sinks_window(backend, num_splits, window, sinks_scale, device):
    """Decode-only batches; the Triton split path (ranges over the window's tiles, sink in the reduce)."""
    _run(backend, [1] * 5, [200, 1, 39, 41, 130], 4, 2, 32, 4, torch.float32, device, window, sinks_scale,
         num_splits=num_splits)


def test_options_validated(device):
    meta = build_metadata([2], [2], [[0]], 4, device)
    cache = allocate_kv_cache(2, 4, 2, 16, torch.float32, device)
    q = torch.randn(2, 4, 16, device=device)
    for attend in (paged_attention_torch, paged_attention_triton):
        with pytest.raises(ValueError, match="sinks must be"):
            attend(q, cache, meta, 1.0, sinks=torch.zeros(3, device=device))
        with pytest.raises(ValueError, match="sliding_window"):
            attend(q, cache, meta, 1.0, sliding_window=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_layer_sinks_window(backend, monkeypatch, device):
    """The layer passes its window and the caller's sinks through: prefill, then two decodes."""
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", backend)
    H, kvH, D, bs, W = 4, 2, 16, 4, 6
    attn = Attention(H, D, 1 / math.sqrt(D), kvH, sliding_window=W)
    bind_kv_cache(torch.nn.Sequential(attn), [allocate_kv_cache(8, bs, kvH, D, torch.float32, device)])
    sinks = torch.randn(H, device=device) * 4
    n, table = 13, [[5, 1, 7, 0]]
    q, k, v = torch.randn(n, H, D), torch.randn(n, kvH, D), torch.randn(n, kvH, D)
    outs = []
    for lo, hi in [(0, n - 2), (n - 2, n - 1), (n - 1, n)]:
        with set_forward_context(build_metadata([hi - lo], [hi], table, bs, device)):
            outs.append(attn(*(x[lo:hi].flatten(1).to(device) for x in (q, k, v)), sinks=sinks))
    ref = dense_reference(q.double(), k.double(), v.double(), 1 / math.sqrt(D), W, sinks.cpu())
    assert_close(torch.cat(outs).view(n, H, D), ref.float().to(device), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1])  # None: split decode at this small batch
def test_cuda_gpt_oss_heads(dtype, num_splits):
    """gpt-oss-20b heads (64 q / 8 kv of 64), window 128, sinks: a prefill of 700, chunked prefill, decodes."""
    dev = torch.device("cuda")
    _run("triton", [700, 64], [700, 1500], 64, 8, 64, 16, dtype, dev, 128, 5.0)
    _run("triton", [1] * 4, [1, 127, 129, 3000], 64, 8, 64, 16, dtype, dev, 128, 5.0, num_splits=num_splits)
    _run("triton", [1] * 4, [1, 127, 129, 3000], 64, 8, 64, 16, dtype, dev, None, 5.0, num_splits=num_splits)
