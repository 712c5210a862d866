"""``/tokenize``, ``/detokenize``, ``/ping`` and ``max_model_len`` on every ``/v1/models`` card, on the
real server; token ids compared with the tokenizer loaded independently by transformers."""
import random

import pytest

from .conftest import MODEL, httpx


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def _post(server, route, body):
    return httpx.post(f"{server.url}{route}", json=body, timeout=10)


@pytest.mark.parametrize("seed", range(3))
def test_tokenize_prompt_matches_transformers(server, hf_tok, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("abcdefghij=XYZ \n") for _ in range(rng.randrange(1, 40)))
    for special in (True, False):
        for model in ("demo", "upper"):
            r = _post(server, "/tokenize", {"model": model, "prompt": text, "add_special_tokens": special})
            assert r.status_code == 200, r.text
            body = r.json()
            want = hf_tok.encode(text, add_special_tokens=special)
            assert body["tokens"] == want and body["count"] == len(want)
            assert body["max_model_len"] == 64
    r = _post(server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert r.json()["token_strs"] == hf_tok.convert_ids_to_tokens(hf_tok.encode(text))


def test_tokenize_messages_renders_the_chat_template(server, hf_tok):
    msgs = [{"role": "user", "content": "hello"}]
    r = _post(server, "/tokenize", {"model": "demo", "messages": msgs})
    assert r.status_code == 200, r.text
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == hf_tok.encode(text, add_special_tokens=False)


def test_detokenize_round_trip(server, hf_tok):
    ids = hf_tok.encode("hello=world", add_special_tokens=False)
    r = _post(server, "/detokenize", {"model": "rot13", "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": hf_tok.decode(ids)}


def test_bad_tokenize_requests(server):
    vocab = httpx.post(f"{server.url}/tokenize", json={"prompt": "a"}).json()  # server answers
    assert vocab["count"] >= 1
    r = _post(server, "/detokenize", {"tokens": [1, 10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert "tokens[1]" in r.json()["error"]["message"] and "vocabulary" in r.json()["error"]["message"]
    r = _post(server, "/detokenize", {"tokens": [-1]})
    assert r.status_code == 400
    r = _post(server, "/tokenize", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = _post(server, "/tokenize", {"model": "demo"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving


def test_ping_and_model_cards(server, client):
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert httpx.post(f"{server.url}/ping").status_code == 200
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {c["id"] for c in cards} == {"demo", "upper", "rot13"}
    assert all(c["max_model_len"] == 64 for c in cards), cards


def test_unknown_fields_are_logged(server):
    r = _post(server, "/tokenize", {"prompt": "a", "zzz_unknown_tok": 1})
    assert r.status_code == 200
    r = _post(server, "/detokenize", {"tokens": [1], "zzz_unknown_detok": 1})
    assert r.status_code == 200
    import time
    time.sleep(0.3)
    log = server.read_log()
    assert "zzz_unknown_tok" in log and "zzz_unknown_detok" in log
