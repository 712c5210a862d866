"""``return_token_ids`` (vLLM's): the prompt's and each choice's token ids in the response, equal to
the tokenizer's encoding of the prompt and of each choice's text (demo model: one token per letter)."""
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


def test_with_stream_is_a_400_naming_the_field(server):
    r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                   json={"model": "demo", "prompt": "a=", "stream": True, "return_token_ids": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_ids"
