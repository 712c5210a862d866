"""Int4 FusedMoE + LoRA (MarlinExperts / TorchInt4Experts at the two seams) against the fp32 loop
reference on the dequantised weights; the LoRA deltas read the unquantized activations."""
import dataclasses

import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import lora_config, pick_slots, random_adapter, router_inputs
from tests.quantization.int4_moe_setup import make_int4_layer, poison_workspaces, random_int4_experts
from tests.lora.lora_moe_harness import assert_delta_paths_agree, delta_paths
from tests.quantization.test_int4_moe_layer import _inputs
from tests.utils import assert_close
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.router import fused_topk

PUNICA_KIND = {"torch": "cpu", "marlin": "gpu"}


def _lora_layer(ex, top_k, activation, group, scheme, dtype, device, backend, max_loras, rank, **kw):
    base = make_int4_layer(ex, top_k, activation, group, scheme, dtype, device, backend=backend, lora_enabled=True,
                           **kw)
    layer = FusedMoEWithLoRA(base)
    layer.create_lora_weights(max_loras, lora_config(max_loras, rank))
    punica = get_punica_wrapper(4096, max_loras, device, kind=PUNICA_KIND[backend])
    layer.set_mapping(punica)
    return layer, punica


def _ref(ex, x, logits, top_k, activation, adapters, slots):
    tw, ti = fused_topk(logits.float().cpu(), top_k, renormalize=True)
    names = [s if s in adapters else None for s in slots]
    w = ex.float_weights
    return moe_reference(x.float().cpu(), w.w13, w.w2, tw, ti, activation, adapters=adapters,
                         token_adapter=names).float()


@pytest.fixture(params=["sorted", "small_batch"])
def lora_path(request, monkeypatch):
    small = request.param == "small_batch"
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)
    return request.param


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("marlin", torch.float32), ("marlin", torch.float16)])
@pytest.mark.parametrize("scheme", ["sym", "asym", "act_order"])
@pytest.mark.parametrize("M,slot_mode", [(9, "mixed"), (5, "one")])
def test_int4_moe_lora_matches_reference(backend, dtype, scheme, M, slot_mode, lora_path, device):
    if backend == "torch" and lora_path == "small_batch":
        pytest.skip("the torch wrapper has one path")
    E, top_k, H, I, group = 8, 2, 64, 32, 16
    gen = torch.Generator().manual_seed(M + len(scheme))
    ex = random_int4_experts(E, H, I, "silu", group, scheme, gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, scheme, dtype, device, backend, max_loras=2, rank=16)
    adapters = {s: random_adapter(E, H, I, r, "silu", gen) for s, r in enumerate([16, 8])}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(M, E, H, top_k, dtype, device, gen)
    slots = pick_slots(M, 2, slot_mode, seed=M)
    punica.update_metadata(slots)
    first = layer(x, logits)
    poison_workspaces(layer.base_layer)
    out = layer(x, logits)
    assert torch.equal(first, out)
    ref = _ref(ex, x, logits, top_k, "silu", adapters, slots)
    assert_close(out.float().cpu(), ref, dtype)
    # the adapters change the output (the test can tell LoRA from no LoRA)
    assert not torch.allclose(ref, _ref(ex, x, logits, top_k, "silu", {}, slots), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "marlin"])
def test_int4_moe_lora_expert_parallel(backend, device):
    """EP ranks with LoRA: each adds deltas for its own experts only; the ranks sum to the full layer."""
    E, top_k, H, I, group = 8, 2, 32, 32, 16
    gen = torch.Generator().manual_seed(7)
    ex = random_int4_experts(E, H, I, "silu", group, "asym", gen)
    adapters = {0: random_adapter(E, H, I, 8, "silu", gen)}
    x, logits = _inputs(11, E, H, top_k, torch.float32, device, gen)
    slots = pick_slots(11, 1, "mixed", seed=3)
    total = 0
    for r in range(2):
        layer, punica = _lora_layer(ex, top_k, "silu", group, "asym", torch.float32, device, backend, 1, 8,
                                    ep_size=2, ep_rank=r)
        ad = adapters[0]
        layer.set_lora(0, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
        punica.update_metadata(slots)
        total = total + layer(x, logits)
    assert_close(total.cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8, 64])
def test_int4_moe_lora_bf16_on_gpu(M, lora_path, device):
    E, top_k, H, I, group = 16, 4, 256, 256, 128
    gen = torch.Generator().manual_seed(M)
    ex = random_int4_experts(E, H, I, "silu", group, "act_order", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "act_order", torch.bfloat16, device, "marlin", 2, 16)
    adapters = {s: random_adapter(E, H, I, 16, "silu", gen) for s in range(2)}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = router_inputs(M, E, H, torch.bfloat16, device, gen, top_k=top_k)
    slots = pick_slots(M, 2, "mixed", seed=M)
    punica.update_metadata(slots)
    assert_close(layer(x, logits).float().cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), torch.bfloat16)


def test_int4_moe_lora_split_k_path(monkeypatch, device):
    """MarlinExperts' decode path (K split, forced here) with LoRA: the GEMM outputs are materialised for the
    LoRA seams (no fused epilogue), and the result matches the reference."""
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setenv("VLLM_INT4_MMA", "0")  # the Triton kernels' split-K path
    get_cfg, invoke, seen = mod.get_int4_moe_config, mod.invoke_int4_moe_gemm, []
    monkeypatch.setattr(mod, "get_int4_moe_config", lambda *a, **kw: dataclasses.replace(get_cfg(*a, **kw), split_k=2,
                                                                                         block_size_k=16))
    monkeypatch.setattr(mod, "invoke_int4_moe_gemm", lambda *a, **kw: seen.append(kw) or invoke(*a, **kw))
    E, top_k, H, I, group = 8, 2, 64, 32, 16
    gen = torch.Generator().manual_seed(9)
    ex = random_int4_experts(E, H, I, "silu", group, "act_order", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "act_order", torch.float32, device, "marlin", 2, 8)
    adapters = {s: random_adapter(E, H, I, 8, "silu", gen) for s in range(2)}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(7, E, H, top_k, torch.float32, device, gen)
    slots = pick_slots(7, 2, "mixed", seed=2)
    punica.update_metadata(slots)
    out = layer(x, logits)
    assert seen and not any("epilogue_activation" in kw or "epilogue_top_k" in kw for kw in seen)
    assert_close(out.cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [5, 9])  # _inputs routes to every expert but one
def test_marlin_lora_deltas_beside(dtype, M, monkeypatch, device):
    """MarlinExperts with the LoRA deltas in fp32 buffers beside its GEMMs (``lora_deltas_beside``, on by default
    since timed on an H200): the side stream changes no bits, and against the in-place seams the output is the same
    bits on CPU (within tolerance on a GPU, whose kernels compiled for an fp32 output may sum in another order)."""
    from vllm.model_executor.layers.fused_moe.experts.marlin_experts import MarlinExperts

    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    E, top_k, H, I, group = 8, 2, 64, 32, 16
    gen = torch.Generator().manual_seed(20 + M)
    ex = random_int4_experts(E, H, I, "silu", group, "asym", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "asym", dtype, device, "marlin", max_loras=2, rank=16)
    adapters = {s: random_adapter(E, H, I, r, "silu", gen) for s, r in enumerate([16, 8])}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(M, E, H, top_k, dtype, device, gen)
    slots = pick_slots(M, 2, "mixed", seed=M)
    punica.update_metadata(slots)
    beside, in_order, in_place, seams = delta_paths(lambda: layer(x, logits), monkeypatch, MarlinExperts)
    assert seams == 4  # both seams, beside and in order
    assert_delta_paths_agree(beside, in_order, in_place, dtype)
    assert_close(beside.float().cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), dtype)
