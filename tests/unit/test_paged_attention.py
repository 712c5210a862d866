"""Paged attention (torch backend) against plain causal attention over the full sequence."""
import math

import torch

from tests.utils import assert_close
from vllm.attention import allocate_kv_cache, build_metadata
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention, bind_kv_cache


def _dense_causal(q, k, v, scale):
    """q: [S, H, D], k/v: [S, kvH, D] float64."""
    S, H, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_prefill_then_decode_matches_dense():
    H, kvH, D, bs = 4, 2, 8, 4
    attn = Attention(H, D, 1 / math.sqrt(D), kvH)
    model = torch.nn.Sequential(attn)
    bind_kv_cache(model, [allocate_kv_cache(16, bs, kvH, D, torch.float32, "cpu")])
    lens = [5, 9]
    tables = [[3, 7], [0, 2, 9]]  # scattered blocks
    qs = [torch.randn(n, H, D) for n in lens]
    ks = [torch.randn(n, kvH, D) for n in lens]
    vs = [torch.randn(n, kvH, D) for n in lens]
    # prefill all but the last token of each sequence, then decode the last one
    pre = [n - 1 for n in lens]
    meta = build_metadata(pre, pre, tables, bs, "cpu")
    with set_forward_context(meta):
        out_pre = attn(torch.cat([q[:-1] for q in qs]).flatten(1), torch.cat([k[:-1] for k in ks]).flatten(1),
                       torch.cat([v[:-1] for v in vs]).flatten(1))
    meta = build_metadata([1, 1], lens, tables, bs, "cpu")
    with set_forward_context(meta):
        out_dec = attn(torch.cat([q[-1:] for q in qs]).flatten(1), torch.cat([k[-1:] for k in ks]).flatten(1),
                       torch.cat([v[-1:] for v in vs]).flatten(1))
    start = 0
    for b, n in enumerate(lens):
        ref = _dense_causal(qs[b].double(), ks[b].double(), vs[b].double(), 1 / math.sqrt(D))
        got = torch.cat([out_pre[start:start + n - 1], out_dec[b:b + 1]]).view(n, H, D)
        assert_close(got, ref.float(), torch.float32)
        start += n - 1
