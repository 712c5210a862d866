"""A FusedMoE layer (TritonExperts) at decode among many experts with the bf16 GEMV forced on
(``fused_moe_gemm.GEMV_PAIRWISE``): against the fp64 loop reference and the tl.dot kernel's layer output,
with biases, gpt-oss's activation, an expert map (pairs of remote experts are -1: skipped) and LoRA
between the GEMMs (the seams see the same GEMM outputs)."""
from __future__ import annotations

import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import make_layer, random_weights, router_inputs
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm_mod
from vllm.model_executor.layers.fused_moe.router import fused_topk

E, TOP_K, H, I = 32, 4, 64, 48  # 1 and 2 tokens are pairwise (pairs * 4 <= E)


@pytest.fixture
def gemv_calls(monkeypatch):
    """GEMV_PAIRWISE on, and the GEMV launches counted (a layer must not pass by running the dot kernel)."""
    calls = []
    real = gemm_mod.invoke_fused_moe_gemv

    def counted(*args, **kwargs):
        calls.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(gemm_mod, "invoke_fused_moe_gemv", counted)
    monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", True)
    return calls


def _reference(layer, w, x, logits, activation, topk_weights=None):
    tw, ti = fused_topk(logits.float().cpu(), TOP_K, renormalize=layer.renormalize,
                        topk_then_softmax=layer.topk_then_softmax)
    return moe_reference(x.float().cpu(), w.w13, w.w2, tw if topk_weights is None else topk_weights(tw, ti), ti,
                         activation, b13=w.b13, b2=w.b2).float()


@pytest.mark.parametrize("activation,bias,M,dtype", [
    ("silu", False, 1, torch.float32), ("swigluoai", True, 1, torch.float32), ("silu", True, 2, torch.float16),
    ("gelu", False, 2, torch.float32)])
def test_layer_with_gemv_matches_reference_and_dot(activation, bias, M, dtype, gemv_calls, monkeypatch, device):
    gen = torch.Generator().manual_seed(M * 10 + bias)
    w = random_weights(E, H, I, activation, bias, gen)
    layer = make_layer(w, TOP_K, activation, dtype, device, backend="triton")
    x, logits = router_inputs(M, E, H, dtype, device, gen)
    out = layer(x, logits)
    assert [c.gemv for c in gemv_calls] == [1, 1], "both GEMMs must run the GEMV"
    assert_close(out.float().cpu(), _reference(layer, w, x, logits, activation), dtype)
    monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", False)
    dot = layer(x, logits)
    assert len(gemv_calls) == 2  # the dot kernel this time
    assert_close(out.float().cpu(), dot.double().cpu(), dtype)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_expert_map_with_gemv(ep_rank, gemv_calls, device):
    """One expert-parallel rank (16 of 32 experts local): the token's two remote experts are -1 in the GEMV and
    contribute nothing; the local experts' weights sit between NaN-filled neighbours (reading any other expert
    index would give NaN)."""
    gen = torch.Generator().manual_seed(7 + ep_rank)
    w = random_weights(E, H, I, "silu", True, gen)
    layer = make_layer(w, TOP_K, "silu", torch.float32, device, backend="triton", ep_size=2, ep_rank=ep_rank)
    for p in (layer.w13_weight, layer.w2_weight, layer.w13_bias, layer.w2_bias):
        n = p.shape[0]
        buf = torch.full((3 * n, *p.shape[1:]), float("nan"), dtype=p.dtype, device=p.device)
        buf[n:2 * n].copy_(p.data)
        p.data = buf[n:2 * n]
    lo, hi = ep_rank * E // 2, (ep_rank + 1) * E // 2
    x, logits = router_inputs(1, E, H, torch.float32, device, gen)
    logits = logits.cpu()
    picks = [lo + 3, hi - 1, (lo + E // 2) % E, (hi + 4) % E]  # two local (the last among them), two remote
    logits[0, picks] = torch.tensor([9.0, 8.5, 8.0, 7.5])
    out = layer(x, logits.to(device))
    assert [c.gemv for c in gemv_calls] == [1, 1]
    local = lambda tw, ti: torch.where((ti >= lo) & (ti < hi), tw, torch.zeros_like(tw))  # noqa: E731
    assert torch.isfinite(out).all(), "another expert's (NaN) weights were read"
    assert_close(out.float().cpu(), _reference(layer, w, x, logits, "silu", local), torch.float32)


@pytest.mark.parametrize("slots", [[0, 1], [1, -1]])
def test_lora_seams_unchanged_with_gemv(slots, gemv_calls, monkeypatch, device):
    """LoRA between the GEMMs (small-batch LoRA path) adds its deltas to the GEMV's outputs as to the dot
    kernel's: the layer with adapters matches the reference and the dot kernel's layer."""
    h = Harness(E=E, top_k=TOP_K, H=H, I=I, device=device, backend="triton", max_loras=2, max_rank=8,
                seed=31 + slots[1])
    for slot in range(2):
        h.load(slot, h.new_adapter())
    x, logits = h.inputs(len(slots), empty=False)
    out = h.forward(x, logits, slots)
    assert [c.gemv for c in gemv_calls] == [1, 1]
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.float32)
    monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", False)
    assert_close(out.float().cpu(), h.forward(x, logits, slots).double().cpu(), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True])
def test_gemv_layer_in_a_cuda_graph(split, gemv_calls, monkeypatch):
    """Captured with the GEMV (and, with ``split``, its split-K partial sums and reduction launch), replayed on
    new inputs copied into the captured buffers: the same output as an eager call, no host synchronisation."""
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemv as gemv_mod

    if split:  # the heuristic splits K when it wants more programs than there are
        monkeypatch.setattr(gemv_mod, "GEMV_PROGRAMS_PER_SM", 1000)
    gen = torch.Generator().manual_seed(3)
    # K splits only where it holds at least two BLOCK_SIZE_K (512) tiles per split: both GEMMs' K >= 2048 then
    Hc, Ic = (2048, 2048) if split else (1024, 512)
    w = random_weights(E, Hc, Ic, "silu", True, gen)
    layer = make_layer(w, TOP_K, "silu", torch.bfloat16, "cuda", backend="triton")
    x, logits = router_inputs(1, E, Hc, torch.bfloat16, "cuda", gen)
    for _ in range(2):
        layer(x, logits)  # compiles, sizes the workspaces
    assert gemv_calls and all(c.gemv == 1 and (c.split_k > 1) == split for c in gemv_calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    x2, logits2 = router_inputs(1, E, Hc, torch.bfloat16, "cuda", gen)
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.float().cpu()  # before an eager call can reuse the layer's buffers
    assert_close(replayed, _reference(layer, w, x2, logits2, "silu"), torch.bfloat16)
    assert_close(replayed, layer(x2, logits2).double().cpu(), torch.bfloat16)
