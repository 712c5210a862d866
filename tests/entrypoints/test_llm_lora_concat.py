"""LLM(enable_lora=True) with the dense LoRA as extra GEMM columns (``dense_concat.CONCAT_K``) against transformers
+ peft: a mixed batch (base and three adapters) gives peft's greedy tokens through the concatenated projections,
and an adapter loaded after the first steps (a slot written into the wide weights in place) too."""
import pytest

from tests.entrypoints.test_llm_lora import GREEDY, PROMPTS, Setup, _llm
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm.lora.layers import dense_concat


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup("qwen3_moe", tmp_path_factory.mktemp("concat"))


def test_concat_engine_matches_peft(setup, monkeypatch):
    monkeypatch.setattr(dense_concat, "CONCAT_K", True)
    monkeypatch.setattr(dense_concat, "CONCAT_ON_CPU", True)
    monkeypatch.setattr(dense_concat, "CONCAT_MIN_TOKENS", 1)
    monkeypatch.setattr(dense_concat, "CONCAT_MAX_FRACTION", 100.0)  # the tiny model's K is 64
    calls = []
    real = dense_concat.forward
    monkeypatch.setattr(dense_concat, "forward", lambda layer, x: calls.append(1) or real(layer, x))
    llm = _llm(setup)
    first = llm.generate(PROMPTS[0], GREEDY, lora_request=setup.requests[1], use_tqdm=False)[0]
    assert first.outputs[0].token_ids == setup.reference(PROMPTS[0], 1)
    assert calls, "the concatenated projections must run"
    which = [None, 0, 1, 2]
    loras = [None if w is None else setup.requests[w] for w in which]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, w, out in zip(PROMPTS, which, outs):
        assert out.outputs[0].token_ids == setup.reference(prompt, w), (prompt, w)
