"""Without llguidance installed (e.g. a GPU machine set up offline) the engine serves every request
that has no grammar, and one that has a grammar gets a ValueError saying what to install."""
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.structured_output import backend, bitmask

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")


def test_grammar_needs_llguidance_plain_requests_do_not(monkeypatch):
    monkeypatch.setattr(backend, "llguidance", None)
    monkeypatch.setattr(bitmask, "llguidance", None)
    llm = LLM(MODEL, max_model_len=64, max_num_seqs=4)
    with pytest.raises(ValueError, match="needs the llguidance package.*pip install"):
        llm.generate(["abc="], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="a+")),
                     use_tqdm=False)
    out = llm.generate(["abc="], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
