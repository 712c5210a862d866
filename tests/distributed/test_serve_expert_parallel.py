"""``vllm serve --tensor-parallel-size 2 --enable-expert-parallel`` for each of the four architectures:
a concurrent mixed batch of base requests and 3 adapters gives the greedy tokens of transformers + peft
(and so of the one-process engine, which test_expert_parallel.py checks against them), and an adapter
loaded at run time serves, then 404s once unloaded. Two processes with gloo on CPU."""
from concurrent.futures import ThreadPoolExecutor

from tests.distributed.test_expert_parallel import BATCH, WHICH, setup  # noqa: F401  (fixture)
from tests.distributed.test_tensor_parallel import GREEDY

# a plain import: without the server packages it skips, or fails in CI (see that conftest's require)
from tests.entrypoints.openai import conftest as openai_conftest  # noqa: E402


def test_serve_expert_parallel_matches_peft(setup):  # noqa: F811
    import httpx

    m = setup
    modules = [f"a{i}={m.requests[i].lora_path}" for i in range(3)]
    srv = openai_conftest.Server(
        ["--tensor-parallel-size", "2", "--enable-expert-parallel"], timeout=180, model=m.path,
        base_args=["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16", "--max-model-len", "128",
                   "--block-size", "4", "--lora-modules", *modules],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    body = {"max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}

    def ask(job):
        prompt, model = job
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": prompt, **body}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def want(tokens):
        return m.tok.decode(tokens, skip_special_tokens=True)

    try:
        assert f"{m.num_experts} experts per MoE layer over 2 ranks, {m.num_experts // 2} whole experts each" \
            in srv.read_log()
        jobs = [(p, "demo" if w is None else f"a{w}") for p, w in zip(BATCH, WHICH)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(ask, jobs))
        assert texts == [want(t) for t in m.expected]
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "a1b", "lora_path": m.adapters[1]},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert ask((BATCH[2], "a1b")) == want(m.expected[2])  # WHICH[2] == 1: the same adapter's weights
        assert httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "a1b"}, timeout=60).status_code == 200
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "a1b", "prompt": BATCH[2], **body}, timeout=60)
        assert r.status_code == 404
    finally:
        srv.stop()
