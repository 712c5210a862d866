"""MarlinExperts with ``VLLM_INT4_MMA=1``: decode launches on the tensor-core int4 kernel
(``csrc/capi/int4_mma_moe.cu``), with and without LoRA and in a CUDA graph, against the fp32 loop reference
on the dequantised weights (CUDA only: the kernel is CUDA C++)."""
import pytest
import torch

from tests.layers.moe_setup import pick_slots, random_adapter, router_inputs
from tests.quantization.int4_moe_setup import make_int4_layer, random_int4_experts
from tests.quantization.test_int4_moe_layer import _forward_poisoned, _ref
from tests.quantization.test_int4_moe_lora import _lora_layer
from tests.quantization.test_int4_moe_lora import _ref as _lora_ref
from tests.utils import assert_close
import vllm.model_executor.layers.fused_moe.ops.int4_mma_moe as mma_mod

pytestmark = pytest.mark.cuda


@pytest.fixture
def mma_calls(monkeypatch):
    """Turn the kernel on and record its launches (block_m of each)."""
    monkeypatch.setenv("VLLM_INT4_MMA", "1")
    calls, invoke = [], mma_mod.invoke_int4_mma_moe_gemm
    monkeypatch.setattr(mma_mod, "invoke_int4_mma_moe_gemm",
                        lambda *a, **kw: calls.append(kw["block_m"]) or invoke(*a, **kw))
    return calls


def _experts(layer):
    return layer.quant_method.kernel.fused_experts


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("M", [1, 4, 16, 40, 96])  # blocks of 8, 8, 8, 16, 64 rows
def test_mma_layer_matches_reference(scheme, M, mma_calls):
    E, top_k, H, I, group = 16, 4, 256, 384, 128
    gen = torch.Generator().manual_seed(M + len(scheme))
    ex = random_int4_experts(E, H, I, "silu", group, scheme, gen)
    layer = make_int4_layer(ex, top_k, "silu", group, scheme, torch.bfloat16, "cuda", backend="marlin")
    x, logits = router_inputs(M, E, H, torch.bfloat16, "cuda", gen, top_k=top_k)
    out = _forward_poisoned(layer, x, logits)
    assert mma_calls, "the tensor-core kernel did not run"
    assert_close(out.float().cpu(), _ref(ex, x, logits, top_k, "silu"), torch.bfloat16)


def test_act_order_stays_on_triton(mma_calls):
    gen = torch.Generator().manual_seed(4)
    ex = random_int4_experts(8, 256, 256, "silu", 128, "act_order", gen)
    layer = make_int4_layer(ex, 2, "silu", 128, "act_order", torch.bfloat16, "cuda", backend="marlin")
    x, logits = router_inputs(3, 8, 256, torch.bfloat16, "cuda", gen, top_k=2)
    out = layer(x, logits)
    assert not mma_calls and _experts(layer).quant_config.w13_mma is None and not hasattr(layer, "w13_mma_words")
    assert_close(out.float().cpu(), _ref(ex, x, logits, 2, "silu"), torch.bfloat16)


def test_one_copy_of_the_weights_and_the_dequant_path(mma_calls, monkeypatch):
    """Repacked at load, the Triton layout's words are dropped (a shape-only view); a batch beyond MMA_MAX_ROWS
    (192) rows per expert takes the dequant path from the repacked words, and inside a graph capture the
    kernel's 64-row blocks."""
    E, top_k, H, I, M = 8, 2, 256, 256, 1200  # 300 pairs per expert
    gen = torch.Generator().manual_seed(8)
    ex = random_int4_experts(E, H, I, "silu", 128, "asym", gen)
    layer = make_int4_layer(ex, top_k, "silu", 128, "asym", torch.bfloat16, "cuda", backend="marlin")
    assert layer.w13_weight.stride() == (0, 0, 0) and layer.w13_mma_words.is_contiguous()
    x, logits = router_inputs(M, E, H, torch.bfloat16, "cuda", gen, top_k=top_k)
    out = _forward_poisoned(layer, x, logits)
    assert not mma_calls  # the dequant path
    assert_close(out.float().cpu(), _ref(ex, x, logits, top_k, "silu"), torch.bfloat16)
    import vllm.model_executor.layers.fused_moe.experts.marlin_experts as marlin

    with monkeypatch.context() as m:  # warm the capture's path up eagerly (kernels built and loaded outside it)
        m.setattr(marlin, "take_dequant_path", lambda *a: False)
        assert_close(layer(x, logits).float().cpu(), _ref(ex, x, logits, top_k, "silu"), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x, logits)
    graph.replay()
    torch.cuda.synchronize()
    assert mma_calls and set(mma_calls) == {64}
    assert_close(captured.float().cpu(), _ref(ex, x, logits, top_k, "silu"), torch.bfloat16)


@pytest.mark.parametrize("M", [1, 8, 32])
def test_mma_layer_with_lora(M, mma_calls):
    E, top_k, H, I, group = 16, 4, 256, 256, 128
    gen = torch.Generator().manual_seed(M * 3)
    ex = random_int4_experts(E, H, I, "silu", group, "asym", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "asym", torch.bfloat16, "cuda", "marlin", 2, 16)
    adapters = {s: random_adapter(E, H, I, 16, "silu", gen) for s in range(2)}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = router_inputs(M, E, H, torch.bfloat16, "cuda", gen, top_k=top_k)
    slots = pick_slots(M, 2, "mixed", seed=M)
    punica.update_metadata(slots)
    out = layer(x, logits)
    assert mma_calls
    assert_close(out.float().cpu(), _lora_ref(ex, x, logits, top_k, "silu", adapters, slots), torch.bfloat16)


@pytest.mark.parametrize("M", [1, 24])
def test_mma_layer_graph_replay(M, mma_calls):
    E, top_k, H, I = 16, 4, 256, 256
    gen = torch.Generator().manual_seed(M + 100)
    ex = random_int4_experts(E, H, I, "silu", 128, "asym", gen)
    layer = make_int4_layer(ex, top_k, "silu", 128, "asym", torch.bfloat16, "cuda", backend="marlin")
    x, logits = router_inputs(M, E, H, torch.bfloat16, "cuda", gen, top_k=top_k)
    layer(x, logits)  # warm-up: repacks the weights, compiles, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    x2, logits2 = router_inputs(M, E, H, torch.bfloat16, "cuda", gen, top_k=top_k)
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()
    assert mma_calls
    assert_close(out.float().cpu(), _ref(ex, x2, logits2, top_k, "silu"), torch.bfloat16)
