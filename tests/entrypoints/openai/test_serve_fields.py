"""Request fields on the real ``vllm serve``: fields the server cannot apply yet are 400s naming the
field (their no-op values are accepted and change nothing), unknown fields are logged as ignored,
and a max_tokens that does not fit the context is a 400 giving both numbers."""
import json
import re

import pytest

from .conftest import MODEL

GREEDY = dict(temperature=0, max_tokens=16)
CONV = [{"role": "user", "content": "hello"}]


def post(server, path: str, body: dict):
    import httpx

    # json.dumps writes NaN / Infinity literals and \ud800 escapes, as a hostile client could
    return httpx.post(f"{server.url}/v1/{path}", content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=30)


def completion(server, **fields):
    return post(server, "completions", {"model": "upper", "prompt": "hello=", **GREEDY, **fields})


def chat(server, **fields):
    return post(server, "chat/completions", {"model": "upper", "messages": CONV, **GREEDY, **fields})


def refused(r, param: str) -> str:
    """The OpenAI-shaped 400 naming ``param``; returns its message."""
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("BadRequestError", param, 400), err
    return err["message"]


def _ok(server) -> None:
    r = completion(server)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HELLO", r.text


# (field, a value the server would have to apply, a no-op value it accepts)
# (penalties, min_p, logit_bias, allowed_token_ids and bad_words are applied: test_serve_sampling.py)
# (structured output - response_format, guided_*, structured_outputs - is applied: test_serve_structured.py)
BOTH = [("best_of", 2, 1), ("use_beam_search", True, False), ("guided_whitespace_pattern", " *", None)]
COMPLETION_ONLY = [("suffix", "!", ""), ("add_special_tokens", False, True)]
CHAT_ONLY = [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], []),
             ("tool_choice", "required", "none"), ("tool_choice", {"type": "function", "function": {"name": "f"}},
                                                   "auto"),
             ("functions", [{"name": "f", "parameters": {}}], []), ("echo", True, False)]


@pytest.mark.parametrize("field,value,_", BOTH + COMPLETION_ONLY)
def test_completions_refuse_fields_they_cannot_apply(server, field, value, _):
    msg = refused(completion(server, **{field: value}), field)
    assert field in msg and "not supported" in msg


@pytest.mark.parametrize("field,value,_", BOTH + CHAT_ONLY)
def test_chat_refuses_fields_it_cannot_apply(server, field, value, _):
    msg = refused(chat(server, **{field: value}), field)
    assert field in msg and "not supported" in msg


def test_no_op_values_are_accepted_and_change_nothing(server, expected):
    r = completion(server, **{f: noop for f, _, noop in BOTH + COMPLETION_ONLY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected[("upper", "hello")]
    r = chat(server, **{f: noop for f, _, noop in BOTH + CHAT_ONLY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected[("upper", "hello")]
    r = chat(server, n=2, best_of=2, tool_choice="auto", parallel_tool_calls=True)  # no tools: auto chooses none
    assert r.status_code == 200 and [c["message"]["content"] for c in r.json()["choices"]] == ["HELLO"] * 2


def test_best_of_other_than_n_and_stream_options_without_stream(server):
    refused(completion(server, n=2, best_of=3), "best_of")
    refused(completion(server, n=2, best_of=1), "best_of")
    refused(completion(server, stream_options={"include_usage": True}), "stream_options")
    _ok(server)


def test_unknown_fields_are_logged_once_per_request(server, expected):
    body = {"model": "upper", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello",
                                                                           "cache": 1}], "name": "bob"}],
            "some_future_field": 1, "\u00e9t\u00e9": 2, "stream_options": {"include_usage": True, "extra_knob": 1},
            "stream": True, **GREEDY}
    r = post(server, "chat/completions", body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "HELLO"
    rid = chunks[0]["id"]
    lines = [line for line in server.read_log().splitlines() if rid in line and "ignored" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING"), lines
    for name in ("'some_future_field'", "'\u00e9t\u00e9'", "'stream_options.extra_knob'", "'messages[0].name'",
                 "'messages[0].content[0].cache'"):
        assert name in lines[0], (name, lines[0])
    r = completion(server, **{"f\ud800": 1})  # a field name that is not valid Unicode: refused
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    r = completion(server)  # a request without unknown fields logs nothing of the kind
    assert r.status_code == 200
    assert not [line for line in server.read_log().splitlines() if r.json()["id"] in line and "ignored" in line]


def test_known_sampling_extras_are_applied(server):
    """include_stop_str_in_output and skip_special_tokens reach the engine (vs the offline LLM)."""
    from vllm import LLM, SamplingParams

    r = completion(server, stop=["L"], include_stop_str_in_output=True)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HEL", r.text
    params = dict(temperature=0, max_tokens=10, ignore_eos=True, skip_special_tokens=False)
    offline = LLM(MODEL, max_model_len=64).generate("hello=", SamplingParams(**params), use_tqdm=False)
    want = offline[0].outputs[0].text
    assert "<eos>" in want  # the test means something: the special token shows
    r = post(server, "completions", {"model": "demo", "prompt": "hello=", **params})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text


def _too_large(msg: str, field: str, value: int, n_prompt: int) -> None:
    assert msg.startswith(f"{field} is too large: {value}."), msg
    assert f"maximum context length is 64 tokens and your request has {n_prompt} input tokens" in msg
    assert f"({value} > 64 - {n_prompt})" in msg


def test_max_tokens_that_does_not_fit_is_a_400_with_both_numbers(server):
    _too_large(refused(completion(server, max_tokens=59), "max_tokens"), "max_tokens", 59, 6)
    r = completion(server, max_tokens=58, ignore_eos=True)  # exactly fits
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 58
    # every prompt of a batch: the second one is the one that does not fit
    msg = refused(completion(server, prompt=["hello=", "a" * 40 + "="], max_tokens=30), "max_tokens")
    _too_large(msg, "max_tokens", 30, 41)
    # chat: the conversation is 6 tokens with the demo template
    _too_large(refused(chat(server, max_tokens=60), "max_tokens"), "max_tokens", 60, 6)
    msg = refused(chat(server, max_tokens=None, max_completion_tokens=10 ** 30), "max_completion_tokens")
    _too_large(msg, "max_completion_tokens", 10 ** 30, 6)
    _ok(server)


def test_unset_max_tokens_takes_what_fits(server):
    # completions' default (16) is cut to the room left; chat without a limit gets all of it
    r = completion(server, prompt="a" * 60 + "=", max_tokens=None, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 - 61
    r = post(server, "completions", {"model": "demo", "prompt": "a" * 54 + "=", "ignore_eos": True,
                                     "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 - 55
    r = post(server, "chat/completions", {"model": "demo", "messages": CONV, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 - 6
    msg = refused(completion(server, prompt="a" * 100), "prompt")
    assert "max_model_len" in msg and re.search(r"\b100 tokens\b", msg)
    # the 400 answers it: transformers' "sequence length is longer than..." warning is not logged
    assert "Token indices sequence length" not in server.read_log()
