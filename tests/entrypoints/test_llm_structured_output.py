"""Structured output through ``LLM``: every output matches its constraint (checked by ``re.fullmatch``,
``json.loads`` and a fresh llguidance matcher), alongside LoRA (each request its own adapter and its own
grammar in one batch), ``n > 1``, recompute preemption, and bad constraints refused while the engine
keeps serving.

The demo model (letters and '=' only) serves regex / choice / grammar; JSON needs braces and quotes, so
the JSON tests use a tiny random model with a printable-ASCII character tokenizer. Both models' outputs
are junk: the grammar is what makes them valid.
"""
import json
import os
import re

import llguidance
import pytest

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from vllm.structured_output.backend import grammar_text

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
ADAPTERS = {name: LoRARequest(name, i + 1, os.path.join(ROOT, "demo_adapters", name))
            for i, name in enumerate(["upper", "rot13"])}


def _so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def demo():
    return LLM(os.path.join(ROOT, "demo_model"), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64)


def test_mixed_batch_each_adapter_its_own_grammar(demo):
    # (adapter, grammar, what must come out): where grammar and adapter agree the adapter's answer comes
    # out, so each row kept its own adapter; where they disagree the grammar wins.
    # rows without a grammar come first and in between: the mask rows must land on their own rows
    rows = [("upper", None, "HELLO"), ("upper", _so(regex="[A-Z]+"), "HELLO"), ("rot13", _so(regex="[a-z]+"), "uryyb"),
            (None, None, "hello"), (None, _so(regex="[a-z]+"), "hello"), ("upper", _so(regex="[a-e]{2,4}"), None),
            ("rot13", _so(choice=["abc", "uryyb", "zzz"]), "uryyb")]
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=g) for _, g, _ in rows]
    outs = demo.generate(["hello="] * len(rows), params, lora_request=[ADAPTERS.get(a) for a, _, _ in rows],
                         use_tqdm=False)
    for (adapter, grammar, expected), out in zip(rows, outs):
        text = out.outputs[0].text
        if expected is not None:
            assert text == expected, (adapter, grammar, text)
        if grammar is not None and grammar.regex is not None:
            assert re.fullmatch(grammar.regex, text), (grammar.regex, text)
        assert out.outputs[0].finish_reason == "stop"
    assert outs[5].outputs[0].text != "HELLO"  # the constrained upper row: what the adapter alone says


def test_without_a_grammar_the_demo_output_breaks_the_regex(demo):
    """The constraint is what makes the outputs valid (the tests above could not pass by luck)."""
    out = demo.generate(["hello="], SamplingParams(temperature=0, max_tokens=12), lora_request=ADAPTERS["upper"],
                        use_tqdm=False)[0].outputs[0].text
    assert not re.fullmatch("[a-e]{2,4}", out)


def test_n_samples_each_follow_the_grammar_and_the_old_name_works(demo):
    regex = "(ab|cd){1,3}=[A-Z]{1,3}"  # bounded: always completes within max_tokens
    params = SamplingParams(temperature=1.0, n=6, seed=7, max_tokens=20,
                            guided_decoding=GuidedDecodingParams(regex=regex))
    outs = demo.generate(["xyz=", "abc="], params, use_tqdm=False)
    texts = [c.text for o in outs for c in o.outputs]
    assert len(texts) == 12 and all(re.fullmatch(regex, t) for t in texts), texts
    assert len(set(texts)) > 1  # sampled, each with its own matcher


def test_choice_logprobs_are_those_of_the_masked_distribution(demo):
    """vLLM applies the grammar before the sampler computes logprobs: only allowed tokens have finite ones."""
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, structured_outputs=_so(choice=["yes", "no"]))
    c = demo.generate(["hello="], params, use_tqdm=False)[0].outputs[0]
    assert c.text in ("yes", "no")
    first = c.logprobs[0]
    finite = {t for t, lp in first.items() if lp.logprob > float("-inf")}
    assert finite == {29, 18}  # 'y' and 'n'
    assert abs(sum(2.718281828 ** first[t].logprob for t in finite) - 1) < 1e-4


def test_preemption_keeps_every_grammar_in_step(monkeypatch):
    """A KV cache too small for the batch preempts (recompute); each sequence's matcher stays with its tokens,
    so the tokens equal those of a roomy run and match the grammar."""
    # bounded, so that each completes within max_tokens
    regexes = ["[a-z]{6,12}", "(ab|ba){1,3}[A-Z]{2,6}", "[A-M]{1,5}=[n-z]{1,5}", "[a-f]{1,12}", "x[a-z]{7,12}",
               "[ABC]{4,10}"]
    prompts = ["pqrstuvwx=", "lanterns=", "quietzone=", "mangoesjar=", "zebrafinch=", "velocity="]
    params = [SamplingParams(temperature=0, max_tokens=14, structured_outputs=_so(regex=r)) for r in regexes]

    def run(num_blocks: int):
        llm = LLM(os.path.join(ROOT, "demo_model"), max_model_len=64, block_size=4,
                  num_gpu_blocks_override=num_blocks, max_num_seqs=8)
        sched = llm.llm_engine.scheduler
        schedule, preempted = sched.schedule, []

        def recording():
            out = schedule()
            preempted.extend(s.request_id for s in out.preempted_seqs)
            return out

        monkeypatch.setattr(sched, "schedule", recording)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], [o.outputs[0].text for o in outs], preempted

    ref_ids, ref_texts, ref_pre = run(256)
    ids, texts, pre = run(18)
    assert not ref_pre and pre, "the small cache must preempt"
    assert ids == ref_ids
    for r, t in zip(regexes, texts):
        assert re.fullmatch(r, t), (r, t)


def test_bad_constraint_is_refused_and_the_engine_goes_on(demo):
    engine = demo.llm_engine
    engine.add_request("good", "hello=", SamplingParams(temperature=0, max_tokens=10,
                                                        structured_outputs=_so(regex="[a-z]+")))
    for rid, so, match in [("bad-json", _so(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
                            "invalid json"),
                           ("bad-regex", _so(regex="(ab"), "invalid regex"),
                           ("no-braces", _so(json_object=True), "no token of this model's vocabulary")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(rid, "hello=", SamplingParams(structured_outputs=so))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"good"} and done["good"].outputs[0].text == "hello"


# ---- JSON: a tiny random model whose tokenizer has every printable ASCII character --------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}
# whitespace is grammatical in JSON; a junk model would pad with it until max_tokens: bias it away
NO_SPACE = {32: -100.0, 10: -100.0}


@pytest.fixture(scope="module")
def ascii_llm(tmp_path_factory):
    from tests.entrypoints.tiny_models import tiny_model_dir

    path, _, _ = tiny_model_dir("qwen3_moe", tmp_path_factory.mktemp("ascii_model"))
    return LLM(path, max_model_len=128)


def _accepted_by_llguidance(llm: LLM, so: StructuredOutputsParams, token_ids: list[int]) -> bool:
    """The grammar library's own check, on a fresh matcher: the tokens (EOS included) are a complete match."""
    tok = llm.llm_engine.grammars.ll_tokenizer
    m = llguidance.LLMatcher(tok, grammar_text(so), log_level=0)
    return m.consume_tokens(token_ids) and m.is_accepting() and not m.is_error()


def test_json_schema_outputs_validate(ascii_llm):
    so = _so(json=SCHEMA)
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=100, logit_bias=NO_SPACE,
                            structured_outputs=so)
    outs = ascii_llm.generate(["{"], params, use_tqdm=False)[0].outputs
    for c in outs:
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        assert set(value) == {"name", "ok", "n"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
        assert isinstance(value["ok"], bool) and isinstance(value["n"], int) and 0 <= value["n"] <= 99
        assert _accepted_by_llguidance(ascii_llm, so, list(c.token_ids))
    unconstrained = ascii_llm.generate(["{"], SamplingParams(temperature=1.0, seed=3, max_tokens=40),
                                       use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(unconstrained)


@pytest.mark.parametrize("so,check", [
    (_so(json_object=True, disable_any_whitespace=True), lambda t: isinstance(json.loads(t), dict)),
    (_so(grammar='start: "x" ("+" "x")~0..3 "=" NUM\nNUM: /[0-9]{1,3}/'),
     lambda t: re.fullmatch(r"x(\+x){0,3}=\d{1,3}", t)),
    (_so(grammar='root ::= "(" [a-c]+ ")"'), lambda t: re.fullmatch(r"\([a-c]+\)", t)),  # GBNF
    (_so(choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
])
def test_other_constraints_on_ascii(ascii_llm, so, check):
    params = SamplingParams(temperature=0.8, seed=11, n=3, max_tokens=60, logit_bias=NO_SPACE, structured_outputs=so)
    for c in ascii_llm.generate(["go"], params, use_tqdm=False)[0].outputs:
        if so.json_object and c.finish_reason == "length":
            continue  # any object: a junk model may write one long string; the ones that end must parse
        assert c.finish_reason == "stop" and check(c.text), c.text
        assert _accepted_by_llguidance(ascii_llm, so, list(c.token_ids))


def test_a_complete_grammar_ends_the_output_even_with_ignore_eos(demo):
    """EOS is allowed only once the grammar accepts; taking it ends the output (nothing more can match)."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, structured_outputs=_so(regex="ab=[A-C]"))
    c = demo.generate(["abc"], params, use_tqdm=False)[0].outputs[0]
    assert (c.text, c.finish_reason, c.token_ids[-1]) == ("ab=A", "stop", 2)
