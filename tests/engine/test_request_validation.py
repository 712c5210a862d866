"""Issue 9, finding 1: request parameters that crashed the engine's step are validated up front.

Each hostile value either works as vLLM defines it (``top_k`` >= the vocabulary means "all") or is
refused with a ValueError naming the field, the value and the valid range, before anything runs; the
engine keeps serving afterwards with unchanged answers.  Runs on the demo model (vocabulary of 57).
"""
import os

import pytest

from vllm import LLM, SamplingParams

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
VOCAB = 57
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


@pytest.fixture(scope="module")
def llm():
    llm = LLM(MODEL, max_model_len=64, max_num_seqs=32)
    llm.reference = [o.outputs[0].token_ids for o in llm.generate(["hello=", "abc="], GREEDY, use_tqdm=False)]
    return llm


def _still_serving(llm):
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine._requests
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
    outs = llm.generate(["hello=", "abc="], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == llm.reference


@pytest.mark.parametrize("kwargs, message", [
    # the three crashes of the fuzz run
    (dict(seed=2**64), rf"seed must be an integer in \[{INT64_MIN}, {INT64_MAX}\].*got {2**64}"),
    (dict(seed=2**63), rf"seed must be an integer in \[{INT64_MIN}, {INT64_MAX}\].*got {2**63}"),
    (dict(seed=INT64_MIN - 1), rf"seed .*got {INT64_MIN - 1}"),
    # bool is not an int
    (dict(seed=True), "seed must be an integer.*got True"),
    (dict(n=True), "n must be an integer >= 1, got True"),
    (dict(top_k=True), "top_k must be .*got True"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1.*got True"),
    (dict(min_tokens=True), "min_tokens must be an integer >= 0, got True"),
    (dict(stop_token_ids=[3, 1.0]), "stop_token_ids must be .*got 1.0"),
    # non-finite and non-numeric floats
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0.*got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0.*got inf"),
    (dict(temperature="1"), "temperature must be a finite number >= 0.*got '1'"),
    (dict(temperature=True), "temperature must be a finite number >= 0.*got True"),
    (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\].*got nan"),
    (dict(top_p="0.5"), r"top_p must be a number in \(0, 1\].*got '0.5'"),
    # flags must be booleans (a string "false" would be truthy)
    (dict(ignore_eos="false"), "ignore_eos must be True or False, got 'false'"),
    (dict(skip_special_tokens=0), "skip_special_tokens must be True or False, got 0"),
    (dict(include_stop_str_in_output=None), "include_stop_str_in_output must be True or False, got None"),
    (dict(stop=[b"x"]), "stop string"),
])
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [INT64_MAX, INT64_MIN, -1, 0])
def test_seed_range_edges_work_and_are_reproducible(llm, seed):
    p = SamplingParams(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True, n=2)
    a = llm.generate("hello=", p, use_tqdm=False)[0]
    b = llm.generate(["abc=", "hello="], p, use_tqdm=False)[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert all(len(c.token_ids) == 6 for c in a.outputs)
    _still_serving(llm)


@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 1, 2**63, 2**64, 10**30])
def test_top_k_at_or_above_the_vocabulary_means_all(llm, top_k):
    """vLLM: a top_k of the vocabulary size or more keeps every token (the engine crashed on >= 2**63)."""
    want = llm.generate("hello=", SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    got = llm.generate("hello=", SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, top_k=top_k),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
    _still_serving(llm)


def test_top_k_below_the_vocabulary_still_cuts(llm):
    outs = llm.generate(["hello="] * 8, SamplingParams(temperature=5.0, top_k=1, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert all(o.outputs[0].token_ids == llm.reference[0][:4] for o in outs)  # top_k=1 is greedy


@pytest.mark.parametrize("stop_token_ids", [[VOCAB], [3, VOCAB + 100], [2**63]])
@pytest.mark.parametrize("min_tokens", [0, 1])
def test_stop_token_ids_outside_the_vocabulary(llm, stop_token_ids, min_tokens):
    """The fuzz run's `{"stop_token_ids": [57], "min_tokens": 1}` raised IndexError inside the step."""
    bad = SamplingParams(temperature=0, max_tokens=4, stop_token_ids=stop_token_ids, min_tokens=min_tokens)
    with pytest.raises(ValueError, match=rf"stop_token_ids.*{max(stop_token_ids)}.*vocabulary.*{VOCAB}"):
        llm.generate(["hello=", "abc="], bad, use_tqdm=False)
    _still_serving(llm)


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": [5, VOCAB]}, rf"prompt_token_ids.*{VOCAB}.*\[0, {VOCAB}\)"),
    ({"prompt_token_ids": [5, -1]}, rf"prompt_token_ids.*-1.*\[0, {VOCAB}\)"),
    ({"prompt_token_ids": [5, True]}, "prompt_token_ids must be integers.*True"),
    ({"prompt_token_ids": [5, 6.0]}, "prompt_token_ids must be integers.*6.0"),
    ({"prompt_token_ids": "abc"}, "prompt_token_ids must be a list"),
    ([5, 2**70], rf"prompt_token_ids.*{2**70}"),
])
def test_bad_prompt_token_ids(llm, prompt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        llm.generate([prompt, "abc="], GREEDY, use_tqdm=False)
    _still_serving(llm)


def test_huge_n_is_refused_and_n_above_max_num_seqs_runs_in_waves(llm):
    """n=10**12 would build 10**12 sequences on the engine thread: refused. n above max_num_seqs (32
    here) is fine: the samples run in waves."""
    from vllm.engine.input_checks import MAX_SAMPLES

    with pytest.raises(ValueError, match=rf"n=1000000000000 .*\({MAX_SAMPLES}\)"):
        llm.generate("hello=", SamplingParams(n=10**12), use_tqdm=False)
    outs = llm.generate("hello=", SamplingParams(temperature=0, n=40, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs) == 40 and all(c.token_ids == llm.reference[0][:3] for c in outs[0].outputs)
    _still_serving(llm)


def test_every_crash_of_the_fuzz_run_in_one_engine(llm):
    """The issue's triggers one after another (valid ones run, invalid ones are refused); the engine
    serves correct answers after each."""
    engine = llm.llm_engine
    triggers = [dict(top_k=2**63, temperature=1.0), dict(top_k=2**63 + 5, temperature=0.7, seed=1)]
    for kw in triggers:
        engine.add_request("t", "hello=", SamplingParams(max_tokens=4, **kw))
        while engine.has_unfinished_requests():
            engine.step()
        _still_serving(llm)
    for kw in [dict(seed=2**64, temperature=1.0), dict(seed=-2**63 - 1, temperature=1.0)]:
        with pytest.raises(ValueError, match="seed"):
            engine.add_request("t", "hello=", SamplingParams(max_tokens=4, **kw))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("t", "hello=", SamplingParams(temperature=0, stop_token_ids=[57], min_tokens=1))
    _still_serving(llm)


def test_a_request_id_in_use_is_refused_and_the_first_request_is_untouched(llm):
    eng = llm.llm_engine
    params = SamplingParams(max_tokens=3, temperature=0)
    eng.add_request("same", {"prompt_token_ids": [5, 6, 7]}, params)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("same", {"prompt_token_ids": [8, 9]}, params)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == ["same"] and outs[0].prompt_token_ids == [5, 6, 7]
    assert len(outs[0].outputs[0].token_ids) == 3
    _still_serving(llm)
