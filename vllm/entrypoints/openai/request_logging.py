"""What the server logs about the work it does: one line per request, and periodic stats.

- ``LoggingEngine`` wraps the ``AsyncLLMEngine`` the routes use.  When a request's
  first output arrives it logs one INFO line: the request id, the model or adapter,
  the number of prompt tokens and the sampling parameters that differ from their
  defaults.  The prompt's text is left out unless the operator asks for its first
  N characters (``--max-log-len N``); ``--disable-log-requests`` turns the lines off.
  It also counts the tokens generated as the outputs flow, for the stats line.
- ``StatsLogger`` logs, every ``VLLM_LOG_STATS_INTERVAL`` seconds while the engine
  has work, the prompt and generation throughput, the running and waiting requests
  and the share of KV-cache blocks in use; nothing while idle
  (``--disable-log-stats`` turns it off).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator, Optional

from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)

_SUMMARY_SKIP = ("output_kind",)


def params_summary(params: Optional[SamplingParams]) -> str:
    """The fields that differ from ``SamplingParams()``'s, as ``name=value``; stop strings only counted."""
    if params is None:
        return "defaults"
    default = SamplingParams()
    parts = []
    for f in dataclasses.fields(SamplingParams):
        if f.name in _SUMMARY_SKIP or not f.init:
            continue
        value = getattr(params, f.name, None)
        if value == getattr(default, f.name, None):
            continue
        if f.name == "stop":  # user text: only how many
            value = f"<{1 if isinstance(value, str) else len(value)} string(s)>"
        parts.append(f"{f.name}={value}")
    return ", ".join(parts) or "defaults"


class LoggingEngine:
    """An ``AsyncLLMEngine`` whose ``generate`` logs each request once and counts generated tokens.

    Every other attribute is the wrapped engine's.
    """

    def __init__(self, engine: AsyncLLMEngine, *, log_requests: bool = True,
                 max_log_len: Optional[int] = None) -> None:
        self._engine = engine
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.generation_tokens = 0  # tokens generated, as seen by the server's requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _prompt_text(self, out: RequestOutput) -> str:
        text = out.prompt
        if text is None:
            text = self._engine.tokenizer.decode(out.prompt_token_ids[: self.max_log_len])
        return text[: self.max_log_len]

    def _log(self, out: RequestOutput, params: Optional[SamplingParams], lora: Optional[LoRARequest]) -> None:
        model = f"adapter {lora.lora_name}" if lora is not None else "the base model"
        line = (f"request {out.request_id}: {model}, {len(out.prompt_token_ids)} prompt tokens, "
                f"params: {params_summary(params)}")
        if self.max_log_len:
            line += f", prompt (first {self.max_log_len} characters): {self._prompt_text(out)!r}"
        logger.info("%s", line)

    async def generate(self, prompt: Any, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, lora_request: Optional[LoRARequest] = None,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        inner = self._engine.generate(prompt, params, request_id, lora_request, **kwargs)
        logged, seen = False, 0
        try:
            async for out in inner:
                if not logged and self.log_requests:
                    self._log(out, params, lora_request)
                logged = True
                now = sum(len(c.token_ids) for c in out.outputs)
                self.generation_tokens += max(now - seen, 0)
                seen = now
                yield out
        finally:
            await inner.aclose()


class StatsLogger:
    """Logs the engine's throughput and load every ``interval`` seconds while it has work."""

    def __init__(self, engine: LoggingEngine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self._task: Optional[asyncio.Task] = None

    def _snapshot(self) -> tuple[float, int, int]:
        return time.monotonic(), self.engine.stats["prompt_tokens"], self.engine.generation_tokens

    def line(self, before: tuple[float, int, int], after: tuple[float, int, int]) -> Optional[str]:
        """The stats line for the interval between two snapshots; None when the engine was idle."""
        stats = self.engine.stats
        running, waiting = stats["requests_running"], stats["requests_waiting"]
        dt = max(after[0] - before[0], 1e-9)
        prompt, gen = after[1] - before[1], after[2] - before[2]
        if not (prompt or gen or running or waiting):
            return None
        bm = self.engine.engine.scheduler.block_manager
        usage = 100.0 * bm.num_used_blocks / max(bm.num_blocks, 1)
        return (f"engine: prompt {prompt / dt:.1f} tokens/s, generation {gen / dt:.1f} tokens/s, "
                f"{running} running, {waiting} waiting requests, KV cache {usage:.1f}% used")

    async def _run(self) -> None:
        before = self._snapshot()
        while True:
            await asyncio.sleep(self.interval)
            after = self._snapshot()
            text = self.line(before, after)
            if text is not None:
                logger.info("%s", text)
            before = after

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
