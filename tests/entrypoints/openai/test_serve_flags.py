"""vLLM's ``vllm serve`` flags: --lora-modules in JSON, --max-logprobs, CORS (--allowed-origins ...),
--root-path, --uvicorn-log-level, --moe-backend, --kv-cache-dtype, --lora-dtype, --enable-log-requests;
on the real server, and the refusals at start-up."""
import json
import subprocess
import sys

import pytest

from .conftest import ADAPTERS, MODEL, REPO, Server, httpx

ORIGIN = "http://app.example"
FLAGS = ["--lora-modules", json.dumps({"name": "up2", "path": ADAPTERS["upper"], "base_model_name": "demo"}),
         "--max-logprobs", "2", "--root-path", "/api", "--allowed-origins", json.dumps([ORIGIN]),
         "--allowed-methods", '["GET", "POST"]', "--uvicorn-log-level", "info", "--moe-backend", "torch",
         "--kv-cache-dtype", "auto", "--lora-dtype", "auto", "--enable-log-requests"]


def _parse(*args):
    from vllm.entrypoints.cli import make_parser

    return make_parser().parse_args(["serve", "M", *args])


def test_lora_modules_both_forms_parse():
    args = _parse("--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}',
                  "--lora-modules", '{"name": "c", "path": "/z"}')
    assert [tuple(m) for m in args.lora_modules] == [("a", "/x", None), ("b", "/y", "m"), ("c", "/z", None)]


@pytest.mark.parametrize("bad, words", [
    (["--lora-modules", '{"name": "b"}'], "path"),
    (["--lora-modules", '{"name": "b", "path": "/y", "base": 1}'], "unknown key"),
    (["--lora-modules", "{not json"], "not valid JSON"),
    (["--kv-cache-dtype", "fp8"], "fp8"),
    (["--max-logprobs", "21"], "between 0 and 20"),
    (["--allowed-origins", "*"], "JSON list"),
    (["--disable-log-requests", "--enable-log-requests"], "not allowed with"),
])
def test_bad_flags_are_refused_with_a_reason(bad, words, capsys):
    with pytest.raises(SystemExit):
        _parse(*bad)
    assert words in capsys.readouterr().err


def test_moe_backend_reaches_the_engine():
    from vllm.entrypoints.openai.api_server import engine_args_from

    assert engine_args_from(_parse("--moe-backend", "torch")).moe_backend == "torch"
    assert engine_args_from(_parse()).moe_backend is None


@pytest.fixture(scope="module")
def flagged():
    srv = Server(FLAGS)
    yield srv
    srv.stop()


def test_json_lora_module_is_served(flagged):
    cards = {c["id"]: c for c in httpx.get(f"{flagged.url}/v1/models").json()["data"]}
    assert cards["up2"]["parent"] == "demo" and cards["up2"]["max_model_len"] == 64
    outs = [httpx.post(f"{flagged.url}/v1/completions", timeout=30, json={
        "model": m, "prompt": "hello=", "temperature": 0, "max_tokens": 8}).json()["choices"][0]["text"]
        for m in ("up2", "upper")]
    assert outs[0] == outs[1] == "HELLO"


def test_max_logprobs_caps_requests(flagged):
    url = f"{flagged.url}/v1"
    ok = httpx.post(f"{url}/completions", json={"model": "demo", "prompt": "a=", "max_tokens": 2, "logprobs": 2})
    assert ok.status_code == 200, ok.text
    r = httpx.post(f"{url}/completions", json={"model": "demo", "prompt": "a=", "max_tokens": 2, "logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "2" in r.json()["error"]["message"] and "--max-logprobs" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "a"}],
                                                     "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_cors(flagged):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{flagged.url}/v1/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{flagged.url}/v1/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{flagged.url}/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_root_path_and_uvicorn_log_level(flagged):
    spec = httpx.get(f"{flagged.url}/openapi.json").json()
    assert spec["servers"] == [{"url": "/api"}]
    httpx.get(f"{flagged.url}/version")
    assert '"GET /version HTTP/1.1" 200' in flagged.read_log()  # uvicorn's access log, on at info


def _start(*args):
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli", "serve", MODEL, "--host", "127.0.0.1", "--port", "0",
           "--max-model-len", "64", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_start_up_refusals():
    out = _start("--enable-lora", "--lora-modules",
                 json.dumps({"name": "u", "path": ADAPTERS["upper"], "base_model_name": "other"}))
    assert out.returncode == 1 and "base_model_name 'other' is not a served model name" in out.stderr + out.stdout
    out = _start("--dtype", "float32", "--enable-lora", "--lora-dtype", "bfloat16")
    assert out.returncode == 1 and "--lora-dtype bfloat16 is not supported" in out.stderr + out.stdout
