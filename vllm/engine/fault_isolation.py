"""Run one step's batch so that an exception fails only the requests that cause it.

``execute_isolated(execute, out, device)`` runs the whole batch first (the normal, only
cost when nothing fails).  When it raises a non-fatal exception, the batch is split
by request into halves that are run again, recursively, until every failing request
is alone: a request that fails alone is the culprit; everything that ran is kept.  A
fault that does not depend on the requests (every run fails) thus fails each request
of the step, and a transient one fails none.

Running part of a batch again is safe: K/V written for the same positions are written
again with the same values, and the generators of seeded sequences are restored to
their state before the failed run, so their tokens do not depend on the failure.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vllm.core.scheduler import SchedulerOutput
from vllm.engine.errors import is_fatal
from vllm.logger import init_logger
from vllm.sequence import Sequence
from vllm.worker.logprobs import ModelRunnerOutput

logger = init_logger(__name__)

Execute = Callable[[SchedulerOutput], ModelRunnerOutput]


def sub_batch(out: SchedulerOutput, keep: list[int]) -> SchedulerOutput:
    """The scheduled sequences at positions ``keep`` of ``out`` (no ignored / preempted ones)."""
    return SchedulerOutput(scheduled_seqs=[out.scheduled_seqs[i] for i in keep],
                           query_lens=[out.query_lens[i] for i in keep],
                           context_lens=[out.context_lens[i] for i in keep], is_prefill=out.is_prefill)


def generator_states(seqs: list[Sequence], device: torch.device) -> list[tuple[torch.Generator, torch.Tensor]]:
    """(generator, state) of the seeded sampled sequences: ``gen.set_state(state)`` undoes a run's draws."""
    states = []
    for seq in seqs:
        params = seq.sampling_params
        if params.seed is None or params.temperature == 0:
            continue
        gen = seq.get_generator(device)  # None unless seeded and sampled (created as the runner would)
        if gen is not None:
            states.append((gen, gen.get_state()))
    return states


def execute_isolated(execute: Execute, out: SchedulerOutput, device: torch.device
                     ) -> tuple[list[tuple[SchedulerOutput, ModelRunnerOutput]], dict[str, Exception]]:
    """Run ``out``; return the parts that ran with their results, and request id -> exception of
    the requests that failed.  Fatal errors (``is_fatal``) are raised at once."""
    done: list[tuple[SchedulerOutput, ModelRunnerOutput]] = []
    failed: dict[str, Exception] = {}

    def run(batch: SchedulerOutput, states: Optional[list]) -> None:
        try:
            done.append((batch, execute(batch)))
            return
        except Exception as exc:  # noqa: BLE001 - pinned down to requests below
            if is_fatal(exc):
                raise
            error = exc
        for gen, state in states or ():
            gen.set_state(state)
        order = list(dict.fromkeys(seq.request_id for seq in batch.scheduled_seqs))
        if len(order) == 1:
            logger.error("request %s failed in a step: %r", order[0], error, exc_info=error)
            failed[order[0]] = error
            return
        half = set(order[:len(order) // 2])
        for side in (True, False):
            keep = [i for i, seq in enumerate(batch.scheduled_seqs) if (seq.request_id in half) == side]
            part = sub_batch(batch, keep)
            run(part, generator_states(part.scheduled_seqs, device) if states else None)

    seeded = generator_states(out.scheduled_seqs, device)
    run(out, seeded)
    return done, failed
