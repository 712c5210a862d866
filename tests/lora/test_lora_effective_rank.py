"""LoRA kernels run at the rank of the adapters in a layer's slots, not at max_lora_rank
(``vllm.lora.layers.effective_rank``).

Dense (QKV) and fused-MoE LoRA layers with max_lora_rank 32 and adapters of ranks 4 / 8 / 16 in different
slots: the effective rank per op (MoE w13 and w2 apart: two gate/up slices of rank r become one w13 slice
of rank 2r, as peft's fused experts do), the kernels' views cut to the kernel rank (views of the buffers,
no copies), outputs equal to an fp64 / fp32 reference and to the padded computation at max_lora_rank, the
buffers' padding poisoned with NaN (a kernel that read past the kernel rank would return NaN), unloading
the largest adapter lowering the rank, a smaller adapter replacing a larger one leaving zeros, and the
Punica wrapper's LoRA layer-set version (what CUDA graphs key on) changing exactly when a kernel rank does.
"""
import dataclasses

import pytest
import torch

from tests.lora.lora_moe_harness import Harness
from tests.lora.test_dense_lora_layers import _make, full_reference, random_adapter, wrap
from tests.utils import assert_close
from vllm.lora.layers.effective_rank import kernel_rank

R = 32
SLOTS = [0, -1, 2, 2, 1, 0, -1, 1, 2]


def test_kernel_rank_is_a_power_of_two_from_8_capped_at_the_buffers_rank():
    assert [kernel_rank(r, 32) for r in (0, 1, 4, 8, 9, 16, 17, 32)] == [8, 8, 8, 8, 16, 16, 32, 32]
    assert kernel_rank(0, 4) == 4 and kernel_rank(20, 24) == 24


# ---- dense -----------------------------------------------------------------------------------------
def _poison_dense(layer, r: int) -> None:
    layer._lora_a[:, :, r:] = float("nan")
    layer._lora_b[..., r:] = float("nan")


def _unpoison_dense(layer, r: int) -> None:
    layer._lora_a[:, :, r:] = 0
    layer._lora_b[..., r:] = 0


@pytest.mark.parametrize("punica_kind", ["cpu", "gpu"])
def test_dense_layer_runs_at_its_adapters_rank(punica_kind, device):
    device = device if punica_kind == "gpu" else torch.device("cpu")
    gen = torch.Generator().manual_seed(3)
    base, W, bias, out_sizes = _make("qkv", gen, 1, 0)
    layer, punica = wrap(base, max_loras=3, rank=R, kind=punica_kind, device=device)
    K = W.shape[1]
    x = torch.randn(len(SLOTS), K, generator=gen)
    punica.update_metadata(SLOTS)
    adapters = {}

    def load(slot, r, **kw):
        adapters[slot] = random_adapter(gen, K, out_sizes, r, **kw)
        layer.set_lora(slot, *adapters[slot])

    def check(rank, name):
        """Effective and kernel rank; the views; the output vs the fp64 reference with the padding poisoned."""
        k = kernel_rank(rank, R)
        assert (layer.effective_rank, layer.kernel_rank) == (rank, k), name
        a0, b0 = layer.lora_a_stacked[0], layer.lora_b_stacked[0]
        assert a0.shape[1] == k and b0.shape[2] == k and a0.data_ptr() == layer._lora_a.data_ptr(), name
        want = full_reference(x, W, bias, adapters, SLOTS, out_sizes).float()
        if k < R:
            _poison_dense(layer, k)
        got = layer(x.to(device)).cpu()
        _unpoison_dense(layer, k)
        assert_close(got, want, torch.float32, name=name)
        return got

    version = punica.lora_layer_set.version
    assert layer.kernel_rank == 8 and layer.effective_rank == 0
    load(0, 4)
    load(2, 8, skip=(1,))  # a slice the adapter does not target
    got = check(8, "ranks 4 and 8")
    assert punica.lora_layer_set.version == version  # kernel rank 8 from the start: nothing to re-capture
    # the padded computation: the same op at max_lora_rank over the zero-padded buffers
    padded = base(x.to(device))
    punica.add_lora_linear(padded, x.to(device), tuple(layer._lora_a.unbind(0)),
                           tuple(layer._lora_b[s, :, :n] for s, n in enumerate(layer.output_slices)),
                           adapter_enabled=layer.adapter_enabled)
    assert_close(got, padded.cpu(), torch.float32, name="vs padded")

    load(1, 16)
    check(16, "ranks 4, 16, 8")
    assert punica.lora_layer_set.version == version + 1
    load(1, 8)  # a smaller adapter replaces the largest: its old columns are zero, the rank drops
    assert not layer._lora_a[:, 1, 8:].any() and not layer._lora_b[:, 1, :, 8:].any()
    check(8, "slot 1 replaced by rank 8")
    assert punica.lora_layer_set.version == version + 2
    load(1, 16)
    assert punica.lora_layer_set.version == version + 3
    layer.reset_lora(1)  # unloading the largest adapter lowers the rank
    del adapters[1]
    check(8, "slot 1 unloaded")
    assert punica.lora_layer_set.version == version + 4
    load(1, 8)  # same kernel rank: the version stays
    assert punica.lora_layer_set.version == version + 4
    for s in (0, 1, 2):
        layer.reset_lora(s)
    assert (layer.effective_rank, layer.kernel_rank) == (0, 8)


# ---- fused MoE -------------------------------------------------------------------------------------
def _poison_moe(layer, r13: int, r2: int, value: float) -> None:
    layer._w13_a[..., r13:, :] = value
    layer._w13_b[..., r13:] = value
    layer._w2_a[..., r2:, :] = value
    layer._w2_b[..., r2:] = value


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_layer_runs_w13_and_w2_at_their_ranks(backend, device):
    # fused w13 (FusedMoE3DWithLoRA): gate/up adapters of rank r become one w13 slice of rank 2r
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=3, max_rank=R, fused=True,
                seed=4)
    layer, punica = h.layer, h.punica
    M = 9
    x, logits = h.inputs(M)
    slots = SLOTS[:M]

    def check(ranks, name):
        k13, k2 = (kernel_rank(r, R) for r in ranks)
        assert layer.effective_ranks == ranks and layer.kernel_ranks == (k13, k2), name
        ctx = layer.base_layer.lora_context
        assert ctx.w13_lora_a_stacked[0].shape[2] == k13 and ctx.w13_lora_b_stacked[0].shape[3] == k13, name
        assert ctx.w2_lora_a_stacked[0].shape[2] == k2 and ctx.w2_lora_b_stacked[0].shape[3] == k2, name
        assert ctx.w2_lora_b_stacked[0].data_ptr() == layer._w2_b.data_ptr(), name
        _poison_moe(layer, k13, k2, float("nan"))
        got = h.forward(x, logits, slots).cpu()
        _poison_moe(layer, k13, k2, 0.0)
        assert_close(got, h.reference(x, logits, slots), torch.float32, name=name)
        return got

    version = punica.lora_layer_set.version
    assert layer.effective_ranks == (0, 0) and layer.kernel_ranks == (8, 8)
    h.load(0, h.new_adapter(rank=4, fused=False))  # w13 8, w2 4
    h.load(2, h.new_adapter(rank=2, fused=False))
    got = check((8, 4), "ranks 4 and 2")
    assert punica.lora_layer_set.version == version
    # the padded computation: the same layer with its context at max_lora_rank
    ctx = layer.base_layer.lora_context
    full = dict(w13_lora_a_stacked=tuple(layer._w13_a.unbind(0)), w13_lora_b_stacked=tuple(layer._w13_b.unbind(0)),
                w2_lora_a_stacked=tuple(layer._w2_a.unbind(0)), w2_lora_b_stacked=tuple(layer._w2_b.unbind(0)))
    layer.base_layer.set_lora_context(dataclasses.replace(ctx, **full))
    padded = h.forward(x, logits, slots).cpu()
    layer.base_layer.set_lora_context(ctx)
    assert_close(got, padded, torch.float32, name="vs padded")

    h.load(1, h.new_adapter(rank=8, fused=False))  # w13 16, w2 8: both ops change
    check((16, 8), "ranks 4, 8, 2")
    assert punica.lora_layer_set.version == version + 1
    h.load(1, h.new_adapter(rank=12, fused=True))  # fused: w13 12 -> 16 (same), w2 12 -> 16
    check((12, 12), "slot 1 fused rank 12")
    assert punica.lora_layer_set.version == version + 2
    h.load(1, h.new_adapter(rank=2, fused=False))  # smaller replaces larger: zeros past rank 4 / 2
    assert not layer._w13_a[:, 1, :, 4:].any() and not layer._w13_b[:, 1, ..., 4:].any()
    assert not layer._w2_a[:, 1, :, 2:].any() and not layer._w2_b[:, 1, ..., 2:].any()
    check((8, 4), "slot 1 replaced by rank 2")
    assert punica.lora_layer_set.version == version + 3
    h.load(1, h.new_adapter(rank=16, fused=False))  # w13 32
    check((32, 16), "slot 1 rank 16")
    h.reset(1)  # unloading the largest adapter lowers both ranks
    check((8, 4), "slot 1 unloaded")
    assert punica.lora_layer_set.version == version + 5
