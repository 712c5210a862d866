"""A two-slice MoE LoRA layer whose slots all hold fused gate_up adapters (one A for gate and up, as peft's
``target_parameters`` adapters are) reads one A for both w13 slices (``fused_moe.SHARE_W13_A``).

The context's two w13 A slices are then views of one buffer; an adapter with distinct gate and up A ends
that (and its removal brings it back), each change changing the Punica wrapper's LoRA layer-set version
(CUDA graphs bake the A pointers in).  Outputs against the fp32 reference, on the per-pair and the sorted
path, with the second slice's copy of A poisoned (NaN) while shared - a kernel still reading it would
return NaN - and bit for bit equal to the layer with the switch off.
"""
import pytest
import torch

from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.layers import fused_moe

F32 = torch.float32


def _harness(backend, device):
    return Harness(E=4, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=3, max_rank=16, seed=7)


def _shares(layer) -> bool:
    a = layer.base_layer.lora_context.w13_lora_a_stacked
    return len(a) == 2 and a[0].data_ptr() == a[1].data_ptr()


def _slots(M):
    return [(i % 4) - 1 for i in range(M)]  # no adapter, slots 0, 1, 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("M", [5, 40], ids=["per-pair", "sorted"])
def test_fused_adapters_read_one_a(backend, M, device):
    h = _harness(backend, device)
    layer, punica = h.layer, h.punica
    x, logits = h.inputs(M)
    slots = _slots(M)
    assert layer.w13_a_shared and _shares(layer)  # empty slots: zeros in both slices
    version = punica.lora_layer_set.version
    h.load(0, h.new_adapter(rank=8, fused=True))
    h.load(2, h.new_adapter(rank=8, fused=True))
    assert _shares(layer) and punica.lora_layer_set.version == version

    def run(name):
        got = h.forward(x, logits, slots).cpu()
        assert_close(got, h.reference(x, logits, slots), F32, name=name)
        return got

    layer._w13_a[1].fill_(float("nan"))  # the second copy of A: unread while shared
    shared = run("fused adapters, one A")
    assert torch.isfinite(shared).all()
    layer._w13_a[1].copy_(layer._w13_a[0])

    h.load(1, h.new_adapter(rank=8, fused=False))  # distinct gate and up A: each slice reads its own
    assert not layer.w13_a_shared and not _shares(layer)
    assert punica.lora_layer_set.version == version + 1
    run("a per-expert adapter beside them")

    h.reset(1)
    assert _shares(layer) and punica.lora_layer_set.version == version + 2
    assert torch.equal(run("the per-expert adapter unloaded"), shared)

    ad = h.new_adapter(rank=8, fused=False)  # two slices whose A happen to be equal count as one A
    ad.w13_a[1] = ad.w13_a[0].clone()
    h.load(1, ad)
    assert _shares(layer) and punica.lora_layer_set.version == version + 2
    run("equal gate and up A")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_switch_off_reads_both_copies_with_the_same_bits(backend, device, monkeypatch):
    M = 40
    outs = []
    for on in (True, False):
        monkeypatch.setattr(fused_moe, "SHARE_W13_A", on)
        h = _harness(backend, device)
        h.load(0, h.new_adapter(rank=8, fused=True))
        h.load(1, h.new_adapter(rank=8, fused=True))
        assert _shares(h.layer) == on and h.layer.w13_a_shared == on
        x, logits = h.inputs(M)
        outs.append(h.forward(x, logits, _slots(M)).cpu())
        assert_close(outs[-1], h.reference(x, logits, _slots(M)), F32)
    assert torch.equal(outs[0], outs[1])


def test_three_d_layer_has_one_slice():
    h = Harness(E=4, top_k=2, H=32, I=32, max_loras=2, max_rank=16, fused=True)
    h.load(0, h.new_adapter())
    assert not h.layer.w13_a_shared and len(h.layer.base_layer.lora_context.w13_lora_a_stacked) == 1
