"""A tensor-parallel rank that dies or hangs in the middle of a step (gloo on CPU): the engine fails
with an error that names the dead rank, or says the collective timed out, within the collective
timeout the engine sets (``VLLM_COLLECTIVE_TIMEOUT``); it never hangs, and it shuts down."""
import os
import signal
import time

import pytest
import torch

from tests.entrypoints.tiny_models import char_tokenizer
from tests.models.hf_checkpoints import make_checkpoint
from vllm import LLM, SamplingParams
from vllm.engine.errors import FatalEngineError

if torch.cuda.is_available():
    pytest.skip("gloo on CPU: the NCCL variant needs 2 GPUs (issue 16)", allow_module_level=True)

ENGINE = dict(max_model_len=128, block_size=4, num_gpu_blocks_override=128, tensor_parallel_size=2)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rank_failure") / "model")
    make_checkpoint("qwen3_moe", path)
    char_tokenizer().save_pretrained(path)
    return path


def test_a_rank_killed_mid_step_fails_the_engine_naming_it(model_path):
    llm = LLM(model_path, **ENGINE)
    try:
        reference = llm.generate("abc", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert len(reference) == 4
        worker = llm.llm_engine.executor._procs[0]
        layer = llm.llm_engine.runner.model.model.layers[1]
        forward = layer.forward

        def kill_rank_1_then_forward(*args, **kwargs):  # rank 1 dies while rank 0 is inside the step
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            return forward(*args, **kwargs)

        layer.forward = kill_rank_1_then_forward
        start = time.monotonic()
        with pytest.raises(FatalEngineError, match=r"worker rank 1 \(exit code -9\) died during the step"):
            llm.generate("abc", GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 60
        with pytest.raises(Exception, match="rank 1"):  # the engine does not pretend to go on
            llm.generate("abc", GREEDY, use_tqdm=False)
    finally:
        start = time.monotonic()
        llm.llm_engine.shutdown()
        assert time.monotonic() - start < 30


def test_a_stuck_rank_fails_the_step_at_the_collective_timeout(model_path, tmp_path, monkeypatch):
    """Rank 1 (a forked worker that inherits this patch) stops inside its forward once the flag file
    exists; rank 0 waits in the collective for VLLM_COLLECTIVE_TIMEOUT seconds, then the step fails."""
    from vllm.model_executor.models import common

    monkeypatch.setenv("VLLM_COLLECTIVE_TIMEOUT", "3")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    flag, parent = tmp_path / "hang", os.getpid()
    forward = common.DecoderLayer.forward

    def maybe_hang(self, *args, **kwargs):
        if os.getpid() != parent and flag.exists():
            time.sleep(600)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(common.DecoderLayer, "forward", maybe_hang)
    llm = LLM(model_path, **ENGINE)
    try:
        assert len(llm.generate("abc", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 4
        flag.touch()
        start = time.monotonic()
        with pytest.raises(FatalEngineError, match=r"collective timed out after 3 s \(VLLM_COLLECTIVE_TIMEOUT\)"):
            llm.generate("abc", GREEDY, use_tqdm=False)
        assert 2.5 < time.monotonic() - start < 60
    finally:
        start = time.monotonic()
        llm.llm_engine.shutdown()
        assert time.monotonic() - start < 60
