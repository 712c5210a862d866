"""``LLM.chat`` with vLLM's template inputs: ``chat_template_kwargs`` and ``continue_final_message``
render as transformers renders them (demo model, a test template)."""
import os

import pytest
from transformers import AutoTokenizer

from tests.entrypoints.openai.test_serve_chat_template import CONV, TEMPLATE
from vllm import LLM, SamplingParams

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, max_model_len=64, max_num_seqs=4)


@pytest.mark.parametrize("kwargs", [
    dict(chat_template_kwargs={"enable_thinking": False}),
    dict(add_generation_prompt=False, continue_final_message=True),
])
def test_chat_renders_as_transformers(llm, kwargs):
    tok = AutoTokenizer.from_pretrained(MODEL)
    hf_kwargs = {"add_generation_prompt": kwargs.get("add_generation_prompt", True),
                 "continue_final_message": kwargs.get("continue_final_message", False),
                 **kwargs.get("chat_template_kwargs", {})}
    want = tok.apply_chat_template(CONV, chat_template=TEMPLATE, tokenize=False, **hf_kwargs)
    out = llm.chat(CONV, SamplingParams(max_tokens=2, temperature=0), chat_template=TEMPLATE, use_tqdm=False,
                   **kwargs)[0]
    assert out.prompt == want
    assert out.prompt_token_ids == tok(want, add_special_tokens=False)["input_ids"]


def test_continue_with_generation_prompt_is_refused(llm):
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt cannot both be true"):
        llm.chat(CONV, chat_template=TEMPLATE, continue_final_message=True, use_tqdm=False)
