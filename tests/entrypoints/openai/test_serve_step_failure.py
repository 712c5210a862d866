"""A request that fails while the engine computes it gets an error (500, or an error event in its
stream); the other requests of the same steps are answered exactly; the server goes on.

The server runs in-process (FastAPI app over the demo engine) so a fault can be injected into the
engine's model runner for batches that hold a marked request."""
import asyncio
import contextlib
import json

import httpx
import pytest

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.entrypoints.openai.api_server import build_app
from vllm.entrypoints.openai.serving import Models

from .conftest import MODEL

MARK = "zzz="  # prompts starting with this fail once they have FAIL_AFTER output tokens
FAIL_AFTER = 2


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64))
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def runner_fault(engine):
    tok = engine.tokenizer
    marked = tok.encode(MARK)
    runner = engine.engine.runner
    execute = runner.execute

    def execute_with_fault(out):
        for s in out.scheduled_seqs:
            if s.prompt_token_ids[:len(marked)] == marked and s.num_output_tokens >= FAIL_AFTER:
                raise RuntimeError("injected fault at /secret/server/path")
        return execute(out)

    runner.execute = execute_with_fault
    try:
        yield
    finally:
        runner.execute = execute


def test_failed_request_gets_an_error_and_the_others_are_served(engine):
    app = build_app(engine, Models(["demo"], MODEL, 64))
    body = {"model": "demo", "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            ref = (await http.post("/v1/completions", json={**body, "prompt": "hello="})).json()["choices"][0]["text"]
            with runner_fault(engine):
                bad, good, bad_stream = await asyncio.gather(
                    http.post("/v1/completions", json={**body, "prompt": MARK}),
                    http.post("/v1/completions", json={**body, "prompt": "hello="}),
                    http.post("/v1/completions", json={**body, "prompt": MARK, "stream": True}))
            after = (await http.post("/v1/completions", json={**body, "prompt": "hello="})).json()
            health = (await http.get("/health")).status_code
        return ref, bad, good, bad_stream, after, health

    ref, bad, good, bad_stream, after, health = asyncio.run(main())
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["type"] == "InternalServerError" and "RuntimeError" in err["message"]
    assert "/secret" not in bad.text  # details stay in the server log
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == ref
    assert bad_stream.status_code == 200  # the stream had started: it ends with an error event
    events = [json.loads(line[6:]) for line in bad_stream.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[-1]["error"]["code"] == 500 and bad_stream.text.rstrip().endswith("data: [DONE]")
    assert "/secret" not in bad_stream.text
    assert after["choices"][0]["text"] == ref and health == 200


def test_request_racing_its_adapters_unload_gets_404():
    """The server resolved the adapter's name, then the adapter was unloaded (while another request
    still uses it) before this request reached the engine: a 404 as if it had come a moment later,
    not a 400 about lora_int_ids (the soak run found this race)."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.serving import Serving
    from vllm.entrypoints.openai.serving_engine import APIError

    from .conftest import ADAPTERS

    eng = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64, enable_lora=True, max_loras=2,
                                                     max_lora_rank=16))
    models = Models(["demo"], MODEL, 64)
    serving = Serving(eng, models)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        req = models.new_lora("x", ADAPTERS["upper"])
        await eng.add_lora(req)
        models.adapters["x"] = req
        resolved = models.resolve("x")
        busy = eng.generate({"prompt_token_ids": [5, 6, 7]}, params, "busy", req)
        await busy.__anext__()  # the adapter is in use
        del models.adapters["x"]  # what /v1/unload_lora_adapter does
        await eng.remove_lora(req.lora_int_id)
        with pytest.raises(APIError) as err:
            await serving._start([({"prompt_token_ids": [5, 6]}, params)], resolved, "late")
        await busy.aclose()
        return err.value

    try:
        err = asyncio.run(main())
    finally:
        eng.shutdown()
    assert err.status == 404 and "`x` does not exist" in err.message
