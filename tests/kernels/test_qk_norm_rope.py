"""Fused q/k norm + clip + rotary embedding: the Triton kernel (interpreter on CPU, native on CUDA)
against the torch path, and both against a float64 per-element rotation written out here."""
from __future__ import annotations

import math

import pytest
import torch

from tests.utils import assert_close
from vllm.model_executor.layers.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_torch
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

# Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding to nearest; the kernel
# rounds ~8 times per element, so bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]


def expected_f64(x, positions, head_dim, rotary_dim, base, norm, weight, eps, clip):
    """Per token and head in float64: norm, clip, then rotate pairs (i, i + rotary_dim / 2)."""
    T = x.shape[0]
    h = x.double().reshape(T, -1, head_dim).clone()
    if norm == "per_head":
        h = weight.double() * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    elif norm == "full":
        flat = h.reshape(T, -1)
        h = (weight.double() * flat / torch.sqrt((flat * flat).mean(-1, keepdim=True) + eps)).reshape(h.shape)
    if clip is not None:
        h = h.clamp(-clip, clip)
    out = h.clone()
    half = rotary_dim // 2
    for t in range(T):
        p = float(positions[t])
        for i in range(half):
            ang = p / base ** (2 * i / rotary_dim)
            c, s = math.cos(ang), math.sin(ang)
            a, b = h[t, :, i], h[t, :, i + half]
            out[t, :, i] = a * c - b * s
            out[t, :, i + half] = b * c + a * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,clip,nq,nk,head_dim,rotary_dim", [
    ("per_head", None, 4, 2, 32, 32),  # Qwen3
    ("full", 2.5, 4, 4, 16, 16),  # OLMoE with clip_qkv
    (None, None, 6, 2, 24, 24),  # Mixtral / Qwen2-MoE; head_dim not a power of two
    ("per_head", None, 3, 1, 32, 16),  # partial rotary
    ("full", None, 2, 1, 40, 20),  # partial rotary with a full-row norm
])
def test_kernel_vs_torch_and_f64(dtype, norm, clip, nq, nk, head_dim, rotary_dim, device):
    T, base, eps = 5, 10000.0, 1e-6
    rope = RotaryEmbedding(head_dim, rotary_dim, 64, base, device=device)
    # q / k as column slices of one fused qkv row (row stride > width), as the model passes them
    qkv = (torch.randn(T, (nq + 2 * nk) * head_dim) * 2).to(device=device, dtype=dtype)
    q, k = qkv[:, :nq * head_dim], qkv[:, nq * head_dim:(nq + nk) * head_dim]
    positions = torch.tensor([0, 3, 17, 63, 5], device=device)
    wq = wk = None
    if norm is not None:
        wq = (torch.rand(head_dim if norm == "per_head" else nq * head_dim) + 0.5).to(device=device, dtype=dtype)
        wk = (torch.rand(head_dim if norm == "per_head" else nk * head_dim) + 0.5).to(device=device, dtype=dtype)
    kw = dict(head_dim=head_dim, rotary_dim=rotary_dim, norm=norm, q_weight=wq, k_weight=wk, eps=eps, clip=clip)
    gq, gk = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, use_triton=True, **kw)
    rq, rk = qk_norm_rope_torch(q, k, positions, rope.cos_cache, rope.sin_cache, **kw)
    for got, ref, x, w, name in ((gq, rq, q, wq, "q"), (gk, rk, k, wk, "k")):
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        assert_close(got, ref, dtype, name=f"{name} vs torch path")
        want = expected_f64(x.cpu(), positions.cpu(), head_dim, rotary_dim, base, norm,
                            None if w is None else w.cpu(), eps, clip)
        assert_close(got, want, dtype, name=f"{name} vs float64")


def test_rotary_embedding_module_matches(device):
    """RotaryEmbedding.forward (the torch path used so far) equals the fused op without a norm."""
    rope = RotaryEmbedding(32, 32, 128, 500000.0, device=device)
    q, k = torch.randn(7, 4 * 32, device=device), torch.randn(7, 2 * 32, device=device)
    pos = torch.randint(0, 128, (7,), device=device)
    rq, rk = rope(pos, q, k)
    gq, gk = qk_norm_rope(q, k, pos, rope.cos_cache, rope.sin_cache, head_dim=32, use_triton=True)
    assert_close(gq, rq, torch.float32)
    assert_close(gk, rk, torch.float32)


def test_empty_and_errors(device):
    rope = RotaryEmbedding(16, 16, 8, 10000.0, device=device)
    e = torch.empty(0, 32, device=device)
    gq, gk = qk_norm_rope(e, e[:, :16], torch.empty(0, dtype=torch.long, device=device), rope.cos_cache,
                          rope.sin_cache, head_dim=16, use_triton=True)
    assert gq.shape == (0, 32) and gk.shape == (0, 16)
    q, k = torch.randn(2, 32, device=device), torch.randn(2, 16, device=device)
    pos = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="norm must be"):
        qk_norm_rope(q, k, pos, rope.cos_cache, rope.sin_cache, head_dim=16, norm="layer")
    with pytest.raises(ValueError, match="weights"):
        qk_norm_rope(q, k, pos, rope.cos_cache, rope.sin_cache, head_dim=16, norm="per_head")
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(q, k, pos[:1], rope.cos_cache, rope.sin_cache, head_dim=16)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(q[:, :20], k, pos, rope.cos_cache, rope.sin_cache, head_dim=16)
    if pos.device.type == "cpu":
        with pytest.raises(ValueError, match="max_position"):
            qk_norm_rope(q, k, torch.tensor([0, 8]), rope.cos_cache, rope.sin_cache, head_dim=16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,nq,nk", [("per_head", 32, 4), ("full", 16, 16), (None, 32, 8)])
def test_cuda_real_widths(dtype, norm, nq, nk):
    """Qwen3-30B-A3B (32 q / 4 kv heads of 128), OLMoE (16 / 16), Mixtral (32 / 8) at 300 tokens."""
    D, T = 128, 300
    rope = RotaryEmbedding(D, D, 4096, 1e6, device="cuda")
    qkv = torch.randn(T, (nq + 2 * nk) * D, device="cuda", dtype=dtype)
    q, k = qkv[:, :nq * D], qkv[:, nq * D:(nq + nk) * D]
    pos = torch.randint(0, 4096, (T,), device="cuda")
    wq = wk = None
    if norm is not None:
        wq = (torch.rand(D if norm == "per_head" else nq * D, device="cuda") + 0.5).to(dtype)
        wk = (torch.rand(D if norm == "per_head" else nk * D, device="cuda") + 0.5).to(dtype)
    kw = dict(head_dim=D, norm=norm, q_weight=wq, k_weight=wk)
    gq, gk = qk_norm_rope(q, k, pos, rope.cos_cache, rope.sin_cache, **kw)
    rq, rk = qk_norm_rope_torch(q, k, pos, rope.cos_cache, rope.sin_cache, **kw)
    # Not bit-identical on a GPU: torch rounds the rotary's products and sums to bf16/fp16 one op at a
    # time, the kernel keeps them in fp32 and rounds once (82 % of elements equal on an H200); the
    # model-level test (tests/models/test_fused_ops_models.py) checks logits and greedy tokens.
    assert_close(gq, rq, dtype)
    assert_close(gk, rk, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,clip,nq,nk,head_dim,rotary_dim", [
    ("per_head", None, 4, 2, 32, 32),  # Qwen3
    ("full", 2.5, 4, 4, 16, 16),  # OLMoE with clip_qkv: the values are clipped too
    ("per_head", None, 3, 1, 32, 16),  # partial rotary: the pass-through columns of k and v
])
def test_kv_write_stores_what_the_attention_write_stores(dtype, norm, clip, nq, nk, head_dim, rotary_dim, device):
    """kv_write: the cache gets the rotated keys and the (clipped) values at each token's slot, exactly what
    qk_norm_rope then write_kv store; slot -1 and every other slot are left alone; q / k unchanged."""
    from tests.utils import poison_
    from vllm.attention.torch_backend import write_kv
    from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite

    T, blocks, bs = 6, 5, 4
    rope = RotaryEmbedding(head_dim, rotary_dim, 64, 10000.0, device=device)
    qkv = (torch.randn(T, (nq + 2 * nk) * head_dim) * 2).to(device=device, dtype=dtype)
    q, k = qkv[:, :nq * head_dim], qkv[:, nq * head_dim:(nq + nk) * head_dim]
    v = qkv[:, (nq + nk) * head_dim:]  # a column view, as the model passes it
    positions = torch.tensor([0, 3, 17, 63, 5, 9], device=device)
    slots = torch.tensor([13, 2, -1, 19, 4, 7], device=device)  # scattered over blocks; -1 skipped
    kw = dict(head_dim=head_dim, rotary_dim=rotary_dim, norm=norm, clip=clip)
    if norm is not None:
        width = head_dim if norm == "per_head" else None
        kw["q_weight"] = (torch.rand(width or nq * head_dim) + 0.5).to(device=device, dtype=dtype)
        kw["k_weight"] = (torch.rand(width or nk * head_dim) + 0.5).to(device=device, dtype=dtype)
    values = (v if clip is None else v.clamp(-clip, clip)).reshape(T, nk, head_dim)
    for use_triton in (True, False):  # the fused launch (on CPU: the interpreter), the torch path
        want_q, want_k = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, use_triton=use_triton, **kw)
        want = poison_(torch.empty(2, blocks, bs, nk, head_dim, device=device, dtype=dtype))
        write_kv(want, want_k.view(T, nk, head_dim), values, slots)
        cache = poison_(torch.empty_like(want))
        got_q, got_k = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, use_triton=use_triton,
                                    kv_write=KVCacheWrite(v, cache, slots), **kw)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        assert torch.equal(cache.isnan(), want.isnan())  # the same slots written, the rest still poisoned
        assert torch.equal(cache.nan_to_num(), want.nan_to_num()), f"use_triton={use_triton}"


def test_kv_write_errors(device):
    from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite

    rope = RotaryEmbedding(16, 16, 64, 10000.0, device=device)
    q, k = torch.randn(3, 32, device=device), torch.randn(3, 16, device=device)
    pos = torch.tensor([0, 1, 2], device=device)
    cache = torch.zeros(2, 4, 4, 1, 16, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    call = lambda w: qk_norm_rope(q, k, pos, rope.cos_cache, rope.sin_cache, head_dim=16, kv_write=w)  # noqa: E731
    with pytest.raises(ValueError, match=r"kv_cache must be \[2, num_blocks, block_size, 1, 16\]"):
        call(KVCacheWrite(k.clone(), torch.zeros(2, 4, 4, 2, 16, device=device), slots))
    with pytest.raises(ValueError, match="value .* must match k"):
        call(KVCacheWrite(torch.randn(3, 32, device=device), cache, slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        call(KVCacheWrite(k.clone(), cache, slots[:2]))
