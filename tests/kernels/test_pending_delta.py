"""A projection's pending LoRA delta carried by the fused ops around it (``ops/pending_delta.py``): the RMSNorm
that shrinks the next projection's input, the residual RMSNorm and the q/k norm + rotary that add the delta.

Each Triton path (the interpreter on CPU, native on CUDA) and each torch path against a float64 reference written
here: the delta of token t is (y_t @ A[slot]^T) @ B[slot]^T for its slot, zero without a slot or with a disabled
one.  Slots include -1, a disabled slot and the last slot; the outputs are poisoned before the kernels write them.
"""
from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close
from vllm.model_executor.layers.ops.dense_gemv import dense_gemv
from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite, qk_norm_rope
from vllm.model_executor.layers.ops.rms_norm import fused_add_rms_norm, rms_norm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]
L = 3
SLOTS = [0, -1, 2, 1, 2]  # slot 1 holds no adapter (zero A and B); 2 is the last


def _delta(sizes, K, rank, dtype, device, gen) -> PendingDelta:
    """Random A and B in slots 0 and 2; slot 1 holds no adapter: zero A and B, as the LoRA layers clear a slot."""
    S, n_max = len(sizes), max(sizes)
    a = (torch.randn(S, L, rank, K, generator=gen) / K ** 0.5).to(dtype)
    b = (torch.randn(S, L, n_max, rank, generator=gen)).to(dtype)
    a[:, 1], b[:, 1] = 0, 0
    mapping = torch.tensor(SLOTS + [-1, -1], dtype=torch.int32)
    return PendingDelta(a=a.to(device), b=b.to(device), mapping=mapping.to(device), slice_sizes=tuple(sizes))


def _ref_shrink(p: PendingDelta, y: torch.Tensor) -> torch.Tensor:
    """[T, S, R] float64: y_t @ A[s, slot]^T, zero for rows without a slot."""
    out = torch.zeros(y.shape[0], len(p.slice_sizes), p.rank, dtype=torch.float64)
    for t, slot in enumerate(SLOTS[:y.shape[0]]):
        if slot >= 0:
            out[t] = torch.einsum("k,srk->sr", y[t].double().cpu(), p.a[:, slot].double().cpu())
    return out


def _ref_delta(p: PendingDelta, shrunk: torch.Tensor, s: int) -> torch.Tensor:
    """[T, N_s] float64 from the float64 shrink."""
    T = shrunk.shape[0]
    out = torch.zeros(T, p.slice_sizes[s], dtype=torch.float64)
    for t, slot in enumerate(SLOTS[:T]):
        if slot >= 0:
            out[t] = p.b[s, slot, :p.slice_sizes[s]].double().cpu() @ shrunk[t, s]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("K,rank", [(64, 8), (96, 16)])
def test_norm_shrinks_the_next_projection(dtype, use_triton, residual, K, rank, device):
    gen = torch.Generator().manual_seed(K + rank)
    T = len(SLOTS)
    x = torch.randn(T, K, generator=gen).to(device=device, dtype=dtype)
    r = torch.randn(T, K, generator=gen).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(K, generator=gen)).to(device=device, dtype=dtype)
    p = _delta([24, 8, 8], K, rank, dtype, device, gen)
    plain = fused_add_rms_norm(x, r, w, 1e-6, use_triton=use_triton)[0] if residual else rms_norm(
        x, w, 1e-6, use_triton=use_triton)
    if residual:
        out, res = fused_add_rms_norm(x, r, w, 1e-6, use_triton=use_triton, lora_shrink=p)
        assert torch.equal(res, (x.float() + r.float()).to(dtype))
    else:
        out = rms_norm(x, w, 1e-6, use_triton=use_triton, lora_shrink=p)
    assert torch.equal(out, plain), "the shrink changed the norm's output"
    assert p.part is not None and p.part.shape[:2] == (T, 3) and p.part.shape[3] >= rank
    want = _ref_shrink(p, out)
    got = p.part.sum(2)[..., :rank].double().cpu()
    on = torch.tensor([s >= 0 for s in SLOTS])
    assert_close(got[on].float(), want[on].float(), torch.float32, name="shrink")
    if use_triton:  # one program per K chunk: 8192 // BLOCK_R columns each
        assert p.part.shape[2] == -(-K // p.shrink_block_k(K))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_residual_norm_adds_the_previous_projection_delta(dtype, use_triton, splits, device):
    gen = torch.Generator().manual_seed(splits)
    T, N, rank = len(SLOTS), 80, 12
    x = torch.randn(T, N, generator=gen).to(device=device, dtype=dtype)
    r = torch.randn(T, N, generator=gen).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(device=device, dtype=dtype)
    p = _delta([N], 32, rank, dtype, device, gen)
    part = p.new_part(T, splits, device)
    part.fill_(float("nan"))  # rows without a slot and columns past the rank are never read
    parts = torch.randn(T, 1, splits, rank, generator=gen)
    part[..., :rank] = parts.to(device)
    out, res = fused_add_rms_norm(x, r, w, 1e-6, use_triton=use_triton, lora_delta=p)
    shrunk = parts.double().sum(2)  # [T, 1, R]
    x_lora = (x.double().cpu() + _ref_delta(p, shrunk, 0)).to(dtype)
    want_out, want_res = fused_add_rms_norm(x_lora.to(device), r, w, 1e-6, use_triton=False)
    assert_close(res.float().cpu(), want_res.float().cpu(), dtype, name="residual")
    assert_close(out.float().cpu(), want_out.float().cpu(), dtype, name="normed")
    base = fused_add_rms_norm(x, r, w, 1e-6, use_triton=use_triton)
    for t, slot in enumerate(SLOTS):  # no delta where no slot or the slot holds none: the plain launch's bits
        if slot in (-1, 1):
            assert torch.equal(out[t], base[0][t]) and torch.equal(res[t], base[1][t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("K", [96, 1000])
def test_gemv_shrinks_its_input(dtype, K, device):
    """The decode GEMV's extra programs write the shrink of x (the o projection's own, at one token)."""
    gen = torch.Generator().manual_seed(K)
    T, N, rank = len(SLOTS), 40, 8
    x = torch.randn(T, K, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(N, generator=gen).to(device=device, dtype=dtype)
    p = _delta([N], K, rank, dtype, device, gen)
    y = dense_gemv(x, w, bias, lora_shrink=p)
    assert torch.equal(y, dense_gemv(x, w, bias)), "the shrink programs changed the projection"
    assert p.part is not None and p.part.shape[:3] == (T, 1, -(-K // p.shrink_block_k(K)))
    on = torch.tensor([s >= 0 for s in SLOTS])
    got = p.part.sum(2)[..., :rank].double().cpu()
    assert_close(got[on].float(), _ref_shrink(p, x)[on].float(), torch.float32, name="shrink")


def test_consumers_too_wide_for_their_registers_take_the_torch_path(device, monkeypatch):
    """B's rows of one program beyond MAX_DELTA_TILE: the torch path adds the delta (no Triton launch)."""
    import importlib

    from vllm.model_executor.layers.ops import pending_delta

    norm_mod = importlib.import_module("vllm.model_executor.layers.ops.rms_norm")
    qk_mod = importlib.import_module("vllm.model_executor.layers.ops.qk_norm_rope")

    gen = torch.Generator().manual_seed(3)
    T, N, hd = len(SLOTS), 32, 16
    x, r = (torch.randn(T, N, generator=gen).to(device) for _ in range(2))
    w = torch.ones(N, device=device)
    p = _delta([N], N, 8, torch.float32, device, gen)
    part = p.new_part(T, 1, device)
    part.copy_(torch.randn(part.shape, generator=gen).to(device))
    want = fused_add_rms_norm(x, r, w, 1e-6, use_triton=True, lora_delta=p)
    monkeypatch.setattr(pending_delta, "MAX_DELTA_TILE", 8)
    monkeypatch.setattr(norm_mod, "_launch", lambda *a, **k: pytest.fail("launched"))
    got = fused_add_rms_norm(x, r, w, 1e-6, use_triton=True, lora_delta=p)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32)
    qkv = torch.randn(T, 3 * N, generator=gen).to(device)
    pq = _delta([N, N, N], N, 8, torch.float32, device, gen)
    pq.new_part(T, 1, device).copy_(torch.randn(T, 3, 1, 8, generator=gen).to(device))
    rope = RotaryEmbedding(hd, hd, 64, 10000.0, device=device)
    pos = torch.arange(T, device=device)
    calls = []
    monkeypatch.setattr(qk_mod, "qk_norm_rope_torch", lambda *a, **k: (calls.append(1), (a[0], a[1]))[1])
    qk_mod.qk_norm_rope(qkv[:, :N], qkv[:, N:2 * N], pos, rope.cos_cache, rope.sin_cache, head_dim=hd,
                        use_triton=True, lora_delta=pq, v=qkv[:, 2 * N:])
    assert calls == [1]


def test_a_norm_cannot_both_shrink_and_add(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen).to(device)
    p = _delta([32], 32, 4, torch.float32, device, gen)
    with pytest.raises(ValueError, match="not both"):
        fused_add_rms_norm(x, x, torch.ones(32, device=device), 1e-6, lora_shrink=p, lora_delta=p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("norm,clip,nq,nk,head_dim,rotary_dim,kv", [
    ("per_head", None, 6, 2, 16, 16, False),  # Qwen3; 6 q heads: two programs of 4 and 2 heads
    ("per_head", None, 4, 2, 32, 16, True),  # partial rotary, the fused KV write
    ("full", 0.8, 4, 2, 16, 16, False),  # OLMoE with clip: one q program (the norm spans all heads)
    (None, None, 5, 1, 24, 24, True),  # Mixtral-like, head_dim not a power of two
])
def test_qk_norm_rope_adds_the_qkv_delta(dtype, use_triton, norm, clip, nq, nk, head_dim, rotary_dim, kv, device):
    gen = torch.Generator().manual_seed(nq * head_dim)
    T, rank = len(SLOTS), 8
    rope = RotaryEmbedding(head_dim, rotary_dim, 64, 10000.0, device=device)
    qs, ks = nq * head_dim, nk * head_dim
    qkv = torch.randn(T, qs + 2 * ks, generator=gen).to(device=device, dtype=dtype)
    positions = torch.tensor([0, 3, 17, 63, 5], device=device)
    wq = wk = None
    if norm is not None:
        n = head_dim if norm == "per_head" else None
        wq = (1 + 0.1 * torch.randn(n or qs, generator=gen)).to(device=device, dtype=dtype)
        wk = (1 + 0.1 * torch.randn(n or ks, generator=gen)).to(device=device, dtype=dtype)
    p = _delta([qs, ks, ks], 32, rank, dtype, device, gen)
    parts = torch.randn(T, 3, 2, rank, generator=gen) * 0.5
    part = p.new_part(T, 2, device)
    part.fill_(float("nan"))
    part[..., :rank] = parts.to(device)
    shrunk = parts.double().sum(2)
    # the reference: the delta added to the projection's output (rounded once), then the plain op
    ref = qkv.clone()
    for s, (lo, n) in enumerate([(0, qs), (qs, ks), (qs + ks, ks)]):
        ref[:, lo:lo + n] = (ref[:, lo:lo + n].double().cpu() + _ref_delta(p, shrunk, s)).to(dtype).to(device)

    def run(t, delta):
        q, k, v = t[:, :qs], t[:, qs:qs + ks], t[:, qs + ks:]
        cache = None
        if kv:
            cache = torch.full((2, 4, 4, nk, head_dim), float("nan"), dtype=dtype, device=device)
            kv_write = KVCacheWrite(v, cache, torch.tensor([3, -1, 8, 0, 15], device=device))
        out = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, head_dim=head_dim, rotary_dim=rotary_dim,
                           norm=norm, q_weight=wq, k_weight=wk, clip=clip, use_triton=use_triton,
                           kv_write=kv_write if kv else None, lora_delta=delta, v=v if delta is not None else None)
        return out, v, cache

    (q, k), v, cache = run(qkv.clone(), p)
    (q_ref, k_ref), v_ref, cache_ref = run(ref.clone(), None)
    assert_close(q.float().cpu(), q_ref.float().cpu(), dtype, name="q")
    assert_close(k.float().cpu(), k_ref.float().cpu(), dtype, name="k")
    assert_close(v.float().cpu(), v_ref.float().cpu(), dtype, name="v (in place)")
    if kv:
        filled = ~torch.isnan(cache_ref.float())
        assert torch.equal(filled, ~torch.isnan(cache.float())), "the cache rows written differ"
        assert_close(cache.float()[filled].cpu(), cache_ref.float()[filled].cpu(), dtype, name="cache")


def test_sm90_kernels_load_the_adapters_before_the_wait_without_spills():
    """Compiled for sm_90 with PDL (a subprocess without the interpreter: pending_delta_compile.py)."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/pending_delta_compile.py").count("ok ") == 6
