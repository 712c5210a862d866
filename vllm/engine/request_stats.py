"""Per-request timings and token counts, measured on the engine thread where they happen.

``AsyncLLMEngine`` keeps one ``RequestTimer`` per request from its arrival (the call of
``generate``, before tokenisation, as vLLM's arrival time) to its end, and after every
command and step hands a ``StepStats`` (what happened since the last one) to its
observers, e.g. the server's Prometheus metrics.  Times come from ``time.monotonic``.

Per request: the time to first token (arrival to the step that produced its first
token), one inter-token latency per later step that produced tokens (the time since
the previous such step), and at its end the end-to-end latency, its prompt and
generation token counts and why it ended: ``stop``, ``length`` or ``abort`` (as
vLLM's ``finished_reason``; a request of several samples takes ``abort`` if any sample
was aborted, else ``length`` if any hit its length, else ``stop``).  A request that
failed inside the engine ends with ``failed=True``.

Prefix caching: the prompt tokens looked up in the prefix cache and those found there
(``LLMEngine.prefix_cache_counts``, vLLM's ``prefix_cache_queries`` / ``_hits``), per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from vllm.outputs import RequestOutput


@dataclass
class FinishedRequest:
    """One request that ended (finished, aborted or failed)."""

    request_id: str
    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    generation_tokens: int
    e2e_latency: float  # seconds, arrival to the end
    failed: bool = False


@dataclass
class StepStats:
    """What happened since the previous ``StepStats``: tokens admitted and generated, prefix-cache
    tokens queried and hit, latencies observed (seconds), requests that ended."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def __bool__(self) -> bool:
        return bool(self.prompt_tokens or self.generation_tokens or self.prefix_cache_queries
                    or self.time_to_first_token
                    or self.inter_token_latency or self.finished)


StatsObserver = Callable[[StepStats], None]


def finish_reason_of(out: Optional[RequestOutput]) -> str:
    """The request's ``finished_reason`` label from its samples' finish reasons."""
    reasons = {c.finish_reason for c in out.outputs} if out is not None else {"abort"}
    if "abort" in reasons or None in reasons:
        return "abort"
    return "length" if "length" in reasons else "stop"


class RequestTimer:
    """The timings of one request (engine thread only)."""

    def __init__(self, request_id: str, arrival: float, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.generation_tokens = 0
        self.last_token_time: Optional[float] = None

    def on_output(self, out: RequestOutput, now: float, stats: StepStats) -> None:
        """Account the tokens ``out`` holds beyond those seen before (its outputs are cumulative)."""
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self.generation_tokens
        if new <= 0:
            return
        self.generation_tokens = total
        stats.generation_tokens += new
        if self.last_token_time is None:
            stats.time_to_first_token.append(now - self.arrival)
        else:
            stats.inter_token_latency.append(now - self.last_token_time)
        self.last_token_time = now

    def finish(self, now: float, reason: str, failed: bool = False) -> FinishedRequest:
        return FinishedRequest(self.request_id, reason, self.prompt_tokens, self.generation_tokens,
                               now - self.arrival, failed)
