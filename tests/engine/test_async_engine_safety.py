"""Issue 9 on AsyncLLMEngine: a failing request fails alone, the loop survives errors, the
running / waiting gauges count requests and follow aborts at once, and a huge prompt's
tokenization does not hold up the other requests (demo model)."""
import asyncio
import os
import threading

import pytest

from tests.utils import patched
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from vllm.executor.multiproc import WorkerError

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
PROMPTS = ["hello=", "abc=", "xyz=", "good day="]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class Injected(RuntimeError):
    pass


def _engine(**kw) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64, **kw))


@pytest.fixture(scope="module")
def engine():
    eng = _engine(max_num_seqs=4)
    eng.reference = {p: asyncio.run(_tokens(eng, p)) for p in PROMPTS}
    yield eng
    eng.shutdown()


async def _tokens(engine, prompt, params=GREEDY, request_id=None):
    last = None
    async for out in engine.generate(prompt, params, request_id=request_id):
        last = out
    return last.outputs[0].token_ids


async def _barrier(engine):
    """Returns once the engine thread has run every command queued before it."""
    await engine._call_async(lambda: None)


def test_a_failing_request_fails_in_its_own_generator_only(engine):
    def make(execute):
        def execute_with_fault(out):
            if any(s.request_id == "bad" and s.num_output_tokens >= 2 for s in out.scheduled_seqs):
                raise Injected("runner fault")
            return execute(out)
        return execute_with_fault

    async def main():
        goods = [asyncio.ensure_future(_tokens(engine, p)) for p in PROMPTS[:3]]
        with pytest.raises(RequestFailedError, match="request bad failed.*runner fault") as e:
            await _tokens(engine, PROMPTS[3], request_id="bad")
        assert e.value.failures.keys() == {"bad"} and e.value.outputs[0].error is not None
        assert len(e.value.outputs[0].outputs[0].token_ids) == 2
        assert await asyncio.gather(*goods) == [engine.reference[p] for p in PROMPTS[:3]]

    with patched(engine.engine.runner, "execute", make):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert engine.is_running and engine.stats["requests_failed"] >= 1
    assert asyncio.run(_tokens(engine, PROMPTS[3])) == engine.reference[PROMPTS[3]]
    engine.engine.scheduler.block_manager.check_no_leaks()


@pytest.mark.parametrize("where", ["step", "has_unfinished_requests"])
def test_the_loop_survives_an_error_outside_the_step(engine, where):
    """An unexpected error in the loop (not inside LLMEngine's own isolation) fails the requests in
    flight; the loop goes on and serves the next ones."""
    def make(fn):
        def fault_once(*args):
            if not fired and len(engine.engine._requests) == 2:
                fired.append(True)
                raise Injected(f"{where} fault")
            return fn(*args)
        return fault_once

    fired = []

    async def main():
        gate, holding = threading.Event(), threading.Event()
        engine._commands.put((lambda: holding.set() or gate.wait(30), None))  # hold the engine thread...
        await asyncio.to_thread(holding.wait, 10)
        tasks = [asyncio.ensure_future(_tokens(engine, p)) for p in PROMPTS[:2]]
        while engine._commands.qsize() < 2:  # ...until both requests are queued behind it
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RequestFailedError) and f"{where} fault" in str(r) for r in results), results

    with patched(engine.engine, where, make):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert fired and engine.is_running
    assert asyncio.run(_tokens(engine, PROMPTS[0])) == engine.reference[PROMPTS[0]]
    assert not engine.engine.has_unfinished_requests()
    engine.engine.scheduler.block_manager.check_no_leaks()


def test_a_fatal_error_stops_the_engine():
    eng = _engine()
    try:
        def make(step):
            def dead():
                raise WorkerError("tensor-parallel worker process(es) rank 1 (exit code -9) died")
            return dead

        async def main():
            with patched(eng.engine, "step", make):
                with pytest.raises(EngineDeadError, match="worker"):
                    await _tokens(eng, PROMPTS[0])
            with pytest.raises(EngineDeadError):
                await _tokens(eng, PROMPTS[0])

        asyncio.run(asyncio.wait_for(main(), 60))
        assert not eng.is_running
    finally:
        eng.shutdown()


def test_gauges_count_requests_and_follow_aborts(engine):
    """max_num_seqs=4: a request with n=4 runs (one request, four sequences), a second waits; after
    both are aborted the gauges read 0 at once, with no step in between."""
    long = SamplingParams(temperature=0, max_tokens=55, ignore_eos=True, n=4)
    b_ids = engine.engine.tokenizer.encode(PROMPTS[1])  # token ids: added at once, no tokenization

    async def main():
        a = engine.generate(PROMPTS[0], long, request_id="a")
        await a.__anext__()
        b = engine.generate(b_ids, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, n=2),
                            request_id="b")
        b_task = asyncio.ensure_future(b.__anext__())
        for _ in range(200):  # until b was added
            if "b" in engine.engine._requests:
                break
            await asyncio.sleep(0.01)
        await _barrier(engine)
        assert (engine.stats["requests_running"], engine.stats["requests_waiting"]) == (1, 1)
        b_task.cancel()
        await asyncio.gather(b_task, return_exceptions=True)
        await b.aclose()
        await a.aclose()
        await _barrier(engine)
        assert (engine.stats["requests_running"], engine.stats["requests_waiting"]) == (0, 0), (list(engine.engine._requests), engine.stats)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not engine.engine.has_unfinished_requests()


class _SlowTokenizer:
    """Delegates to the real tokenizer; ``encode`` of the huge prompt waits until released."""

    def __init__(self, real, huge: str) -> None:
        self._real, self._huge = real, huge
        self.release = threading.Event()
        self.started = threading.Event()

    def encode(self, text, *args, **kwargs):
        if text == self._huge:
            self.started.set()
            assert self.release.wait(30), "never released"
        return self._real.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_huge_prompt_does_not_block_other_requests(engine):
    huge = "x" * 200  # longer than max_model_len: refused once tokenized
    slow = _SlowTokenizer(engine.engine.tokenizer, huge)

    async def main():
        big = asyncio.ensure_future(_tokens(engine, huge))
        try:
            await asyncio.to_thread(slow.started.wait, 10)
            assert slow.started.is_set()
            small = await asyncio.wait_for(asyncio.gather(*[_tokens(engine, p) for p in PROMPTS]), 20)
            assert small == [engine.reference[p] for p in PROMPTS]
            assert not big.done()  # still tokenizing: the others were served meanwhile
        finally:
            slow.release.set()
        with pytest.raises(ValueError, match="max_model_len"):
            await big

    engine.engine.tokenizer = slow
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.engine.tokenizer = slow._real
    assert engine.is_running


def test_cancelled_while_being_added_is_aborted(engine):
    """A caller cancelled while its add waits for the engine thread (e.g. the client went away): its
    request never runs, and the requests in flight are not disturbed."""
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def main():
        other = asyncio.ensure_future(_tokens(engine, PROMPTS[0]))
        while not engine.engine._requests:
            await asyncio.sleep(0.01)
        gate, holding = threading.Event(), threading.Event()
        engine._commands.put((lambda: holding.set() or gate.wait(30), None))
        await asyncio.to_thread(holding.wait, 10)
        task = asyncio.ensure_future(_tokens(engine, [5, 6, 7], long, request_id="cancelled"))
        while engine._commands.qsize() < 1:  # its add is queued
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        assert await other == engine.reference[PROMPTS[0]]
        await _barrier(engine)
        assert not engine.engine.has_unfinished_requests() and engine.stats["requests_running"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_cancelled_right_after_being_added_is_aborted(engine):
    """The add ran on the engine thread, but the caller is cancelled before it hears back: the request
    it added is aborted (not left running with nobody to read it)."""
    import time

    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def main():
        gate, holding = threading.Event(), threading.Event()
        engine._commands.put((lambda: holding.set() or gate.wait(30), None))
        await asyncio.to_thread(holding.wait, 10)
        task = asyncio.ensure_future(_tokens(engine, [5, 6, 7], long, request_id="late"))
        while engine._commands.qsize() < 1:
            await asyncio.sleep(0.01)
        gate.set()
        deadline = time.monotonic() + 10
        while "late" not in engine.engine._requests and time.monotonic() < deadline:
            time.sleep(0.001)  # blocks the event loop: the add's answer cannot reach the task yet
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _barrier(engine)
        assert not engine.engine.has_unfinished_requests() and "late" not in engine._streams

    asyncio.run(asyncio.wait_for(main(), 60))
