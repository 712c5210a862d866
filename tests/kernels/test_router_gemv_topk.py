"""The router GEMV and its top-k in one launch (``dense_gemv.router_gemv_topk``; the dense GEMV kernel's TOP_K
epilogue, run by its last program) against the two launches it replaces (``dense_gemv`` then ``fused_topk``:
equal bits) and a float64 per-token reference; the counter is back at zero after every launch; the MoE layer's
``forward_gate`` takes it only where it applies and gives the same output as ``forward(x, gate(x))``."""
import pytest
import torch

from tests.utils import poison_
from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk, fused_topk_reference
from vllm.model_executor.layers.ops import counters, dense_gemv


def _case(M, E, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    w = (torch.randn(E, K, generator=gen) / K ** 0.5).to(device, dtype)
    return x, w


@pytest.fixture(autouse=True)
def _fresh_counters(monkeypatch):
    monkeypatch.setattr(counters, "_BUFFERS", {})


# Qwen3 (128 experts, top 8), Qwen2-MoE-like (60, top 4), Mixtral (8, top 2), an odd count (17, top 3, K not a
# multiple of the K-step)
@pytest.mark.parametrize("E,top_k,K", [(128, 8, 256), (60, 4, 128), (8, 2, 64), (17, 3, 96)])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("renormalize,topk_then_softmax,with_bias", [(True, False, False), (False, False, True),
                                                                    (False, True, True)])  # the last: gpt-oss
def test_equals_gemv_then_topk(E, top_k, K, M, renormalize, topk_then_softmax, with_bias, device):
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    x, w = _case(M, E, K, dtype, device)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(E)).to(device, dtype) if with_bias else None
    logits = dense_gemv.dense_gemv(x, w, bias)
    want_w, want_i = fused_topk(logits, top_k, renormalize=renormalize, topk_then_softmax=topk_then_softmax,
                                use_triton=True)
    for _ in range(2):  # the second launch counts from the zero the first left
        got_w, got_i = dense_gemv.router_gemv_topk(x, w, top_k, renormalize=renormalize,
                                                   topk_then_softmax=topk_then_softmax, bias=bias)
        assert torch.equal(got_i, want_i), "expert ids differ from the GEMV then fused_topk"
        assert torch.equal(got_w, want_w), "weights differ from the GEMV then fused_topk"
        assert int(counters._BUFFERS[("router top-k", x.device)].abs().sum()) == 0
    ref_w, ref_i = fused_topk_reference(logits.cpu().float(), top_k, renormalize=renormalize,
                                        topk_then_softmax=topk_then_softmax)
    assert torch.equal(got_i.cpu(), ref_i)
    torch.testing.assert_close(got_w.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)


def test_outputs_poisoned_then_written(monkeypatch, device):
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    x, w = _case(2, 16, 64, dtype, device, seed=3)
    real_empty = torch.empty

    def poisoned_empty(*a, **kw):
        return poison_(real_empty(*a, **kw))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    got_w, got_i = dense_gemv.router_gemv_topk(x, w, 4, renormalize=True)
    monkeypatch.undo()
    assert torch.isfinite(got_w).all() and ((got_i >= 0) & (got_i < 16)).all()
    assert torch.allclose(got_w.sum(-1), torch.ones(2, device=device))


def test_refuses_what_it_cannot_route(device):
    x, w = _case(9, 16, 64, torch.float16, device)
    with pytest.raises(ValueError, match="9 tokens"):
        dense_gemv.router_gemv_topk(x, w, 2, renormalize=True)
    with pytest.raises(ValueError, match="top_k 17 of 16"):
        dense_gemv.router_gemv_topk(x[:1], w, 17, renormalize=True)


def _moe_layer(E, top_k, H, I, dtype, device):
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE
    from vllm.model_executor.layers.linear import ReplicatedLinear

    gen = torch.Generator().manual_seed(5)
    layer = FusedMoE(E, top_k, H, I, params_dtype=dtype, device=device, renormalize=True, activation="silu")
    with torch.no_grad():
        layer.w13_weight.copy_(torch.randn(layer.w13_weight.shape, generator=gen) / H ** 0.5)
        layer.w2_weight.copy_(torch.randn(layer.w2_weight.shape, generator=gen) / I ** 0.5)
    layer.process_weights_after_loading()
    gate = ReplicatedLinear(H, E, bias=False, params_dtype=dtype, device=device)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, H, generator=gen) / H ** 0.5)
    return layer, gate


def test_moe_forward_gate(monkeypatch, device):
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    layer, gate = _moe_layer(8, 2, 64, 32, dtype, device)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    want = layer(x, gate(x))
    calls = []
    real = dense_gemv.router_gemv_topk
    monkeypatch.setattr(dense_gemv, "router_gemv_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(moe_runner, "ROUTER_FUSED_TOPK", False)
    assert torch.equal(layer.forward_gate(x, gate), want) and not calls  # off: gate, then the router
    monkeypatch.setattr(moe_runner, "ROUTER_FUSED_TOPK", True)
    if device.type == "cpu":  # the interpreter: let the GEMV apply to CPU tensors
        monkeypatch.setattr(dense_gemv, "gemv_applies", lambda x, w, max_tokens=None: x.shape[0] <= 1)
    assert torch.equal(layer.forward_gate(x, gate), want) and len(calls) == 1
    x3 = torch.cat([x, x, x])
    assert torch.equal(layer.forward_gate(x3, gate), layer(x3, gate(x3))) and len(calls) == 1  # 3 tokens: two launches
    with torch.no_grad():  # a router bias (gpt-oss): still one launch
        gate.bias = torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(7)).to(device, dtype))
    assert torch.equal(layer.forward_gate(x, gate), layer(x, gate(x))) and len(calls) == 2


def test_lora_wrapped_gate_fuses_only_without_a_delta(monkeypatch, device):
    """A LoRA-enabled engine wraps the router too: forward_gate fuses while no adapter of the step targets it,
    and takes the wrapper (base + delta) when one does - the same output as forward(x, gate(x)) either way."""
    from tests.lora.test_dense_lora_layers import random_adapter, wrap
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    layer, base_gate = _moe_layer(8, 2, 64, 32, dtype, device)
    gate, punica = wrap(base_gate, max_loras=2, kind="gpu", device=device)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    calls = []
    real = dense_gemv.router_gemv_topk
    monkeypatch.setattr(dense_gemv, "router_gemv_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(moe_runner, "ROUTER_FUSED_TOPK", True)
    if device.type == "cpu":
        monkeypatch.setattr(dense_gemv, "gemv_applies", lambda x, w, max_tokens=None: x.shape[0] <= 1)
    punica.update_metadata([0])  # slot 0 holds no adapter of this layer
    assert torch.equal(layer.forward_gate(x, gate), layer(x, gate(x))) and len(calls) == 1
    a, b = random_adapter(torch.Generator().manual_seed(9), 64, [8], 16)
    gate.set_lora(0, [t.to(dtype) for t in a], [t.to(dtype) for t in b])
    punica.update_metadata([0])
    want = layer(x, gate(x))
    assert not torch.equal(want, layer(x, base_gate(x))), "the router adapter changed nothing: a weak test"
    assert torch.equal(layer.forward_gate(x, gate), want) and len(calls) == 1  # the delta: gate, then top-k
