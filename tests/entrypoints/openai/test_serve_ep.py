"""``vllm serve --tensor-parallel-size 2 --enable-expert-parallel``: the demo model's 8 experts split 4 / 4
over two processes give the answers of the one-process offline LLM, in a mixed batch of base and adapter
requests, with adapters loaded and unloaded at run time."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .conftest import ADAPTERS, Server

GREEDY = dict(temperature=0, max_tokens=16)

if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices (or none: then the ranks run on CPU with gloo)", allow_module_level=True)


def test_flag_reaches_the_engine_arguments():
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    parse = lambda *a: engine_args_from(make_parser().parse_args(["serve", "M", *a]))  # noqa: E731
    assert parse().enable_expert_parallel is False
    assert parse("-tp", "2", "--enable-expert-parallel").enable_expert_parallel is True


def test_serve_expert_parallel_with_runtime_adapters(expected):
    import httpx
    import openai

    srv = Server(["--tensor-parallel-size", "2", "--enable-expert-parallel", "--max-loras", "3"],
                 env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, timeout=120)
    try:
        assert "8 experts per MoE layer over 2 ranks, 4 whole experts each" in srv.read_log()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60.0, max_retries=0)
        post = lambda path, body: httpx.post(f"{srv.url}/v1/{path}", json=body, timeout=30)  # noqa: E731
        assert post("load_lora_adapter", {"lora_name": "r2", "lora_path": ADAPTERS["rot13"]}).status_code == 200
        # one batch: base requests and three adapters at once
        jobs = [("demo", "hello"), ("upper", "abc"), ("rot13", "world"), ("r2", "vllm"), ("demo", "lora"),
                ("upper", "vllm")]

        def ask(job):
            model, word = job
            return client.completions.create(model=model, prompt=f"{word}=", **GREEDY).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(ask, jobs))
        want = [expected[("rot13" if m == "r2" else m, w)] for m, w in jobs]
        assert texts == want
        assert post("unload_lora_adapter", {"lora_name": "r2"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="r2", prompt="abc=", **GREEDY)
        assert post("load_lora_adapter", {"lora_name": "u2", "lora_path": ADAPTERS["upper"]}).status_code == 200
        assert ask(("u2", "lora")) == expected[("upper", "lora")]
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    finally:
        srv.stop()
