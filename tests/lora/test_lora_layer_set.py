"""The LoRA layer set: the layers a LoRA CUDA graph launches (``PunicaWrapperBase.lora_layer_set``).

The Punica wrapper's rules, on stand-in layers (each named by its own ``enabled_slots`` set): version 0
means unknown (every layer is a member), the first ``add_lora_layers`` makes the set known (even empty),
it only grows, and its version changes exactly when it does; under ``run_all_lora_ops`` a layer launches
when it is in the set the graph holds, eagerly when a token of the step uses one of its slots.  Then the
LoRA manager on a real model: activating an adapter adds exactly the layers it targets; swaps, unloads
and adapters with the same targets leave the set and its version alone.  And the dense layers' fused
projection + LoRA, taken exactly where a graph launches the layer.
"""
import pytest
import torch

from tests.lora.test_dense_lora_fused import _layer, fused_calls  # noqa: F401  (fixture)
from tests.lora.test_model_manager import checkpoints, dense_adapter, manager  # noqa: F401  (fixture)
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.request import LoRARequest

Q0 = "model.layers.0.self_attn.q_proj"
QKV0 = "model.layers.0.self_attn.qkv_proj"
O1 = "model.layers.1.self_attn.o_proj"
GATE1 = "model.layers.1.mlp.gate"


def test_versions_membership_and_what_launches():
    punica = get_punica_wrapper(8, 2, "cpu", kind="cpu")
    a, b = {0}, set()  # two layers' enabled_slots: a holds weights in slot 0, b in none
    start = punica.lora_layer_set
    assert start.version == 0 and start.members is None
    assert a in start and b in start  # unknown: everything is a member
    punica.run_all_lora_ops(True)
    assert punica.any_active(a) and punica.any_active(b)  # a start-up graph launches every layer

    assert punica.add_lora_layers([])  # an adapter that targets none of the layers: known and empty
    empty = punica.lora_layer_set
    assert empty.version == 1 and empty.members == frozenset()
    assert not punica.any_active(a) and not punica.any_active(b)
    assert punica.any_active(None)  # a layer that does not track its slots always launches

    assert punica.add_lora_layers([a]) and punica.lora_layer_set.version == 2
    assert not punica.add_lora_layers([a]) and punica.lora_layer_set.version == 2  # nothing new
    held = punica.lora_layer_set
    assert punica.any_active(a) and not punica.any_active(b)
    assert punica.add_lora_layers(iter([a, b])) and punica.lora_layer_set.version == 3
    assert punica.any_active(b)
    punica.run_all_lora_ops(True, held)  # a graph captured at version 2 launches its own set
    assert punica.any_active(a) and not punica.any_active(b)
    assert start.members is None and empty.members == frozenset()  # snapshots never change
    assert a in start and a not in empty and b not in held

    punica.run_all_lora_ops(False)  # eagerly: the step's tokens decide
    punica.update_metadata([-1, -1])
    assert not punica.any_active(a) and not punica.step_includes_layer(a)
    punica.update_metadata([-1, 0])
    assert punica.any_active(a) and not punica.any_active(b)
    # the fused dense path follows the set, not the layer's own slots: b is in it, c is not
    c: set[int] = set()
    assert punica.step_includes_layer(a) and punica.step_includes_layer(b) and not punica.step_includes_layer(c)
    punica.run_all_lora_ops(True, held)
    assert punica.step_includes_layer(a) and not punica.step_includes_layer(b)
    punica.run_all_lora_ops(False, held)  # turning it off forgets the snapshot
    punica.run_all_lora_ops(True)
    assert punica.step_includes_layer(b)


def _set_names(mgr) -> set[str]:
    layer_set = mgr.punica_wrapper.lora_layer_set
    return {name for name, w in mgr.modules.items() if w.enabled_slots in layer_set}


def _add(mgr, folder, lid, modules, seed):
    dense_adapter(folder / f"a{lid}", {m: (mgr.module_table[m].in_features, mgr.module_table[m].out_features)
                                       for m in modules}, seed=seed)
    assert mgr.add_adapter(LoRARequest(f"a{lid}", lid, str(folder / f"a{lid}")))


def test_manager_adds_the_layers_activated_adapters_target(checkpoints, tmp_path):  # noqa: F811
    folder, _ = checkpoints("qwen3_moe")
    mgr, _, _ = manager(folder, max_loras=1, max_cpu_loras=4)
    punica = mgr.punica_wrapper
    assert GATE1 in mgr.modules  # the router is wrapped (a ReplicatedLinear)
    _add(mgr, tmp_path, 1, [Q0, O1], seed=1)
    _add(mgr, tmp_path, 2, [Q0, O1], seed=2)  # same targets, other weights
    _add(mgr, tmp_path, 3, [GATE1], seed=3)
    assert punica.lora_layer_set.version == 0  # loaded into the CPU cache only: nothing in a slot yet
    mgr.set_adapter_mapping([1, 0])
    assert punica.lora_layer_set.version == 1 and _set_names(mgr) == {QKV0, O1}
    mgr.set_adapter_mapping([2])  # a swap (one slot) to an adapter with the same targets
    assert punica.lora_layer_set.version == 1
    assert mgr.remove_adapter(2) and punica.lora_layer_set.version == 1 and _set_names(mgr) == {QKV0, O1}
    mgr.set_adapter_mapping([3, 0])  # a new layer: the set grows, the old members stay (monotone)
    assert punica.lora_layer_set.version == 2 and _set_names(mgr) == {QKV0, O1, GATE1}
    assert not mgr.modules[QKV0].enabled_slots  # no slot holds weights there now: its delta is exactly zero
    mgr.set_adapter_mapping([1])
    mgr.set_adapter_mapping([0, 0])
    assert punica.lora_layer_set.version == 2


def test_a_slot_written_halfway_still_records_its_layers(checkpoints, tmp_path):  # noqa: F811
    """Should filling a slot fail part-way, the layers that already took weights are in the set: a graph must
    never miss a layer that holds weights in some slot."""
    folder, _ = checkpoints("qwen3_moe")
    mgr, _, _ = manager(folder, max_loras=1)
    _add(mgr, tmp_path, 1, [Q0, GATE1], seed=1)
    gate = mgr.modules[GATE1]

    def broken(*a, **k):
        raise RuntimeError("copy failed")

    gate.set_lora = broken
    with pytest.raises(RuntimeError, match="copy failed"):
        mgr.activate_adapter(1)
    assert QKV0 in _set_names(mgr) and mgr.punica_wrapper.lora_layer_set.version == 1
    assert mgr.modules[QKV0].enabled_slots == {0}


def test_the_fused_dense_path_follows_the_layer_set(fused_calls, device):  # noqa: F811
    """The fused projection + LoRA (forced on) replaces F.linear exactly where a LoRA graph launches the layer's
    ops, so eager steps and replays take the same kernels: a layer outside the set (no adapter targets it, like
    the router) runs its base projection alone, eagerly and under ``run_all_lora_ops``; once in the set, both
    fuse, even where the step's tokens use none of its slots (a zero delta)."""
    layer, x, _, _ = _layer("qkv", 1, 0, torch.float32, device)  # the step's tokens use slots 0-2
    for slot in range(3):
        layer.reset_lora(slot)
    layer.use_fused_decode = True
    punica = layer.punica_wrapper
    other: set[int] = set()
    punica.add_lora_layers([other])  # the set is known: another layer only
    base = layer.base_layer(x)
    assert torch.equal(layer(x), base)
    punica.run_all_lora_ops(True)
    try:
        assert torch.equal(layer(x), base)
    finally:
        punica.run_all_lora_ops(False)
    assert fused_calls == []
    punica.add_lora_layers([layer.enabled_slots])
    eager = layer(x)
    punica.run_all_lora_ops(True)
    try:
        captured = layer(x)
    finally:
        punica.run_all_lora_ops(False)
    assert len(fused_calls) == 2 and torch.equal(eager, captured)
