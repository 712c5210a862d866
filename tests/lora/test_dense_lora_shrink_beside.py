"""The dense LoRA delta's shrink beside the projection (``dense_overlap.DENSE_SHRINK_BESIDE``).

Where the op takes the sorted split (17-512 rows), the shrink runs inside ``lora_overlap.beside`` (on CUDA the
side stream while the projection runs; forced on for CPU here, in order) and the expand adds into the
projection's output after it.  Checked: the same bits as the in-place op (the same launches), the full-weight
reference, the partials' scratch poisoned (the expand reads only what the shrink wrote), one shrink inside
``beside`` and no expand there; not taken on the token path (<= 16 rows) or where no token has an adapter; on a
GPU inside a CUDA graph at Qwen3-30B-A3B's q/k/v width."""
import pytest
import torch

from tests.lora.test_dense_lora_layers import _make, full_reference, random_adapter, wrap
from tests.utils import assert_close
from vllm.lora.layers import dense_overlap
from vllm.lora.ops.triton_ops import lora_linear as op
from vllm.lora.ops.triton_ops import lora_linear_sorted_split as split
from vllm.model_executor.layers.fused_moe.experts import lora_overlap

SLOTS = [(i * 7) % 5 - 1 for i in range(40)]  # no adapter, slots 0-2, and slot 3 (empty) over 40 rows


@pytest.fixture
def calls(monkeypatch):
    """The path forced on for CPU too, the partials poisoned with NaN, and a record of the shrinks and expands
    (``beside``: whether each ran inside ``lora_overlap.beside``)."""
    record = {"shrink": [], "expand": []}
    inside = [False]
    monkeypatch.setattr(op, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device))
    monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dense_overlap, "DENSE_SHRINK_BESIDE", True)
    real_beside, shrink, expand = lora_overlap.beside, split.sorted_shrink, split.sorted_expand

    def beside(device, side, main):
        def marked():
            inside[0] = True
            try:
                return side()
            finally:
                inside[0] = False
        return real_beside(device, marked, main)

    monkeypatch.setattr(lora_overlap, "beside", beside)
    monkeypatch.setattr(split, "sorted_shrink", lambda *a: record["shrink"].append(inside[0]) or shrink(*a))
    monkeypatch.setattr(split, "sorted_expand", lambda *a: record["expand"].append(inside[0]) or expand(*a))
    return record


def _layer(kind, device, dtype, slots_len=len(SLOTS)):
    gen = torch.Generator().manual_seed(4)
    base, W, bias, out_sizes = _make(kind, gen, 1, 0)
    layer, punica = wrap(base.to(dtype), max_loras=4, kind="gpu", device=device)
    adapters = {0: random_adapter(gen, W.shape[1], out_sizes, 12), 1: random_adapter(gen, W.shape[1], out_sizes, 16),
                2: random_adapter(gen, W.shape[1], out_sizes, 8)}
    for slot, (a, b) in adapters.items():
        layer.set_lora(slot, a, b)
    x = torch.randn(slots_len, W.shape[1], generator=gen).to(dtype).to(device)
    return layer, punica, x, W, bias, adapters, out_sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["qkv", "merged", "row", "replicated"])
def test_shrink_beside_gives_the_in_place_bits(kind, dtype, device, calls, monkeypatch):
    layer, punica, x, W, bias, adapters, out_sizes = _layer(kind, device, dtype)
    punica.update_metadata(SLOTS)
    beside = layer(x)
    assert calls == {"shrink": [True], "expand": [False]}, "one shrink inside beside(), its expand after"
    monkeypatch.setattr(dense_overlap, "DENSE_SHRINK_BESIDE", False)
    in_place = layer(x)
    assert calls == {"shrink": [True, False], "expand": [False, False]}
    assert torch.equal(beside, in_place), (beside.float() - in_place.float()).abs().max()
    want = full_reference(x.float().cpu(), W.to(dtype).float(), None if bias is None else bias.to(dtype).float(),
                          {s: ([t.to(dtype).float() for t in a], [t.to(dtype).float() for t in b])
                           for s, (a, b) in adapters.items()}, SLOTS, out_sizes)
    assert_close(beside.float().cpu(), want.float(), dtype)


def test_not_taken_on_the_token_path_or_without_adapters(device, calls, monkeypatch):
    layer, punica, x, W, bias, adapters, out_sizes = _layer("qkv", device, torch.float32, slots_len=9)
    slots = SLOTS[:9]
    punica.update_metadata(slots)  # 9 rows: the token path (no sorted split)
    got = layer(x)
    assert calls == {"shrink": [], "expand": []}
    want = full_reference(x.float().cpu(), W, bias, adapters, slots, out_sizes)
    assert_close(got.float().cpu(), want.float(), torch.float32)
    layer, punica, x, *_ = _layer("qkv", device, torch.float32)
    punica.update_metadata([3 if s >= 0 else -1 for s in SLOTS])  # slot 3 holds no adapter of this layer
    assert torch.equal(layer(x), layer.base_layer(x))
    assert calls == {"shrink": [], "expand": []}


@pytest.mark.cuda
def test_shrink_beside_in_a_cuda_graph(monkeypatch):
    """Qwen3-30B-A3B's q/k/v projection (2048 -> 32 + 4 + 4 heads of 128), bf16, 256 rows, 4 adapters: captured
    with both streams, replayed with new inputs, the in-place op's bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vllm.model_executor.layers.linear import QKVParallelLinear

    monkeypatch.setattr(dense_overlap, "DENSE_SHRINK_BESIDE", True)
    gen = torch.Generator().manual_seed(6)
    base = QKVParallelLinear(2048, 128, 32, 4).to(torch.bfloat16)
    base.weight.data.copy_(torch.randn(base.weight.shape, generator=gen) / 2048 ** 0.5)
    layer, punica = wrap(base, max_loras=4, kind="gpu", device="cuda")
    sizes = [4096, 512, 512]
    for slot in range(4):
        layer.set_lora(slot, *random_adapter(gen, 2048, sizes, 16))
    T = 256
    slots = [(i % 5) - 1 for i in range(T)]
    punica.update_metadata(slots)
    x = torch.randn(T, 2048, generator=gen).to(torch.bfloat16).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(2):
        x.copy_(torch.randn(T, 2048, generator=gen).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(dense_overlap, "DENSE_SHRINK_BESIDE", False)
        in_place = layer(x)
        monkeypatch.setattr(dense_overlap, "DENSE_SHRINK_BESIDE", True)
        assert torch.equal(out, in_place), (out.float() - in_place.float()).abs().max()
