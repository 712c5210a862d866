"""Requests whose text nobody reads before they finish (``LLM.generate``: FINAL_ONLY, no stop strings,
no logprobs) are detokenized once, when they finish; the text equals the per-step incremental text
and the tokenizer's own decode of the tokens.  Runs on the demo model."""
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.sampling_params import RequestOutputKind

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
PROMPTS = ["hello=", "abc=", "x=", "lorem ipsum="]


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, max_model_len=64, max_num_seqs=8, seed=0)


def _run_engine(llm, params):
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}-{params.output_kind}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[k] for k in sorted(done)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_final_only_text_equals_per_step_text(llm, temperature, monkeypatch):
    calls = []
    decode = llm.llm_engine.detokenizer.decode_sequence_inplace
    monkeypatch.setattr(llm.llm_engine.detokenizer, "decode_sequence_inplace",
                        lambda seq: calls.append(seq.request_id) or decode(seq))
    kw = dict(temperature=temperature, max_tokens=24, ignore_eos=True, seed=7)
    final = _run_engine(llm, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kw))
    final_calls = len(calls)
    per_step = _run_engine(llm, SamplingParams(output_kind=RequestOutputKind.CUMULATIVE, **kw))
    assert final_calls == len(PROMPTS), "FINAL_ONLY requests are decoded once, when they finish"
    assert len(calls) - final_calls == len(PROMPTS) * 24, "streaming requests are decoded every step"
    tok = llm.get_tokenizer()
    for a, b in zip(final, per_step):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].text == tok.decode(a.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_strings_are_still_checked_every_step(llm):
    base = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = base[5:7]
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base[:base.index(stop)] and out.finish_reason == "stop"
