"""Prefix caching end to end on the embedded demo model and its adapters ('upper', 'rot13').

The independent reference is the same engine with ``enable_prefix_caching=False``, which
computes every prompt whole: with caching on, tokens must be identical and logprobs equal
(to float noise), while the counters show the reuse.  Blocks of 4 tokens and prompts of
~30 tokens: several full blocks and a partial last one.
"""
import os
import shutil

import pytest

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
ADAPTER_DIRS = {name: os.path.join(ROOT, "demo_adapters", name) for name in ("upper", "rot13")}
ADAPTERS = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(ADAPTER_DIRS.items())}
BS = 4
PROMPTS = ["thequickbrownfoxjumpsoverthelazy=", "thequickbrownfoxjumpsoverdogs=", "zebrafinchesandlighthouses="]
PARAMS = SamplingParams(temperature=0, max_tokens=10, logprobs=3)


def _llm(caching: bool, num_blocks: int = 256, **kw) -> LLM:
    return LLM(os.path.join(ROOT, "demo_model"), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64,
               block_size=BS, num_gpu_blocks_override=num_blocks, max_num_seqs=8, enable_prefix_caching=caching, **kw)


@pytest.fixture(scope="module")
def off():
    return _llm(False)


@pytest.fixture(scope="module")
def on():
    return _llm(True)


def _counts(llm: LLM) -> tuple[int, int]:
    return llm.llm_engine.prefix_cache_counts()


def _run(llm: LLM, prompts, lora, params=PARAMS):
    return llm.generate(prompts, params, lora_request=lora, use_tqdm=False)


def _same(got, want) -> None:
    """Equal tokens, and logprobs equal to float noise."""
    for g, w in zip(got, want):
        for gc, wc in zip(g.outputs, w.outputs):
            assert gc.token_ids == wc.token_ids, (g.prompt, gc.text, wc.text)
            for glp, wlp in zip(gc.logprobs or [], wc.logprobs or []):
                assert glp.keys() == wlp.keys()
                assert all(abs(glp[t].logprob - wlp[t].logprob) < 1e-4 for t in glp)


def _cached_tokens(prompt: str) -> int:
    """What a repeat can take from the cache: the full blocks before the last prompt token."""
    return (len(prompt) - 1) // BS * BS


@pytest.mark.parametrize("adapter", ["upper", None])
def test_repeated_prompt_reuses_its_blocks_with_identical_tokens(on, off, adapter):
    lora = ADAPTERS.get(adapter)
    want = _run(off, PROMPTS, lora)
    assert _counts(off) == (0, 0)  # caching off: nothing is looked up
    first = _run(on, PROMPTS[:1], lora)
    q0, h0 = _counts(on)
    again = _run(on, PROMPTS, lora)
    q1, h1 = _counts(on)
    assert q1 - q0 == sum(len(p) for p in PROMPTS)
    # the repeat reuses all its full blocks but the last token's; the second prompt shares the first's
    # leading blocks ("thequickbrownfoxjumpsover" = 6 blocks); the third has nothing in common
    assert h1 - h0 == _cached_tokens(PROMPTS[0]) + 24
    assert _counts(on)[1] > 0
    _same(first, want[:1])
    _same(again, want)


def test_prompt_logprobs_on_a_cached_prompt_match_caching_off(on, off):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    _run(on, PROMPTS[:1], ADAPTERS["upper"], params)
    q0, h0 = _counts(on)
    got = _run(on, PROMPTS[:1], ADAPTERS["upper"], params)
    assert _counts(on) == (q0, h0)  # computed whole, not looked up
    want = _run(off, PROMPTS[:1], ADAPTERS["upper"], params)
    _same(got, want)
    for g, w in zip(got[0].prompt_logprobs[1:], want[0].prompt_logprobs[1:]):
        assert g.keys() == w.keys() and all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)


@pytest.mark.parametrize("first,then", [("upper", "rot13"), ("upper", None), (None, "rot13")])
def test_another_adapter_does_not_reuse_the_blocks(on, off, first, then):
    prompt = f"{first}{then}adapterscannotsharekv="
    _run(on, [prompt], ADAPTERS.get(first))
    _, h0 = _counts(on)
    got = _run(on, [prompt], ADAPTERS.get(then))
    assert _counts(on)[1] == h0  # nothing reused across adapters (or base vs adapter)
    _same(got, _run(off, [prompt], ADAPTERS.get(then)))
    _run(on, [prompt], ADAPTERS.get(then))
    assert _counts(on)[1] == h0 + _cached_tokens(prompt)  # its own repeat does hit


def test_cache_salt_isolates_blocks(on, off):
    """vLLM's cache_salt: a prompt's blocks are reused only by requests with the same salt (none is a
    salt of its own); tokens stay those of caching off."""
    prompt = "saltedpromptsdonotsharetheirkv="
    salted = lambda salt: {"prompt": prompt, "cache_salt": salt}  # noqa: E731
    _run(on, [salted("tenant-a")], None)
    _, h0 = _counts(on)
    got = _run(on, [salted("tenant-b")], None)
    assert _counts(on)[1] == h0, "another salt reuses nothing"
    _run(on, [prompt], None)
    assert _counts(on)[1] == h0, "no salt reuses nothing of a salted prompt"
    _same(got, _run(off, [prompt], None))
    _run(on, [salted("tenant-a")], None)
    assert _counts(on)[1] == h0 + _cached_tokens(prompt), "the same salt does hit"
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        _run(on, [{"prompt": prompt, "cache_salt": ""}], None)


def test_an_adapter_reloaded_with_other_weights_does_not_hit_stale_blocks(tmp_path, off):
    """Same name, id and path, new weights on disk after an unload: a fresh load, fresh KV."""
    folder = tmp_path / "swap"
    shutil.copytree(ADAPTER_DIRS["upper"], folder)
    swap = LoRARequest("swap", 7, str(folder))
    on = _llm(True)
    prompt = "weightschangeunderthesamename="
    _same(_run(on, [prompt], swap), _run(off, [prompt], ADAPTERS["upper"]))
    assert on.llm_engine.remove_lora(7)
    shutil.rmtree(folder)
    shutil.copytree(ADAPTER_DIRS["rot13"], folder)
    _, h0 = _counts(on)
    got = _run(on, [prompt], swap)
    assert _counts(on)[1] == h0
    _same(got, _run(off, [prompt], ADAPTERS["rot13"]))


def test_preemption_under_caching_matches_caching_off(monkeypatch, off):
    """A cache too small for the batch: sequences are preempted and recomputed from their cached
    blocks; every request's tokens equal the caching-off run in a roomy cache."""
    prompts = [f"sharedsystemprefix{w}=" for w in ["pqrst", "lanterns", "quietzone", "mango", "zebra", "velocity"]]
    loras = [ADAPTERS.get(t) for t in ["upper", "rot13", None, "upper", "rot13", None]]
    params = SamplingParams(temperature=0, max_tokens=16)
    want = _run(off, prompts, loras, params)
    small = _llm(True, num_blocks=40)
    preempted = []
    schedule = small.llm_engine.scheduler.schedule

    def recording():
        out = schedule()
        preempted.extend(out.preempted_seqs)
        return out

    monkeypatch.setattr(small.llm_engine.scheduler, "schedule", recording)
    got = _run(small, prompts, loras, params)
    assert preempted, "the cache was expected to force preemptions"
    assert _counts(small)[1] > 0
    _same(got, want)
    small.llm_engine.scheduler.block_manager.check_no_leaks()


def test_n_samples_share_the_prompt_blocks(on, off):
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=8, n=3, logprobs=2)
    _, h0 = _counts(on)
    got = _run(on, [prompt], ADAPTERS["rot13"], params)
    assert _counts(on)[1] - h0 >= 2 * _cached_tokens(prompt)  # the 2nd and 3rd samples reuse the 1st's blocks
    _same(got, _run(off, [prompt], ADAPTERS["rot13"], params))


def test_abort_keeps_the_cache_consistent(on, off):
    engine = on.llm_engine
    prompt = "abortedrequestsleavetheirblocks="
    engine.add_request("abort-me", prompt, SamplingParams(temperature=0, max_tokens=20))
    engine.step()
    engine.step()
    engine.abort_request("abort-me")
    assert not engine.has_unfinished_requests()
    engine.scheduler.block_manager.check_no_leaks()
    _, h0 = _counts(on)
    got = _run(on, [prompt], None)
    assert _counts(on)[1] - h0 == _cached_tokens(prompt)
    _same(got, _run(off, [prompt], None))


def test_reset_prefix_cache_forgets_the_blocks(on, off):
    prompt = "resettheprefixcachenow="
    _run(on, [prompt], ADAPTERS["upper"])
    assert on.reset_prefix_cache() is True
    assert on.llm_engine.scheduler.block_manager.num_cached_blocks == 0
    _, h0 = _counts(on)
    got = _run(on, [prompt], ADAPTERS["upper"])
    assert _counts(on)[1] == h0
    _same(got, _run(off, [prompt], ADAPTERS["upper"]))


def test_tensor_parallel_ranks_read_the_cached_prefix(off):
    """Two ranks (gloo on CPU): the cached prefix's blocks and the shorter prefill reach every rank
    through the ModelInput; a repeat on an adapter hits and matches one rank with caching off."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (or none: then it runs on CPU with gloo)")
    tp = _llm(True, tensor_parallel_size=2)
    try:
        lora = [ADAPTERS["rot13"], ADAPTERS["upper"], None]
        _run(tp, PROMPTS, lora)
        _, h0 = _counts(tp)
        got = _run(tp, PROMPTS, lora)
        assert _counts(tp)[1] - h0 == sum(_cached_tokens(p) for p in PROMPTS)
        _same(got, _run(off, PROMPTS, lora))
    finally:
        tp.llm_engine.shutdown()


def test_a_prefill_of_one_token_per_sequence_replays_the_decode_graph(off):
    """Prompts whose every full block is cached leave one token each to prefill: the step looks like
    a decode step and goes through the CUDA-graph runner (emulated here: the same forward over its
    static buffers), reading the cached prefix through the block tables; tokens equal caching off."""
    from vllm.worker.cuda_graphs import DecodeGraphRunner

    llm = _llm(True, enforce_eager=True)
    eng, worker = llm.llm_engine, llm.llm_engine.executor.driver
    prompts = ["onetokenleftto=", "prefillforeachsequence="]
    prompts = [p + "x" * ((1 - len(p)) % BS) for p in prompts]  # 4k + 1 tokens: 4k of them cached
    assert all(len(p) % BS == 1 for p in prompts)
    lora = [ADAPTERS["upper"], None]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    _run(llm, prompts, lora, params)  # eager: fills the cache
    g = DecodeGraphRunner(worker.model, block_size=BS, max_model_len=eng.scheduler_config.max_model_len,
                          max_num_seqs=eng.scheduler_config.max_num_seqs, device=worker.device,
                          lora_manager=worker.lora_manager, sizes=[2], emulate=True)
    g.capture()
    eng.runner.graphs = g
    _, h0 = _counts(llm)
    got = _run(llm, prompts, lora, params)
    assert _counts(llm)[1] - h0 == sum(len(p) - 1 for p in prompts)
    assert g.replays[(2, True)] == params.max_tokens  # the prefill too, not only the 5 decode steps
    _same(got, _run(off, prompts, lora, params))
