"""Hostile input on the real ``vllm serve``: every bad value is an OpenAI-shaped 400 naming the
field (never a 500), and the server keeps answering good requests correctly after each."""
import json

import pytest

from .test_serve_fields import CONV, GREEDY, _ok, chat, completion, post, refused

INF, NAN = float("inf"), float("nan")
SURROGATE = "hel\ud800lo="


@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty", "presence_penalty",
                                   "repetition_penalty", "min_p"])
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_non_finite_floats_are_refused(server, field, value):
    assert "finite" in refused(completion(server, **{field: value}), field)
    assert "finite" in refused(chat(server, **{field: value}), field)


def test_non_finite_logit_bias_and_server_still_serves(server):
    refused(completion(server, logit_bias={"5": NAN}), "logit_bias")
    _ok(server)


@pytest.mark.parametrize("text", [5, None, ["hello"], {"t": 1}])
def test_chat_text_part_that_is_not_a_string(server, text):
    msg = refused(chat(server, messages=[{"role": "user", "content": [{"type": "text", "text": text}]}]), "messages")
    assert "'text' must be a string" in msg
    _ok(server)


def test_chat_content_parts(server, expected):
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    r = chat(server, messages=[{"role": "user", "content": parts}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[("upper", "hello")]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    assert "only 'text' parts" in refused(chat(server, messages=[{"role": "user", "content": [image]}]), "messages")
    for bad in ([5], [{"text": "hello"}], "hi", [{"content": "x"}], [{"role": 5, "content": "x"}]):
        refused(chat(server, messages=bad), "messages")
    _ok(server)


@pytest.mark.parametrize("where", ["prompt", "prompt_list", "stop", "model", "user", "suffix"])
def test_lone_surrogates_in_completions(server, where):
    body = {"prompt": {"prompt": SURROGATE}, "prompt_list": {"prompt": ["hello=", SURROGATE]},
            "stop": {"stop": ["x", "\udfff"]}, "model": {"model": "\ud800"}, "user": {"user": "\ud800"},
            "suffix": {"suffix": "\ud800"}}[where]
    param = "prompt" if where.startswith("prompt") else where
    assert "lone surrogate" in refused(completion(server, **body), param)
    _ok(server)


@pytest.mark.parametrize("messages", [[{"role": "user", "content": SURROGATE}],
                                      [{"role": "\ud800", "content": "hello"}],
                                      [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]])
def test_lone_surrogates_in_chat(server, messages):
    assert "lone surrogate" in refused(chat(server, messages=messages), "messages")
    _ok(server)


def test_unknown_model_names_are_404s_that_encode(server):
    import httpx

    r = completion(server, model="no-such-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post(server, "unload_lora_adapter", {"lora_name": "\ud800"})
    assert r.status_code in (400, 404) and json.loads(r.text)["error"]["param"] == "lora_name"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


HUGE = 10 ** 30


@pytest.mark.parametrize("fields,param", [
    ({"n": HUGE}, "n"), ({"max_tokens": HUGE}, "max_tokens"), ({"logprobs": HUGE}, "logprobs"),
    ({"seed": 2 ** 64}, "seed"), ({"seed": -2 ** 63 - 1}, "seed"), ({"top_k": 2 ** 63}, "top_k"),
    ({"top_k": -2}, "top_k"), ({"min_tokens": HUGE}, "min_tokens"), ({"stop_token_ids": [2 ** 64]}, "stop_token_ids"),
    ({"stop_token_ids": [57], "min_tokens": 1, "temperature": 1}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"prompt": [[HUGE]]}, "prompt"), ({"prompt": [57]}, "prompt"),
    ({"prompt": [-1]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"best_of": HUGE}, "best_of"),
    ({"n": "x"}, "n"), ({"temperature": "hot"}, "temperature"), ({"prompt": 5}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"), ({"prompt": [1, "a"]}, "prompt"), ({"stop": 5}, "stop"),
    ({"stop": [["x"]]}, "stop"), ({"logit_bias": [1]}, "logit_bias"), ({"echo": "sometimes"}, "echo"),
    ({"stream_options": 5, "stream": True}, "stream_options"), ({"model": ["demo"]}, "model"),
])
def test_bad_completion_values(server, fields, param):
    refused(completion(server, **fields), param)


@pytest.mark.parametrize("fields,param", [
    ({"top_logprobs": HUGE, "logprobs": True}, "top_logprobs"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": "x"}, "tools"), ({"messages": {"role": "user"}}, "messages"), ({"messages": []}, "messages"),
    ({"seed": 2 ** 63}, "seed"), ({"n": 0}, "n"),
])
def test_bad_chat_values(server, fields, param):
    refused(chat(server, **fields), param)


def test_valid_extremes_are_served(server):
    """The bounds are not too tight: the largest 64-bit values are fine (top_k >= vocab means all)."""
    for fields in ({"top_k": 2 ** 63 - 1, "seed": 2 ** 63 - 1, "temperature": 1.0},
                   {"seed": -2 ** 63, "temperature": 1.0}, {"top_k": -1}, {"stop_token_ids": [56]}):
        r = completion(server, **fields)
        assert r.status_code == 200, (fields, r.text)
    _ok(server)


def test_malformed_bodies_are_openai_shaped_400s(server):
    import httpx

    def raw(content: bytes):
        return httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)

    r = raw(b'{"model": "demo",\n "prompt": }')
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("BadRequestError", None, 400)
    assert "not valid JSON" in err["message"] and "line 2 column 12" in err["message"], err
    for content in (b'{"model": "demo", "prompt": "x"', b"\xff\xfe{", b'{"prompt": 1' + b"9" * 5000 + b"}",
                    b'[1, 2]', b'"hello"'):
        r = raw(content)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    _ok(server)


def test_the_server_is_healthy_after_all_that(server, client, expected):
    import httpx

    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    out = client.chat.completions.create(model="rot13", messages=CONV, **GREEDY)
    assert out.choices[0].message.content == expected[("rot13", "hello")]
