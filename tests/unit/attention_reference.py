"""Dense float64 causal attention, and a prefill-then-decode check of an Attention layer against it."""
import math

import torch

from tests.utils import assert_close
from vllm.attention import build_metadata
from vllm.forward_context import set_forward_context


def dense_causal(q, k, v, scale):
    """q: [S, H, D], k/v: [S, kvH, D] float64 -> [S, H, D] (grouped-query heads repeated)."""
    S = q.shape[0]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool, device=q.device), 1)[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def check_prefill_then_decode(attn, lens, tables, H, kvH, D, bs, device):
    """Prefill all but the last token of each sequence, decode the last one; compare with dense."""
    qs = [torch.randn(n, H, D, device=device) for n in lens]
    ks = [torch.randn(n, kvH, D, device=device) for n in lens]
    vs = [torch.randn(n, kvH, D, device=device) for n in lens]
    pre = [n - 1 for n in lens]
    with set_forward_context(build_metadata(pre, pre, tables, bs, device)):
        out_pre = attn(*(torch.cat([x[:-1] for x in xs]).flatten(1) for xs in (qs, ks, vs)))
    with set_forward_context(build_metadata([1] * len(lens), lens, tables, bs, device)):
        out_dec = attn(*(torch.cat([x[-1:] for x in xs]).flatten(1) for xs in (qs, ks, vs)))
    start = 0
    for b, n in enumerate(lens):
        ref = dense_causal(qs[b].double(), ks[b].double(), vs[b].double(), 1 / math.sqrt(D))
        got = torch.cat([out_pre[start:start + n - 1], out_dec[b:b + 1]]).view(n, H, D)
        assert_close(got, ref.float(), torch.float32)
        start += n - 1
