"""Structured output on the real ``vllm serve`` with the ``openai`` client: response_format (json_object,
json_schema), vLLM's guided_regex / guided_choice / guided_grammar / structured_outputs, two adapters each
with its own grammar in one batch, and bad constraints refused (400) while the other requests succeed.

The demo model writes letters and '=' only: regex / choice / grammar run there, with its adapters. JSON
runs on a second server with a tiny random model whose character tokenizer has printable ASCII."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import Server

GREEDY = dict(temperature=0, max_tokens=16)
CONV = [{"role": "user", "content": "hello"}]


def _bad_request(fn):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        fn()
    return e.value


def test_guided_regex_and_choice_completions_and_chat(client):
    r = client.completions.create(model="upper", prompt="hello=", **GREEDY, extra_body={"guided_regex": "[A-E]{2,4}"})
    assert re.fullmatch("[A-E]{2,4}", r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(model="demo", messages=CONV, **GREEDY,
                                       extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].message.content in ("yes", "no", "maybe") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="rot13", prompt="hello=", **GREEDY,
                                  extra_body={"structured_outputs": {"regex": "[a-z]+"}})
    assert r.choices[0].text == "uryyb"  # the adapter's answer, which the grammar allows
    r = client.completions.create(model="demo", prompt="abc=", temperature=1.0, n=4, seed=5, max_tokens=20,
                                  extra_body={"guided_grammar": 'start: WORD "=" WORD\nWORD: /[a-c]{1,4}/'})
    assert all(re.fullmatch("[a-c]{1,4}=[a-c]{1,4}", c.text) for c in r.choices), [c.text for c in r.choices]


def test_streamed_output_follows_the_grammar(client):
    stream = client.chat.completions.create(model="upper", messages=CONV, stream=True, **GREEDY,
                                            extra_body={"guided_regex": "[H-L]+=[a-c]"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert re.fullmatch("[H-L]+=[a-c]", text), text


def test_two_adapters_own_grammars_one_batch_and_a_bad_schema(client):
    """Sent together (the engine batches them): each keeps its adapter and its grammar; the bad ones get
    400s that say what is wrong, and the others succeed."""
    def good(model, regex, expected):
        r = client.completions.create(model=model, prompt="hello=", **GREEDY, extra_body={"guided_regex": regex})
        text = r.choices[0].text
        assert re.fullmatch(regex, text) and (expected is None or text == expected), (model, regex, text)
        return text

    def bad_schema():
        return _bad_request(lambda: client.chat.completions.create(
            model="upper", messages=CONV, **GREEDY,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}))

    def bad_regex():
        return _bad_request(lambda: client.completions.create(model="rot13", prompt="hello=", **GREEDY,
                                                               extra_body={"guided_regex": "(unclosed"}))

    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(good, "upper", "[A-Z]+", "HELLO"), pool.submit(good, "rot13", "[a-z]+", "uryyb"),
                pool.submit(bad_schema), pool.submit(good, "upper", "[a-h]{3}", None),
                pool.submit(bad_regex), pool.submit(good, "rot13", "[A-Z]{1,3}", None),
                pool.submit(good, "demo", "[a-z]+", "hello")]
        results = [j.result() for j in jobs]
    assert "invalid json" in str(results[2]) and "nonsense" in str(results[2])
    assert "invalid regex" in str(results[4])


def test_refusals_name_the_field(client):
    e = _bad_request(lambda: client.completions.create(model="demo", prompt="a", **GREEDY,
                                                       extra_body={"guided_regex": "a+", "guided_choice": ["a"]}))
    assert e.body["param"] == "guided_choice" and "one structured-output constraint" in e.body["message"]
    e = _bad_request(lambda: client.chat.completions.create(model="demo", messages=CONV, **GREEDY,
                                                            response_format={"type": "xml"}))
    assert e.body["param"] == "response_format"
    # the demo vocabulary has no '{': JSON cannot even start
    e = _bad_request(lambda: client.chat.completions.create(model="demo", messages=CONV, **GREEDY,
                                                            response_format={"type": "json_object"}))
    assert "no token of this model's vocabulary" in e.body["message"]
    e = _bad_request(lambda: client.chat.completions.create(
        model="demo", messages=CONV, **GREEDY, tools=[{"type": "function", "function": {"name": "f"}}]))
    assert e.body["param"] == "tools" and "not supported" in e.body["message"]
    r = client.completions.create(model="upper", prompt="hello=", **GREEDY,
                                  extra_body={"response_format": {"type": "text"}})
    assert r.choices[0].text == "HELLO"


def test_grammar_dead_end_mid_output_is_a_400_and_others_go_on(client):
    """'a' then a digit: the demo vocabulary has no digits, so the grammar dead-ends after one token.
    That is the client's constraint, not a server fault: a 400 saying so; the server keeps serving."""
    e = _bad_request(lambda: client.completions.create(model="demo", prompt="hello=", **GREEDY,
                                                       extra_body={"guided_regex": "a[0-9]"}))
    assert "grammar" in e.body["message"] and "vocabulary" in e.body["message"], e.body
    r = client.completions.create(model="upper", prompt="hello=", **GREEDY)
    assert r.choices[0].text == "HELLO"


# ---- JSON on a model whose vocabulary can write it ------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}
NO_SPACE = {"32": -100, "10": -100}  # a junk model would pad JSON with whitespace until max_tokens


@pytest.fixture(scope="module")
def ascii_client(tmp_path_factory):
    import openai

    from tests.entrypoints.tiny_models import tiny_model_dir

    path, _, _ = tiny_model_dir("qwen3_moe", tmp_path_factory.mktemp("ascii_model"))
    srv = Server(model=path, base_args=["--max-model-len", "128"])
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60.0, max_retries=0)
    srv.stop()


def _check(value: dict) -> None:
    assert set(value) == {"name", "ok", "n"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["ok"], bool) and isinstance(value["n"], int) and 0 <= value["n"] <= 99


def test_response_format_json_schema_and_json_object(ascii_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}
    r = ascii_client.chat.completions.create(model="demo", messages=CONV, temperature=1.0, seed=2, n=3,
                                             max_tokens=100, logit_bias=NO_SPACE, response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        _check(json.loads(c.message.content))
    r = ascii_client.completions.create(model="demo", prompt="{", temperature=0.7, seed=4, max_tokens=100,
                                        logit_bias=NO_SPACE, extra_body={"guided_json": SCHEMA})
    _check(json.loads(r.choices[0].text))
    r = ascii_client.chat.completions.create(
        model="demo", messages=CONV, temperature=0.7, seed=9, max_tokens=100, logit_bias=NO_SPACE,
        extra_body={"structured_outputs": {"json_object": True, "disable_any_whitespace": True}})
    if r.choices[0].finish_reason == "stop":  # any object: the junk model may write one long string
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = ascii_client.chat.completions.create(model="demo", messages=CONV, temperature=0, max_tokens=40,
                                             response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
