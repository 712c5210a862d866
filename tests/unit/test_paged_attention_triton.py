"""Triton paged attention vs the torch backend and a dense float64 causal reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) at small sizes
in fp32 / fp16; the ``cuda`` tests use realistic sizes and skip without a GPU.
"""
import math

import pytest
import torch

from tests.utils import assert_close, poison_
from vllm.attention import allocate_kv_cache, build_metadata
from vllm.attention.torch_backend import paged_attention_torch, write_kv
from vllm.attention.triton_backend import paged_attention_triton, write_kv_triton
from tests.unit.attention_reference import check_prefill_then_decode, dense_causal
from vllm.model_executor.layers.attention import Attention, bind_kv_cache, select_attention_backend


def _scattered_tables(seq_lens, bs, num_blocks, gen, extra=1):
    """Non-contiguous, shuffled block ids per sequence (plus ``extra`` unused trailing entries)."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for s in seq_lens:
        n = -(-s // bs) + extra
        tables.append(perm[i:i + n])
        i += n
    assert i <= num_blocks
    return tables


def _run_case(query_lens, seq_lens, H, kvH, D, bs, dtype, device, num_splits=None):
    """Fill the cache with each sequence's cached context, write the new K/V, attend; check all three ways."""
    gen = torch.Generator().manual_seed(1234)
    num_blocks = sum(-(-s // bs) + 1 for s in seq_lens) + 3
    tables = _scattered_tables(seq_lens, bs, num_blocks, gen)
    scale = 1 / math.sqrt(D)
    qs = [torch.randn(s, H, D, generator=gen).to(dtype) for s in seq_lens]
    ks = [torch.randn(s, kvH, D, generator=gen).to(dtype) for s in seq_lens]
    vs = [torch.randn(s, kvH, D, generator=gen).to(dtype) for s in seq_lens]
    cache = allocate_kv_cache(num_blocks, bs, kvH, D, dtype, device)
    # cached context (positions before this step's queries), written by the torch reference
    ctx = [s - q for q, s in zip(query_lens, seq_lens)]
    has_ctx = [b for b, c in enumerate(ctx) if c]
    if has_ctx:
        ctx_meta = build_metadata([ctx[b] for b in has_ctx], [ctx[b] for b in has_ctx],
                                  [tables[b] for b in has_ctx], bs, device)
        write_kv(cache, torch.cat([ks[b][:ctx[b]] for b in has_ctx]).to(device),
                 torch.cat([vs[b][:ctx[b]] for b in has_ctx]).to(device), ctx_meta.slot_mapping)
    meta = build_metadata(query_lens, seq_lens, tables, bs, device)
    new_k = torch.cat([k[c:] for k, c in zip(ks, ctx)]).to(device)
    new_v = torch.cat([v[c:] for v, c in zip(vs, ctx)]).to(device)
    ref_cache = cache.clone()
    write_kv(ref_cache, new_k, new_v, meta.slot_mapping)
    write_kv_triton(cache, new_k, new_v, meta.slot_mapping)
    assert torch.equal(cache, ref_cache)

    query = torch.cat([q[c:] for q, c in zip(qs, ctx)]).to(device)
    out = poison_(torch.empty_like(query))
    got = paged_attention_triton(query, cache, meta, scale, out=out, num_splits=num_splits)
    assert got is out
    assert torch.isfinite(out).all(), "some output rows were not written"
    assert_close(out, paged_attention_torch(query, cache, meta, scale), dtype, name="vs torch backend")
    dense = torch.cat([dense_causal(q.double(), k.double(), v.double(), scale)[c:]
                       for q, k, v, c in zip(qs, ks, vs, ctx)])
    assert_close(out, dense.to(device=device, dtype=torch.float32), dtype, name="vs dense float64")


# Mixed batch: decodes (query_len 1) with long context, a fresh prefill, chunked prefills with cached
# context; seq_lens 16 / 20 / 32 are exact multiples of block size 4 (16 and 32 of block size 16).
_QUERY_LENS = [1, 20, 3, 1, 9]
_SEQ_LENS = [37, 20, 32, 16, 30]


@pytest.mark.parametrize("dtype,H,kvH,D,bs", [
    (torch.float32, 4, 2, 32, 4),
    (torch.float16, 4, 1, 64, 16),
    (torch.float32, 4, 1, 64, 16),
    (torch.float16, 4, 2, 32, 4),
    (torch.float32, 4, 4, 32, 16),  # no GQA
    (torch.float32, 6, 2, 24, 6),  # group 3 and head_dim 24 (padded), block size not a power of two
])
def test_mixed_batch_matches_torch_and_dense(dtype, H, kvH, D, bs, device):
    _run_case(_QUERY_LENS, _SEQ_LENS, H, kvH, D, bs, dtype, device)


def test_decode_only_and_single_prefill(device):
    _run_case([1, 1, 1], [5, 8, 1], 4, 2, 32, 4, torch.float32, device)
    _run_case([40], [40], 4, 1, 32, 16, torch.float16, device)  # several query blocks, causal loop limit


# Split-context decode (flash-decoding): seq_lens from 1 position to several ranges of 32-position
# tiles; 16 splits of a 37-token context leave most ranges empty, 3 splits of 300 cover 10 tiles.
@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("dtype,H,kvH,D,bs", [
    (torch.float32, 4, 2, 32, 4),
    (torch.float16, 8, 1, 64, 16),  # group 8
    (torch.float32, 6, 2, 24, 6),  # group 3, head_dim 24, block size 6
])
def test_decode_split_matches_torch_and_dense(num_splits, dtype, H, kvH, D, bs, device):
    _run_case([1] * 5, [37, 1, 300, 64, 65], H, kvH, D, bs, dtype, device, num_splits=num_splits)


def test_decode_split_default_and_errors(device):
    from vllm.attention.triton_backend import DECODE_SPLITS, decode_num_splits

    assert decode_num_splits(4, 2, torch.device("cpu")) == 1
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert decode_num_splits(1, 4, torch.device("cuda")) == DECODE_SPLITS
        assert decode_num_splits(sms, 1, torch.device("cuda")) == 1
    meta = build_metadata([1], [3], [[0]], 4, device)
    cache = allocate_kv_cache(2, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_triton(torch.randn(1, 4, 16, device=device), cache, meta, 1.0, num_splits=0)


def test_write_kv_triton_skips_negative_slots(device):
    cache = poison_(allocate_kv_cache(6, 4, 2, 16, torch.float32, device))
    before = cache.clone()
    k, v = torch.randn(5, 2, 16, device=device), torch.randn(5, 2, 16, device=device)
    slots = torch.tensor([3, -1, 17, 0, -1], dtype=torch.int64, device=device)
    write_kv_triton(cache, k, v, slots)
    flat = cache.view(2, -1, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[0, s], k[t]) and torch.equal(flat[1, s], v[t])
    written = torch.zeros(24, dtype=torch.bool)
    written[[3, 17, 0]] = True
    untouched = flat[:, ~written.to(device)]
    assert torch.isnan(untouched).all() and torch.isnan(before.view(2, -1, 2, 16)[:, ~written.to(device)]).all()


def test_validation_errors(device):
    meta = build_metadata([2], [2], [[0]], 4, device)
    cache = allocate_kv_cache(2, 4, 2, 16, torch.float32, device)
    q = torch.randn(2, 4, 16, device=device)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_triton(q.half(), cache, meta, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(torch.randn(2, 3, 16, device=device), cache, meta, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_triton(torch.randn(2, 4, 32, device=device), cache, meta, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        paged_attention_triton(torch.randn(3, 4, 16, device=device), cache, meta, 1.0)
    with pytest.raises(ValueError, match="kv_cache must be"):
        paged_attention_triton(q, cache[0], meta, 1.0)
    with pytest.raises(ValueError, match="block_size"):
        paged_attention_triton(q, allocate_kv_cache(2, 8, 2, 16, torch.float32, device), meta, 1.0)


def test_backend_selection_env(monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "triton")
    assert Attention(4, 16, 0.25, 2).backend == "triton"
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TORCH")
    assert Attention(4, 16, 0.25, 2).backend == "torch"
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND")
    assert select_attention_backend() == ("triton" if torch.cuda.is_available() else "torch")
    assert select_attention_backend("cpu") == "torch"
    assert select_attention_backend("cuda") == "triton"
    # without the variable the layer decides when its cache is bound, by the cache's device
    cpu_layer = Attention(4, 16, 0.25, 2)
    assert cpu_layer.backend is None
    bind_kv_cache(torch.nn.Sequential(cpu_layer), [allocate_kv_cache(4, 4, 2, 16, torch.float32, "cpu")])
    assert cpu_layer.backend == "torch"
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="VLLM_ATTENTION_BACKEND"):
        Attention(4, 16, 0.25, 2)


def test_attention_layer_on_triton_backend(monkeypatch, device):
    """The layer picks the backend once at construction; prefill then decode through it vs dense."""
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "triton")
    H, kvH, D, bs = 4, 2, 16, 4
    attn = Attention(H, D, 1 / math.sqrt(D), kvH)
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "torch")  # no effect on an existing layer
    assert attn.backend == "triton"
    bind_kv_cache(torch.nn.Sequential(attn), [allocate_kv_cache(16, bs, kvH, D, torch.float32, device)])
    check_prefill_then_decode(attn, [6, 9], [[3, 7], [0, 2, 9]], H, kvH, D, bs, device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_realistic_mixed_batch(dtype):
    """8 decodes with 1000-token contexts plus one 512-token prefill; 32 heads / 8 kv heads, head_dim 128."""
    query_lens = [1] * 8 + [512]
    seq_lens = [1000 + 3 * i for i in range(8)] + [512]
    _run_case(query_lens, seq_lens, 32, 8, 128, 16, dtype, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 16])  # None: the default (splits at this small batch)
def test_cuda_decode_split_qwen3_heads(dtype, num_splits):
    """Decode at batch 3, 32 q / 4 kv heads of 128: contexts of 1, 144 and 4100 positions."""
    _run_case([1, 1, 1], [1, 144, 4100], 32, 4, 128, 16, dtype, torch.device("cuda"), num_splits=num_splits)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_chunked_prefill_with_context(dtype):
    _run_case([256, 1, 77], [1280, 2049, 300], 32, 8, 128, 16, dtype, torch.device("cuda"))
