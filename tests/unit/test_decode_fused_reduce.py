"""Split-context decode with the reduce in the split kernel (``triton_backend.DECODE_FUSED_REDUCE``).

The last split program of each (sequence, kv head), found with an atomic counter, reduces the group's
heads.  Checked: against the torch backend and a dense float64 reference (through the existing cases,
sinks and window included); equal to the two-launch path; the counters back at zero after every launch
(a second launch on the same counters gives the same output); a CUDA graph replaying it.
"""
import math

import pytest
import torch

from tests.unit.test_attention_sinks_window import _run as run_sinks_window
from tests.unit.test_paged_attention_triton import _run_case
from tests.utils import assert_close, poison_
from vllm.attention import allocate_kv_cache, build_metadata, triton_backend
from vllm.attention.torch_backend import paged_attention_torch, write_kv
from vllm.attention.triton_backend import paged_attention_triton
from vllm.model_executor.layers.ops import counters


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(triton_backend, "DECODE_FUSED_REDUCE", True)
    monkeypatch.setattr(counters, "_BUFFERS", {})


@pytest.mark.parametrize("num_splits", [3, 16])
@pytest.mark.parametrize("dtype,H,kvH,D,bs", [
    (torch.float32, 4, 2, 32, 4),
    (torch.float16, 8, 1, 64, 16),  # group 8: the last program reduces 8 heads
    (torch.float32, 6, 2, 24, 6),  # group 3, head_dim 24, block size 6
])
def test_fused_reduce_matches_torch_and_dense(fused, num_splits, dtype, H, kvH, D, bs, device):
    # 1 position (one non-empty range) to 300 (every range non-empty at 3 splits)
    _run_case([1] * 5, [37, 1, 300, 64, 65], H, kvH, D, bs, dtype, device, num_splits=num_splits)


@pytest.mark.parametrize("window,sinks_scale", [(None, 30.0), (40, 30.0), (7, 3.0)])
def test_fused_reduce_sinks_window(fused, window, sinks_scale, device):
    run_sinks_window("triton", [1] * 5, [200, 1, 39, 41, 130], 4, 2, 32, 4, torch.float32, device, window,
                     sinks_scale, num_splits=16)


def _decode_case(device, dtype=torch.float32, H=8, kvH=2, D=32, bs=4, seq_lens=(1, 45, 130, 7)):
    gen = torch.Generator().manual_seed(11)
    blocks = [-(-s // bs) for s in seq_lens]
    perm = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
    tables, i = [], 0
    for n in blocks:
        tables.append(perm[i:i + n])
        i += n
    cache = allocate_kv_cache(sum(blocks) + 2, bs, kvH, D, dtype, device)
    full = build_metadata(list(seq_lens), list(seq_lens), tables, bs, device)
    T = sum(seq_lens)
    write_kv(cache, torch.randn(T, kvH, D, generator=gen).to(device, dtype),
             torch.randn(T, kvH, D, generator=gen).to(device, dtype), full.slot_mapping)
    meta = build_metadata([1] * len(seq_lens), list(seq_lens), tables, bs, device)
    query = torch.randn(len(seq_lens), H, D, generator=gen).to(device, dtype)
    return query, cache, meta, 1 / math.sqrt(D)


def test_fused_reduce_equals_two_launches_and_resets_counters(monkeypatch, device):
    query, cache, meta, scale = _decode_case(device)
    two = paged_attention_triton(query, cache, meta, scale, out=poison_(torch.empty_like(query)), num_splits=8)
    monkeypatch.setattr(triton_backend, "DECODE_FUSED_REDUCE", True)
    monkeypatch.setattr(counters, "_BUFFERS", {})
    outs = []
    for _ in range(2):  # the second launch counts from the zeros the first left
        outs.append(paged_attention_triton(query, cache, meta, scale, out=poison_(torch.empty_like(query)),
                                           num_splits=8))
        buf = counters._BUFFERS[("split decode attention", query.device)]
        assert buf.numel() >= meta.num_seqs * cache.shape[3]
        assert int(buf.abs().sum()) == 0, "a counter was left non-zero after the launch"
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    if device.type == "cpu":  # the interpreter: the same reduce code on the same partials
        assert torch.equal(outs[0], two)
    else:  # a different warp count may sum the splits in another order
        assert_close(outs[0], two, name="fused vs two launches")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_reduce_in_a_graph(monkeypatch, dtype):
    """Qwen3-30B-A3B's heads (32 / 4 of 128), contexts 1 to 4100, replayed from a CUDA graph."""
    monkeypatch.setattr(triton_backend, "DECODE_FUSED_REDUCE", True)
    monkeypatch.setattr(counters, "_BUFFERS", {})
    dev = torch.device("cuda")
    query, cache, meta, scale = _decode_case(dev, dtype, 32, 4, 128, 16, (1, 144, 4100, 77, 16))
    ref = paged_attention_torch(query, cache, meta, scale)
    out = torch.empty_like(query)
    paged_attention_triton(query, cache, meta, scale, out=out)  # eager: compiles, allocates the counters
    assert_close(out, ref, dtype, name="fused reduce, eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(query, cache, meta, scale, out=out)
    for _ in range(3):
        poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref, dtype, name="fused reduce, graph replay")
    assert int(counters._BUFFERS[("split decode attention", dev)].abs().sum()) == 0
