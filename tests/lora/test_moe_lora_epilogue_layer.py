"""LoRA MoE layers whose sorted-path seams are split: the shrink before each GEMM, the expand in its epilogue
(``experts/lora_epilogue.py``, ``LORA_EPILOGUE``).

Against the fp32 loop reference and the in-place path (one rounding fewer: within the dtype's rounding of it),
with the layer's gate / up adapters (two slices) and a peft fused gate_up adapter (one slice), SiLU and gpt-oss's
clamped SwiGLU with biases, a slot that holds no adapter, and expert-parallel ranks; spies check that the split
seams ran, and that the per-pair path and the fully-sharded one do not take them.  On CUDA also inside a graph.
"""
import dataclasses

import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.lora.test_moe_lora_side_stream import _captured_qwen3_layer, _replay_with_new_inputs
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_epilogue
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm


@pytest.fixture
def spied(monkeypatch):
    """The sorted path forced, and the calls of the two split seams counted."""
    calls = {"w13": 0, "w2": 0}
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    for name in ("w13", "w2"):
        orig = getattr(PunicaWrapperGPU, f"lora_{name}_epilogue")

        def spy(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(PunicaWrapperGPU, f"lora_{name}_epilogue", spy)
    return calls


def _harness(dtype, device, activation="silu", fused=False, H=32, **kw):
    h = Harness(E=8, top_k=2, H=H, I=48, activation=activation, bias=activation == "swigluoai", dtype=dtype,
                device=device, backend="triton", max_loras=3, max_rank=16, fused=fused, seed=5, **kw)
    h.load(0, h.new_adapter(rank=16))
    h.load(2, h.new_adapter(rank=8))
    return h


def _both_paths(h, x, logits, slots, monkeypatch):
    outs = []
    for on in (True, False):
        monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", on)
        outs.append(h.forward(x, logits, slots))
    return outs


def _dtypes(device):
    # the interpreter rounds fp32 -> bf16 by truncation: bf16 is compared on the GPU
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("fused_act", [False, True], ids=["act-apart", "act-in-gemm1"])
@pytest.mark.parametrize("activation,fused", [("silu", False), ("silu", True), ("swigluoai", True)])
def test_layer_epilogue_matches_in_place_and_reference(activation, fused, fused_act, device, spied, monkeypatch):
    """``fused_act``: GEMM1 also applies the activation (``FUSED_ACTIVATION``), after the w13 expand."""
    calls = []
    gemm = fused_moe_gemm.invoke_fused_moe_gemm
    monkeypatch.setattr(fused_moe_gemm, "FUSED_ACTIVATION", fused_act)
    monkeypatch.setattr(fused_moe_gemm, "invoke_fused_moe_gemm",
                        lambda *a, **kw: calls.append(kw.get("fused_activation")) or gemm(*a, **kw))
    for dtype in _dtypes(device):
        h = _harness(dtype, device, activation, fused)
        for M in (9, 40):
            x, logits = h.inputs(M)
            slots = pick_slots(M, 3, "mixed", seed=M)  # slot 1 holds no adapter: its tokens get the base only
            before = dict(spied)
            split, in_place = _both_paths(h, x, logits, slots, monkeypatch)
            assert spied["w13"] == before["w13"] + 1 and spied["w2"] == before["w2"] + 1
            assert any(c is not None for c in calls) == fused_act
            assert not split.isnan().any()
            assert_close(split.float(), in_place.float(), dtype)
            assert_close(split.float().cpu(), h.reference(x, logits, slots), dtype)


def test_layer_epilogue_with_a_split_shrink(device, spied, monkeypatch):
    """``SHRINK_SPLIT_K``: the seams' shrinks as partials over K ranges (the split shrink kernel), summed by the
    epilogues: the reference, and within rounding the one-launch shrink's result."""
    from vllm.lora.ops.triton_ops import moe_lora_epilogue

    h = _harness(torch.float32, device, H=64)
    x, logits = h.inputs(21)
    slots = pick_slots(21, 3, "mixed", seed=21)
    monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", True)
    one = h.forward(x, logits, slots)
    monkeypatch.setattr(moe_lora_epilogue, "SHRINK_SPLIT_K", 4)  # w13: K = 64 in 4 ranges; w2: K = 48 in 3
    split = h.forward(x, logits, slots)
    assert spied["w13"] == 2 and spied["w2"] == 2
    assert_close(split, one, torch.float32)
    assert_close(split.cpu(), h.reference(x, logits, slots), torch.float32)


def test_layer_epilogue_with_an_expert_map(device, spied, monkeypatch):
    """Expert-parallel ranks: each rank's GEMMs take only its experts' pairs and their deltas; they sum to the
    layer."""
    hs = [_harness(torch.float32, device, layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    for h in hs[1:]:
        for s, ad in hs[0].slots.items():
            h.load(s, ad)
    x, logits = hs[0].inputs(13, empty=False)
    slots = pick_slots(13, 3, "mixed")
    monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", True)
    total = sum(h.forward(x, logits, slots) for h in hs)
    assert spied["w13"] == 2 and spied["w2"] == 2
    assert_close(total.cpu(), hs[0].reference(x, logits, slots), torch.float32)


def test_applies_only_to_the_sorted_unsharded_path(device, monkeypatch):
    h = _harness(torch.float32, device)
    ctx = h.layer.base_layer.lora_context
    monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", True)
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    assert lora_epilogue.applies(ctx, 18)
    assert not lora_epilogue.applies(ctx, 0)
    assert not lora_epilogue.applies(dataclasses.replace(ctx, fully_sharded=True, tp_size=2), 18)
    monkeypatch.setattr(lora_epilogue, "MAX_PAIRS_PER_EXPERT", 2.0)  # 18 pairs over 8 experts: ~2.5 per expert
    assert not lora_epilogue.applies(ctx, 18) and lora_epilogue.applies(ctx, 8)
    monkeypatch.setattr(lora_epilogue, "MAX_PAIRS_PER_EXPERT", None)
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    assert not lora_epilogue.applies(ctx, 18)  # the per-pair path keeps its own kernels
    monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", False)
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    assert not lora_epilogue.applies(ctx, 18)


def test_per_pair_path_keeps_its_kernels(device, spied, monkeypatch):
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    h = _harness(torch.float32, device)
    x, logits = h.inputs(3)
    slots = pick_slots(3, 3, "mixed", seed=3)
    split, in_place = _both_paths(h, x, logits, slots, monkeypatch)
    assert spied == {"w13": 0, "w2": 0}
    assert torch.equal(split, in_place)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [256])
def test_epilogue_in_a_cuda_graph(M, spied, monkeypatch):
    """Qwen3-30B-A3B's widths (64 experts), the split seams captured and replayed with new inputs: the eager bits,
    and the reference's within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", True)
    h, x, logits, slots, graph, out = _captured_qwen3_layer(M, seed=14)
    assert spied["w13"] > 0
    _replay_with_new_inputs(h, x, logits, M, graph)
    eager = h.forward(x, logits, slots)
    assert torch.equal(out, eager), (out.float() - eager.float()).abs().max()
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.bfloat16)


def _chunked_dequant_path(monkeypatch, experts_per_chunk):
    """The 4-bit experts' large-batch path forced, its scratch holding ``experts_per_chunk`` experts: the GEMMs
    run chunk by chunk with experts numbered from each chunk's first (``MoELoRAEpilogue.expert0``)."""
    from vllm.model_executor.layers.fused_moe.experts import dequant_path

    monkeypatch.setattr(dequant_path, "FORCE_PATH", "dequant")
    monkeypatch.setattr(dequant_path, "experts_per_chunk", lambda E, N, K, dtype: experts_per_chunk)


@pytest.mark.parametrize("experts_per_chunk", [8, 3])
def test_int4_dequant_path_epilogue(experts_per_chunk, device, spied, monkeypatch):
    """``MarlinExperts`` on its dequant path (bf16 grouped GEMMs over dequantised chunks of experts) with the split
    seams: the fp32 reference on the dequantised weights, and the in-place path."""
    from tests.quantization.test_int4_moe_lora import _lora_layer, _ref
    from tests.layers.moe_setup import random_adapter
    from tests.quantization.int4_moe_setup import random_int4_experts
    from tests.quantization.test_int4_moe_layer import _inputs

    _chunked_dequant_path(monkeypatch, experts_per_chunk)
    E, top_k, H, I, group = 8, 2, 64, 32, 16
    gen = torch.Generator().manual_seed(4)
    ex = random_int4_experts(E, H, I, "silu", group, "asym", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "asym", torch.float32, device, "marlin", 2, 16)
    adapters = {s: random_adapter(E, H, I, r, "silu", gen) for s, r in enumerate([16, 8])}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(11, E, H, top_k, torch.float32, device, gen)
    slots = pick_slots(11, 2, "mixed", seed=6)
    punica.update_metadata(slots)
    split, in_place = _both_paths_of(lambda: layer(x, logits), monkeypatch)
    assert spied["w13"] == 1 and spied["w2"] == 1
    assert_close(split, in_place, torch.float32)
    assert_close(split.cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), torch.float32)


@pytest.mark.parametrize("experts_per_chunk", [8, 3])
def test_mxfp4_dequant_path_epilogue(experts_per_chunk, device, spied, monkeypatch):
    """``UnfusedOAITritonExperts`` on its dequant path, gpt-oss's interleaved gate / up with biases and one fused
    adapter slice: the split seams against the reference and the in-place path."""
    from tests.lora.test_mxfp4_moe_lora import Mxfp4Harness

    _chunked_dequant_path(monkeypatch, experts_per_chunk)
    h = Mxfp4Harness(E=8, top_k=2, H=32, I=32, dtype=torch.float32, device=device, backend="triton", max_loras=2,
                     max_rank=16, seed=8)
    for slot, r in enumerate([16, 8]):
        h.load(slot, h.new_adapter(rank=r))
    x, logits = h.inputs(11)
    slots = pick_slots(11, 2, "mixed", seed=8)
    split, in_place = _both_paths_of(lambda: h.forward(x, logits, slots), monkeypatch)
    assert spied["w13"] == 1 and spied["w2"] == 1
    assert_close(split, in_place, torch.float32)
    assert_close(split.cpu(), h.reference(x, logits, slots), torch.float32)


def _both_paths_of(forward, monkeypatch):
    outs = []
    for on in (True, False):
        monkeypatch.setattr(lora_epilogue, "LORA_EPILOGUE", on)
        outs.append(forward())
    return outs
