"""The real ``vllm serve`` driven by the openai client: outputs equal the offline LLM's."""
import asyncio

import pytest

from .conftest import ADAPTERS, Server, sample

MODELS = ["demo", "upper", "rot13"]
WORDS = ["hello", "world", "abc"]
GREEDY = dict(temperature=0, max_tokens=16)


def test_offline_reference(expected):
    assert expected[("demo", "hello")] == "hello"
    assert expected[("upper", "hello")] == "HELLO"
    assert expected[("rot13", "hello")] == "uryyb"


def test_models_lists_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"demo", "upper", "rot13"}
    assert cards["upper"].parent == "demo" and cards["rot13"].parent == "demo"
    assert getattr(cards["demo"], "parent", None) is None


@pytest.mark.parametrize("model", MODELS)
def test_completions(client, expected, model):
    out = client.completions.create(model=model, prompt=[f"{w}=" for w in WORDS], **GREEDY)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [expected[(model, w)] for w in WORDS]
    assert all(c.finish_reason == "stop" for c in out.choices)
    assert out.usage.prompt_tokens == sum(len(w) + 1 for w in WORDS)
    assert out.usage.completion_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_completions_stream(client, expected, model):
    text, finish, usage = "", None, None
    for chunk in client.completions.create(model=model, prompt="world=", stream=True,
                                           stream_options={"include_usage": True}, **GREEDY):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == expected[(model, "world")] and finish == "stop"
    assert usage.prompt_tokens == 6 and usage.completion_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_chat(client, expected, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], **GREEDY)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected[(model, "hello")]
    assert out.usage.prompt_tokens == 6


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream(client, expected, model):
    text = ""
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "abc"}],
                                                stream=True, **GREEDY):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == expected[(model, "abc")]


def test_n_stop_seed_ignore_eos(client, expected):
    out = client.completions.create(model="upper", prompt="hello=", n=3, temperature=0, max_tokens=16)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text == "HELLO" for c in out.choices)
    out = client.completions.create(model="upper", prompt="hello=", stop=["L"], **GREEDY)
    assert out.choices[0].text == "HE" and out.choices[0].finish_reason == "stop"
    out = client.completions.create(prompt="hello=", temperature=0, max_tokens=10,
                                    model="demo", extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 10
    a = client.completions.create(model="demo", prompt="abc=", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    b = client.completions.create(model="demo", prompt="abc=", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    assert a.choices[0].text == b.choices[0].text


def _ok(client):
    assert client.completions.create(model="rot13", prompt="hello=", **GREEDY).choices[0].text == "uryyb"


def test_errors_keep_the_server_up(client, server):
    import httpx
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hello=", **GREEDY)
    assert e.value.status_code == 404
    _ok(client)
    for bad in [dict(temperature=-1), dict(top_p=2.0), dict(max_tokens=0), dict(n=0)]:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="demo", prompt="hello=", **{**GREEDY, **bad})
        _ok(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="a" * 100, **GREEDY)
    assert "max_model_len" in str(e.value)
    _ok(client)
    with pytest.raises(openai.BadRequestError):  # missing messages, a pydantic error: 400 not 422
        client.chat.completions.create(model="demo", messages=[], **GREEDY)
    _ok(client)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo"}, timeout=10)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    _ok(client)


def test_health_version_metrics(server):
    import httpx

    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/version", timeout=5).json()["version"]
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    assert sample(server.url, "vllm:lora_adapters_loaded") == 2
    assert sample(server.url, "vllm:request_success_total", finished_reason="stop") >= 0


def test_runtime_load_unload(client, server):
    import httpx
    import openai

    post = lambda path, body: httpx.post(f"{server.url}/v1/{path}", json=body, timeout=30)  # noqa: E731
    r = post("load_lora_adapter", {"lora_name": "broken", "lora_path": "/nonexistent/adapter"})
    assert r.status_code == 400 and "error" in r.json()
    _ok(client)
    assert post("load_lora_adapter", {"lora_name": "upper2", "lora_path": ADAPTERS["upper"]}).status_code == 200
    assert client.completions.create(model="upper2", prompt="hello=", **GREEDY).choices[0].text == "HELLO"
    assert post("unload_lora_adapter", {"lora_name": "upper2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="upper2", prompt="hello=", **GREEDY)
    assert post("unload_lora_adapter", {"lora_name": "upper2"}).status_code == 404
    _ok(client)


def test_concurrent_streams(server, expected):
    import openai

    async def one(client, model, word):
        text = ""
        stream = await client.completions.create(model=model, prompt=f"{word}=", stream=True, **GREEDY)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
        return model, word, text

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=30.0, max_retries=0)
        jobs = [one(client, MODELS[i % 3], ["hello", "world", "abc", "vllm", "lora"][i % 5]) for i in range(16)]
        return await asyncio.wait_for(asyncio.gather(*jobs), 40)

    for model, word, text in asyncio.run(main()):
        assert text == expected[(model, word)], (model, word)


def test_api_key_and_disabled_runtime_updates():
    import httpx
    import openai

    srv = Server(["--api-key", "sekret"], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})
    try:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", timeout=30.0, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="demo", prompt="hello=", **GREEDY)
        r = httpx.get(f"{srv.url}/v1/models", timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", timeout=30.0, max_retries=0)
        _ok(good)
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", headers={"Authorization": "Bearer sekret"},
                       json={"lora_name": "u2", "lora_path": ADAPTERS["upper"]}, timeout=10)
        assert 400 <= r.status_code < 500 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]
        _ok(good)
    finally:
        srv.stop()


def test_client_disconnect_aborts(server, client):
    import time

    import httpx

    def aborted() -> int:
        return int(sample(server.url, "vllm:request_aborted_total"))

    before = aborted()
    body = {"model": "demo", "prompt": ["hello=", "world="], "n": 64, "max_tokens": 50, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while aborted() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() >= before + 1
    _ok(client)


def test_serve_flags_reach_the_engine_arguments():
    """Every engine flag of ``vllm serve`` lands in EngineArgs; defaults equal EngineArgs' own."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    parse = lambda *a: engine_args_from(make_parser().parse_args(["serve", "M", *a]))  # noqa: E731
    defaults = parse()
    for f in dataclasses.fields(EngineArgs):
        if f.name not in ("model", "moe_backend", "usage_context"):  # the backend: VLLM_FUSED_MOE_BACKEND
            assert getattr(defaults, f.name) == f.default, f.name
    assert defaults.usage_context == "openai_api_server"  # not a flag: the server says who builds the engine
    got = parse("--tokenizer", "T", "--gpu-memory-utilization", "0.5", "--max-num-batched-tokens", "512",
                "--block-size", "32", "-tp", "2", "--fully-sharded-loras", "--enable-lora", "--max-loras", "3",
                "--max-lora-rank", "64", "--max-cpu-loras", "5", "--max-model-len", "99", "--max-num-seqs", "7",
                "--dtype", "float16", "--seed", "3", "--trust-remote-code", "--enforce-eager",
                "--enable-expert-parallel", "--cuda-graph-sizes", "1", "8")
    assert (got.tokenizer, got.gpu_memory_utilization, got.max_num_batched_tokens, got.block_size) == \
        ("T", 0.5, 512, 32)
    assert (got.tensor_parallel_size, got.fully_sharded_loras, got.enable_lora, got.max_loras) == (2, True, True, 3)
    assert (got.max_lora_rank, got.max_cpu_loras, got.max_model_len, got.max_num_seqs) == (64, 5, 99, 7)
    assert (got.dtype, got.seed, got.trust_remote_code) == ("float16", 3, True)
    assert (got.enforce_eager, got.enable_expert_parallel, got.cuda_graph_sizes) == (True, True, [1, 8])
