"""Tensor parallelism over processes (gloo on CPU, NCCL on CUDA) against transformers and peft.

Each engine here runs rank 0 in the test process and rank 1 in a spawned
worker; greedy tokens must equal transformers' (the base model) and
transformers + peft's (adapters), in mixed batches, with adapters loaded,
evicted and removed at run time, and with fully sharded LoRA.
"""
import os

import pytest
import torch

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model
from tests.entrypoints.tiny_models import char_tokenizer
from tests.models.hf_checkpoints import make_checkpoint, single_thread  # noqa: F401  (fixture)
from tests.utils import child_processes
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PROMPTS = ["hello world", "abc", "the quick brown fox", "xyz 123"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
TP = 2
ENGINE = dict(max_model_len=128, block_size=4, num_gpu_blocks_override=128, tensor_parallel_size=TP)

if torch.cuda.is_available() and torch.cuda.device_count() < TP:
    pytest.skip(f"needs {TP} CUDA devices (or none: then it runs on CPU with gloo)", allow_module_level=True)


class Model:
    def __init__(self, arch, folder, **overrides):
        self.path = str(folder)
        self.hf = make_checkpoint(arch, self.path, **overrides)
        self.tok = char_tokenizer()
        self.tok.save_pretrained(self.path)
        self._ref = {}

    def reference(self, prompt, adapter=None):
        if (prompt, adapter) not in self._ref:
            model = self.hf if adapter is None else peft_model(self.hf, adapter)
            self._ref[(prompt, adapter)] = greedy(model, self.tok, prompt, 16)
        return self._ref[(prompt, adapter)]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,overrides", [
    ("qwen3_moe", {}), ("qwen2_moe", {}), ("mixtral", {}), ("olmoe", {}),
    # one KV head for two ranks: both hold it (replicated), OLMoE's full k-norm must count it once
    ("olmoe", {"num_key_value_heads": 1}),
])
def test_greedy_matches_transformers(tmp_path, arch, overrides):
    m = Model(arch, tmp_path, **overrides)
    llm = LLM(m.path, **ENGINE)
    try:
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == [m.reference(p) for p in PROMPTS]
        # the worker holds the other half of the weights: rank 0 alone has half the heads and experts' columns
        attn = llm.llm_engine.model.model.layers[0].self_attn
        assert attn.num_heads == m.hf.config.num_attention_heads // TP
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_moe_tp")
    m = Model("qwen2_moe", folder / "model")  # attention, a dense layer, experts and a shared expert
    m.adapters = [make_peft_adapter(m.hf, folder / f"a{i}", rank=r, seed=20 + i) for i, r in enumerate([8, 4, 8])]
    m.requests = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(m.adapters)]
    return m


@pytest.mark.parametrize("fully_sharded", [False, True])
def test_mixed_lora_batch_matches_peft(lora_model, fully_sharded):
    m = lora_model
    llm = LLM(m.path, enable_lora=True, max_loras=4, max_lora_rank=16, fully_sharded_loras=fully_sharded, **ENGINE)
    try:
        which = [None, 0, 1, 2]
        loras = [None if w is None else m.requests[w] for w in which]
        outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
        assert _tokens(outs) == [m.reference(p, None if w is None else m.adapters[w]) for p, w in zip(PROMPTS, which)]
    finally:
        llm.llm_engine.shutdown()


def test_adapters_evicted_removed_and_refused_on_every_rank(lora_model, tmp_path):
    """One slot, a CPU cache of two: every switch evicts on both ranks; results stay correct."""
    from vllm.lora.peft_loader import LoRALoadError

    m = lora_model
    llm = LLM(m.path, enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=16, **ENGINE)
    engine = llm.llm_engine
    try:
        for w in [0, 1, 2, 0, 2]:
            out = llm.generate(PROMPTS[1], GREEDY, lora_request=m.requests[w], use_tqdm=False)
            assert _tokens(out) == [m.reference(PROMPTS[1], m.adapters[w])], w
        assert engine.executor.call_workers("call_lora_manager", "list_adapters")[0].keys() == \
            engine.lora_manager.list_adapters().keys()
        assert engine.remove_lora(m.requests[0].lora_int_id)
        assert m.requests[0].lora_int_id not in engine.executor.call_workers("call_lora_manager",
                                                                             "list_adapters")[0]
        too_big = make_peft_adapter(m.hf, tmp_path / "r32", rank=32, seed=5)
        with pytest.raises(LoRALoadError, match="max_lora_rank"):
            llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("big", 9, too_big), use_tqdm=False)
        outs = llm.generate(PROMPTS[:2], GREEDY, lora_request=[None, m.requests[1]], use_tqdm=False)
        assert _tokens(outs) == [m.reference(PROMPTS[0]), m.reference(PROMPTS[1], m.adapters[1])]
    finally:
        engine.shutdown()


def test_bad_tensor_parallel_sizes_fail_clearly_and_leave_no_workers(lora_model):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(lora_model.path, **{**ENGINE, "tensor_parallel_size": 0})
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPUs"):  # more ranks than visible GPUs: refused before spawning
            LLM(lora_model.path, **{**ENGINE, "tensor_parallel_size": torch.cuda.device_count() + 1})
        return
    # 4 attention heads over 3 ranks: every rank refuses; the workers are stopped
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # spawning starts it once per process: not a leftover worker
    before = set(child_processes(os.getpid()))
    with pytest.raises(Exception, match="not divisible by tp_size"):
        LLM(lora_model.path, **{**ENGINE, "tensor_parallel_size": 3})
    assert set(child_processes(os.getpid())) <= before


def test_worker_processes_stop_with_the_engine(lora_model):
    llm = LLM(lora_model.path, **ENGINE)
    procs = list(llm.llm_engine.executor._procs)
    assert len(procs) == TP - 1 and all(p.is_alive() for p in procs)
    llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_logprobs_and_prompt_logprobs_match_one_rank(lora_model):
    """Prompt logprobs gather extra logits rows on every rank; values equal the one-rank engine's."""
    from tests.utils import assert_close

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    results = []
    for tp in (1, TP):
        llm = LLM(lora_model.path, **{**ENGINE, "tensor_parallel_size": tp})
        try:
            results.append(llm.generate(PROMPTS[:3], params, use_tqdm=False))
        finally:
            llm.llm_engine.shutdown()
    for one, two in zip(*results):
        assert one.outputs[0].token_ids == two.outputs[0].token_ids
        for a, b in zip(one.outputs[0].logprobs + one.prompt_logprobs[1:],
                        two.outputs[0].logprobs + two.prompt_logprobs[1:]):
            assert list(a) == list(b)  # same tokens, same order
            assert_close(torch.tensor([v.logprob for v in b.values()]), torch.tensor([v.logprob for v in a.values()]),
                         torch.float32, name="logprobs")
        assert two.prompt_logprobs[0] is None and len(two.prompt_logprobs) == len(two.prompt_token_ids)


def test_script_without_main_guard_fails_fast_with_a_hint(lora_model, tmp_path):
    """Spawned workers (forced here; the default is fork, see test_unguarded_script.py) import the main
    module: an unguarded script's workers die at start-up. Rank 0 says why at once instead of waiting
    for them in the group's rendezvous."""
    import subprocess
    import sys
    import time

    script = tmp_path / "unguarded.py"
    script.write_text(f"from vllm import LLM\nLLM({lora_model.path!r}, max_model_len=64, tensor_parallel_size=2)\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": repo, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"})
    assert run.returncode != 0
    assert 'if __name__ == "__main__":' in run.stderr, run.stderr[-2000:]
    assert time.monotonic() - start < 90


def test_a_dead_worker_is_reported_not_waited_for(lora_model):
    from vllm.executor.multiproc import WorkerError

    llm = LLM(lora_model.path, **ENGINE)
    try:
        proc = llm.llm_engine.executor._procs[0]
        proc.kill()
        proc.join(10)
        with pytest.raises(WorkerError, match="rank 1 .*died"):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
