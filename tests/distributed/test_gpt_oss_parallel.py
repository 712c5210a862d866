"""gpt-oss over two ranks (tensor parallel, and expert parallel) against transformers + peft.

Under tensor parallelism each rank holds half the heads (and their sinks) and half of every expert's
intermediate size (interleaved gate/up pairs kept together); the experts' down-projection bias must
count once in the all-reduce.  Under expert parallelism each rank holds two whole experts.
"""
import pytest
import torch

from tests.distributed.test_tensor_parallel import ENGINE, TP, _tokens
from tests.entrypoints.test_llm_gpt_oss import GREEDY, PROMPTS, Setup
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm import LLM

if torch.cuda.is_available() and torch.cuda.device_count() < TP:
    pytest.skip(f"needs {TP} CUDA devices (or none: then it runs on CPU with gloo)", allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("gpt_oss_tp"))


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_mixed_lora_batch_matches_peft(setup, expert_parallel):
    llm = LLM(setup.path, **ENGINE, enable_expert_parallel=expert_parallel, enable_lora=True, max_loras=2,
              max_lora_rank=16)
    try:
        which = [None, 0, 1, None]
        loras = [None if w is None else setup.requests[w] for w in which]
        outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
        assert _tokens(outs) == [setup.reference(p, w) for p, w in zip(PROMPTS, which)]
        attn = llm.llm_engine.model.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.sinks.shape == (2,)
    finally:
        llm.llm_engine.shutdown()
