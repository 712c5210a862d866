"""Async scheduling over the CUDA-graph decode path, on CPU: chained steps copy their input ids from
the previous step's tokens on the device into the static ids buffer before the replay (emulated graph
runner, as in test_decode_graphs_host).  Tokens equal the synchronous eager engine's, greedy and seeded,
with adapters mixed in the batch; on a GPU the same test runs over real graphs."""
import pytest
import torch

from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.worker.test_decode_graphs_host import _attach, _llm, setup  # noqa: F401  (fixture)
from vllm import LLM, SamplingParams

PROMPTS = ["hello world", "abc", "the quick brown fox", "zz"]
PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 3, 12)] + [
    SamplingParams(temperature=1.0, seed=4, max_tokens=10, ignore_eos=True)]


def _summary(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def test_chained_steps_over_emulated_graphs_match_the_eager_engine(setup, single_thread):  # noqa: F811
    path, adapters = setup
    loras = [adapters[0], None, adapters[1], None]
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    want = _summary(_llm(path, **kw).generate(PROMPTS, PARAMS, lora_request=loras, use_tqdm=False))
    llm = _llm(path, async_scheduling=True, **kw)
    g = _attach(llm)
    got = _summary(llm.generate(PROMPTS, PARAMS, lora_request=loras, use_tqdm=False))
    assert got == want
    assert llm.llm_engine.async_scheduling.chained_steps > 0
    assert g.replays[(4, True)] > 0 and g.replays[(2, True)] > 0  # 4 rows, then fewer (padded to 2 and 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_scheduling_with_real_graphs_matches_sync(setup, dtype):  # noqa: F811
    path, adapters = setup
    loras = [adapters[0], None, adapters[1], None]
    kw = dict(dtype=dtype, max_model_len=64, block_size=16, max_num_seqs=8, enable_lora=True, max_loras=2,
              max_lora_rank=8)
    want = _summary(LLM(path, **kw).generate(PROMPTS, PARAMS, lora_request=loras, use_tqdm=False))
    llm = LLM(path, async_scheduling=True, **kw)
    assert llm.llm_engine.runner.graphs is not None
    got = _summary(llm.generate(PROMPTS, PARAMS, lora_request=loras, use_tqdm=False))
    assert got == want and llm.llm_engine.async_scheduling.chained_steps > 0


@pytest.mark.cuda
@pytest.mark.parametrize("lora", [False, True])
def test_a_chained_graph_step_is_queued_without_waiting_for_the_gpu(setup, monkeypatch, lora):  # noqa: F811
    """The launch of a chained decode step (graph replay + sampler + token copy) never synchronises
    with the device: with torch's sync debug mode at "error", a blocking call raises.  (A failure here
    is a lost overlap, not wrong tokens: the message names the call.)"""
    path, adapters = setup
    kw = dict(max_model_len=64, block_size=16, max_num_seqs=8, async_scheduling=True)
    if lora:
        kw.update(enable_lora=True, max_loras=2, max_lora_rank=8)
    llm = LLM(path, **kw)
    runner = llm.llm_engine.runner
    launch = runner.launch
    checked = []

    def strict_launch(out, input_ids=None, tokens_ahead=0):
        if input_ids is None:
            return launch(out)
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = launch(out, input_ids=input_ids, tokens_ahead=tokens_ahead)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(len(out.scheduled_seqs))
        return tokens

    llm.generate(PROMPTS, PARAMS, lora_request=[adapters[0], None, adapters[1], None] if lora else None,
                 use_tqdm=False)  # warm-up: adapters activated, kernels compiled
    monkeypatch.setattr(runner, "launch", strict_launch)
    llm.generate(PROMPTS, PARAMS, lora_request=[adapters[0], None, adapters[1], None] if lora else None,
                 use_tqdm=False)
    assert checked
