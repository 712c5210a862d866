"""Load test: 64 concurrent streaming requests over the base model and three adapters,
while one adapter is loaded and another unloaded at run time.  Every request must be
answered completely and correctly (greedy equality with the offline LLM), and the
server must stay healthy.  Traffic goes to 127.0.0.1 only; every wait is bounded."""
import asyncio

from tests.entrypoints.openai.conftest import ADAPTERS, Server

GREEDY = dict(max_tokens=16, temperature=0)
WORDS = ["hello", "world", "abc", "vllm", "lora"]
# upper_b serves the upper adapter's weights under its own name and slot; spare is unloaded mid-run
EXTRA = ["--lora-modules", f"upper_b={ADAPTERS['upper']}", f"spare={ADAPTERS['rot13']}"]
MODELS = ["demo", "upper", "rot13", "upper_b"]
SAME_AS = {"upper_b": "upper", "rot13_b": "rot13"}


def test_64_streams_during_load_and_unload(expected):
    import httpx
    import openai

    srv = Server(extra_args=EXTRA, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        async def stream_one(client, i):
            model, word = MODELS[i % len(MODELS)], WORDS[i % len(WORDS)]
            text, finish = "", None
            stream = await client.completions.create(model=model, prompt=f"{word}=", stream=True, **GREEDY)
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            return model, word, text, finish

        async def admin(http):
            await asyncio.sleep(0.2)  # while the streams are in flight
            r1 = await http.post(f"{srv.url}/v1/load_lora_adapter",
                                 json={"lora_name": "rot13_b", "lora_path": ADAPTERS["rot13"]})
            r2 = await http.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "spare"})
            return r1.status_code, r2.status_code

        async def main():
            client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", timeout=60.0, max_retries=0)
            async with httpx.AsyncClient(timeout=30.0) as http:
                jobs = [stream_one(client, i) for i in range(64)]
                return await asyncio.wait_for(asyncio.gather(admin(http), *jobs), 120)

        (load_status, unload_status), *results = asyncio.run(main())
        assert (load_status, unload_status) == (200, 200)
        assert len(results) == 64
        for model, word, text, finish in results:
            assert text == expected[(SAME_AS.get(model, model), word)], (model, word, text)
            assert finish == "stop"
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        names = {m["id"] for m in httpx.get(f"{srv.url}/v1/models", timeout=5).json()["data"]}
        assert "rot13_b" in names and "spare" not in names
        sync = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", timeout=30.0, max_retries=0)
        assert sync.completions.create(model="rot13_b", prompt="hello=", **GREEDY).choices[0].text == "uryyb"
    finally:
        srv.stop()
