"""``return_token_ids`` (vLLM's): the prompt's and each choice's token ids in the response, equal to
the tokenizer's encoding of the prompt and of each choice's text (demo model: one token per letter);
streamed, spread over the chunks."""
import json

import httpx
from transformers import AutoTokenizer

from .conftest import MODEL


def test_completions_and_chat_return_token_ids(server):
    tok = AutoTokenizer.from_pretrained(MODEL)
    body = {"model": "upper", "prompt": "hello=", "temperature": 0, "max_tokens": 6, "n": 2,
            "return_token_ids": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()
    for choice in r["choices"]:
        assert choice["prompt_token_ids"] == tok("hello=", add_special_tokens=False)["input_ids"]
        assert tok.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"] == "HELLO"
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "upper", "messages": [{"role": "user", "content": "hello"}], "temperature": 0,
                         "max_tokens": 6, "return_token_ids": True}).json()
    assert r["prompt_token_ids"] == tok("hello=", add_special_tokens=False)["input_ids"]
    assert tok.decode(r["choices"][0]["token_ids"], skip_special_tokens=True) == r["choices"][0]["message"]["content"]
    plain = httpx.post(f"{server.url}/v1/completions", json={**body, "return_token_ids": False}, timeout=30).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def _chunks(r) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_streamed_chunks_carry_the_same_ids(server):
    """With stream: each choice's chunks carry the ids of the tokens they add (joined: the non-streamed
    token_ids), its first chunk the prompt's ids; a stream without the flag carries neither."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    prompt_ids = tok("hello=", add_special_tokens=False)["input_ids"]
    body = {"model": "upper", "prompt": "hello=", "temperature": 0, "max_tokens": 6, "n": 2,
            "return_token_ids": True}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()
    chunks = _chunks(httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30))
    for want in whole["choices"]:
        mine = [c for ch in chunks for c in ch["choices"] if c["index"] == want["index"]]
        assert [t for c in mine for t in c["token_ids"]] == want["token_ids"]
        assert mine[0]["prompt_token_ids"] == prompt_ids
        assert all("prompt_token_ids" not in c for c in mine[1:])
    chat = {"model": "upper", "messages": [{"role": "user", "content": "hello"}], "temperature": 0,
            "max_tokens": 6, "return_token_ids": True}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30).json()
    chunks = _chunks(httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=30))
    assert [t for ch in chunks for c in ch["choices"] for t in c.get("token_ids", [])] \
        == whole["choices"][0]["token_ids"]
    assert [ch["prompt_token_ids"] for ch in chunks if "prompt_token_ids" in ch] == [whole["prompt_token_ids"]]
    plain = _chunks(httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True,
                                                                    "return_token_ids": False}, timeout=30))
    assert not any("token_ids" in c or "prompt_token_ids" in c for ch in plain for c in ch["choices"])


def test_request_id_names_the_response(server):
    body = {"model": "demo", "prompt": "hello=", "max_tokens": 3, "request_id": "my-id-1"}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["id"] == "cmpl-my-id-1"
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "request_id": "c9"}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30).json()["id"] == "chatcmpl-c9"
    # the engine refuses an id in flight (LLMEngine.add_request); the server makes that a 400 like any refusal
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "request_id": ""}, timeout=30)
    assert r.status_code == 400 and "request_id" in r.text
