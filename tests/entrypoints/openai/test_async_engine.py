"""AsyncLLMEngine in-process: errors reach their caller only, cancellation frees the request."""
import asyncio

import pytest

from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.lora.request import LoRARequest

from .conftest import ADAPTERS, MODEL


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16,
                                                     max_model_len=64))
    yield eng
    eng.shutdown()
    assert not eng.is_running


async def _text(engine, prompt, lora=None, **kw):
    last = None
    async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=16, **kw), lora_request=lora):
        last = out
    return last.outputs[0].text


def test_errors_to_caller_only_and_cancellation(engine):
    upper = LoRARequest("upper", 1, ADAPTERS["upper"])

    async def main():
        good = asyncio.ensure_future(_text(engine, "hello=", upper))
        with pytest.raises(ValueError, match="max_model_len"):
            await _text(engine, "a" * 100)
        with pytest.raises(Exception):
            await _text(engine, "hello=", LoRARequest("bad", 9, "/nonexistent/adapter"))
        assert await asyncio.wait_for(good, 30) == "HELLO"
        # a cancelled request is aborted in the engine
        long = asyncio.ensure_future(_text(engine, "hello=", ignore_eos=True))
        await asyncio.sleep(0.05)
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        assert not engine.engine.has_unfinished_requests()
        assert await _text(engine, "abc=") == "abc"

    asyncio.run(asyncio.wait_for(main(), 60))
