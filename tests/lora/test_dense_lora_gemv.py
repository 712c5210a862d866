"""Dense LoRA wrappers with the decode GEMV's LoRA epilogue (``gemv_lora.GEMV_LORA``) forced on.

Under ``TRITON_INTERPRET=1`` the GEMV takes up to ``GEMV_MAX_TOKENS`` tokens on CPU too, so the layers take the
path at one token here.  Checked: that it is taken exactly where it applies (one token, the switch on, some
token of the step on this layer's adapters, a base layer whose forward is the library's linear), that it
matches the float64 reference and the separate path, and that a token without this layer's adapter gets the
plain GEMV's bits (as a captured graph replays it: every LoRA op on).
"""
import pytest
import torch

from tests.lora.test_dense_lora_fused import build_layer, check_graph_replay
from tests.lora.test_dense_lora_layers import _make, held_rows
from tests.utils import assert_close
from vllm.lora.layers import linear as linear_mod
from vllm.lora.ops.triton_ops import gemv_lora
from vllm.model_executor.layers.ops.dense_gemv import dense_gemv


@pytest.fixture
def gemv_calls(monkeypatch):
    """GEMV_LORA on; counts the layers' calls of ``gemv_with_lora`` (rows of each)."""
    calls = []
    real = gemv_lora.gemv_with_lora

    def spy(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(gemv_lora, "GEMV_LORA", True)
    monkeypatch.setattr(linear_mod, "gemv_with_lora", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,tp_size", [("replicated", 1), ("column", 1), ("merged", 1), ("qkv", 1), ("qkv", 2),
                                          ("row", 1), ("row", 2)])
def test_matches_reference_and_separate_path(kind, tp_size, dtype, gemv_calls, device, monkeypatch):
    """One token on slot 1 (an adapter on every slice): the path on, then off, each against the float64
    reference (a row-parallel layer: the ranks' partial sums add up to it) and against each other."""
    outs = {True: [], False: []}
    for rank in range(tp_size):
        layer, punica, x, want, _ = build_layer(kind, tp_size, rank, dtype, device, [1])
        punica.update_metadata([1])
        for on in (True, False):
            monkeypatch.setattr(gemv_lora, "GEMV_LORA", on)
            n = len(gemv_calls)
            outs[on].append(layer(x).float().cpu())
            assert len(gemv_calls) == n + on, "the GEMV LoRA path was (not) taken"
        if kind != "row":
            base, W_rank = _make(kind, torch.Generator().manual_seed(0), tp_size, rank)[:2]
            for on in (True, False):
                assert_close(outs[on][-1], want[:, held_rows(base, W_rank)].float(), dtype, name=f"on={on}")
    if kind == "row":
        for on in (True, False):
            assert_close(sum(outs[on]), want.float(), dtype, name=f"on={on}")
    for got, ref in zip(outs[True], outs[False]):
        assert_close(got, ref, dtype, name="GEMV epilogue vs separate path")


def test_when_it_is_not_taken(gemv_calls, device):
    layer, punica, x, _, _ = build_layer("merged", 1, 0, torch.bfloat16, device, [0, 1])
    punica.update_metadata([0, 1])
    layer(x)  # two tokens: the projection is F.linear's, not the GEMV's (GEMV_MAX_TOKENS = 1)
    punica.update_metadata([-1])
    assert torch.equal(layer(x[:1]), layer.base_layer(x[:1]))  # no token on this layer's adapters
    punica.update_metadata([0])
    cls = type(layer.base_layer)  # a base layer whose forward is not the library's linear
    layer.base_layer.__class__ = type("CustomLinear", (cls,), {"forward": lambda self, t: cls.forward(self, t)})
    layer(x[:1])
    layer.base_layer.__class__ = cls
    assert gemv_calls == []
    layer(x[:1])
    assert gemv_calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_token_without_this_layers_adapter_gets_the_gemvs_bits(dtype, gemv_calls, device):
    """In a captured LoRA graph every LoRA op runs (``run_all_lora_ops``): a token with no slot, or on a slot
    whose adapter skips this layer, then gets ``dense_gemv``'s output bit for bit - what the plain projection
    gives it at one token on CUDA, where an eager step takes the plain path."""
    layer, punica, x, _, W = build_layer("qkv", 1, 0, dtype, device, [2])
    for slots, reset in (([-1], False), ([2], True)):
        if reset:
            layer.reset_lora(2)  # the step's adapter targets other layers only
        punica.update_metadata(slots)
        punica.run_all_lora_ops(True)
        try:
            captured = layer(x)
        finally:
            punica.run_all_lora_ops(False)
        assert torch.equal(captured, dense_gemv(x, layer.weight, layer.base_layer.bias))
        if device.type == "cuda":
            assert torch.equal(captured, layer(x))
    assert gemv_calls == [1, 1]


@pytest.mark.cuda
def test_replays_in_a_cuda_graph(gemv_calls, device):
    """Captured once (every LoRA op on, as the graph runner does), a replay follows the mapping and the input
    written in place afterwards and equals the eager forward bit for bit."""
    layer, punica, x, _, _ = build_layer("qkv", 1, 0, torch.bfloat16, device, [1])
    punica.update_metadata([1])
    check_graph_replay(layer, x.clone(), [2])
    assert gemv_calls == [1, 1, 1]
