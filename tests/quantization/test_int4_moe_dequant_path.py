"""MarlinExperts' large-batch path (dequantise the int4 weights once, then the bf16 grouped GEMM), forced on
and off, against the fp32 loop reference on the dequantised weights: with and without LoRA, with an
expert map (EP), with the scratch capped so that the experts go in several chunks; routing reaches the
last expert and leaves one expert without tokens.  Also the decision itself (``use_dequant_path``)."""
import pytest
import torch

import vllm.model_executor.layers.fused_moe.experts.dequant_path as dp
import vllm.model_executor.layers.fused_moe.ops.int4_dequant as int4_dequant
from tests.layers.moe_setup import pick_slots, random_adapter
from tests.quantization.int4_moe_setup import make_int4_layer, poison_workspaces, random_int4_experts
from tests.quantization.test_int4_moe_layer import _inputs, _ref, check_graph_replay
from tests.quantization.test_int4_moe_lora import _lora_layer
from tests.quantization.test_int4_moe_lora import _ref as _lora_ref
from tests.utils import assert_close

E, TOP_K, H, I, GROUP = 8, 2, 64, 32, 16


@pytest.fixture
def dequant_calls(monkeypatch):
    """Records (K, e0, e1) of every int4 dequantisation (the path's GEMMs call it; K is H for GEMM1, I for GEMM2)."""
    calls, real = [], int4_dequant.dequantize_int4_experts

    def spy(w, out, e0=0, e1=None, **kw):
        calls.append((w.k, e0, e0 + out.shape[0]))
        return real(w, out, e0, e1, **kw)

    monkeypatch.setattr(int4_dequant, "dequantize_int4_experts", spy)
    monkeypatch.setenv("VLLM_INT4_MMA", "0")  # the Triton layout's words (the tensor-core copy: its own tests)
    return calls


def _force(monkeypatch, path: str, chunk_experts: int = 0, H: int = H, I: int = I, elt: int = 4) -> None:
    monkeypatch.setattr(dp, "FORCE_PATH", path)
    if chunk_experts:  # the cap holds this many of GEMM1's [2I, H] weights (GEMM2's are half as big: twice as many)
        monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", chunk_experts * 2 * I * H * elt)


def _chunks(calls, k):
    return [(e0, e1) for kk, e0, e1 in calls if kk == k]


@pytest.mark.parametrize("path", ["dequant", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scheme", ["sym", "asym", "act_order"])
def test_dequant_path_matches_reference(path, dtype, scheme, dequant_calls, monkeypatch, device):
    _force(monkeypatch, path)
    gen = torch.Generator().manual_seed(len(scheme) + 3)
    ex = random_int4_experts(E, H, I, "silu", GROUP, scheme, gen)
    layer = make_int4_layer(ex, TOP_K, "silu", GROUP, scheme, dtype, device, backend="marlin")
    x, logits = _inputs(13, E, H, TOP_K, dtype, device, gen)
    first = layer(x, logits)
    poison_workspaces(layer)
    out = layer(x, logits)
    assert torch.equal(first, out)
    assert_close(out.float().cpu(), _ref(ex, x, logits, TOP_K, "silu"), dtype)
    if path == "dequant":  # one dequantisation of all experts per GEMM and forward
        assert set(_chunks(dequant_calls, H)) == {(0, E)} and set(_chunks(dequant_calls, I)) == {(0, E)}
    else:
        assert not dequant_calls


@pytest.mark.parametrize("ep", [False, True])
def test_dequant_path_in_chunks(ep, dequant_calls, monkeypatch, device):
    """A scratch cap of 3 experts: GEMM1 runs chunks [0, 3) [3, 6) [6, 8) (EP: [0, 3) [3, 4) per rank), each
    on the pairs routed to it only; with an expert map the ranks sum to the full layer."""
    _force(monkeypatch, "dequant", chunk_experts=3)
    gen = torch.Generator().manual_seed(17)
    ex = random_int4_experts(E, H, I, "silu", GROUP, "act_order", gen)
    x, logits = _inputs(13, E, H, TOP_K, torch.float32, device, gen)
    ranks = [make_int4_layer(ex, TOP_K, "silu", GROUP, "act_order", torch.float32, device, backend="marlin",
                             **(dict(ep_size=2, ep_rank=r) if ep else {})) for r in range(2 if ep else 1)]
    total = 0
    for layer in ranks:
        layer(x, logits)
        poison_workspaces(layer)
        total = total + layer(x, logits)
    assert_close(total.cpu(), _ref(ex, x, logits, TOP_K, "silu"), torch.float32)
    expected = [(0, 3), (3, 4)] if ep else [(0, 3), (3, 6), (6, 8)]
    assert _chunks(dequant_calls, H) == expected * 2 * len(ranks)
    assert _chunks(dequant_calls, I) == ([(0, 4)] if ep else [(0, 6), (6, 8)]) * 2 * len(ranks)


@pytest.mark.parametrize("path,chunk_experts", [("dequant", 0), ("dequant", 3), ("kernel", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_path_with_lora(path, chunk_experts, dtype, dequant_calls, monkeypatch, device):
    """The LoRA seams sit where they do on the kernel path: same reference, deltas on the unquantized inputs."""
    _force(monkeypatch, path, chunk_experts, elt=torch.finfo(dtype).bits // 8)
    gen = torch.Generator().manual_seed(23)
    ex = random_int4_experts(E, H, I, "silu", GROUP, "asym", gen)
    layer, punica = _lora_layer(ex, TOP_K, "silu", GROUP, "asym", dtype, device, "marlin", max_loras=2, rank=8)
    adapters = {s: random_adapter(E, H, I, 8, "silu", gen) for s in range(2)}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(11, E, H, TOP_K, dtype, device, gen)
    slots = pick_slots(11, 2, "mixed", seed=4)
    punica.update_metadata(slots)
    out = layer(x, logits)
    ref = _lora_ref(ex, x, logits, TOP_K, "silu", adapters, slots)
    assert_close(out.float().cpu(), ref, dtype)
    assert not torch.allclose(ref, _lora_ref(ex, x, logits, TOP_K, "silu", {}, slots), rtol=1e-2, atol=1e-3)
    assert bool(dequant_calls) == (path == "dequant")
    if chunk_experts:
        assert _chunks(dequant_calls, H) == [(0, 3), (3, 6), (6, 8)]


def test_dequant_path_lora_expert_parallel(dequant_calls, monkeypatch, device):
    _force(monkeypatch, "dequant", chunk_experts=3, H=32, I=32)
    gen = torch.Generator().manual_seed(29)
    ex = random_int4_experts(E, 32, 32, "silu", GROUP, "asym", gen)
    ad = random_adapter(E, 32, 32, 8, "silu", gen)
    x, logits = _inputs(11, E, 32, TOP_K, torch.float32, device, gen)
    slots = pick_slots(11, 1, "mixed", seed=3)
    total = 0
    for r in range(2):
        layer, punica = _lora_layer(ex, TOP_K, "silu", GROUP, "asym", torch.float32, device, "marlin", 1, 8,
                                    ep_size=2, ep_rank=r)
        layer.set_lora(0, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
        punica.update_metadata(slots)
        total = total + layer(x, logits)
    assert_close(total.cpu(), _lora_ref(ex, x, logits, TOP_K, "silu", {0: ad}, slots), torch.float32)
    assert _chunks(dequant_calls, 32)[:2] == [(0, 3), (3, 4)]


def test_auto_decision_takes_the_path_by_shape(dequant_calls, monkeypatch, device):
    """Without forcing, the pair counts decide (thresholds lowered so that a CPU-sized batch crosses them)."""
    monkeypatch.setattr(dp, "MIN_PAIRS", 20)
    monkeypatch.setattr(dp, "MIN_PAIRS_PER_EXPERT", {"int4": 3, "mxfp4": 3})
    gen = torch.Generator().manual_seed(31)
    ex = random_int4_experts(E, H, I, "silu", GROUP, "sym", gen)
    layer = make_int4_layer(ex, TOP_K, "silu", GROUP, "sym", torch.float32, device, backend="marlin")
    for M, taken in ((9, False), (12, True)):  # 18 pairs (< 20), 24 pairs (>= 20 and >= 3 * 8)
        dequant_calls.clear()
        x, logits = _inputs(M, E, H, TOP_K, torch.float32, device, gen)
        assert_close(layer(x, logits).cpu(), _ref(ex, x, logits, TOP_K, "silu"), torch.float32)
        assert bool(dequant_calls) == taken


def test_use_dequant_path_thresholds(monkeypatch):
    assert dp.use_dequant_path(4096 * 8, 128, "int4") and dp.use_dequant_path(256 * 2, 8, "int4")
    assert not dp.use_dequant_path(16 * 8, 128, "int4")  # decode: the in-register kernel
    assert not dp.use_dequant_path(255, 1, "int4")  # too few pairs whatever the experts
    assert dp.use_dequant_path(20 * 128, 128, "int4") and not dp.use_dequant_path(20 * 128 - 1, 128, "int4")
    assert not dp.use_dequant_path(256 * 8, 128, "int4")  # Qwen3-30B-A3B at 256 tokens: the kernel is faster
    assert dp.use_dequant_path(64 * 32, 32, "mxfp4") and not dp.use_dequant_path(64 * 32 - 4, 32, "mxfp4")
    assert not dp.use_dequant_path(256 * 4, 32, "mxfp4")  # gpt-oss-20b at 256 tokens: the kernel is faster
    with pytest.raises(ValueError, match="unknown 4-bit kind 'fp8'"):
        dp.use_dequant_path(4096, 8, "fp8")
    monkeypatch.setattr(dp, "FORCE_PATH", "kernel")
    assert not dp.use_dequant_path(1 << 20, 1, "int4")
    monkeypatch.setattr(dp, "FORCE_PATH", "bogus")
    with pytest.raises(ValueError, match="FORCE_PATH"):
        dp.use_dequant_path(1, 1, "int4")


def test_not_taken_while_a_cuda_graph_is_captured(monkeypatch):
    """A captured allocation would stay in the graphs' pool: decode graphs keep the 4-bit kernels."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda")
    assert not dp.take_dequant_path(1 << 16, 8, "int4", cuda)
    assert dp.take_dequant_path(1 << 16, 8, "int4", torch.device("cpu"))
    monkeypatch.setattr(dp, "IN_CUDA_GRAPHS", True)
    assert dp.take_dequant_path(1 << 16, 8, "int4", cuda)
    monkeypatch.setattr(dp, "IN_CUDA_GRAPHS", False)
    monkeypatch.setattr(dp, "FORCE_PATH", "dequant")
    assert dp.take_dequant_path(1, 8, "int4", cuda)


def test_experts_per_chunk(monkeypatch):
    monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", 1 << 30)
    # Mixtral-8x7B w13 (8 x [28672, 4096] bf16, 1.9 GB): 4 experts a chunk; Qwen3-30B-A3B w13 fits whole
    assert dp.experts_per_chunk(8, 28672, 4096, torch.bfloat16) == 4
    assert dp.experts_per_chunk(128, 1536, 2048, torch.bfloat16) == 128
    monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", 1)
    assert dp.experts_per_chunk(8, 64, 64, torch.float32) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["asym", "act_order"])
@pytest.mark.parametrize("chunk_experts", [0, 5])
def test_dequant_path_bf16_on_gpu(scheme, chunk_experts, monkeypatch, device):
    monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", chunk_experts * 2 * 384 * 256 * 2 or dp.SCRATCH_CAP_BYTES)
    gen = torch.Generator().manual_seed(7)
    ex = random_int4_experts(16, 256, 384, "silu", 128, scheme, gen)
    layer = make_int4_layer(ex, 4, "silu", 128, scheme, torch.bfloat16, device, backend="marlin")
    from tests.layers.moe_setup import router_inputs

    x, logits = router_inputs(512, 16, 256, torch.bfloat16, device, gen, top_k=4, empty=True)
    assert dp.use_dequant_path(512 * 4, 16, "int4")  # 128 pairs per expert: the default thresholds take it
    assert_close(layer(x, logits).float().cpu(), _ref(ex, x, logits, 4, "silu"), torch.bfloat16)


@pytest.mark.cuda
def test_dequant_path_cuda_graph_replay(monkeypatch, device):
    """Forced into a capture, the path is graph-safe (no host reads of device values): replayed with new inputs."""
    monkeypatch.setattr(dp, "IN_CUDA_GRAPHS", True)
    monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", 5 * 2 * 256 * 256 * 2)  # chunks too
    check_graph_replay(256, 16, torch.Generator().manual_seed(8), device)


@pytest.mark.cuda
def test_capture_keeps_the_kernel_path(dequant_calls, monkeypatch, device):
    """A batch that takes the path eagerly keeps the in-register kernel inside a CUDA-graph capture (default)."""
    from tests.layers.moe_setup import router_inputs
    from vllm.model_executor.layers.fused_moe.router import fused_topk

    gen = torch.Generator().manual_seed(9)
    ex = random_int4_experts(32, 256, 256, "silu", 128, "asym", gen)
    layer = make_int4_layer(ex, 4, "silu", 128, "asym", torch.bfloat16, device, backend="marlin")
    x, logits = router_inputs(256, 32, 256, torch.bfloat16, device, gen, top_k=4)
    tw, ti = fused_topk(logits.float(), 4, renormalize=True)
    monkeypatch.setattr(dp, "FORCE_PATH", "kernel")
    layer.quant_method.apply(layer, x, tw, ti)  # compile the kernel path outside the capture
    monkeypatch.setattr(dp, "FORCE_PATH", None)
    layer.quant_method.apply(layer, x, tw, ti)
    assert dequant_calls  # 1024 pairs, 32 per expert: eagerly, the dequant path
    dequant_calls.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.quant_method.apply(layer, x, tw, ti)
    assert not dequant_calls
    graph.replay()
    assert_close(out.float().cpu(), _ref(ex, x, logits, 4, "silu"), torch.bfloat16)
