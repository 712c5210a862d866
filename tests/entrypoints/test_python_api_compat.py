"""vLLM's Python API names: ``vllm.TokensPrompt`` / ``vllm.inputs``, ``LLM.get_default_sampling_params``,
``from vllm import AsyncLLMEngine, AsyncEngineArgs``; on the embedded demo model."""
import asyncio
import os
import random

import pytest

import vllm
from vllm import LLM, AsyncEngineArgs, AsyncLLMEngine, SamplingParams, TextPrompt, TokensPrompt
from vllm import inputs

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, max_model_len=64)


def test_names_are_exported():
    assert inputs.TokensPrompt is TokensPrompt and inputs.TextPrompt is TextPrompt
    assert issubclass(AsyncEngineArgs, vllm.EngineArgs)
    assert {"AsyncLLMEngine", "AsyncEngineArgs", "TokensPrompt", "TextPrompt"} <= set(vllm.__all__)


def test_typed_prompts_equal_plain_ones(llm):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randrange(2, 6))) for _ in range(3)]
    tok = llm.get_tokenizer()
    typed = [TokensPrompt(prompt_token_ids=tok.encode(f"{w}=")) for w in words] + [TextPrompt(prompt=f"{w}=")
                                                                                   for w in words]
    outs = [o.outputs[0].text for o in llm.generate(typed, GREEDY, use_tqdm=False)]
    plain = [o.outputs[0].text for o in llm.generate([f"{w}=" for w in words], GREEDY, use_tqdm=False)]
    assert outs == plain + plain
    assert plain == words  # the demo model copies the word


def test_unknown_prompt_keys_are_refused(llm):
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "abc=", "multi_modal_data": {"image": None}}, GREEDY, use_tqdm=False)


def test_default_sampling_params_are_what_generate_uses(llm, monkeypatch):
    assert isinstance(llm.get_default_sampling_params(), SamplingParams)
    assert llm.get_default_sampling_params() is not llm.get_default_sampling_params()
    monkeypatch.setattr(llm, "get_default_sampling_params",
                        lambda: SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    out = llm.generate(["abc=", "hello="], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]


def test_async_engine_from_async_engine_args():
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(MODEL, max_model_len=64))

    async def run() -> str:
        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=engine.tokenizer.encode("hello=")),
                                         GREEDY, "r1"):
            final = out
        return final.outputs[0].text

    try:
        assert asyncio.run(run()) == "hello"
    finally:
        engine.shutdown()
