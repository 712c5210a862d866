"""``vllm serve`` on a tiny gpt-oss checkpoint with two adapters, driven by the openai client: one
concurrent batch of base and adapter requests gives the offline LLM's text, whose tokens equal
transformers + peft; chat uses the tokenizer's own template."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.entrypoints.lora_adapters import greedy, peft_model
from tests.entrypoints.test_llm_gpt_oss import Setup

from .conftest import Server

MAX_TOKENS = 12
JOBS = [(None, "hello world"), ("a0", "the quick brown fox"), ("a1", "xyz 123 xyz"), ("a0", "abc"),
        (None, "the quick brown fox")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    setup = Setup(tmp_path_factory.mktemp("gpt_oss_serve"))
    args = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-model-len", "128",
            "--lora-modules", f"a0={setup.adapters[0]}", f"a1={setup.adapters[1]}"]
    srv = Server(model=setup.path, base_args=args, timeout=120)
    yield setup, srv
    srv.stop()


def test_mixed_batch_and_chat_match_the_reference(served):
    import openai

    from vllm import LLM, SamplingParams

    setup, srv = served
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60.0, max_retries=0)

    def ask(job):
        name, prompt = job
        out = client.completions.create(model=name or "demo", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    with ThreadPoolExecutor(len(JOBS)) as pool:
        texts = list(pool.map(ask, JOBS))
    llm = LLM(setup.path, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    index = {None: None, "a0": 0, "a1": 1}
    for (name, prompt), text in zip(JOBS, texts):
        lora = None if name is None else setup.requests[index[name]]
        offline = llm.generate(prompt, params, lora_request=lora, use_tqdm=False)[0].outputs[0]
        assert list(offline.token_ids) == setup.reference(prompt, index[name]), (name, prompt)
        assert text == offline.text, (name, prompt)

    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                          temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    templated = "<|user|>hi<|end|><|assistant|>"
    assert chat.usage.prompt_tokens == len(setup.tok.encode(templated))
    want = greedy(peft_model(setup.hf, setup.adapters[1]), setup.tok, templated, MAX_TOKENS)
    got = llm.generate(templated, params, lora_request=setup.requests[1], use_tqdm=False)[0].outputs[0]
    assert list(got.token_ids) == want and chat.choices[0].message.content == got.text
