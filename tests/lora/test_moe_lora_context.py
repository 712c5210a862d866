"""The MoELoRAContext is built once, is an argument, and nothing is patched."""
import inspect

import pytest
import torch

from tests.layers.moe_setup import make_layer, pick_slots, random_weights
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
from vllm.model_executor.layers.fused_moe.router import fused_topk


def _objects(lora_layer):
    base = lora_layer.base_layer
    kernel = base.quant_method.kernel
    return [base, base.runner, base.quant_method, base.quant_method.old_method, kernel, kernel.fused_experts,
            kernel.prepare_finalize]


def _class_snapshot(objs):
    return {cls: dict(vars(cls)) for o in objs for cls in type(o).__mro__}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nothing_is_patched(backend, device):
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=2)
    objs = _objects(h.layer)
    before = _class_snapshot(objs)
    h.load(0, h.new_adapter())
    x, logits = h.inputs(5)
    h.forward(x, logits, [0, 1, -1, 0, 0])
    for o in objs:
        # no instance attribute shadows a method
        for name, val in vars(o).items():
            assert not (callable(val) and hasattr(type(o), name)), f"{type(o).__name__}.{name} is shadowed"
        for name in dir(type(o)):
            member = inspect.getattr_static(o, name)
            fn = getattr(member, "__func__", member)
            if inspect.isfunction(fn):
                owner = next(c for c in type(o).__mro__ if name in vars(c))
                if not owner.__module__.startswith("vllm"):
                    continue  # torch's own aliases (Module.__call__)
                assert fn.__qualname__ == f"{owner.__name__}.{name}", f"{type(o).__name__}.{name} is {fn.__qualname__}"
    assert _class_snapshot(objs) == before, "a class was modified"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_context_built_once_and_stays_valid(backend, device):
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=3, max_rank=16, seed=2)
    ctx = h.layer.base_layer.lora_context
    assert ctx is not None and ctx.punica_wrapper is h.punica
    h.load(0, h.new_adapter())
    h.load(1, h.new_adapter(rank=8))
    ctx, ranks = h.layer.base_layer.lora_context, h.layer.kernel_ranks
    steps = [
        ("mixed", None),
        ("one", ("load", 2)),
        ("mixed", ("reset", 0)),
        ("mixed", ("load", 0)),
        ("none", None),
        ("mixed", ("reset", 1)),
    ]
    for i, (mode, action) in enumerate(steps):
        if action and action[0] == "load":
            h.load(action[1], h.new_adapter(rank=4 + 4 * i % 12))
        elif action:
            h.reset(action[1])
        M = 3 + 5 * i
        x, logits = h.inputs(M)
        slots = pick_slots(M, 3, mode, seed=i)
        out = h.forward(x, logits, slots)
        now = h.layer.base_layer.lora_context
        if h.layer.kernel_ranks == ranks:  # built again only when an op's kernel rank changed
            assert now is ctx, "the context was rebuilt"
        else:
            assert now is not ctx and now.punica_wrapper is h.punica
            assert (now.w13_lora_a_stacked[0].shape[2], now.w2_lora_a_stacked[0].shape[2]) == h.layer.kernel_ranks
        ctx, ranks = now, h.layer.kernel_ranks
        assert_close(out.cpu(), h.reference(x, logits, slots), torch.float32, name=f"step {i}")


def test_wrapping_a_backend_without_lora_is_a_clear_error(device):
    w = random_weights(4, 32, 32, "silu", False, torch.Generator().manual_seed(0))
    layer = make_layer(w, 2, "silu", torch.float32, device, backend="naive_dense")
    with pytest.raises(ValueError, match="does not support LoRA.*lora_enabled=True"):
        FusedMoEWithLoRA(layer)


def test_base_layer_forward_without_context_is_plain_moe(device):
    h = Harness(E=8, top_k=2, H=32, I=32, backend="torch", device=device, max_loras=1)
    h.load(0, h.new_adapter())
    x, logits = h.inputs(4)
    with_lora = h.forward(x, logits, [0] * 4)
    h.layer.base_layer.set_lora_context(None)
    plain = h.layer(x, logits)
    assert_close(plain.cpu(), h.reference(x, logits, [-1] * 4), torch.float32)
    assert not torch.allclose(plain, with_lora)


def test_mapping_errors_are_clear(device):
    h = Harness(E=8, top_k=2, H=32, I=32, backend="torch", device=device, max_loras=2)
    with pytest.raises(ValueError, match="slots in"):
        h.punica.update_metadata([0, 5])
    with pytest.raises(ValueError, match="max_lora_rank"):
        h.load(0, h.new_adapter(rank=32))
    ad = h.new_adapter()
    ad.w2_a = ad.w2_a[:, :, :7]
    with pytest.raises(ValueError, match="w2_lora_a has shape"):
        h.load(0, ad)
    bad = h.new_adapter()
    bad.w2_b[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        h.load(1, bad)
    _ = pick_slots


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatched_rows_take_their_slots_from_the_context(backend, device):
    """After an expert-parallel dispatch the rows' slots travel in ``ctx.token_lora_mapping``
    (``after_dispatch``); the Punica wrapper reads them there, not the step's mapping."""
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=2, seed=3)
    h.load(0, h.new_adapter())
    h.load(1, h.new_adapter(rank=8))
    x, logits = h.inputs(6)
    slots = [0, 1, -1, 1, 0, 1]
    h.punica.update_metadata([-1] * 6)  # the step's own tokens use no adapter
    base = h.layer.base_layer
    tw, ti = fused_topk(logits, h.top_k, renormalize=base.renormalize)
    mapping = torch.tensor(slots, dtype=torch.int32, device=x.device)
    out = base.quant_method.apply(base, x, tw, ti, lora_context=base.lora_context.after_dispatch(mapping))
    assert_close(out.cpu(), h.reference(x, logits, slots), torch.float32)
    assert base.lora_context.token_lora_mapping is None  # the layer's own context is unchanged
