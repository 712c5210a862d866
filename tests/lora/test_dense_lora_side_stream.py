"""The dense LoRA delta in an fp32 buffer beside the projection (``vllm/lora/layers/dense_overlap.py``).

The path is forced on for CPU too (the buffer and the join, in order): it must give the in-place path's bits
(the interpreter and torch round alike), match the full-weight reference, run only where the LoRA op runs and
only up to ``MAX_TOKENS``; on a GPU it must also hold inside a CUDA graph replayed with new inputs."""
import pytest
import torch

from tests.lora.lora_moe_harness import poisoned_delta_buffer
from tests.lora.test_dense_lora_layers import SLOTS, _make, full_reference, random_adapter, wrap
from tests.utils import assert_close
from vllm.lora.layers import dense_overlap
from vllm.model_executor.layers.fused_moe.experts import lora_overlap


@pytest.fixture
def beside_calls(monkeypatch):
    """The path forced on for CPU too, its buffers poisoned with NaN (the side work must zero them), and a record
    of its calls."""
    calls = []
    monkeypatch.setattr(lora_overlap, "delta_buffer", poisoned_delta_buffer)
    real = dense_overlap.project_beside
    monkeypatch.setattr(dense_overlap, "project_beside", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dense_overlap, "DENSE_LORA_SIDE_STREAM", True)  # off by default (timed slower)
    return calls


def _layer(kind, punica_kind, device, dtype, tp_size=1, rank=0):
    gen = torch.Generator().manual_seed(3)
    base, W, bias, out_sizes = _make(kind, gen, tp_size, rank, **({"reduce_results": False} if kind == "row" else {}))
    layer, punica = wrap(base.to(dtype), kind=punica_kind, device=device)
    adapters = {0: random_adapter(gen, W.shape[1], out_sizes, 12), 2: random_adapter(gen, W.shape[1], out_sizes, 8)}
    for slot, (a, b) in adapters.items():
        layer.set_lora(slot, a, b)
    x = torch.randn(len(SLOTS), layer.weight.shape[1], generator=gen).to(dtype).to(device)  # this rank's inputs
    return layer, punica, x, W, bias, adapters, out_sizes


@pytest.mark.parametrize("punica_kind,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                               ("gpu", torch.float32), ("gpu", torch.float16)])
@pytest.mark.parametrize("kind", ["qkv", "merged", "row", "replicated"])
def test_beside_gives_the_in_place_bits(kind, punica_kind, dtype, device, beside_calls, monkeypatch):
    device = device if punica_kind == "gpu" else torch.device("cpu")
    layer, punica, x, W, bias, adapters, out_sizes = _layer(kind, punica_kind, device, dtype)
    punica.update_metadata(SLOTS)  # slot 1 holds no adapter: its tokens get the base only
    beside = layer(x)
    assert len(beside_calls) == 1
    monkeypatch.setattr(dense_overlap, "DENSE_LORA_SIDE_STREAM", False)
    in_place = layer(x)
    assert len(beside_calls) == 1
    if device.type == "cuda":  # kernels compiled for an fp32 output may sum in another order
        assert_close(beside.float(), in_place.float(), dtype)
    else:
        assert torch.equal(beside, in_place), (beside.float() - in_place.float()).abs().max()
    if kind != "row":
        want = full_reference(x.float().cpu(), W.to(dtype).float(), None if bias is None else bias.to(dtype).float(),
                              {s: ([t.to(dtype).float() for t in a], [t.to(dtype).float() for t in b])
                               for s, (a, b) in adapters.items()}, SLOTS, out_sizes)
        assert_close(beside.float().cpu(), want.float(), dtype)


def test_row_parallel_rank_partials_beside(device, beside_calls):
    """tp 2, no all-reduce in the layer: the ranks' partial outputs with the delta beside sum to the reference."""
    outs = []
    for rank in range(2):
        layer, punica, x, W, bias, adapters, out_sizes = _layer("row", "gpu", device, torch.float32, 2, rank)
        punica.update_metadata(SLOTS)
        part = W.shape[1] // 2
        gen = torch.Generator().manual_seed(9)
        x_full = torch.randn(len(SLOTS), W.shape[1], generator=gen)
        outs.append(layer(x_full[:, rank * part:(rank + 1) * part].to(device)).cpu())
    assert len(beside_calls) == 2
    want = full_reference(x_full, W, bias, adapters, SLOTS, out_sizes)
    assert_close(sum(outs), want.float(), torch.float32)


def test_taken_only_where_the_lora_op_runs_and_up_to_max_tokens(device, beside_calls, monkeypatch):
    layer, punica, x, *_ = _layer("qkv", "gpu", device, torch.float32)
    punica.update_metadata([1] * len(SLOTS))  # no token on a slot of this layer: the projection alone
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    assert not beside_calls
    punica.update_metadata(SLOTS)
    monkeypatch.setattr(dense_overlap, "MAX_TOKENS", len(SLOTS) - 1)
    layer(x)
    assert not beside_calls
    monkeypatch.setattr(dense_overlap, "MAX_TOKENS", len(SLOTS))
    layer(x)
    assert len(beside_calls) == 1
    assert not dense_overlap.applies(torch.device("meta"), 4)  # a device type without the path


def test_off_by_default(device, monkeypatch):
    """Timed slower on an H200 (the module docstring): the in-place op unless switched on."""
    assert not dense_overlap.DENSE_LORA_SIDE_STREAM
    monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
    assert not dense_overlap.applies(device, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 9, 64])
def test_beside_in_a_cuda_graph(tokens, monkeypatch):
    """Captured on two streams, replayed with new inputs and slots: the eager path's output."""
    monkeypatch.setattr(dense_overlap, "DENSE_LORA_SIDE_STREAM", True)
    device = torch.device("cuda")
    layer, punica, _, *_ = _layer("qkv", "gpu", device, torch.bfloat16)
    K = layer.weight.shape[1]
    slots = [(t % 4) - 1 for t in range(tokens)]
    x = torch.randn(tokens, K, device=device, dtype=torch.bfloat16)
    punica.update_metadata(slots)
    for _ in range(2):  # warm-up (Triton compiles) on a side stream, as CUDA graphs require
        layer(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    slots = slots[::-1]
    punica.update_metadata(slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, layer(x))
