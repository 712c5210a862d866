"""The L2 weight prefetch of the norm and q/k norm + rotary launches (``ops/l2_prefetch.py``): what it plans,
that the launches' results are bit for bit those without it (interpreter on CPU, native on a GPU, in a CUDA graph
too), that the sm_90 build issues the prefetches after the PDL wait, and that every architecture's decode
gives the same logits with it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm.model_executor.layers.ops import l2_prefetch
from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite, qk_norm_rope
from vllm.model_executor.layers.ops.rms_norm import fused_add_rms_norm, rms_norm


@pytest.fixture
def prefetch_on(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH", True)
    return monkeypatch


def test_plan_covers_the_weight_in_chunks(prefetch_on):
    prefetch_on.setattr(l2_prefetch, "CHUNK_BYTES", 4096)
    w = torch.randn(1000, 333, dtype=torch.bfloat16)  # 666000 bytes: 163 chunks, the last one partial
    p = l2_prefetch.plan(w, 1)
    assert p.nbytes == 666000 and p.programs == 163 and (p.programs - 1) * 4096 < p.nbytes <= p.programs * 4096
    assert p.data.dtype == torch.uint8 and p.data.data_ptr() == w.data_ptr() and p.data.numel() == 666000
    odd = torch.randn(5, 3, dtype=torch.float16)  # 30 bytes: rounded down to 16
    assert l2_prefetch.plan(odd, 1).nbytes == 16
    assert l2_prefetch.plan(torch.randn(3, dtype=torch.float16), 1) is None  # 6 bytes: nothing to fetch


@pytest.mark.parametrize("case", ["switch off", "too many tokens", "no tokens", "no weight", "not contiguous"])
def test_plan_declines(prefetch_on, case):
    w = torch.randn(64, 64)
    tokens = 1
    if case == "switch off":
        prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", False)
    elif case == "too many tokens":
        tokens = l2_prefetch.L2_PREFETCH_MAX_TOKENS + 1
    elif case == "no tokens":
        tokens = 0
    elif case == "no weight":
        w = None
    else:
        w = w.t()
    assert l2_prefetch.plan(w, tokens) is None


def test_weight_of_follows_base_layers():
    lin = nn.Linear(8, 4, bias=False)
    wrapper = nn.Module()
    wrapper.base_layer = lin
    assert l2_prefetch.weight_of(lin) is lin.weight and l2_prefetch.weight_of(wrapper) is lin.weight
    packed = nn.Module()
    packed.weight = torch.zeros(4, 2, dtype=torch.int32)  # a quantized layer's words: not streamed as such
    assert l2_prefetch.weight_of(packed) is None and l2_prefetch.weight_of(nn.ReLU()) is None
    assert l2_prefetch.weight_of(None) is None


def _small_chunks(mp):
    mp.setattr(l2_prefetch, "CHUNK_BYTES", 2048)
    mp.setattr(l2_prefetch, "PIECE_BYTES", 512)


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_norms_give_the_same_bits_with_the_prefetch(prefetch_on, device, rows, early):
    _small_chunks(prefetch_on)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(device, torch.bfloat16)
    r = torch.randn(rows, 96, generator=g).to(device, torch.bfloat16)
    w = (torch.rand(96, generator=g) + 0.5).to(device, torch.bfloat16)
    target = torch.randn(100, 77, generator=g).to(device, torch.bfloat16)  # 15400 bytes: 8 programs
    assert l2_prefetch.plan(target, rows).programs == 8
    got = (rms_norm(x, w, 1e-6, use_triton=True, prefetch=target, prefetch_early=early),
           *fused_add_rms_norm(x, r, w, 1e-6, use_triton=True, prefetch=target, prefetch_early=early))
    prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", False)
    want = (rms_norm(x, w, 1e-6, use_triton=True), *fused_add_rms_norm(x, r, w, 1e-6, use_triton=True))
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and torch.equal(g_, w_)


@pytest.mark.parametrize("kv_write", [False, True])
def test_qk_norm_rope_gives_the_same_bits_with_the_prefetch(prefetch_on, device, kv_write):
    _small_chunks(prefetch_on)
    g = torch.Generator().manual_seed(7)
    T, hd, nq, nk = 3, 32, 4, 2
    qkv = torch.randn(T, (nq + 2 * nk) * hd, generator=g).to(device, torch.bfloat16)
    q, k, v = qkv.split([nq * hd, nk * hd, nk * hd], dim=-1)
    pos = torch.tensor([0, 5, 11], device=device)
    ang = torch.rand(16, hd // 2, generator=g) * 3
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    qw, kw = [(torch.rand(hd, generator=g) + 0.5).to(device, torch.bfloat16) for _ in range(2)]
    target = torch.randn(64, 100, generator=g).to(device, torch.bfloat16)  # 12800 bytes: 7 programs
    runs = []
    for on in (True, False):
        prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", on)
        cache = torch.full((2, 4, 4, nk, hd), 7.0, device=device, dtype=torch.bfloat16)  # 16 slots, 3 written
        w = KVCacheWrite(v, cache, torch.tensor([2, 9, 14], device=device)) if kv_write else None
        out = qk_norm_rope(q, k, pos, cos, sin, head_dim=hd, norm="per_head", q_weight=qw, k_weight=kw,
                           use_triton=True, kv_write=w, prefetch=target)
        runs.append((*out, cache))
    for g_, w_ in zip(*runs):
        assert torch.equal(g_, w_)
    if kv_write:
        untouched = torch.ones(16, dtype=torch.bool)
        untouched[[2, 9, 14]] = False
        assert bool((runs[0][2].reshape(2, 16, nk, hd)[:, untouched] == 7.0).all())


def test_sm90_build_prefetches_after_the_wait():
    """Compiled for sm_90 (a subprocess without the interpreter: l2_prefetch_hopper_compile.py): PREFETCH adds
    one bulk L2 prefetch per piece after griddepcontrol.wait, no spills, none without it."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/l2_prefetch_hopper_compile.py").count("ok ") == 5


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 64])
def test_prefetching_launches_in_a_cuda_graph_match(prefetch_on, tokens):
    """At Qwen3-30B-A3B width, the o projection's 16.8 MB weight prefetched by q/k norm + rotary, the q/k/v
    weight by the norm and the chosen experts' w13 by the top-k (one token): replayed in a CUDA graph, the
    outputs are those of the launches without it."""
    from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(tokens)
    H, hd, nq, nk = 2048, 128, 32, 4
    x = torch.randn(tokens, H, device=dev, generator=g).to(dt)
    r = torch.randn(tokens, H, device=dev, generator=g).to(dt)
    wn = (torch.rand(H, device=dev, generator=g) + 0.5).to(dt)
    qkv = torch.randn(tokens, (nq + 2 * nk) * hd, device=dev, generator=g).to(dt)
    q, k = qkv[:, :nq * hd], qkv[:, nq * hd:(nq + nk) * hd]
    pos = torch.randint(0, 4096, (tokens,), device=dev, generator=g)
    ang = torch.rand(4096, hd // 2, device=dev, generator=g) * 3
    cos, sin = ang.cos(), ang.sin()
    qw, kw = [(torch.rand(hd, device=dev, generator=g) + 0.5).to(dt) for _ in range(2)]
    w_o = torch.randn(H, nq * hd, device=dev, generator=g).to(dt)
    w_qkv = torch.randn((nq + 2 * nk) * hd, H, device=dev, generator=g).to(dt)
    logits = torch.randn(tokens, 128, device=dev, generator=g).to(dt)
    w13 = torch.randn(128, 1536, H, device=dev, generator=g).to(dt)

    def chain() -> tuple[torch.Tensor, ...]:
        h, res = fused_add_rms_norm(x, r, wn, 1e-6, prefetch=w_qkv)
        qo, ko = qk_norm_rope(q, k, pos, cos, sin, head_dim=hd, norm="per_head", q_weight=qw, k_weight=kw,
                              prefetch=w_o)
        weights, ids = fused_topk(logits, 8, renormalize=True, prefetch_experts=w13)
        return h, res, qo, ko, weights, ids

    prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", False)
    want = chain()
    prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", True)
    assert l2_prefetch.plan(w_o, tokens) is not None
    assert (l2_prefetch.plan_experts(w13, tokens, 8) is not None) == (tokens == 1)
    eager = chain()
    chain()  # warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    graph.replay()
    torch.cuda.synchronize()
    for e, c, w in zip(eager, captured, want):
        assert torch.equal(e, w) and torch.equal(c, w)


def test_plan_experts_splits_the_budget(prefetch_on):
    prefetch_on.setattr(l2_prefetch, "CHUNK_BYTES", 4096)
    prefetch_on.setattr(l2_prefetch, "EXPERT_BUDGET_BYTES", 40000)
    w13 = torch.randn(6, 24, 40, dtype=torch.bfloat16)  # 1920 bytes an expert
    p = l2_prefetch.plan_experts(w13, 2, 2)
    assert (p.expert_bytes, p.nbytes, p.chunks) == (1920, 1920, 1)  # all of each expert fits the budget
    p = l2_prefetch.plan_experts(w13, 8, 4)  # 32 pairs: 1250 bytes each, rounded down to 16
    assert (p.nbytes, p.chunks) == (1248, 1)
    assert l2_prefetch.plan_experts(w13, 9, 4) is None  # past EXPERT_MAX_PAIRS
    words = torch.zeros(6, 24, 10, dtype=torch.int32)  # a 4-bit backend's packed words: bytes like any other
    assert l2_prefetch.plan_experts(words, 1, 2).expert_bytes == 960
    assert l2_prefetch.plan_experts(w13.transpose(1, 2), 1, 2) is None  # not contiguous
    prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", False)
    assert l2_prefetch.plan_experts(w13, 1, 2) is None


@pytest.mark.parametrize("tokens,top_k,bias,then_softmax", [(1, 8, False, False), (3, 2, True, False),
                                                            (2, 4, True, True)])
def test_topk_routes_the_same_with_the_expert_prefetch(prefetch_on, device, tokens, top_k, bias, then_softmax):
    from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk

    _small_chunks(prefetch_on)
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    E = 40
    logits = torch.randn(tokens, E, generator=g).to(device, torch.bfloat16)
    rb = torch.randn(E, generator=g).to(device) if bias else None
    w13 = torch.randn(E, 32, 96, generator=g).to(device, torch.bfloat16)  # 6144 bytes an expert: 3 chunks
    assert l2_prefetch.plan_experts(w13, tokens, top_k).chunks == 3
    runs = []
    for on in (True, False):
        prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", on)
        runs.append(fused_topk(logits, top_k, renormalize=True, topk_then_softmax=then_softmax, router_bias=rb,
                               use_triton=True, prefetch_experts=w13))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("act", ["silu", "swigluoai"])
def test_activation_gives_the_same_bits_with_the_w2_prefetch(prefetch_on, device, act):
    from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation

    _small_chunks(prefetch_on)
    g = torch.Generator().manual_seed(11)
    pairs, E = 6, 9
    x = torch.randn(pairs, 2 * 80, generator=g).to(device, torch.bfloat16)
    ids = torch.tensor([3, 8, -1, 0, 8, 5], dtype=torch.int32, device=device)  # -1: another rank's expert
    w2 = torch.randn(E, 64, 60, generator=g).to(device, torch.bfloat16)  # 7680 bytes an expert: 4 chunks
    assert l2_prefetch.plan_experts(w2, pairs, 1).chunks == 4
    runs = []
    for on in (True, False):
        prefetch_on.setattr(l2_prefetch, "L2_PREFETCH", on)
        out = torch.full((pairs, 80), float("nan"), device=device, dtype=torch.bfloat16)
        runs.append(moe_activation(act, x, out=out, use_triton=True, prefetch_experts=(w2, ids)))
    assert torch.equal(runs[0], runs[1]) and not runs[0].isnan().any()
