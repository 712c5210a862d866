"""Penalties and token constraints through LLM.generate on the embedded demo model, mixed in one
batch with requests that ask nothing (which must come out as they do alone)."""
import os

import pytest

from vllm import LLM, SamplingParams

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
Z, X = 56, 54  # the demo tokenizer's ids of "Z" and "X" (checked below)


@pytest.fixture(scope="module")
def llm():
    return LLM(os.path.join(ROOT, "demo_model"), max_model_len=64)


def texts(llm, prompts, params):
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_constraints_force_and_ban_tokens_in_a_mixed_batch(llm):
    assert llm.get_tokenizer().encode("ZX", add_special_tokens=False) == [Z, X]
    greedy = dict(temperature=0, max_tokens=8)
    plain = texts(llm, ["hello=", "banana="], SamplingParams(**greedy))
    params = [SamplingParams(**greedy, logit_bias={Z: 100}), SamplingParams(**greedy),
              SamplingParams(**greedy, allowed_token_ids=[Z, X]), SamplingParams(**greedy, bad_words=["l", "n"]),
              SamplingParams(temperature=1.0, max_tokens=8, logit_bias={X: 100}, seed=1)]
    got = texts(llm, ["hello="] * 2 + ["banana="] * 3, params)
    assert got[0] == "Z" * 8 and got[4] == "X" * 8
    assert got[1] == plain[0]
    assert got[2] and set(got[2]) <= {"Z", "X"}
    assert "n" not in got[3] and got[3] != plain[1]


def test_presence_penalty_changes_greedy_output(llm):
    prompts = ["aaaaaaaa=", "hello="]
    base = texts(llm, prompts, SamplingParams(temperature=0, max_tokens=16))
    penalised = texts(llm, prompts, [SamplingParams(temperature=0, max_tokens=16, presence_penalty=2.0),
                                     SamplingParams(temperature=0, max_tokens=16)])
    assert penalised[0] != base[0] and penalised[1] == base[1]


def test_out_of_vocabulary_ids_are_refused(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    for kw, field in (({"logit_bias": {vocab: 1.0}}, "logit_bias"), ({"allowed_token_ids": [1, vocab]},
                                                                    "allowed_token_ids")):
        with pytest.raises(ValueError, match=field):
            llm.generate(["hello="], SamplingParams(**kw), use_tqdm=False)
    assert texts(llm, ["hello="], SamplingParams(temperature=0)) == ["hello"]


def test_truncate_prompt_tokens_keeps_the_last_k_tokens(llm):
    """vLLM's semantics: the last k prompt tokens (left truncation); -1 keeps max_model_len of them."""
    greedy = dict(temperature=0, max_tokens=8)
    k = len(llm.get_tokenizer().encode("hello="))
    ref = llm.generate(["hello="], SamplingParams(**greedy), use_tqdm=False)[0]
    cut = llm.generate(["xyzzy hello="], SamplingParams(**greedy, truncate_prompt_tokens=k), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ref.prompt_token_ids and cut.outputs[0].text == ref.outputs[0].text == "hello"
    assert cut.prompt is None  # the text no longer matches the ids kept
    long_ids = list(range(5, 25)) * 3 + ref.prompt_token_ids  # 66 ids > max_model_len 64
    with pytest.raises(ValueError, match="the prompt has 64 tokens, but max_model_len is 64"):  # -1: kept 64 of 66
        llm.generate([long_ids], SamplingParams(temperature=0, max_tokens=1, truncate_prompt_tokens=-1),
                     use_tqdm=False)


def test_truncate_prompt_tokens_checks(llm):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    with pytest.raises(ValueError, match="truncate_prompt_tokens is 65, more than .* 64"):
        llm.generate(["hello="], SamplingParams(truncate_prompt_tokens=65), use_tqdm=False)
    short = llm.generate(["hello="], SamplingParams(temperature=0, truncate_prompt_tokens=60), use_tqdm=False)[0]
    assert short.prompt == "hello=" and short.outputs[0].text == "hello"  # shorter than k: untouched


def test_best_of_only_as_n(llm):
    assert SamplingParams(n=3, best_of=3).best_of == 3
    for kw in ({"n": 2, "best_of": 3}, {"n": 2, "best_of": 1}, {"best_of": 0}):
        with pytest.raises(ValueError, match="best_of"):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="best_of is not supported when it differs from n"):
        SamplingParams(n=1, best_of=2)


def test_n_with_a_seed_is_reproducible_and_the_samples_differ(llm):
    params = SamplingParams(n=4, temperature=5.0, seed=7, max_tokens=12)
    first = [c.text for c in llm.generate(["hello="], params, use_tqdm=False)[0].outputs]
    mixed = llm.generate(["abc=", "hello="], [SamplingParams(n=2, temperature=1.0, max_tokens=12), params],
                         use_tqdm=False)  # another request in the batch changes nothing
    assert [c.text for c in mixed[1].outputs] == first
    assert len(set(first)) > 1, first
    other_seed = [c.text for c in llm.generate(["hello="], SamplingParams(n=4, temperature=5.0, seed=8,
                                                                         max_tokens=12), use_tqdm=False)[0].outputs]
    assert other_seed != first
