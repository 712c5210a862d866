"""Dense LoRA wrappers with the fused decode path (``fused_linear_lora``) forced on, against the path off.

Under ``TRITON_INTERPRET=1`` the fused path is off by default (CUDA only); the tests
switch it on per layer (``use_fused_decode``) and check that it was taken, that it
matches the two-launch path and the float64 full-weight reference, and when it must
not be taken (more than ``BATCH_MAX_TOKENS`` tokens, no token on this layer's adapters, a base layer
with its own forward, the switch off).
"""
import pytest
import torch

import vllm.lora.ops.triton_ops.fused_linear_lora as fused_mod
from tests.lora.test_dense_lora_layers import SLOTS, _make, full_reference, held_rows, random_adapter, wrap
from tests.utils import assert_close
from vllm.lora.layers import linear as linear_mod
from vllm.lora.layers.linear import fused_decode_default
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import BATCH_MAX_TOKENS
from vllm.lora.punica_wrapper import get_punica_wrapper


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op (the layers import it at call time)."""
    calls = []
    real = fused_mod.fused_linear_lora

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_mod, "fused_linear_lora", spy)
    return calls


def build_layer(kind, tp_size, rank, dtype, device, slots, seed=0):
    """A wrapped layer on ``device`` with adapters in slots 0-2 (rank < max; slot 2 skips a slice), its input
    for ``slots`` (this rank's part for a row-parallel layer) and the float64 reference of the full output;
    returns (layer, punica, x, want, W)."""
    gen = torch.Generator().manual_seed(seed)
    base, W, bias, out_sizes = _make(kind, gen, tp_size, rank, **({"reduce_results": False} if kind == "row" else {}))
    layer, punica = wrap(base.to(dtype), kind="gpu", device=device)
    K = W.shape[1]
    adapters = {0: random_adapter(gen, K, out_sizes, 12), 1: random_adapter(gen, K, out_sizes, 16),
                2: random_adapter(gen, K, out_sizes, 8, skip=(1,) if len(out_sizes) > 1 else ())}
    for slot, (a, b) in adapters.items():
        adapters[slot] = ([None if t is None else t * 4 for t in a], b)  # a delta of the base's size
        layer.set_lora(slot, *adapters[slot])
    x_full = torch.randn(len(slots), K, generator=gen)
    want = full_reference(x_full.to(dtype).double(), W.to(dtype), None if bias is None else bias.to(dtype),
                          adapters, slots, out_sizes)
    x = x_full
    if kind == "row":
        part = K // tp_size
        x = x_full[:, rank * part:(rank + 1) * part]
    return layer, punica, x.to(dtype=dtype, device=device), want, W


def _layer(kind, tp_size, rank, dtype, device, seed=0):
    """``build_layer`` for ``SLOTS``, the step's metadata set; returns (layer, x, want, W)."""
    layer, punica, x, want, W = build_layer(kind, tp_size, rank, dtype, device, SLOTS, seed)
    punica.update_metadata(SLOTS)
    return layer, x, want, W


def check_fused_against_unfused(kind, tp_size, dtype, device, calls, slots):
    """For each rank: the layer's output for ``slots`` with the fused path off, then on (``calls``: the fused
    op's spy, one entry a call: it must be taken exactly when on), each against the float64 reference
    (a row-parallel layer: the ranks' partial sums), and the two paths against each other."""
    outs = {True: [], False: []}
    for rank in range(tp_size):
        layer, punica, x, want, _ = build_layer(kind, tp_size, rank, dtype, device, slots)
        punica.update_metadata(slots)
        assert not layer.use_fused_decode or device.type == "cuda"
        for fused in (False, True):
            layer.use_fused_decode = fused
            n = len(calls)
            outs[fused].append(layer(x).float().cpu())
            assert len(calls) == n + fused, "the fused path was (not) taken"
        if kind == "row":
            continue
        base, W_rank = _make(kind, torch.Generator().manual_seed(0), tp_size, rank)[:2]
        want_rank = want[:, held_rows(base, W_rank)].float()
        for fused in (False, True):
            assert_close(outs[fused][-1], want_rank, dtype, name=f"fused={fused} rank {rank}")
    if kind == "row":  # partial sums of the ranks (bias on rank 0 only) add up to the full output
        for fused in (False, True):
            assert_close(sum(outs[fused]), want.float(), dtype, name=f"fused={fused}")
    for got, ref in zip(outs[True], outs[False]):
        assert_close(got, ref, dtype, name="fused vs unfused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,tp_size", [("replicated", 1), ("column", 1), ("merged", 1), ("qkv", 1), ("qkv", 2),
                                          ("row", 1), ("row", 2)])
def test_fused_matches_unfused_and_reference(kind, tp_size, dtype, fused_calls, device):
    check_fused_against_unfused(kind, tp_size, dtype, device, fused_calls, SLOTS)


def test_fused_keeps_leading_dims(fused_calls, device):
    layer, x, want, _ = _layer("qkv", 1, 0, torch.float32, device)
    layer.use_fused_decode = True
    y = layer(x.view(3, 3, -1))
    assert fused_calls == [9] and y.shape == (3, 3, want.shape[1])
    assert_close(y.reshape(9, -1).cpu(), want.float(), torch.float32)


def test_when_the_fused_path_is_not_taken(fused_calls, device, monkeypatch):
    layer, x, _, _ = _layer("merged", 1, 0, torch.float32, device)
    layer.use_fused_decode = True
    punica = layer.punica_wrapper
    # more than BATCH_MAX_TOKENS tokens: the two-launch path
    big = get_punica_wrapper(2 * BATCH_MAX_TOKENS, 3, device, kind="gpu")
    layer.set_mapping(big)
    layer.use_fused_decode = True
    many = BATCH_MAX_TOKENS + 1
    big.update_metadata([0] * many)
    layer(x[:1].expand(many, -1))
    layer.set_mapping(punica)
    layer.use_fused_decode = True
    # fewer rows than FUSED_DECODE_MIN_TOKENS: the two-launch path
    with monkeypatch.context() as m:
        m.setattr(linear_mod, "FUSED_DECODE_MIN_TOKENS", len(SLOTS) + 1)
        layer(x)
    # no token on this layer's adapters: the base layer alone, bit for bit
    punica.update_metadata([-1] * len(SLOTS))
    assert torch.equal(layer(x), layer.base_layer(x))
    # a base layer whose forward is not the library's F.linear (a subclass or stand-in)
    punica.update_metadata(SLOTS)
    cls = type(layer.base_layer)
    layer.base_layer.__class__ = type("CustomLinear", (cls,), {"forward": lambda self, t: cls.forward(self, t)})
    layer(x)
    layer.base_layer.__class__ = cls
    # switched off: exactly the two-launch path
    layer.use_fused_decode = False
    y = layer(x)
    want = layer.base_layer(x)
    punica.add_lora_linear(want, x, layer.lora_a_stacked, layer.lora_b_stacked, adapter_enabled=layer.adapter_enabled)
    assert torch.equal(y, want)
    assert fused_calls == []
    layer.use_fused_decode = True
    layer(x)
    assert fused_calls == [len(SLOTS)]


def test_default_switch(monkeypatch):
    """Off by default (on an H200 the 17-256-token path ran out of shared memory at rank 32); with
    VLLM_FUSED_LORA_LINEAR=1 on for CUDA with compiled Triton; off on CPU and in the interpreter."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("VLLM_FUSED_LORA_LINEAR", raising=False)
    assert not fused_decode_default(cuda) and not fused_decode_default(cpu)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "1")
    assert fused_decode_default(cuda) and not fused_decode_default(cpu)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "0")
    assert not fused_decode_default(cuda)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "1")
    assert fused_decode_default(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fused_decode_default(cuda)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "maybe")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="VLLM_FUSED_LORA_LINEAR"):
        fused_decode_default(cuda)
    # the benchmarks' override (decode_switch_ab.py --switches dense-fused-lora) wins over the variable
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "0")
    monkeypatch.setattr(linear_mod, "FUSED_DECODE", True)
    assert fused_decode_default(cuda) and not fused_decode_default(cpu)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "1")
    monkeypatch.setattr(linear_mod, "FUSED_DECODE", False)
    assert not fused_decode_default(cuda)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_step_takes_the_kernels_of_the_captured_graph(dtype, fused_calls, device):
    """A LoRA decode graph is captured with every LoRA op on (``run_all_lora_ops``), so a layer that holds no
    adapter of the step (here: none at all) runs the fused op there; an eager step with some adapter token
    must take the same kernel, or graph replays and eager steps round the base differently."""
    layer, x, _, _ = _layer("qkv", 1, 0, dtype, device)
    for slot in range(3):
        layer.reset_lora(slot)  # the step's adapters target other layers only
    layer.use_fused_decode = True
    punica = layer.punica_wrapper
    eager = layer(x)
    punica.run_all_lora_ops(True)
    try:
        captured = layer(x)
    finally:
        punica.run_all_lora_ops(False)
    assert torch.equal(eager, captured)
    assert fused_calls == [len(SLOTS)] * 2
    # a step without adapter tokens uses the no-LoRA graph (and F.linear eagerly): the base layer alone
    punica.update_metadata([-1] * len(SLOTS))
    assert torch.equal(layer(x), layer.base_layer(x)) and len(fused_calls) == 2


def check_graph_replay(layer, static_x, new_slots, check_eager=None):
    """Capture ``layer(static_x)`` once (every LoRA op on, as the graph runner does; the eager forward first
    compiles the kernel, ``check_eager`` gets its output): the replay equals the eager forward bit for bit,
    also after the step's mapping (``new_slots``) and the input are written in place."""
    punica = layer.punica_wrapper
    eager = layer(static_x)  # compiles the kernel outside the capture
    if check_eager is not None:
        check_eager(eager)
    graph = torch.cuda.CUDAGraph()
    punica.run_all_lora_ops(True)
    try:
        with torch.cuda.graph(graph):
            out = layer(static_x)
    finally:
        punica.run_all_lora_ops(False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    punica.update_metadata(new_slots)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(static_x))


@pytest.mark.cuda
def test_fused_layer_replays_in_a_cuda_graph(fused_calls, device):
    """Forced on (off by default, VLLM_FUSED_LORA_LINEAR); captured once (every LoRA op on, as the graph runner does), a replay follows
    the mapping and the input written in place afterwards and equals the eager forward bit for bit."""
    layer, x, _, _ = _layer("qkv", 1, 0, torch.bfloat16, device)
    assert not layer.use_fused_decode  # off by default
    layer.use_fused_decode = True
    check_graph_replay(layer, x.clone(), [2, 1, -1, 0, 0, 1, 2, -1, 1])
    assert len(fused_calls) == 3
