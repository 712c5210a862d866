"""Async scheduling (issue 10): the engine queues decode step n+1 before it reads step n's tokens, and
its outputs are those of the synchronous engine.  Each test runs the same work on two engines built
alike, ``async_scheduling`` off and on (demo model, CPU), and compares token ids, text, finish and
stop reasons; it also checks that steps were really chained (``chained_steps``), so a test cannot
pass by never chaining."""
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.sampling_params import StructuredOutputsParams

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
MODEL = os.path.join(ROOT, "demo_model")
WORDS = ["hello", "abc", "xyz", "good day", "quick brown fox", "lorem", "ipsum dolor", "zebra"]
EOS = 2


def _pair(**kw) -> tuple[LLM, LLM]:
    kw = dict(max_model_len=64, max_num_seqs=16, **kw)
    return LLM(MODEL, async_scheduling=False, **kw), LLM(MODEL, async_scheduling=True, **kw)  # (GPU default: on)


def _summary(outs) -> list:
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _chained(llm: LLM) -> int:
    return llm.llm_engine.async_scheduling.chained_steps


@pytest.fixture(scope="module")
def engines():
    return _pair()


def test_off_and_on_as_asked(engines):  # (the default by device: test_async_scheduling_steps.py)
    sync, chained = engines
    assert sync.llm_engine.async_scheduling is None and chained.llm_engine.async_scheduling is not None


def _mixed_params() -> list[SamplingParams]:
    """max_tokens 1..40, EOS, stop tokens, stop strings (kept or not), min_tokens, seeds, n > 1."""
    ps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 5, 17, 40)]
    ps += [SamplingParams(temperature=0, max_tokens=30),  # EOS
           SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[8]),
           SamplingParams(temperature=0, max_tokens=30, stop=["o"]),
           SamplingParams(temperature=0, max_tokens=30, stop=["y", "ol"], include_stop_str_in_output=True),
           SamplingParams(temperature=0, max_tokens=30, min_tokens=9),  # EOS suppressed past where it comes
           SamplingParams(temperature=0.9, seed=7, max_tokens=25),
           SamplingParams(temperature=1.0, seed=3, max_tokens=12, n=3, top_k=20),
           SamplingParams(temperature=0.7, seed=11, max_tokens=33, min_tokens=4, ignore_eos=False, top_p=0.9)]
    return ps


def test_greedy_and_seeded_outputs_match_the_synchronous_engine(engines):
    sync, chained = engines
    params = _mixed_params()
    prompts = [f"{WORDS[i % len(WORDS)]}=" for i in range(len(params))]
    want = sync.generate(prompts, params, use_tqdm=False)
    before = _chained(chained)
    got = chained.generate(prompts, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert _chained(chained) - before >= 30  # the decode steps chained
    reasons = {c.finish_reason for o in want for c in o.outputs}
    assert reasons == {"stop", "length"}
    assert want[9].outputs[0].finish_reason == "stop" and len(want[9].outputs[0].token_ids) >= 9  # min_tokens
    chained.llm_engine.scheduler.block_manager.check_no_leaks()


def test_min_tokens_counts_the_token_ahead(engines):
    """The row whose EOS min_tokens holds back ends on the step it would synchronously (a chained
    step samples before the previous token is recorded: min_tokens must count it)."""
    sync, chained = engines
    for m in (2, 4, 6, 9):
        p = SamplingParams(temperature=0, max_tokens=30, min_tokens=m)
        want = sync.generate(["abc=", "xyz=", "hello="], p, use_tqdm=False)
        assert _summary(chained.generate(["abc=", "xyz=", "hello="], p, use_tqdm=False)) == _summary(want)


@pytest.mark.parametrize("feature", ["penalties", "logprobs", "bad_words", "structured_output"])
def test_a_request_that_needs_its_tokens_on_the_host_ends_the_chain(engines, feature):
    sync, chained = engines
    special = {"penalties": dict(repetition_penalty=1.3, presence_penalty=0.5),
               "logprobs": dict(logprobs=2), "bad_words": dict(bad_words=["l"]),
               "structured_output": dict(structured_outputs=StructuredOutputsParams(regex="[a-k]{3,6}"))}[feature]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, **special)]
    params += [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)] * 2
    prompts = ["hello=", "good day=", "zebra="]
    want = sync.generate(prompts, params, use_tqdm=False)
    engine = chained.llm_engine
    before = _chained(chained)
    engine.add_request("special", prompts[0], params[0])
    engine.step()  # the prefill
    for _ in range(2):  # while the special request runs, no step is queued ahead
        engine.step()
        assert _chained(chained) == before and engine.async_scheduling.pending is None
    for i, p in enumerate(prompts[1:]):
        engine.add_request(f"r{i}", p, params[1])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert _chained(chained) > before  # once it finished, the others chained
    got = [done["special"], done["r0"], done["r1"]]
    if feature == "logprobs":  # (other batches than the synchronous run's: equal up to rounding)
        lp = [[(t, e.rank, round(e.logprob, 3)) for d in c.logprobs for t, e in d.items()] for c in got[0].outputs]
        assert lp == [[(t, e.rank, round(e.logprob, 3)) for d in c.logprobs for t, e in d.items()]
                      for c in want[0].outputs]
    assert _summary(got) == _summary(want)


def _drive(llm: LLM, script: dict, max_steps: int = 300) -> tuple[dict, dict]:
    """Run ``script`` ({step index: [action(engine)]}) between the steps; the final output of each request
    and, per request, the token ids of every output it got (each step's outputs, in order)."""
    engine = llm.llm_engine
    done, seen = {}, {}
    for i in range(max_steps):
        for action in script.get(i, ()):
            action(engine)
        if not engine.has_unfinished_requests() and i > max(script):
            return done, seen
        for out in engine.step():
            seen.setdefault(out.request_id, []).append([list(c.token_ids) for c in out.outputs])
            if out.finished:
                assert out.request_id not in done, "a request finished twice"
                done[out.request_id] = out
    raise AssertionError("the engine did not finish")


def _add(rid, prompt, params):
    return lambda engine: engine.add_request(rid, prompt, params)


def _abort(rid):
    return lambda engine: engine.abort_request(rid)


def test_requests_added_and_aborted_between_steps(engines):
    sync, chained = engines
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=20, n=2, ignore_eos=True)
    script = {0: [_add("a", "hello=", greedy), _add("b", "zebra=", seeded)],
              3: [_add("c", "abc=", greedy)],
              6: [_abort("b"), _add("d", "xyz=", SamplingParams(temperature=0, max_tokens=6))],
              7: [_add("e", "lorem=", greedy)],
              9: [_abort("e")],
              12: [_add("f", "good day=", seeded), _abort("never-added")]}
    want_done, want_seen = _drive(sync, script)
    before = _chained(chained)
    got_done, got_seen = _drive(chained, script)
    assert _chained(chained) > before
    assert set(got_done) == set(want_done) == {"a", "c", "d", "f"}
    assert _summary(got_done[r] for r in sorted(got_done)) == _summary(want_done[r] for r in sorted(want_done))
    # every output adds exactly one token per unfinished sample: each token streamed once, in order
    for rid, outs in got_seen.items():
        for prev, cur in zip(outs, outs[1:]):
            for p, c in zip(prev, cur):
                assert c[:len(p)] == p and len(c) - len(p) <= 1, rid
    # an aborted request got as many outputs as synchronously: none of its tokens computed ahead was shown
    assert got_seen["b"] == want_seen["b"] and got_seen["e"] == want_seen["e"]
    assert not chained.llm_engine._requests
    chained.llm_engine.scheduler.block_manager.check_no_leaks()


def test_has_unfinished_while_a_step_is_pending_even_after_aborting_all(engines):
    _, chained = engines
    engine = chained.llm_engine
    engine.add_request("x", "hello=", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()  # the first decode: the next one is queued
    assert engine.async_scheduling.pending is not None
    engine.abort_request("x")
    assert engine.has_unfinished_requests()  # the queued step's outputs are still owed (none here)
    assert engine.step() == [] and not engine.has_unfinished_requests()
    engine.scheduler.block_manager.check_no_leaks()


def test_preemption_with_few_kv_blocks(monkeypatch):
    sync, chained = _pair(block_size=4, num_gpu_blocks_override=14, enable_prefix_caching=False)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (18, 22, 9, 26)]
    params.append(SamplingParams(temperature=0.9, seed=1, max_tokens=20, ignore_eos=True))
    prompts = [f"{w}=" for w in WORDS[:len(params)]]
    want = sync.generate(prompts, params, use_tqdm=False)
    engine = chained.llm_engine
    preempted = []
    preempt = engine.scheduler._preempt
    monkeypatch.setattr(engine.scheduler, "_preempt", lambda seq: (preempted.append(seq.request_id), preempt(seq)))
    got = chained.generate(prompts, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert preempted and _chained(chained) > 0
    engine.scheduler.block_manager.check_no_leaks()


def test_lora_mixed_batches():
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=16)
    sync, chained = _pair(**kw)
    adapters = [None, LoRARequest("upper", 1, os.path.join(ROOT, "demo_adapters", "upper")),
                LoRARequest("rot13", 2, os.path.join(ROOT, "demo_adapters", "rot13"))]
    prompts = [f"{w}=" for w in WORDS]
    loras = [adapters[i % 3] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=16)
    want = sync.generate(prompts, params, lora_request=loras, use_tqdm=False)
    got = chained.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert [o.outputs[0].text for o in got[:3]] == ["hello", "ABC", "klm"]  # each row on its adapter
    assert _chained(chained) > 0


def test_chains_while_requests_wait_for_a_full_running_set():
    """max_num_seqs 3, 7 requests: while the running set is full, the waiting ones cannot start, so
    decode steps chain; they start one step later than synchronously, with the same tokens."""
    sync = LLM(MODEL, max_model_len=64, max_num_seqs=3, async_scheduling=False)
    chained = LLM(MODEL, max_model_len=64, max_num_seqs=3, async_scheduling=True)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 11, 3, 9, 14, 5, 8)]
    prompts = [f"{WORDS[i % len(WORDS)]}=" for i in range(len(params))]
    want = sync.generate(prompts, params, use_tqdm=False)
    assert _summary(chained.generate(prompts, params, use_tqdm=False)) == _summary(want)
    assert _chained(chained) >= 12
