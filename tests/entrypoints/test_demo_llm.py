"""The embedded demo through LLM.generate: the adapters do their tasks on held-out strings."""
import codecs
import importlib.util
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
TASKS = {"base": lambda w: w, "upper": str.upper, "rot13": lambda w: codecs.encode(w, "rot13")}


def held_out(n: int) -> list[str]:
    """The training script's evaluation strings, excluded from its training data."""
    spec = importlib.util.spec_from_file_location("train_demo_model", os.path.join(ROOT, "train_demo_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.heldout_strings(n)


@pytest.fixture(scope="module")
def llm():
    return LLM(os.path.join(ROOT, "demo_model"), enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64)


def test_adapters_reach_95_percent_in_one_mixed_batch(llm):
    words = held_out(100)
    adapters = {"upper": LoRARequest("upper", 1, os.path.join(ROOT, "demo_adapters", "upper")),
                "rot13": LoRARequest("rot13", 2, os.path.join(ROOT, "demo_adapters", "rot13"))}
    rows = [(w, t) for w in words for t in TASKS]
    outs = llm.generate([f"{w}=" for w, _ in rows], SamplingParams(temperature=0, max_tokens=16),
                        lora_request=[adapters.get(t) for _, t in rows], use_tqdm=False)
    for task, fn in TASKS.items():
        got = [o.outputs[0].text == fn(w) for (w, t), o in zip(rows, outs) if t == task]
        assert sum(got) / len(got) >= 0.95, f"{task}: {sum(got)}/{len(got)}"
        assert all(o.outputs[0].finish_reason == "stop" for (w, t), o in zip(rows, outs) if t == task)


def test_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=16),
                   lora_request=LoRARequest("upper", 1, os.path.join(ROOT, "demo_adapters", "upper")),
                   use_tqdm=False)[0]
    assert out.outputs[0].text == "HELLO"
