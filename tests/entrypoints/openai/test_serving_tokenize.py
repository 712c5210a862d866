"""Prompts are tokenised (and chat templates rendered) in a worker thread, neither on the event loop
nor on the engine thread; the ids equal the tokenizer's own, and no over-length warning is logged."""
import asyncio
import logging
import random
import threading

import pytest

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.entrypoints.openai import serving_chat, serving_engine
from vllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from vllm.entrypoints.openai.serving import APIError, Models, Serving
from vllm.transformers_utils.tokenizer import encode_text, get_tokenizer

from .conftest import MODEL

LONG_WARNING = "Token indices sequence length is longer"


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64))
    yield eng
    eng.shutdown()


@pytest.fixture
def serving(engine):
    return Serving(engine, Models(["demo"], MODEL, 64))


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz=ABC <eos><bos> \n\u00e9\u4e2d!"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("seed", range(3))
def test_encode_text_equals_the_tokenizer(seed, tmp_path):
    from tests.entrypoints.tiny_models import char_tokenizer

    rng = random.Random(seed)
    demo = get_tokenizer(MODEL)
    char_tokenizer().save_pretrained(str(tmp_path))
    char = get_tokenizer(str(tmp_path))
    for tok in (demo, char):
        for _ in range(20):
            text = _random_text(rng, rng.randrange(0, 200))
            for special in (True, False):
                assert encode_text(tok, text, special) == tok.encode(text, add_special_tokens=special), text


def test_encode_text_logs_no_length_warning(caplog):
    """The demo tokenizer says model_max_length 64: its encode warns on 100 tokens, encode_text does not."""
    tok = get_tokenizer(MODEL)
    text = "a" * 100
    with caplog.at_level(logging.WARNING):
        tok.deprecation_warnings.clear()  # transformers warns once per tokenizer
        tok.encode(text)
    assert LONG_WARNING in caplog.text  # the warning this test is about does exist
    caplog.clear()
    tok2 = get_tokenizer(MODEL)
    with caplog.at_level(logging.WARNING):
        ids = encode_text(tok2, text)

        class Slow(type(tok2)):  # a tokenizer whose encode is its own: transformers' path, warning off
            def _encode_plus(self, *a, **kw):
                return super()._encode_plus(*a, **kw)

        tok2.__class__ = Slow
        assert encode_text(tok2, text) == ids == tok.encode(text)
    assert LONG_WARNING not in caplog.text


def _record_threads(monkeypatch, module, name: str) -> list[str]:
    seen: list[str] = []
    real = getattr(module, name)

    def recorded(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, recorded)
    return seen


def test_completion_prompts_are_tokenised_in_a_worker_thread(serving, engine, monkeypatch):
    seen = _record_threads(monkeypatch, serving_engine, "encode_text")
    engine_encodes = _record_threads(monkeypatch, engine.tokenizer, "encode")  # the engine's own path

    async def run():
        loop_thread = threading.current_thread().name
        out = await serving.completions(CompletionRequest(model="demo", prompt=["hello=", "abc="], temperature=0))
        return loop_thread, out

    loop_thread, out = asyncio.run(run())
    assert [c["text"] for c in out["choices"]] == ["hello", "abc"]
    assert len(seen) == 2 and not engine_encodes
    assert all(t not in (loop_thread, "vllm-engine") for t in seen), seen


def test_chat_is_rendered_and_tokenised_in_a_worker_thread(serving, engine, monkeypatch):
    rendered = _record_threads(monkeypatch, engine.tokenizer, "apply_chat_template")
    seen = _record_threads(monkeypatch, serving_chat, "encode_text")

    async def run():
        loop_thread = threading.current_thread().name
        req = ChatCompletionRequest(model="demo", messages=[{"role": "user", "content": "hello"}], temperature=0)
        return loop_thread, await serving.chat(req)

    loop_thread, out = asyncio.run(run())
    assert out["choices"][0]["message"]["content"] == "hello"
    assert len(seen) == 1 and len(rendered) == 1
    assert all(t not in (loop_thread, "vllm-engine") for t in seen + rendered), seen + rendered


@pytest.mark.parametrize("seed", range(3))
def test_chat_prompt_equals_the_tokenized_template(serving, engine, seed):
    """Rendering to text and encoding it without special tokens gives the template's own token ids."""
    rng = random.Random(seed)
    roles = ["system", "user", "assistant"]
    conv = [{"role": rng.choice(roles), "content": _random_text(rng, rng.randrange(0, 30))}
            for _ in range(rng.randrange(1, 5))]
    req = ChatCompletionRequest(model="demo", messages=conv, add_generation_prompt=bool(seed % 2))
    want = engine.tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=bool(seed % 2))
    if hasattr(want, "keys"):
        want = want["input_ids"]
    assert serving._render_chat(req)["prompt_token_ids"] == list(want)


def test_not_found_with_a_lone_surrogate_encodes():
    import json

    with pytest.raises(APIError) as e:
        Models(["demo"], MODEL, 64).resolve("x\ud800")
    assert e.value.status == 404
    body = json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # as the JSON response renders it
    assert b"x\\\\ud800" in body
