"""Async scheduling: the order of the device work and the host reads, failures in chained steps, the
server's engine (streaming) on top, the --async-scheduling flag (demo model, CPU)."""
import asyncio
import os

import pytest
import torch

from tests.utils import assert_clean_and_serving, faulty_runner, run_to_completion
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.worker.device_tokens import DeviceTokens

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
PROMPTS = ["hello=", "abc=", "xyz=", "good day="]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=3.0, seed=9, max_tokens=12, ignore_eos=True)
FAIL_AFTER = 3


@pytest.fixture(scope="module")
def llm():
    sync = LLM(MODEL, max_model_len=64, max_num_seqs=8, async_scheduling=False)
    llm = LLM(MODEL, max_model_len=64, max_num_seqs=8, async_scheduling=True)
    llm.reference = {p: sync.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}
    llm.seeded = sync.generate(PROMPTS[0], SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    return llm


def test_a_chained_step_is_queued_before_the_previous_tokens_are_read(llm, monkeypatch):
    """Per step() call in steady state: queue step n+1 (its ids from step n's tokens on the device),
    then read step n's tokens, then record them; the launch never reads a token on the host."""
    engine = llm.llm_engine
    runner = engine.runner
    events = []
    launch, tolist = runner.launch, DeviceTokens.tolist

    def logged_launch(out, input_ids=None, tokens_ahead=0):
        events.append(("launch", tuple(s.num_output_tokens for s in out.scheduled_seqs), input_ids is not None))
        tokens = launch(out, input_ids=input_ids, tokens_ahead=tokens_ahead)
        tokens.step = len([e for e in events if e[0] == "launch"])
        return tokens

    def logged_tolist(self):
        events.append(("read", getattr(self, "step", None)))
        return tolist(self)

    monkeypatch.setattr(runner, "launch", logged_launch)
    monkeypatch.setattr(DeviceTokens, "tolist", logged_tolist)
    engine.add_request("r", "hello=", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()  # the prefill runs synchronously: 1 token
    monkeypatch.setattr(runner, "execute", lambda out: pytest.fail("a synchronous decode step ran"))
    steps = []
    while engine.has_unfinished_requests():
        steps.append([(len(o.outputs[0].token_ids)) for o in engine.step()])
    assert steps == [[2], [3], [4], [5], [6]]
    # launch 1 (host ids), launch 2 (device ids) before read 1, launch 3 before read 2, ...; the step that
    # would follow the 6th token is never queued (max_tokens is known): the last call only reads
    assert events == [("launch", (1,), False), ("launch", (1,), True), ("read", 1),
                      ("launch", (2,), True), ("read", 2), ("launch", (3,), True), ("read", 3),
                      ("launch", (4,), True), ("read", 4), ("read", 5)]


def _due(seq, ahead=0) -> bool:
    return seq.request_id == "bad" and seq.num_output_tokens + ahead >= FAIL_AFTER


@pytest.mark.parametrize("where", ["launch", "read"])
def test_a_failure_in_a_chained_step_fails_only_its_request(llm, where):
    """The runner raises for one request, in the chained step's launch or when its tokens are read
    (where a real device reports an asynchronous error): that request fails, the others get exactly
    their tokens, nothing leaks, the engine goes on."""
    engine = llm.llm_engine
    runner = engine.runner

    with faulty_runner(runner, where, lambda out, ahead: any(_due(s, ahead) for s in out.scheduled_seqs),
                       lambda out: any(_due(s) for s in out.scheduled_seqs)):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"good{i}", p, GREEDY)
        engine.add_request("bad", "bad request=", SamplingParams(temperature=0, max_tokens=12, n=2, ignore_eos=True))
        engine.add_request("seeded", PROMPTS[0], SEEDED)  # its draws in the dropped step are undone
        done = run_to_completion(engine)
    assert done["seeded"].outputs[0].token_ids == llm.seeded
    bad = done["bad"]
    assert "Injected" in bad.error and "step fault" in bad.error
    assert all(c.finish_reason == "abort" and len(c.token_ids) == FAIL_AFTER for c in bad.outputs)
    for i, p in enumerate(PROMPTS):
        assert done[f"good{i}"].error is None and done[f"good{i}"].outputs[0].token_ids == llm.reference[p]
    assert engine.async_scheduling.pending is None
    assert_clean_and_serving(llm, PROMPTS, GREEDY)


def test_streaming_through_the_async_engine_gives_every_token_once_in_order(llm):
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64, async_scheduling=True))
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["l"]), GREEDY]

    async def stream(prompt, p, delay):
        await asyncio.sleep(delay)  # arrivals while the others decode
        seen = []
        async for out in engine.generate(prompt, p):
            seen.append(list(out.outputs[0].token_ids))
        return seen, out

    async def main():
        return await asyncio.gather(*(stream(pr, p, 0.05 * i) for i, (pr, p) in enumerate(zip(PROMPTS, params))))

    try:
        results = asyncio.run(main())
        chained = engine.engine.async_scheduling.chained_steps
    finally:
        engine.shutdown()
    sync = LLM(MODEL, max_model_len=64, async_scheduling=False)
    want = sync.generate(PROMPTS, params, use_tqdm=False)
    for (seen, final), w in zip(results, want):
        assert [len(s) for s in seen] == list(range(1, len(seen) + 1))  # one new token per output
        assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # never changed once streamed
        c = final.outputs[0]
        assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (
            w.outputs[0].token_ids, w.outputs[0].text, w.outputs[0].finish_reason, w.outputs[0].stop_reason)
    assert chained > 0


def test_serve_flag():
    pytest.importorskip("fastapi")
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    def parse(*flags):
        return engine_args_from(make_parser().parse_args(["serve", MODEL, *flags]))

    assert parse("--async-scheduling").async_scheduling is True
    assert parse("--no-async-scheduling").async_scheduling is False
    assert parse().async_scheduling is None  # the engine decides: on with one CUDA GPU, as vLLM since 0.14


@pytest.mark.parametrize("asked,device,tp,want", [
    (None, "cuda", 1, True), (None, "cpu", 1, False), (None, "cuda", 2, False),
    (True, "cpu", 1, True), (True, "cuda", 2, False), (False, "cuda", 1, False)])
def test_async_scheduling_default(asked, device, tp, want):
    """vLLM's default since 0.14: on with one GPU unless turned off; off on CPU; never with TP > 1 (yet)."""
    from types import SimpleNamespace

    from vllm.engine.llm_engine import LLMEngine

    args = SimpleNamespace(async_scheduling=asked, tensor_parallel_size=tp)
    assert LLMEngine._wants_async_scheduling(SimpleNamespace(device=torch.device(device)), args) is want
