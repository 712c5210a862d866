"""Penalties, logit_bias, allowed_token_ids, bad_words and min_p: the batched sampler against
transformers' logits processors (and a plain fp64 loop for frequency / presence), per request,
on random logits and random token histories, batched with rows that ask nothing."""
import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, NoBadWordsLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

from vllm.model_executor.layers.logits_processors import apply_min_p, apply_penalties, apply_token_constraints
from vllm.model_executor.layers.sampler import Sampler
from vllm.sampling_params import SamplingParams

V = 50


def random_params(rng: random.Random) -> SamplingParams:
    """Any mix of the fields (about a third of the rows ask nothing)."""
    if rng.random() < 0.3:
        return SamplingParams(temperature=rng.choice([0.0, 1.0]))
    kw = {}
    if rng.random() < 0.6:
        kw["repetition_penalty"] = rng.uniform(0.5, 2.0)
    if rng.random() < 0.6:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.6:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.5:
        kw["logit_bias"] = {rng.randrange(V): rng.uniform(-100, 100) for _ in range(rng.randint(1, 5))}
    if rng.random() < 0.3:
        kw["allowed_token_ids"] = rng.sample(range(V), rng.randint(3, 20))
    params = SamplingParams(temperature=rng.choice([0.0, 0.8]), **kw)
    if rng.random() < 0.5:  # bad words as token sequences (what update_from_tokenizer makes)
        params._bad_words_token_ids = [[rng.randrange(V) for _ in range(rng.randint(1, 3))] for _ in range(3)]
        params.bad_words = ["x"]
    return params


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row, fp64, through transformers' processors in vLLM's order."""
    x = logits.double().unsqueeze(0)
    ids = torch.tensor([prompt + output])
    if p.logit_bias:
        x = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()])(ids, x)
    if p.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[p.allowed_token_ids] = True
        x = x.masked_fill(~keep, float("-inf"))
    if p.bad_words_token_ids:  # matched against the generated tokens only, as vLLM
        x = NoBadWordsLogitsProcessor(p.bad_words_token_ids)(torch.tensor([output]), x)
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = x.squeeze(0).clone()
    for token, count in Counter(output).items():
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    return x


def batch(seed: int, rows: int = 12):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 4
    params = [random_params(rng) for _ in range(rows)]
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 30))] for _ in range(rows)]
    outputs = [[rng.randrange(V) for _ in range(rng.randint(1, 40))] for _ in range(rows)]
    for p, out in zip(params, outputs):  # make some multi-token bad words match the output's end
        if p.bad_words_token_ids and rng.random() < 0.7:
            p._bad_words_token_ids.append(out[-2:] + [rng.randrange(V)])
    return logits, params, prompts, outputs


@pytest.mark.parametrize("seed", range(6))
def test_constraints_and_penalties_match_transformers(seed):
    logits, params, prompts, outputs = batch(seed)
    got = logits.clone()
    apply_token_constraints(got, params, outputs)
    apply_penalties(got, params, prompts, outputs)
    for i, p in enumerate(params):
        want = reference(logits[i], p, prompts[i], outputs[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: masked ids differ"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[i][finite].double(), want[finite], rtol=1e-5, atol=1e-4)
        if not (p.needs_penalties or p.logit_bias or p.allowed_token_ids or p.bad_words):
            assert torch.equal(got[i], logits[i]), f"row {i} asked nothing but changed"


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rows_take_the_penalised_argmax(seed):
    logits, params, prompts, outputs = batch(seed, rows=16)
    greedy = [SamplingParams(**{**{k: getattr(p, k) for k in ("repetition_penalty", "frequency_penalty",
                                                                 "presence_penalty", "logit_bias",
                                                                 "allowed_token_ids", "bad_words")},
                                "temperature": 0.0}) for p in params]
    for g, p in zip(greedy, params):
        g._bad_words_token_ids = p._bad_words_token_ids
    tokens = Sampler()(logits, greedy, [None] * len(greedy), prompt_token_ids=prompts, output_token_ids=outputs)
    for i, p in enumerate(greedy):
        assert tokens[i] == reference(logits[i], p, prompts[i], outputs[i]).argmax(), f"row {i}"


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_transformers(min_p):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, V, generator=g) * 3
    got = apply_min_p(logits, torch.full((5,), min_p))
    want = MinPLogitsWarper(min_p)(torch.zeros(5, 1, dtype=torch.long), logits.double()) if min_p > 0 else logits
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_sampled_tokens_respect_allowed_bias_and_min_p():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    allowed = [3, 17, 41]
    params = [SamplingParams(temperature=1.0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, logit_bias={9: 100}),
              SamplingParams(temperature=1.0, min_p=0.5),
              SamplingParams(temperature=1.0)]
    probs = logits[2].softmax(-1)
    min_p_ok = set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())
    seen = [set() for _ in params]
    for _ in range(200):
        for i, t in enumerate(Sampler()(logits, params, [None] * 4).tolist()):
            seen[i].add(t)
    assert seen[0] <= set(allowed) and len(seen[0]) > 1
    assert seen[1] == {9}
    assert seen[2] <= min_p_ok
    assert len(seen[3]) > len(min_p_ok)  # the plain row is untouched


def test_penalties_without_histories_are_refused():
    logits = torch.zeros(1, V)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sampler()(logits, [SamplingParams(presence_penalty=1.0)], [None])


def test_logprobs_stay_those_of_the_raw_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, V, generator=g)
    p = SamplingParams(temperature=0.0, logit_bias={4: 100}, logprobs=1)
    out = Sampler()(logits, [p], [None], num_logprobs=[1])
    assert out.token_ids.tolist() == [4]
    assert out.logprobs[0][4].logprob == pytest.approx(logits[0].log_softmax(-1)[4].item(), abs=1e-6)


@pytest.mark.parametrize("kw, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [""]}, "bad word"),
])
def test_bad_values_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_logit_bias_is_clamped():
    assert SamplingParams(logit_bias={1: 1e9, 2: -300, 3: 5}).logit_bias == {1: 100.0, 2: -100.0, 3: 5.0}


class _SpaceTokenizer:
    """Each word is one token; a leading space makes a different token (as BPE vocabularies do)."""

    def encode(self, text, add_special_tokens=False):
        return [(hash(w) % 1000) + (1000 if i == 0 and text.startswith(" ") else 0)
                for i, w in enumerate(text.split())]


def test_bad_words_are_tokenized_with_and_without_a_leading_space():
    p = SamplingParams(bad_words=["foo", " bar baz"])
    p.update_from_tokenizer(_SpaceTokenizer())
    tok = _SpaceTokenizer()
    assert p.bad_words_token_ids == [tok.encode("foo"), tok.encode(" foo"), tok.encode("bar baz"),
                                     tok.encode(" bar baz")]
