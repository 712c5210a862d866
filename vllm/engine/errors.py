"""How the engine reports failures, and which ones it survives.

A bad request is refused by ``add_request`` with a ValueError (the server's 400).
An exception raised while a step is computed (model runner, sampler, postprocess,
detokenizer) fails only the requests that caused it: each finishes with
``RequestOutput.error`` set (its unfinished samples with finish_reason "abort"),
``AsyncLLMEngine.generate`` raises ``RequestFailedError`` in that request's
iterator, and ``LLM.generate`` raises it after the batch, with every output
attached.  The engine goes on.  Only fatal errors (``is_fatal``: a dead
tensor-parallel worker, ranks out of step, an interpreter exit) stop it; then
``AsyncLLMEngine`` answers ``EngineDeadError`` to everyone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine stopped (a fatal error, or shutdown); no request can be served any more."""


class FatalEngineError(RuntimeError):
    """An error after which the engine cannot go on (e.g. the tensor-parallel ranks are out of step)."""


class RequestFailedError(RuntimeError):
    """One or more requests failed while the engine computed them; the others were served.

    failures: request id -> what went wrong.
    outputs: the final ``RequestOutput`` of the request (``AsyncLLMEngine``), or of every
        prompt of the batch in prompt order (``LLM.generate``); failed ones have ``error`` set.
    """

    def __init__(self, message: str, failures: dict[str, str],
                 outputs: Optional[list["RequestOutput"]] = None) -> None:
        super().__init__(message)
        self.failures = failures
        self.outputs = outputs or []


def is_fatal(exc: BaseException) -> bool:
    """True for errors the engine cannot survive by failing requests: a worker process that died,
    ranks out of step, and anything that is not an ``Exception`` (KeyboardInterrupt, SystemExit)."""
    if not isinstance(exc, Exception) or isinstance(exc, FatalEngineError):
        return True
    from vllm.executor.multiproc import WorkerError

    return isinstance(exc, WorkerError)


def describe(exc: BaseException) -> str:
    """A one-line description of an internal error for the failed request's output."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
