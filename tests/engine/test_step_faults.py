"""Issue 9: an exception while a step is computed fails only the requests that cause it.

Faults are injected into a live engine (demo model) at each stage of a step - the model
runner, the sampler, postprocessing, the detokenizer, the scheduler - for batches that
hold a marked request.  The marked request finishes with ``RequestOutput.error``; every
other request of the batch gets exactly the tokens of an undisturbed run; KV blocks are
all freed; the engine serves later requests.
"""
import os

import pytest

from tests.utils import assert_clean_and_serving, patched, run_to_completion
from vllm import LLM, SamplingParams
from vllm.engine.errors import RequestFailedError
from vllm.executor.multiproc import WorkerError

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
PROMPTS = ["hello=", "abc=", "xyz=", "good day="]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
FAIL_AFTER = 3  # the marked request fails once it has this many tokens


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def llm():
    llm = LLM(MODEL, max_model_len=64, max_num_seqs=32)
    llm.reference = {p: llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}
    return llm


def _marked(seq) -> bool:
    return seq.request_id.startswith("bad") or getattr(seq.sampling_params, "fault", False)


def _due(seq) -> bool:
    return _marked(seq) and seq.num_output_tokens >= FAIL_AFTER


def runner_fault(engine):
    def make(execute):
        def execute_with_fault(out):
            if any(_due(s) for s in out.scheduled_seqs):
                raise Injected("model runner fault")
            return execute(out)
        return execute_with_fault
    return patched(engine.runner, "execute", make)


def sampler_fault(engine):
    sampler = engine.runner.sampler

    def make(forward):
        def forward_with_fault(logits, params, *args, **kwargs):
            if any(getattr(p, "fault", False) for p in params):
                raise Injected("sampler fault")
            return forward(logits, params, *args, **kwargs)
        return forward_with_fault
    return patched(sampler, "forward", make)


def late_sampler_fault(engine):
    """Raises after the whole batch was sampled (the seeded rows' generators have advanced)."""
    sampler = engine.runner.sampler

    def make(forward):
        def forward_then_fault(logits, params, *args, **kwargs):
            result = forward(logits, params, *args, **kwargs)
            if any(getattr(p, "fault", False) for p in params):
                raise Injected("late sampler fault")
            return result
        return forward_then_fault
    return patched(sampler, "forward", make)


def postprocess_fault(engine):
    def make(check_stop):
        def check_stop_with_fault(seq):
            if _due(seq):
                raise Injected("postprocess fault")
            return check_stop(seq)
        return check_stop_with_fault
    return patched(engine.scheduler, "_check_stop", make)


def detokenizer_fault(engine):
    def make(decode):
        def decode_with_fault(seq):
            if _due(seq):
                raise Injected("detokenizer fault")
            return decode(seq)
        return decode_with_fault
    return patched(engine.detokenizer, "decode_sequence_inplace", make)


@pytest.mark.parametrize("fault", [runner_fault, postprocess_fault, detokenizer_fault])
def test_a_fault_fails_only_the_request_that_causes_it(llm, fault):
    engine = llm.llm_engine
    with fault(engine):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"good{i}", p, GREEDY)
            if i == 1:
                engine.add_request("bad", "bad request=", SamplingParams(temperature=0, max_tokens=12, n=2,
                                                                         ignore_eos=True))
        done = run_to_completion(engine)
    bad = done["bad"]
    assert bad.finished and "Injected" in bad.error and "fault" in bad.error
    assert all(c.finish_reason == "abort" and len(c.token_ids) == FAIL_AFTER for c in bad.outputs)
    for i, p in enumerate(PROMPTS):
        good = done[f"good{i}"]
        assert good.error is None and good.outputs[0].token_ids == llm.reference[p]
        assert good.outputs[0].finish_reason == "length"
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_llm_generate_raises_after_the_batch_with_every_output(llm):
    params = [GREEDY] * len(PROMPTS)
    bad = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bad.fault = True
    params[2] = bad
    with sampler_fault(llm.llm_engine), pytest.raises(RequestFailedError, match=r"1 of 4 requests failed.*"
                                                                               r"prompt 2 .*sampler fault") as e:
        llm.generate(PROMPTS, params, use_tqdm=False)
    outs = e.value.outputs
    assert [o.prompt for o in outs] == PROMPTS
    assert list(e.value.failures.values()) == [outs[2].error] and "sampler fault" in outs[2].error
    for i in (0, 1, 3):
        assert outs[i].error is None and outs[i].outputs[0].token_ids == llm.reference[PROMPTS[i]]
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_seeded_requests_keep_their_tokens_when_a_batch_is_split(llm):
    """The failing batch is re-run in parts: seeded generators are restored, so a seeded request
    gets the tokens it gets alone."""
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2, 3)]
    alone = [llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0].token_ids for p in seeded]
    engine = llm.llm_engine
    bad = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    bad.fault = True
    with late_sampler_fault(engine):
        engine.add_request("s0", PROMPTS[0], seeded[0])
        engine.add_request("bad", PROMPTS[1], bad)
        engine.add_request("s1", PROMPTS[0], seeded[1])
        engine.add_request("s2", PROMPTS[0], seeded[2])
        done = run_to_completion(engine)
    assert done["bad"].error is not None
    assert [done[f"s{i}"].outputs[0].token_ids for i in range(3)] == alone
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_a_fault_of_the_whole_step_fails_its_requests_and_a_transient_one_none(llm):
    engine = llm.llm_engine
    state = {"calls": 0, "failing": set()}

    def make(execute):
        def execute_with_fault(out):
            state["calls"] += 1
            if state["calls"] in state["failing"]:
                raise Injected("step fault")
            return execute(out)
        return execute_with_fault

    # transient: only the first run of the third step fails; the re-run parts succeed
    state["failing"] = {3}
    with patched(engine.runner, "execute", make):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"t{i}", p, GREEDY)
        done = run_to_completion(engine)
    assert all(done[f"t{i}"].outputs[0].token_ids == llm.reference[p] for i, p in enumerate(PROMPTS))
    # persistent for one step (every run of it fails): that step's requests fail, nobody else
    state["calls"], state["failing"] = 0, set(range(3, 3 + 2 * len(PROMPTS)))
    with patched(engine.runner, "execute", make):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"p{i}", p, GREEDY)
        done = run_to_completion(engine)
    assert all("step fault" in done[f"p{i}"].error for i in range(len(PROMPTS)))
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_a_scheduler_fault_fails_the_unfinished_requests(llm):
    engine = llm.llm_engine
    calls = {"n": 0}

    def make(schedule):
        def schedule_with_fault():
            calls["n"] += 1
            if calls["n"] == 4:
                raise Injected("scheduler fault")
            return schedule()
        return schedule_with_fault

    with patched(engine.scheduler, "schedule", make):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"s{i}", p, GREEDY)
        done = run_to_completion(engine)
    assert all("scheduler fault" in done[f"s{i}"].error for i in range(len(PROMPTS)))
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_a_fatal_error_is_raised(llm):
    engine = llm.llm_engine

    def make(execute):
        def dead_worker(out):
            raise WorkerError("tensor-parallel worker process(es) rank 1 (exit code -9) died")
        return dead_worker

    engine.add_request("f", PROMPTS[0], GREEDY)
    with patched(engine.runner, "execute", make), pytest.raises(WorkerError):
        engine.step()
    engine.abort_request("f")
    assert_clean_and_serving(llm, PROMPTS, GREEDY)
