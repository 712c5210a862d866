"""``AsyncLLMEngine``: an ``LLMEngine`` stepped by one background thread, driven from asyncio.

The engine is not thread-safe, so every call into it (add_request, abort_request,
add_lora, remove_lora, step) happens on the engine thread.  Callers post commands
to a queue; the thread drains the queue between steps, runs a step while there is
work, and hands each ``RequestOutput`` to the asyncio queue of its request with
``loop.call_soon_threadsafe``.

Prompts are tokenized and checked off the engine thread (``asyncio.to_thread``), so a
huge prompt never holds up the other requests' steps.  A request that fails inside the
engine raises ``RequestFailedError`` in its own iterator only; an unexpected error in
the loop itself fails the requests in flight and the loop goes on.  Only a fatal error
(``vllm.engine.errors.is_fatal``) stops the engine: then every caller gets
``EngineDeadError``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Optional

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.errors import EngineDeadError, RequestFailedError, describe, is_fatal
from vllm.engine.llm_engine import LLMEngine, PromptType
from vllm.engine.request_stats import RequestTimer, StatsObserver, StepStats, finish_reason_of
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)


__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestFailedError"]


class _Stream:
    """Where the outputs of one request go: an asyncio queue on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: "queue.Queue[tuple[Callable[[], Any], Optional[concurrent.futures.Future]]]" = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._dead: Optional[BaseException] = None
        # counters for /metrics (written on the engine thread only)
        # (requests_running / requests_waiting count requests, refreshed after every step and command)
        self.stats = {"requests_finished": 0, "requests_aborted": 0, "requests_failed": 0, "prompt_tokens": 0,
                      "generation_tokens": 0, "requests_running": 0, "requests_waiting": 0}
        # (adapter names of the running requests, of the waiting ones, when they were counted): with LoRA on
        self.lora_state: tuple[tuple[str, ...], tuple[str, ...], float] = ((), (), time.time())
        # per-request timings (engine thread), handed to the observers as StepStats after commands and steps
        self._timers: dict[str, RequestTimer] = {}
        self._step_stats = StepStats()
        self._prefix_cache_seen = (0, 0)  # the engine's prefix-cache counts already handed on
        self._observers: list[StatsObserver] = []
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine(args))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def add_stats_observer(self, observer: StatsObserver) -> None:
        """Call ``observer(StepStats)`` (on the engine thread) after each command or step that did something."""
        self._observers.append(observer)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ---- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except BaseException as e:  # noqa: BLE001
                if is_fatal(e):
                    self._die(e)
                    return
                logger.exception("the engine loop failed; failing the requests in flight and going on")
                self._fail_all(e)

    def _iteration(self) -> None:
        """Run the queued commands (waiting for one when idle), then one step if there is work."""
        busy = self.engine.has_unfinished_requests()
        try:
            cmd = self._commands.get_nowait() if busy else self._commands.get()
        except queue.Empty:
            cmd = None
        while cmd is not None:
            self._run_command(*cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None
        if self._stop.is_set():
            return
        if self.engine.has_unfinished_requests():
            self._step()

    def _die(self, e: BaseException) -> None:
        logger.error("the engine loop died: %r", e, exc_info=e)
        self._dead = e
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(f"the engine loop died: {e!r}"))
        self._streams.clear()

    def _fail_all(self, e: BaseException) -> None:
        """After an unexpected error outside the engine's own isolation: every request in flight fails."""
        error = f"the engine failed while serving this request ({describe(e)})"
        ids = list(self.engine._requests) + [rid for rid in self._streams if rid not in self.engine._requests]
        try:
            self.engine.abort_request(ids)
        except Exception:  # noqa: BLE001 - the streams are answered anyway
            logger.exception("aborting the failed requests failed")
        for rid in ids:
            stream = self._streams.pop(rid, None)
            self.stats["requests_failed"] += 1
            self._end_timer(rid, "abort", failed=True)
            if stream is not None:
                stream.put(RequestFailedError(f"request {rid} failed: {error}", {rid: error}))
        self._update_gauges()

    def _run_command(self, fn: Callable[[], Any], fut: Optional[concurrent.futures.Future]) -> None:
        """Run one command; the gauges are refreshed before its caller hears back."""
        if fut is not None and not fut.set_running_or_notify_cancel():
            return  # its caller was cancelled before it ran: nothing to do, nobody to answer
        try:
            result = fn()
        except BaseException as e:
            self._update_gauges()
            if fut is not None:
                fut.set_exception(e)
            elif is_fatal(e):
                raise
            else:
                logger.exception("an engine command failed")
            return
        self._update_gauges()
        if fut is not None:
            fut.set_result(result)

    def _end_timer(self, request_id: str, reason: str, failed: bool = False) -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            self._step_stats.finished.append(timer.finish(time.monotonic(), reason, failed))

    def _publish(self) -> None:
        """Hand what happened since the last call to the observers (an observer's error is only logged)."""
        stats, self._step_stats = self._step_stats, StepStats()
        if not stats:
            return
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # noqa: BLE001 - metrics are not worth a request
                logger.exception("a stats observer failed")

    def _update_gauges(self) -> None:
        self._publish()
        try:
            running, waiting = self.engine.get_request_counts()
            if self.engine.lora_config is not None:
                # a request runs when any of its sequences does (as the gauges count them)
                sched = self.engine.scheduler
                running_ids = {s.request_id for s in sched.running}
                queued = [s for s in sched.waiting if s.request_id not in running_ids]
                names = [sorted({s.lora_request.lora_name for s in seqs if s.lora_request is not None})
                         for seqs in (sched.running, queued)]
                self.lora_state = (tuple(names[0]), tuple(names[1]), time.time())
        except Exception:  # noqa: BLE001 - a gauge is not worth a request; keep the last values
            logger.exception("could not count the running and waiting requests")
            return
        self.stats["requests_running"] = running
        self.stats["requests_waiting"] = waiting

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        queries, hits = self.engine.prefix_cache_counts()
        self._step_stats.prefix_cache_queries += queries - self._prefix_cache_seen[0]
        self._step_stats.prefix_cache_hits += hits - self._prefix_cache_seen[1]
        self._prefix_cache_seen = (queries, hits)
        for out in outputs:  # timings first: /metrics holds a request before its caller hears back
            timer = self._timers.get(out.request_id)
            if timer is not None:
                timer.on_output(out, now, self._step_stats)
                if out.finished:
                    self._end_timer(out.request_id, finish_reason_of(out), failed=out.error is not None)
        self._update_gauges()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
                self.stats["generation_tokens"] += sum(len(o.token_ids) for o in out.outputs)
                if out.error is not None:
                    self.stats["requests_failed"] += 1
                    if stream is not None:
                        stream.put(RequestFailedError(f"request {out.request_id} failed: {out.error}",
                                                      {out.request_id: out.error}, [out]))
                    continue
                self.stats["requests_finished"] += 1
            if stream is not None:
                stream.put(out)

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    async def _call_async(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._call(fn))

    # ---- public API -------------------------------------------------------------------
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        return await self._call_async(lambda: self.engine.add_lora(lora_request))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call_async(lambda: self.engine.remove_lora(lora_int_id))

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    def _abort_nowait(self, request_id: str) -> None:
        def do() -> None:
            if request_id in self._streams or request_id in self.engine._requests:
                self.stats["requests_aborted"] += 1
            self._end_timer(request_id, "abort")
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        if self.is_running:
            self._commands.put((do, None))

    def _abort_added(self, request_id: str, stream: _Stream) -> None:
        """Abort a request whose caller was cancelled right after its add ran (engine thread)."""
        if self._streams.get(request_id) is stream:
            self._streams.pop(request_id)
            self.stats["requests_aborted"] += 1
            self._end_timer(request_id, "abort")
            self.engine.abort_request(request_id)

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None,
                       lora_request: Optional[LoRARequest] = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's ``RequestOutput`` after every step until it finishes.

        Errors of ``add_request`` (bad adapter, too-long prompt) are raised here, to this
        caller only; so is ``RequestFailedError`` when the request fails inside the engine
        (its final output is ``error.outputs[0]``).  Closing or cancelling the iterator
        aborts the request.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        arrival = time.monotonic()
        stream = _Stream(asyncio.get_running_loop())
        params = params or SamplingParams()
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        # tokenized and checked here, off the engine thread: other requests keep stepping meanwhile
        text, ids = await asyncio.to_thread(self.engine.process_prompt, request_id, prompt, params)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        prompt = {"prompt": text, "prompt_token_ids": ids, **({"cache_salt": salt} if salt is not None else {})}

        added = threading.Event()

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, lora_request=lora_request,
                                    arrival_time=time.time())
            self._streams[request_id] = stream
            n_prompt = len(self.engine._requests[request_id][0].prompt_token_ids)
            self.stats["prompt_tokens"] += n_prompt
            self._timers[request_id] = RequestTimer(request_id, arrival, n_prompt)
            self._step_stats.prompt_tokens += n_prompt
            added.set()

        try:
            await self._call_async(add)
        except asyncio.CancelledError:  # the add may have run (or be running): abort what it added
            if self.is_running:
                self._commands.put((lambda: added.is_set() and self._abort_added(request_id, stream), None))
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_nowait(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; unfinished requests are dropped."""
        self._stop.set()
        self._commands.put((lambda: None, None))  # wake the thread if it waits for work
        self._thread.join(timeout)
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError("the engine was shut down"))
        self._streams.clear()
        if not self._thread.is_alive():  # else the step in flight still talks to the other ranks
            self.engine.shutdown()
