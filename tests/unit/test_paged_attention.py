"""Paged attention (torch backend) against plain causal attention over the full sequence."""
import math

import torch

from tests.unit.attention_reference import check_prefill_then_decode
from vllm.attention import allocate_kv_cache
from vllm.model_executor.layers.attention import Attention, bind_kv_cache


def test_prefill_then_decode_matches_dense(monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "torch")
    H, kvH, D, bs = 4, 2, 8, 4
    attn = Attention(H, D, 1 / math.sqrt(D), kvH)
    bind_kv_cache(torch.nn.Sequential(attn), [allocate_kv_cache(16, bs, kvH, D, torch.float32, "cpu")])
    check_prefill_then_decode(attn, [5, 9], [[3, 7], [0, 2, 9]], H, kvH, D, bs, "cpu")  # scattered blocks


def test_batched_decode_matches_dense_per_sequence(monkeypatch):
    """Decode steps are batched over sequences (padded contexts, chunks of sequences): one query
    per sequence of very different lengths, scattered blocks, grouped heads, vs float64 dense."""
    import vllm.attention.torch_backend as tb
    from tests.unit.attention_reference import dense_causal
    from tests.utils import assert_close
    from vllm.attention import build_metadata

    H, kvH, D, bs = 6, 2, 8, 4
    lens = [1, 6, 13, 4, 9]
    perm = torch.randperm(20).tolist()  # scattered, shared pool of blocks
    tables, used = [], 0
    for n in lens:
        k = -(-n // bs)
        tables.append(perm[used:used + k])
        used += k
    cache = allocate_kv_cache(20, bs, kvH, D, torch.float32, "cpu")
    cache.normal_()
    q = torch.randn(len(lens), H, D)
    meta = build_metadata([1] * len(lens), lens, tables, bs, "cpu")
    refs = []
    for b, n in enumerate(lens):
        slots = torch.tensor([tables[b][p // bs] * bs + p % bs for p in range(n)])
        k, v = cache[0].view(-1, kvH, D)[slots], cache[1].view(-1, kvH, D)[slots]
        qs = torch.cat([torch.zeros(n - 1, H, D), q[b:b + 1]]).double()  # only the last row is compared
        refs.append(dense_causal(qs, k.double(), v.double(), 0.3)[-1])
    for chunk_elements in (tb._DECODE_CHUNK_ELEMENTS, 2 * 13 * kvH * D):  # one chunk; chunks of two sequences
        monkeypatch.setattr(tb, "_DECODE_CHUNK_ELEMENTS", chunk_elements)
        got = tb.paged_attention_torch(q, cache, meta, 0.3)
        assert_close(got, torch.stack(refs).float(), torch.float32)
