"""The MoE LoRA deltas in fp32 buffers beside the base GEMMs (``experts/lora_overlap.py``).

The activation and the top-k sum with an fp32 ``delta`` are checked against adding the delta into their
input in place first (what the LoRA kernels do on the in-place path); then whole LoRA layers: side stream
against in order (bit for bit), against the in-place path (bit for bit on CPU, where the interpreter and torch
round alike; within tolerance on a GPU, whose kernels compiled for an fp32 output may sum in another order) and
against the fp32 loop reference; on CUDA also inside a CUDA graph.  Only the per-pair LoRA path takes the
buffers; the sorted one stays in place.  On CPU the path runs in order (no second stream), which still checks
the buffers, the zeroing and the joins.
"""
import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness, assert_delta_paths_agree, delta_paths
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_overlap
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum

ACTIVATIONS = ["silu", "gelu", "swigluoai", "silu_no_mul", "gelu_no_mul", "relu2_no_mul"]


def _dtypes(device, use_triton):
    # the interpreter rounds fp32 -> bf16 by truncation, torch to nearest: bf16 kernels are compared on the GPU
    if use_triton and device.type == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _in_place(x, delta):
    """The in-place path's seam: x + delta in fp32, rounded into x's dtype."""
    return (x.float() + delta).to(x.dtype)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_with_delta_is_the_in_place_add(activation, use_triton, device):
    g = torch.Generator().manual_seed(1)
    for dtype in _dtypes(device, use_triton):
        x = (torch.randn(13, 96, generator=g) * 4).to(dtype).to(device)
        delta = (torch.randn(13, 96, generator=g) * 0.5).to(device)
        delta[3] = 0.0  # a pair without an adapter: its row of the buffer stays zero
        x_before = x.clone()
        got = moe_activation(activation, x, use_triton=use_triton, delta=delta)
        want = moe_activation(activation, _in_place(x, delta), use_triton=use_triton)
        assert torch.equal(got, want), (activation, dtype)
        assert torch.equal(x, x_before)  # x is read, never written
        # a strided delta (a column slice of a wider buffer) reads the same values
        wide = torch.randn(13, 200, generator=g).to(device)
        wide[:, 7:103] = delta
        assert torch.equal(moe_activation(activation, x, use_triton=use_triton, delta=wide[:, 7:103]), want)


@pytest.mark.parametrize("use_triton", [False, True])
def test_moe_sum_with_delta_is_the_in_place_add(use_triton, device):
    g = torch.Generator().manual_seed(2)
    for dtype in _dtypes(device, use_triton):
        for top_k in (1, 3, 8):
            x = (torch.randn(5, top_k, 80, generator=g) * 3).to(dtype).to(device)
            delta = torch.randn(5, top_k, 80, generator=g).to(device)
            out = torch.full((5, 80), float("nan"), dtype=dtype, device=device)
            moe_sum(x, out, use_triton=use_triton, delta=delta)
            want = moe_sum(_in_place(x, delta), torch.empty_like(out), use_triton=use_triton)
            assert torch.equal(out, want), (dtype, top_k)


def test_delta_must_be_fp32_of_the_input_shape(device):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="delta must be fp32"):
        moe_activation("silu", x, delta=torch.zeros(4, 32, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="delta must be fp32"):
        moe_activation("silu", x, delta=torch.zeros(4, 16, device=device))
    with pytest.raises(ValueError, match="delta must be fp32"):
        moe_sum(x.view(2, 2, 32), torch.empty(2, 32, device=device), delta=torch.zeros(2, 32, device=device))


def test_applies_only_to_small_per_pair_steps_off_the_sharded_path(monkeypatch):
    cuda = torch.device("cuda", 0)

    def applies(device, pairs, widths, per_pair=True, sharded=False):
        return lora_overlap.applies(device, pairs, widths, per_pair=per_pair, fully_sharded_tp=sharded)

    assert applies(cuda, 512, (1536, 2048))
    assert not applies(cuda, 512, (1536, 2048), per_pair=False)  # the sorted path stays in place
    assert not applies(cuda, 512, (1536, 2048), sharded=True)  # fully sharded: collectives inside
    assert not applies(cuda, 0, (1536, 2048))
    assert not applies(cuda, 16384, (1536, 2048))  # 128 MiB of fp32 deltas
    assert not applies(torch.device("cpu"), 8, (64, 64))
    monkeypatch.setattr(lora_overlap, "LORA_SIDE_STREAM", False)
    assert applies(cuda, 8, (64, 64))  # the buffers stay (the same bits), only the second stream goes


@pytest.fixture(params=["sorted", "small_batch"])
def lora_path(request, monkeypatch):
    small = request.param == "small_batch"
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)
    return request.param


def _harness(backend, dtype, device, activation="silu", **kw):
    h = Harness(E=8, top_k=2, H=32, I=48, activation=activation, bias=activation == "swigluoai", dtype=dtype,
                device=device, backend=backend, max_loras=3, max_rank=16, seed=11, **kw)
    h.load(0, h.new_adapter(rank=16))
    h.load(2, h.new_adapter(rank=8))
    return h


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16),
                                           ("triton", torch.bfloat16)])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_layer_beside_equals_in_order_and_in_place(backend, dtype, activation, lora_path, device, monkeypatch):
    if backend == "torch" and lora_path != "small_batch":
        pytest.skip("the torch wrapper has one path (per pair)")
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs on the GPU (the interpreter truncates)")
    h = _harness(backend, dtype, device, activation)
    calls = 0
    for M in (1, 9):
        x, logits = h.inputs(M, empty=M > 1)
        slots = pick_slots(M, 3, "mixed", seed=M)  # slot 1 is empty: its tokens get the base only
        beside, in_order, in_place, seams = delta_paths(lambda: h.forward(x, logits, slots), monkeypatch)
        calls += seams
        assert_delta_paths_agree(beside, in_order, in_place, dtype)
        assert_close(beside.float().cpu(), h.reference(x, logits, slots), dtype)
    # two seams, two steps on the per-pair path; the sorted path stays in place (its w2 kernel may round
    # out + delta * weight once, which a separate buffer cannot repeat)
    assert calls == (8 if lora_path == "small_batch" else 0)  # (beside, in order) x two seams x two steps


def test_layer_beside_with_an_expert_map(device, monkeypatch):
    """Expert-parallel ranks: rows of other ranks' experts get no delta, the ranks still sum to the layer."""
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    hs = [_harness("triton", torch.float32, device, layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    for h in hs[1:]:
        for s, ad in hs[0].slots.items():
            h.load(s, ad)
    x, logits = hs[0].inputs(7, empty=False)
    slots = pick_slots(7, 3, "mixed")
    outs = [delta_paths(lambda: h.forward(x, logits, slots), monkeypatch) for h in hs]
    for beside, in_order, in_place, _ in outs:
        assert_delta_paths_agree(beside, in_order, in_place, torch.float32)
    assert_close(sum(o[0] for o in outs).cpu(), hs[0].reference(x, logits, slots), torch.float32)


def _captured_qwen3_layer(M, seed):
    """A LoRA layer at Qwen3-30B-A3B's widths (64 of its experts), 4 adapters over M tokens, warmed up on a side
    stream and captured in a CUDA graph: (harness, x, logits, slots, graph, the graph's output)."""
    h = Harness(E=64, top_k=8, H=2048, I=768, dtype=torch.bfloat16, device=torch.device("cuda"), backend="triton",
                max_loras=4, max_rank=16, seed=seed)
    for s in range(4):
        h.load(s, h.new_adapter(rank=16 if s % 2 else 8))
    x, logits = h.inputs(M, empty=False)
    slots = pick_slots(M, 4, "mixed", seed=M)
    h.punica.update_metadata(slots)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            h.layer(x, logits)  # warm-up: compiles, tuned-config lookups
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = h.layer(x, logits)
    return h, x, logits, slots, graph, out


def _replay_with_new_inputs(h, x, logits, M, graph):
    x2, logits2 = h.inputs(M, empty=False)
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 64])
def test_beside_in_a_cuda_graph(M, monkeypatch):
    """Qwen3-30B-A3B's widths (64 of its experts): captured with both streams, replayed with new inputs in the
    same buffers, the bits of the buffers in order, eager.  1 token runs the one-launch pair kernel, 16 and 64 the
    two launches."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    monkeypatch.setattr(lora_overlap, "LORA_SIDE_STREAM", True)
    h, x, logits, slots, graph, out = _captured_qwen3_layer(M, seed=12)
    for step in range(2):
        _replay_with_new_inputs(h, x, logits, M, graph)
        monkeypatch.setattr(lora_overlap, "LORA_SIDE_STREAM", False)
        in_order = h.forward(x, logits, slots)
        monkeypatch.setattr(lora_overlap, "LORA_SIDE_STREAM", True)
        assert torch.equal(out, in_order), (step, (out.float() - in_order.float()).abs().max())
        assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.bfloat16)


def test_the_joins_launch_without_pdl(monkeypatch):
    """A kernel that reads a side stream's delta must not start before that stream ends: no PDL launch there."""
    from vllm.model_executor.layers.fused_moe.ops import activation, moe_sum as moe_sum_mod

    pdl = {"USE_PDL": True, "launch_pdl": True}
    for mod in (activation, moe_sum_mod):
        monkeypatch.setattr(mod, "pdl_launch_kwargs", lambda device: dict(pdl))
        assert mod._launch_kwargs(torch.device("cuda"), None) == pdl
        assert mod._launch_kwargs(torch.device("cuda"), torch.zeros(1)) == {}
