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
