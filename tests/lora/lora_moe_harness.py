"""Shared setup of LoRA-wrapped MoE layers for the LoRA tests."""
from __future__ import annotations

import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import lora_config, make_layer, random_adapter, random_weights, router_inputs
from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.model_executor.layers.fused_moe.experts import lora_overlap
from vllm.model_executor.layers.fused_moe.router import fused_topk
from tests.utils import assert_close

_DELTA_BUFFER = lora_overlap.delta_buffer


def poisoned_delta_buffer(rows, cols, device):
    """A delta buffer full of NaN: an element the seam fails to overwrite poisons the layer's output."""
    return _DELTA_BUFFER(rows, cols, device).fill_(float("nan"))

# backend -> Punica wrapper kind
PUNICA_KIND = {"torch": "cpu", "triton": "gpu"}


class Harness:
    """A LoRA-wrapped FusedMoE, its full fp32 weights, and the adapters in each slot."""

    def __init__(self, *, E, top_k, H, I, activation="silu", bias=False, dtype=torch.float32, device="cpu",
                 backend="torch", max_loras=2, max_rank=16, fused=False, seed=0, layer_kwargs=None,
                 lora_kwargs=None, punica_kwargs=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.E, self.H, self.I, self.top_k, self.activation = E, H, I, top_k, activation
        self.dtype, self.device, self.max_rank, self.fused = dtype, torch.device(device), max_rank, fused
        self.weights = random_weights(E, H, I, activation, bias, self.gen)
        base = make_layer(self.weights, top_k, activation, dtype, device, backend=backend, lora_enabled=True,
                          **(layer_kwargs or {}))
        cls = FusedMoE3DWithLoRA if (fused or activation == "swigluoai") else FusedMoEWithLoRA
        self.layer = cls(base)
        self.layer.create_lora_weights(max_loras, lora_config(max_loras, max_rank, **(lora_kwargs or {})))
        self.punica = get_punica_wrapper(4096, max_loras, device, kind=PUNICA_KIND[backend], **(punica_kwargs or {}))
        self.layer.set_mapping(self.punica)
        self.slots: dict[int, object] = {}

    def new_adapter(self, rank=None, fused=None):
        return random_adapter(self.E, self.H, self.I, rank or self.max_rank, self.activation, self.gen,
                              fused=self.fused if fused is None else fused)

    def load(self, slot, adapter):
        self.layer.set_lora(slot, w13_lora_a=adapter.w13_a, w13_lora_b=adapter.w13_b, w2_lora_a=adapter.w2_a,
                            w2_lora_b=adapter.w2_b)
        self.slots[slot] = adapter

    def reset(self, slot):
        self.layer.reset_lora(slot)
        self.slots.pop(slot, None)

    def inputs(self, M, empty=True):
        """Hidden states and router logits: every expert gets tokens (as far as M allows), but
        with ``empty`` one expert, drawn at random, gets none."""
        return router_inputs(M, self.E, self.H, self.dtype, self.device, self.gen, top_k=self.top_k, empty=empty)

    def forward(self, x, logits, token_slots):
        self.punica.update_metadata(token_slots)
        return self.layer(x, logits)

    def reference(self, x, logits, token_slots, **route):
        base = self.layer.base_layer
        tw, ti = fused_topk(logits.float().cpu(), self.top_k, renormalize=base.renormalize,
                            topk_then_softmax=base.topk_then_softmax)
        names = [s if s in self.slots else None for s in token_slots]
        w = self.weights
        return moe_reference(x.float().cpu(), w.w13, w.w2, tw, ti, self.activation, b13=w.b13, b2=w.b2,
                             apply_router_weight_on_input=base.apply_router_weight_on_input,
                             adapters=self.slots, token_adapter=names).float()


def delta_paths(forward, monkeypatch, experts_cls=None):
    """``forward()`` three ways (``experts/lora_overlap.py``): the LoRA delta buffers beside the GEMMs, the buffers
    in order, the in-place seams; the buffers forced on for CPU too, and for ``experts_cls`` when given (its
    ``lora_deltas_beside``); the buffers are poisoned with NaN, as the seams must overwrite all of them.
    Returns (beside, in order, in place, how many seams went through the buffers)."""
    calls = []
    # a seam through the buffers allocates one (``beside`` also makes the sorted path's alignment: ALIGN_BESIDE)
    monkeypatch.setattr(lora_overlap, "delta_buffer", lambda *a: calls.append(1) or poisoned_delta_buffer(*a))
    if experts_cls is not None:
        monkeypatch.setattr(experts_cls, "lora_deltas_beside", True)
    monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
    out = []
    for side in (True, False):
        monkeypatch.setattr(lora_overlap, "LORA_SIDE_STREAM", side)
        out.append(forward())
    monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ())
    out.append(forward())
    return (*out, len(calls))


def assert_delta_paths_agree(beside, in_order, in_place, dtype):
    """The side stream changes no bits; against the in-place seams the same bits on CPU (the interpreter and torch
    round alike), within tolerance on a GPU (kernels compiled for an fp32 output may sum in another order)."""
    assert torch.equal(beside, in_order), (beside.float() - in_order.float()).abs().max()
    if beside.is_cuda:
        assert_close(beside.float(), in_place.float(), dtype)
    else:
        assert torch.equal(beside, in_place), (beside.float() - in_place.float()).abs().max()
