"""``vllm serve --tensor-parallel-size 2``: the same answers as the offline LLM (one rank), and the
worker process goes away with the server."""
import time

import pytest
import torch

from tests.utils import child_processes, process_running

from .conftest import ADAPTERS, Server

GREEDY = dict(temperature=0, max_tokens=16)

if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices (or none: then the ranks run on CPU with gloo)", allow_module_level=True)


def test_serve_with_two_ranks(expected):
    import httpx
    import openai

    srv = Server(["--tensor-parallel-size", "2", "--fully-sharded-loras"], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, timeout=120)
    try:
        assert "tensor_parallel_size=2" in srv.read_log()
        workers = child_processes(srv.proc.pid)
        assert workers, "expected a worker process for rank 1"
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60.0, max_retries=0)
        for model in ("demo", "upper", "rot13"):
            out = client.completions.create(model=model, prompt=["hello=", "abc="], **GREEDY)
            assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == \
                [expected[(model, "hello")], expected[(model, "abc")]]
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="upper", messages=[{"role": "user", "content": "world"}], stream=True, **GREEDY) if c.choices)
        assert text == expected[("upper", "world")]
        post = lambda path, body: httpx.post(f"{srv.url}/v1/{path}", json=body, timeout=30)  # noqa: E731
        assert post("load_lora_adapter", {"lora_name": "broken", "lora_path": "/nonexistent"}).status_code == 400
        assert post("load_lora_adapter", {"lora_name": "r2", "lora_path": ADAPTERS["rot13"]}).status_code == 200
        assert client.completions.create(model="r2", prompt="vllm=", **GREEDY).choices[0].text == \
            expected[("rot13", "vllm")]
        assert post("unload_lora_adapter", {"lora_name": "r2"}).status_code == 200
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    finally:
        srv.stop()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(process_running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if process_running(w)]
    assert not alive, f"worker process(es) {alive} outlived the server"

