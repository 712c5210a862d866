"""The memo of a batch's adapters (``vllm.core.batch_adapters``) and what the LoRA engine builds on it.

Per step the LoRA engine needs the adapter of each sequence of the batch and the batch's distinct
adapters; ``AdapterMemo`` hands out the previous answer while the batch is the same list of sequences.
These tests compare it with a computation from scratch after every change of a batch (join, finish,
preemption, reorder, in-place edits of the scheduler's running list), check that the scheduler's
``max_loras`` and the registry's check of cached weights stay right when the batch does not change but
the adapters do, and that an engine's greedy tokens are those of an engine without the memo while
requests join, finish and are preempted and adapters are swapped, unloaded and loaded between steps.
"""
import os
import random
from dataclasses import dataclass

import pytest

from tests.engine.test_scheduler import make_scheduler, make_seq
from tests.utils import run_to_completion
from vllm import SamplingParams
from vllm.core.batch_adapters import AdapterMemo, BatchAdapters
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine
from vllm.lora.request import LoRARequest
from vllm.sequence import Sequence

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
MODEL = os.path.join(ROOT, "demo_model")
UPPER, ROT13 = os.path.join(ROOT, "demo_adapters", "upper"), os.path.join(ROOT, "demo_adapters", "rot13")


def _fresh(seqs) -> tuple[list[int], set[int]]:
    """The reference: each sequence's adapter read from its request, and the distinct ones."""
    ids = [s.lora_request.lora_int_id if s.lora_request is not None else 0 for s in seqs]
    return ids, {i for i in ids if i > 0}


def _check(memo: AdapterMemo, seqs) -> bool:
    """memo.get(seqs) against the reference; True when it was a hit."""
    hits = memo.hits
    got = memo.get(seqs)
    ids, distinct = _fresh(seqs)
    assert got.ids == ids and set(got.distinct) == distinct
    return memo.hits > hits


def test_memo_matches_a_fresh_computation_after_every_batch_change():
    """A random script of batch edits, the list edited in place (as ``Scheduler.running``) or replaced
    (as each step's ``SchedulerOutput``): the memo answers as a computation from scratch, and answers
    from memory exactly when the batch is the previous call's sequences in the same order."""
    rng = random.Random(0)
    pool = [make_seq(i, 3, lora=rng.choice([None, 1, 2, 3, 4])) for i in range(40)]
    memo = AdapterMemo()
    batch: list[Sequence] = []
    _check(memo, batch)
    kinds = set()
    for _ in range(400):
        prev = list(batch)
        r = rng.random()
        if r < 0.3:
            kind = "same"
        elif r < 0.45:
            kind = "join"
            batch.insert(rng.randrange(len(batch) + 1), rng.choice(pool))
        elif r < 0.6 and batch:
            kind = "finish"  # (a finish, an abort or a preemption: the sequence leaves the batch)
            del batch[rng.randrange(len(batch))]
        elif r < 0.75 and len(batch) > 1:
            kind = "reorder"
            rng.shuffle(batch)
        elif r < 0.9 and batch:
            kind = "replace"  # one leaves and another joins: the same length
            batch[rng.randrange(len(batch))] = rng.choice(pool)
        else:
            kind = "new list"
            batch = list(batch)
        if rng.random() < 0.5:
            batch = list(batch)  # a new list object with the same content, or the edited one
        hit = _check(memo, batch)
        assert hit == (batch == prev), (kind, hit)
        kinds.add(kind)
    assert kinds == {"same", "join", "finish", "reorder", "replace", "new list"}
    assert memo.hits > 100 and memo.misses > 100


def test_memo_tells_apart_sequences_that_look_alike():
    """The key is each sequence's identity: a sequence with the same ids and tokens but another adapter is
    another batch (``Sequence`` must keep ``object``'s equality for this)."""
    assert Sequence.__eq__ is object.__eq__
    a, b = make_seq(0, 4, lora=1), make_seq(0, 4, lora=2)
    memo = AdapterMemo()
    assert memo.get([a]).ids == [1]
    assert memo.get([b]).ids == [2] and memo.get([b]).distinct == {2}
    assert memo.get([a, b]).distinct == {1, 2} and memo.hits == 1


def test_without_a_memo_the_output_computes_each_time():
    out_seqs = [make_seq(0, 3, lora=5), make_seq(1, 3)]
    assert BatchAdapters.of(out_seqs) == BatchAdapters([5, 0], frozenset({5}))
    sched, _ = make_scheduler()
    sched.add_seqs(out_seqs)
    out = sched.schedule()
    assert out.adapter_memo is sched.adapter_memo and out.lora_int_ids == [5, 0]


def test_base_model_batches_never_touch_the_memo():
    """Without adapters nothing asks for a batch's adapters (no LoRA cost for an engine without LoRA)."""
    from tests.engine.test_scheduler import run_to_completion as drive

    sched, bm = make_scheduler(max_num_seqs=4)
    sched.add_seqs([make_seq(i, 3 + i, max_tokens=4 + i) for i in range(6)])
    drive(sched, bm)
    assert sched.adapter_memo.hits == sched.adapter_memo.misses == 0


def test_max_loras_with_the_running_list_edited_in_place():
    """``max_loras`` counts the running adapters from the memo: the running list changes in place (prefills
    join it, finished and preempted sequences leave it) while adapter sequences keep waiting, and at no
    step do the running sequences use more than ``max_loras`` adapters (counted here from scratch)."""
    rng = random.Random(3)
    sched, bm = make_scheduler(num_blocks=40, block_size=2, max_model_len=24, max_num_seqs=6, max_loras=2)
    seqs = [make_seq(i, 2 + i % 5, max_tokens=2 + rng.randrange(9), lora=rng.choice([None, 1, 2, 3]))
            for i in range(30)]
    pending = list(seqs)
    most = 0
    for step in range(400):
        for _ in range(rng.randrange(3)):
            if pending:
                sched.add_seq(pending.pop(0))
        if not sched.has_unfinished() and not pending:
            break
        out = sched.schedule()
        running = _fresh(sched.running)[1]
        assert len(running) <= 2, (step, running)
        most = max(most, len(running))
        assert out.lora_int_ids == _fresh(out.scheduled_seqs)[0]
        sched.postprocess(out.scheduled_seqs, [7] * len(out.scheduled_seqs))
    assert not pending and not sched.has_unfinished() and most == 2
    assert all(s.is_finished for s in seqs) and sched.adapter_memo.hits > 0
    bm.check_no_leaks()


# ---- the engine (demo model and adapters, CPU) ----------------------------------------------------------

@dataclass
class _Plan:
    add: dict  # step -> [(request id, LoRARequest or None, max_tokens)]
    unload: dict  # step -> lora_int_id to unload (its requests finish on it)


def _plan() -> _Plan:
    """14 requests on 3 adapter ids (two folders) and the base model, added over 16 steps, lengths 3-20."""
    rng = random.Random(7)
    loras = [LoRARequest(f"a{i}", 20 + i, (UPPER, ROT13)[i % 2]) for i in range(3)]
    add: dict = {}
    for k in range(14):
        add.setdefault(rng.randrange(16), []).append((f"r{k}", rng.choice([None, *loras]), rng.randrange(3, 21)))
    return _Plan(add, {9: 21})


def _run(plan: _Plan, memo: bool, async_scheduling: bool, monkeypatch) -> tuple[dict, dict, list]:
    """Drive an engine through ``plan``: max_loras 2 of 3 adapters (swaps), 18 KV blocks of 4 tokens
    (preemptions), an adapter unloaded mid-run.  (tokens, errors) per request and the requests refused;
    without ``memo`` every
    batch's adapters are computed from scratch."""
    if not memo:
        monkeypatch.setattr(AdapterMemo, "get", lambda self, seqs: BatchAdapters.of(seqs))
    engine = LLMEngine(EngineArgs(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
                                  max_num_seqs=8, block_size=4, num_gpu_blocks_override=18, seed=0,
                                  enable_prefix_caching=False, async_scheduling=async_scheduling))
    preempted = []
    real_preempt = engine.scheduler._preempt
    monkeypatch.setattr(engine.scheduler, "_preempt", lambda seq: (preempted.append(seq), real_preempt(seq)))
    done, refused, step = {}, [], 0
    while step < 16 or engine.has_unfinished_requests():
        for rid, lora, n in plan.add.get(step, []):
            try:
                engine.add_request(rid, f"hello world {rid}=", SamplingParams(temperature=0, max_tokens=n,
                                                                             ignore_eos=True), lora_request=lora)
            except ValueError as e:  # its adapter was unloaded and still drains: refused, clearly
                assert "Load it again under a new lora_int_id" in str(e)
                refused.append(rid)
        if step in plan.unload:
            assert engine.remove_lora(plan.unload[step])
        done.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
        assert step < 400
    assert preempted, "the run preempted sequences"
    assert engine.lora_manager._slots_version > 3, "adapters moved between slots"
    if memo:
        assert engine.scheduler.adapter_memo.hits > 10
    if async_scheduling:
        assert engine.async_scheduling.chained_steps > 0
    engine.scheduler.block_manager.check_no_leaks()
    engine.shutdown()
    return ({rid: list(o.outputs[0].token_ids) for rid, o in done.items()},
            {rid: o.error for rid, o in done.items() if o.error}, refused)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_tokens_identical_with_and_without_the_memo(async_scheduling, monkeypatch):
    plan = _plan()
    with_memo = _run(plan, True, async_scheduling, monkeypatch)
    with monkeypatch.context() as m:
        without = _run(plan, False, async_scheduling, m)
    tokens, errors, refused = with_memo
    assert len(tokens) + len(refused) == 14 and len(tokens) >= 10 and not errors
    assert with_memo == without


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_weights_lost_between_two_steps_of_the_same_batch_fail_their_requests(async_scheduling):
    """The batch stays the same sequences (memo hits) while one adapter's weights leave the CPU cache behind
    the registry's back (a bug the check guards against): its requests fail with the clear error at the
    next step, the others run to the end with the tokens they have alone."""
    def engine():
        return LLMEngine(EngineArgs(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
                                    seed=0, async_scheduling=async_scheduling))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    up, rot = LoRARequest("up", 1, UPPER), LoRARequest("rot", 2, ROT13)
    ref = engine()
    for rid, lora in (("u", up), ("b", None)):
        ref.add_request(rid, "hello world=", params, lora_request=lora)
    want = {rid: o.outputs[0].token_ids for rid, o in run_to_completion(ref).items()}
    eng = engine()
    for rid, lora in (("u", up), ("r1", rot), ("b", None), ("r2", rot)):
        eng.add_request(rid, "hello world=", params, lora_request=lora)
    eng.step()  # the prefill
    eng.step()
    hits = eng.scheduler.adapter_memo.hits
    assert eng.lora_manager.remove_adapter(2)
    done = run_to_completion(eng)
    assert eng.scheduler.adapter_memo.hits > hits
    for rid in ("r1", "r2"):
        assert done[rid].error is not None and "'rot' (lora_int_id 2) are no longer cached" in done[rid].error
        assert len(done[rid].outputs[0].token_ids) < 12
    assert {rid: done[rid].outputs[0].token_ids for rid in ("u", "b")} == want
    assert done["u"].error is None and done["b"].error is None
    eng.scheduler.block_manager.check_no_leaks()
