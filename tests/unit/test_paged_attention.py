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
