"""Async scheduling of prefills (issue 10, goal 3): while a prefill step is queued and more prompts wait,
the engine schedules the next prefill batch and queues it before it reads the queued step's tokens, so the
host work between prefill steps overlaps the device.  Each test runs the same work on a synchronous and an
async engine (demo model, CPU, a 64-token step so that a batch of prompts takes several prefill steps) and
compares tokens, text, finish reasons and logprobs; each also checks that prefills were really queued
(``queued_prefills``), so it cannot pass by running them synchronously."""
import os

import pytest

from tests.utils import faulty_runner, run_to_completion
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.worker.device_tokens import DeviceTokens

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
MODEL = os.path.join(ROOT, "demo_model")
WORDS = ["hello there friend", "abc def ghi jkl", "xyz xyz xyz", "good day to you", "quick brown fox",
         "lorem ipsum dolor", "zebra crossing", "one two three four"]
PROMPTS = [f"{w}=" for w in WORDS]
KW = dict(max_model_len=64, max_num_seqs=16, max_num_batched_tokens=64)


def _summary(outs) -> list:
    return [[(c.index, c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


def _queued(llm: LLM) -> int:
    return llm.llm_engine.async_scheduling.queued_prefills


@pytest.fixture(scope="module")
def pair():
    return LLM(MODEL, async_scheduling=False, **KW), LLM(MODEL, async_scheduling=True, **KW)


def _params() -> list[SamplingParams]:
    ps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 3, 12)]
    ps += [SamplingParams(temperature=0, max_tokens=20, stop=["o"]),
           SamplingParams(temperature=0.9, seed=7, max_tokens=9),
           SamplingParams(temperature=1.0, seed=3, max_tokens=6, n=2, top_k=20),
           SamplingParams(temperature=0, max_tokens=1), SamplingParams(temperature=0, max_tokens=15, min_tokens=5)]
    return ps


def test_prefill_batches_are_queued_back_to_back_with_the_same_outputs(pair):
    sync, chained = pair
    want = sync.generate(PROMPTS, _params(), use_tqdm=False)
    before = _queued(chained)
    got = chained.generate(PROMPTS, _params(), use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert _queued(chained) - before >= 2  # 8 prompts of 12-20 tokens in 64-token steps: 3+ prefill steps
    chained.llm_engine.scheduler.block_manager.check_no_leaks()


def test_the_next_prefill_is_launched_before_the_queued_ones_tokens_are_read(pair, monkeypatch):
    _, chained = pair
    engine = chained.llm_engine
    runner = engine.runner
    events = []
    launch, tolist, execute = runner.launch, DeviceTokens.tolist, runner.execute

    def logged_launch(out, input_ids=None, tokens_ahead=0):
        tokens = launch(out, input_ids=input_ids, tokens_ahead=tokens_ahead)
        tokens.tag = ("prefill" if out.is_prefill else "decode", tuple(s.request_id for s in out.scheduled_seqs))
        events.append(("launch",) + tokens.tag)
        return tokens

    def logged_tolist(self):
        events.append(("read",) + getattr(self, "tag", ("?",)))
        return tolist(self)

    monkeypatch.setattr(runner, "launch", logged_launch)
    monkeypatch.setattr(DeviceTokens, "tolist", logged_tolist)
    monkeypatch.setattr(runner, "execute", lambda out: (events.append(("sync", out.is_prefill)), execute(out))[1])
    for i in range(14):
        engine.add_request(f"p{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=0, max_tokens=1))
    run_to_completion(engine)
    prefills = [e for e in events if e[0] == "launch"]
    assert len(prefills) >= 3 and all(e[1] == "prefill" for e in prefills)
    assert not [e for e in events if e[0] == "sync"]  # every prefill was queued
    # launch 1, launch 2, read 1, launch 3, read 2, ..., read last: each launch before its predecessor's read
    reads = [e for e in events if e[0] == "read"]
    assert [e[2] for e in reads] == [e[2] for e in prefills]
    for k in range(1, len(prefills)):
        assert events.index(prefills[k]) < events.index(reads[k - 1])
    assert sorted(r for e in prefills for r in e[2]) == sorted(f"p{i}" for i in range(14))


def test_a_prefill_that_needs_its_prompt_logprobs_runs_synchronously(pair):
    sync, chained = pair
    params = [SamplingParams(temperature=0, max_tokens=4)] * len(PROMPTS)
    params[6] = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)  # in the second prefill batch
    want = sync.generate(PROMPTS, params, use_tqdm=False)
    before = _queued(chained)
    got = chained.generate(PROMPTS, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert _queued(chained) > before

    def lp(o):
        return [None if d is None else sorted((t, e.rank, round(e.logprob, 4)) for t, e in d.items())
                for d in o.prompt_logprobs]
    assert lp(got[6]) == lp(want[6])


def test_lora_prefills_across_queued_steps():
    kw = dict(KW, enable_lora=True, max_loras=2, max_lora_rank=16)
    sync, chained = LLM(MODEL, async_scheduling=False, **kw), LLM(MODEL, async_scheduling=True, **kw)
    adapters = [None, LoRARequest("upper", 1, os.path.join(ROOT, "demo_adapters", "upper")),
                LoRARequest("rot13", 2, os.path.join(ROOT, "demo_adapters", "rot13"))]
    loras = [adapters[i % 3] for i in range(len(PROMPTS))]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = sync.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
    got = chained.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert _queued(chained) >= 2


@pytest.mark.parametrize("where", ["launch", "read"])
def test_a_failure_in_a_queued_prefill_fails_only_its_request(pair, where):
    """The runner raises for one request's prefill, when it is queued or when its tokens are read: that
    request fails, the others get exactly their tokens, no KV block leaks, the engine goes on."""
    sync, chained = pair
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = {o.prompt: o.outputs[0].token_ids for o in sync.generate(PROMPTS, params, use_tqdm=False)}
    engine = chained.llm_engine
    runner = engine.runner
    before = _queued(chained)

    def bad(out, tokens_ahead=0):
        return out.is_prefill and any(s.request_id == "bad" for s in out.scheduled_seqs)

    with faulty_runner(runner, where, bad, bad):
        for i in range(14):  # 4+ prefill steps; "bad" in the second, which is queued (and the third after it)
            engine.add_request(f"good{i}", PROMPTS[i % len(PROMPTS)], params)
            if i == 5:
                engine.add_request("bad", "a bad request here=", params)
        done = run_to_completion(engine)
    assert "Injected" in done["bad"].error and "step fault" in done["bad"].error
    assert done["bad"].outputs[0].finish_reason == "abort"
    for i in range(14):
        assert done[f"good{i}"].error is None and done[f"good{i}"].outputs[0].token_ids == want[PROMPTS[i % 8]]
    assert _queued(chained) > before
    assert not engine.has_unfinished_requests() and not engine._requests and not engine._errors
    engine.scheduler.block_manager.check_no_leaks()


def test_a_request_aborted_while_its_prefill_is_queued(pair):
    """Aborted between the step that queued its prefill and the one that reads it: it finishes aborted with
    no token shown, its blocks are freed, and the other requests are unaffected."""
    sync, chained = pair
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = {o.prompt: o.outputs[0].token_ids for o in sync.generate(PROMPTS, params, use_tqdm=False)}
    engine = chained.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params)
    seen = {}
    aborted = None
    for _ in range(200):
        for out in engine.step():
            seen[out.request_id] = out
        pending = engine.async_scheduling.pending
        if aborted is None and pending is not None and pending.out.is_prefill:
            aborted = pending.out.scheduled_seqs[0].request_id
            engine.abort_request(aborted)
        if not engine.has_unfinished_requests():
            break
    assert aborted is not None
    assert aborted not in seen or not seen[aborted].outputs[0].token_ids
    for i, p in enumerate(PROMPTS):
        if f"r{i}" != aborted:
            assert seen[f"r{i}"].finished and seen[f"r{i}"].outputs[0].token_ids == want[p]
    engine.scheduler.block_manager.check_no_leaks()
