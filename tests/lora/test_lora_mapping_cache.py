"""The per-step LoRA mapping is only rebuilt when it changes (host time of a LoRA step).

``PunicaWrapperBase.update_metadata`` keeps the step's mapping (and, for the Triton wrapper, the tokens
grouped by slot) in one device buffer written by one copy; it skips the copy when the slots are those of
the previous step.  ``LoRAModelManager.set_adapter_mapping`` skips everything but the pins and the LRU
order when the adapter ids, the slots and the wrapper's mapping are those of its previous call.  These
tests check both against references computed from scratch: random mapping sequences (lengths up and
down, repeats), and the manager's invalidations (a request changing adapter, finishing, the batch size
changing, an adapter moved to another slot, the wrapper's mapping set behind the manager's back), and the
engine's greedy tokens with adapters swapped between steps against a run with the caches off.
"""
import os
import random
from collections import Counter

import pytest
import torch

from tests.lora.test_model_manager import add_q_adapters, checkpoints, manager  # noqa: F401
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.request import LoRARequest

MAX_T, L = 40, 3


def _expected_sorted(slots: list[int]) -> list[int]:
    """Token indices grouped by slot (stable), tokens without an adapter last."""
    return sorted(range(len(slots)), key=lambda t: (slots[t] if slots[t] >= 0 else L, t))


def _check_wrapper(w, slots: list[int]) -> None:
    n = len(slots)
    full = w.token_mapping(MAX_T).tolist()
    assert full == slots + [-1] * (MAX_T - n), "the mapping (with -1 past the step's tokens)"
    assert w.token_lora_indices.tolist() == slots
    active = set(slots) - {-1}
    assert w.any_active(range(L)) == bool(active)
    for s in range(L):
        assert w.any_active([s]) == (s in active)
    meta = w.linear_metadata(n)
    if meta is not None:  # the Triton wrapper: tokens grouped by slot, made on the host
        counts = Counter(slots)
        assert meta.slot_counts.tolist() == [counts[s] for s in range(L)]
        grouped = sum(counts[s] for s in range(L))
        assert meta.sorted_token_ids[:grouped].tolist() == _expected_sorted(slots)[:grouped]


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_wrapper_mapping_matches_a_fresh_build(kind):
    """A random sequence of mappings (lengths up and down, repeats, as lists, arrays and tensors): after
    each, the device buffer says what a wrapper built for that mapping alone says."""
    import numpy as np

    rng = random.Random(0)
    w = get_punica_wrapper(MAX_T, L, "cpu", kind=kind)
    _check_wrapper(w, [])
    prev: list[int] = []
    for step in range(60):
        r = rng.random()
        if r < 0.25:
            slots = list(prev)  # a decode step of the same requests
        elif r < 0.4 and prev:
            slots = prev[:rng.randrange(len(prev))]  # requests finished
        else:
            slots = [rng.randrange(-1, L) for _ in range(rng.randrange(MAX_T + 1))]
        arg = [slots, np.array(slots, dtype=np.int64), torch.tensor(slots, dtype=torch.int32)][step % 3]
        version = w.mapping_version
        w.update_metadata(arg)
        assert (w.mapping_version == version) == (slots == prev), "only a changed mapping is written"
        _check_wrapper(w, slots)
        fresh = get_punica_wrapper(MAX_T, L, "cpu", kind=kind)
        fresh.update_metadata(slots)
        assert torch.equal(w._device_buf[:MAX_T], fresh._device_buf[:MAX_T])
        prev = slots


def test_wrapper_rejects_bad_mappings_and_keeps_the_last_good_one():
    w = get_punica_wrapper(8, 2, "cpu", kind="gpu")
    w.update_metadata([1, 0])
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        w.update_metadata([0] * 9)
    with pytest.raises(ValueError, match="slots in"):
        w.update_metadata([2, 0])
    with pytest.raises(ValueError, match="slots in"):
        w.update_metadata([-2])
    assert w.token_mapping(8).tolist() == [1, 0] + [-1] * 6


def _slots_on_device(mgr, n):
    return mgr.punica_wrapper.token_mapping(n).tolist()


def test_manager_reuses_the_mapping_only_while_nothing_changed(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    mgr, _, _ = manager(checkpoints("qwen2_moe")[0], max_loras=2, max_cpu_loras=4)
    add_q_adapters(mgr, tmp_path, [1, 2, 3])
    calls = []
    original = mgr.punica_wrapper.update_metadata
    monkeypatch.setattr(mgr.punica_wrapper, "update_metadata", lambda m: (calls.append(list(m)), original(m)))

    def check(ids, rebuilt):
        before = len(calls)
        slots = mgr.set_adapter_mapping(ids)
        assert (len(calls) > before) == rebuilt, (ids, calls[before:])
        want = [mgr.get_slot(i) if i else -1 for i in ids]
        assert None not in want, "every adapter of the batch is resident"
        assert slots == want and _slots_on_device(mgr, len(ids) + 2) == want + [-1, -1]
        return slots

    check([1, 2, 1], rebuilt=True)
    check([1, 2, 1], rebuilt=False)  # a decode step of the same requests
    check([1, 2, 2], rebuilt=True)  # a request changed adapter
    check([1, 2], rebuilt=True)  # a request finished (the batch size changed)
    check([1, 2], rebuilt=False)
    check([1, 2, 0, 0], rebuilt=True)  # base-model requests joined
    # adapter 1 leaves its slot for adapter 3, then comes back (into the same slot, written again)
    old = mgr.get_slot(1)
    mgr.deactivate_adapter(1)
    mgr.activate_adapter(3)
    assert mgr.get_slot(3) == old
    check([1, 2, 0, 0], rebuilt=True)
    # both adapters leave; 2 comes back first: the same ids now map to the other slots
    before = [mgr.get_slot(1), mgr.get_slot(2)]
    mgr.deactivate_adapter(1)
    mgr.deactivate_adapter(2)
    mgr.activate_adapter(2)
    slots = check([1, 2, 0, 0], rebuilt=True)
    assert slots[:2] == before[::-1]
    # the wrapper's mapping set behind the manager's back (e.g. a graph capture's dummy step)
    mgr.punica_wrapper.update_metadata([-1, -1, -1, -1])
    check([1, 2, 0, 0], rebuilt=True)
    # the adapter removed and loaded again (same id, same slot or not): the mapping is rebuilt
    mgr.remove_adapter(2)
    add_q_adapters(mgr, tmp_path / "again", [2])
    check([1, 2, 0, 0], rebuilt=True)


def test_manager_fast_path_renews_the_pins(checkpoints, tmp_path):  # noqa: F811
    """A step reusing the mapping still pins the batch's adapters: loading another one into a full set of
    slots must not evict them."""
    mgr, _, _ = manager(checkpoints("qwen2_moe")[0], max_loras=2, max_cpu_loras=4)
    add_q_adapters(mgr, tmp_path, [1, 2, 3])
    mgr.set_adapter_mapping([1, 2])
    mgr.pin_adapters(set())  # e.g. the engine's pins between two steps
    mgr.set_adapter_mapping([1, 2])
    with pytest.raises(RuntimeError, match="all 2 LoRA slots"):
        mgr.activate_adapter(3)
    mgr.set_adapter_mapping([1, 0])  # adapter 2 is not in the batch any more: its slot may go
    mgr.activate_adapter(3)
    assert mgr.get_slot(1) is not None and mgr.get_slot(2) is None


# ---- the engine: greedy tokens with adapters swapped between steps, caches on vs off -------------------

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
MODEL = os.path.join(ROOT, "demo_model")
ADAPTERS = [os.path.join(ROOT, "demo_adapters", "upper"), os.path.join(ROOT, "demo_adapters", "rot13")]


def _run_schedule(no_cache: bool, monkeypatch) -> tuple[dict[str, list[int]], int]:
    """Requests on 3 adapter ids (2 folders) and the base model, added at different steps, with 2 slots:
    the batch's adapters change, requests finish, and adapters move between slots from step to step (by
    the scheduler's batches, and by hand every other step while the batch stays the same)."""
    if no_cache:
        real = LoRAModelManager.set_adapter_mapping

        def uncached(self, ids):
            self._last_step = None
            self.punica_wrapper._host_mapping = None
            return real(self, ids)

        monkeypatch.setattr(LoRAModelManager, "set_adapter_mapping", uncached)
    engine = LLMEngine(EngineArgs(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
                                  max_cpu_loras=4, seed=0))
    loras = [LoRARequest(f"a{i}", 10 + i, ADAPTERS[i % 2]) for i in range(3)]
    rng = random.Random(1)
    plan = {}
    for k in range(10):
        step = rng.randrange(12)
        lora = rng.choice([None, *loras])
        plan.setdefault(step, []).append((f"r{k}", lora, rng.randrange(3, 14)))
    done, step = {}, 0
    while step < 12 or engine.has_unfinished_requests():
        for rid, lora, n in plan.get(step, []):
            engine.add_request(rid, f"hello world {rid}=", SamplingParams(temperature=0, max_tokens=n,
                                                                         ignore_eos=True), lora_request=lora)
        if step % 2 == 1:  # move the resident adapters to each other's slots between two steps
            mgr = engine.lora_manager
            resident = sorted(mgr.active_adapters, key=mgr.get_slot)
            for lid in resident:
                mgr.deactivate_adapter(lid)
            for lid in reversed(resident):
                mgr.activate_adapter(lid)
        done.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
        step += 1
        assert step < 300
    swaps = engine.lora_manager._slots_version
    engine.shutdown()
    return done, swaps


def test_engine_tokens_identical_with_and_without_the_caches(monkeypatch):
    cached, swaps = _run_schedule(False, monkeypatch)
    with monkeypatch.context() as m:
        uncached, _ = _run_schedule(True, m)
    assert swaps > 4, "adapters moved between slots during the run"
    assert len(cached) == 10 and cached == uncached


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_wrapper_on_cuda_host_and_device_mappings(kind):
    """On a GPU: pinned staging buffers used in turn, and device-tensor mappings in between (made with
    device ops), against a wrapper built for each mapping alone."""
    rng = random.Random(2)
    w = get_punica_wrapper(MAX_T, L, "cuda", kind=kind)
    for step in range(40):
        slots = [rng.randrange(-1, L) for _ in range(rng.randrange(MAX_T + 1))]
        w.update_metadata(torch.tensor(slots, dtype=torch.int32, device="cuda") if step % 4 == 3 else slots)
        fresh = get_punica_wrapper(MAX_T, L, "cuda", kind=kind)
        fresh.update_metadata(slots)
        torch.cuda.synchronize()
        assert w.token_mapping(MAX_T).tolist() == slots + [-1] * (MAX_T - len(slots))
        assert torch.equal(w._device_buf[:MAX_T], fresh._device_buf[:MAX_T])
        if kind == "gpu":
            counts = Counter(slots)
            meta = w.linear_metadata(len(slots))
            assert meta.slot_counts.tolist() == [counts[s] for s in range(L)]
            grouped = sum(counts[s] for s in range(L))
            assert meta.sorted_token_ids[:grouped].tolist() == _expected_sorted(slots)[:grouped]
