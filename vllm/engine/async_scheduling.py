"""Async scheduling (vLLM's ``async_scheduling``): decode step n+1 is queued on the device before
the host reads step n's tokens, so the host work of a step (recording tokens, stop checks,
detokenizing, outputs, building the next inputs) overlaps the device work of the next one.

Opt-in (``EngineArgs.async_scheduling``, ``--async-scheduling``); one rank only.  ``LLMEngine.step``
hands a decode batch to ``AsyncScheduling.start`` (which queues it: the *pending* step) and then
calls ``advance``, which

1. builds the next decode batch without the pending step's tokens (``next_batch``): the same running
   sequences, in the same order, one position further (positions, slots and lengths do not depend
   on the token), their input ids gathered from the pending step's sampled tokens *on the device*;
   and queues it (``ModelRunner.launch(..., input_ids=..., tokens_ahead=1)``);
2. reads the pending step's tokens and returns them for the engine to record as a synchronous step's
   (``LLMEngine._record``); the step queued in 1 becomes the pending one.

Each ``step()`` call thus returns the outputs of one batch, in order, as without async scheduling.

Prefills are queued too, when prompts wait for several prefill steps (a batch larger than
max_num_batched_tokens, a burst of requests): ``start`` queues a prefill batch when another may follow
it, and while a prefill step is pending the engine calls ``Scheduler.schedule_prefills`` (waiting
sequences only; the pending ones are left alone) and hands the batch to ``advance``, which queues it
(``queue_prefill``) before reading the pending step's tokens.  A prefill's inputs are its prompt, so
nothing it needs is on the device only; the host work between prefill steps (recording tokens, outputs,
scheduling, building the inputs) then overlaps the device (the inputs are copied without a device
synchronisation: ``vllm.platforms.host_copy``).  A prefill that needs its prompt logprobs, or any
sequence that cannot be chained (below), runs synchronously.  After a prefill, the scheduler decides the
next decode batch; after a decode step, prompts that arrive wait for the pending step (as before).
Prefix-cache blocks are registered when a step's tokens are recorded, so a queued prefill computes a
prefix that the pending step is computing instead of sharing it (same tokens).

Why the outputs are those of the synchronous engine:

* A chained batch is what ``Scheduler.schedule`` would return next if nothing arrived meanwhile,
  or it is not built: no prefill can come first (nothing waits, or the running set is full and the
  head of the queue is not a prompt to ignore), the running sequences are the pending step's, and
  each holds (or gets now, ``BlockManager.append_slot``) the block of its next position; when a block
  is missing the chain ends and the scheduler preempts as usual.  A request that arrives, or finds
  room because the pending step finishes another, is scheduled one step later than synchronously
  (its prefill waits for the step already queued); no sequence's tokens change.
* A sequence that cannot take part in a step launched before its previous token is known never starts
  a chain: a grammar (its mask needs the token), penalties or bad_words (they read the generated
  tokens), logprobs (their host read would wait for the step anyway).  min_tokens counts the token
  ahead (``Sequence.suppressed_token_ids(tokens_ahead=1)``).
* A sequence that the pending step finishes has had one more step computed: when the finish is
  certain beforehand (max_tokens, max_model_len) it is left out of the chained batch; otherwise (EOS,
  stop token or string, abort, failure) its row's token is never read: the engine records only the
  rows of unfinished sequences.  Its KV write went to blocks it held when the step was queued; a block
  freed then and given to another sequence is written by that sequence only in later steps, which the
  device runs after this one (one stream).  Seeded sequences draw from their own generators, so the
  others' tokens do not depend on it.  (Unseeded sampled rows share the global generator, as in
  vLLM: their draws are reproducible run to run, but not the synchronous engine's.)
* Failures: an exception while a chained step is queued undoes its seeded draws and drops it (the
  chain ends; the next ``step()`` runs that batch synchronously, where ``execute_isolated`` fails only
  the requests that cause it); an exception while the pending step's tokens are read drops any
  chained step, undoes the draws and runs the pending batch again through ``execute_isolated``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm.core.scheduler import Scheduler, SchedulerOutput
from vllm.engine.errors import is_fatal
from vllm.engine.fault_isolation import Execute, execute_isolated, generator_states, sub_batch
from vllm.engine.lora_registry import LoRARegistry
from vllm.logger import init_logger
from vllm.sequence import Sequence, SequenceStatus
from vllm.worker.device_tokens import DeviceTokens
from vllm.worker.logprobs import ModelRunnerOutput
from vllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)

Results = tuple[list[tuple[SchedulerOutput, ModelRunnerOutput]], dict[str, Exception]]


@dataclass
class PendingStep:
    """A queued decode step: its batch, its tokens (device), the seeded generators' states before it."""

    out: SchedulerOutput
    tokens: DeviceTokens
    generator_states: list[tuple[torch.Generator, torch.Tensor]]


def chain_blocker(seq: Sequence) -> Optional[str]:
    """Why ``seq`` cannot be sampled before its previous token is recorded (None: it can)."""
    params = seq.sampling_params
    if seq.grammar is not None:
        return "structured output"
    if params.needs_penalties:
        return "penalties"
    if params.bad_words:
        return "bad_words"
    if params.logprobs is not None:
        return "logprobs"
    return None


def prefill_blocker(seq: Sequence) -> Optional[str]:
    """Why ``seq``'s prefill cannot be queued with its tokens left on the device (None: it can)."""
    if seq.sampling_params.prompt_logprobs is not None:
        return "prompt logprobs"
    return chain_blocker(seq)


def _restore(states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for gen, state in states:
        gen.set_state(state)


class AsyncScheduling:
    """The pending step of an ``LLMEngine`` and the chaining of decode steps (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, loras: LoRARegistry,
                 device: torch.device) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.loras = loras
        self.device = device
        self.pending: Optional[PendingStep] = None
        self.chained_steps = 0  # steps launched before their predecessor's tokens were read (tests, logs)
        self.queued_prefills = 0  # prefill steps queued (by ``start`` or ``queue_prefill``; tests, logs)

    def prefill_may_come(self) -> bool:
        """Whether the scheduler may take a waiting sequence next (then the chain must end)."""
        sched = self.scheduler
        if not sched.waiting:
            return False
        return len(sched.running) < sched.config.max_num_seqs or sched.waiting[0].num_tokens > sched.max_model_len

    def can_start(self, out: SchedulerOutput) -> bool:
        """Whether ``out`` (just scheduled) may be queued as the first step of a chain: a decode batch
        when no prefill may come next, or a prefill batch when another prefill may follow it."""
        if out.is_empty:
            return False
        if out.is_prefill:
            return self.prefill_may_come() and all(prefill_blocker(s) is None for s in out.scheduled_seqs)
        return (not self.prefill_may_come() and all(q == 1 for q in out.query_lens)
                and all(chain_blocker(s) is None for s in out.scheduled_seqs))

    def start(self, out: SchedulerOutput) -> bool:
        """Queue ``out`` as the pending step; False (nothing queued, seeded draws undone) when it may not
        start a chain or queueing it failed: the engine then runs it synchronously, isolated."""
        if self.pending is not None:
            raise RuntimeError("a step is already pending; advance() first")
        if not self.can_start(out):
            return False
        self.pending = self._queue(out)
        if self.pending is not None and out.is_prefill:
            self.queued_prefills += 1
        return self.pending is not None

    def _queue(self, out: SchedulerOutput) -> Optional[PendingStep]:
        """Launch ``out`` (host input ids); None, with its seeded draws undone, when that fails: the
        synchronous path then runs it and pins the failure down to requests."""
        states = generator_states(out.scheduled_seqs, self.device)
        try:
            tokens = self.runner.launch(out)
        except Exception as exc:  # noqa: BLE001 - the synchronous path pins it down to requests
            if is_fatal(exc):
                raise
            _restore(states)
            logger.debug("async scheduling: queueing a step failed (%r); it runs synchronously", exc)
            return None
        return PendingStep(out, tokens, states)

    def queue_prefill(self, out: SchedulerOutput) -> Optional[PendingStep]:
        """A prefill batch scheduled while a step is pending (``Scheduler.schedule_prefills``: new
        sequences only, whose inputs are their prompts), launched now; None when it must run
        synchronously (a sequence needs its tokens on the host, or the launch failed)."""
        if out.is_empty or any(prefill_blocker(s) is not None for s in out.scheduled_seqs):
            return None
        step = self._queue(out)
        if step is not None:
            self.chained_steps += 1
            self.queued_prefills += 1
        return step

    def advance(self, execute: Execute, prefill: Optional[SchedulerOutput] = None) -> Results:
        """Queue the next step when the chain goes on, then read the pending step's tokens: the
        (batch, result) parts and the failed requests, as ``execute_isolated`` returns them.
        ``execute``: the synchronous runner, for a pending step whose tokens cannot be read.
        ``prefill``: a prefill batch the engine scheduled meanwhile; it is the next step (queued, when
        it can be: ``pending.out is prefill`` afterwards; otherwise the engine runs it)."""
        prev = self.pending
        if prev is None:
            raise RuntimeError("no step is pending")
        self.pending = None
        if prefill is not None:
            nxt = self.queue_prefill(prefill)
        else:
            nxt = self._launch_next(prev) if not self.prefill_may_come() else None
        live = [i for i, s in enumerate(prev.out.scheduled_seqs) if not s.is_finished]
        part = sub_batch(prev.out, live)
        try:
            tokens = prev.tokens.tolist()
        except Exception as exc:  # noqa: BLE001 - run it again, isolated
            if is_fatal(exc):
                raise
            logger.warning("async scheduling: reading a step's tokens failed (%r); running it again", exc)
            if nxt is not None:  # dropped: a queued prefill's own draws are undone (the engine runs it after)
                _restore(nxt.generator_states)
            _restore(prev.generator_states)  # also undoes a chained decode step's draws (they came after)
            return execute_isolated(execute, part, self.device) if live else ([], {})
        self.pending = nxt
        if not live:
            return [], {}
        return [(part, ModelRunnerOutput([tokens[i] for i in live]))], {}

    # ---- the chained step --------------------------------------------------------------
    def next_batch(self, prev: SchedulerOutput) -> Optional[tuple[SchedulerOutput, list[int]]]:
        """The decode batch after ``prev`` (queued, tokens not recorded) and, per sequence, its row in
        ``prev``; None when the scheduler must decide (see the module docstring).  Reserves the blocks
        of the new positions."""
        sched, bm = self.scheduler, self.scheduler.block_manager
        bs, max_len = bm.block_size, sched.max_model_len
        rows: list[int] = []
        seqs: list[Sequence] = []
        ctx: list[int] = []
        short: list[Sequence] = []  # sequences whose next position starts a block
        live = 0
        for i, (seq, c) in enumerate(zip(prev.scheduled_seqs, prev.context_lens)):
            if seq.is_finished:
                continue
            live += 1
            if seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens != c or seq.num_tokens != c + 1:
                return None  # not the state of a decode step in flight (cannot happen; never guess)
            max_tokens = seq.sampling_params.max_tokens
            if (max_tokens is not None and seq.num_output_tokens + 1 >= max_tokens) or c + 2 >= max_len:
                continue  # prev's token finishes it (length): nothing more to compute
            rows.append(i)
            seqs.append(seq)
            ctx.append(c + 1)
            if len(seq.block_table) * bs < c + 2:
                short.append(seq)
        if not rows or live != len(sched.running) or len(short) > bm.num_free_blocks:
            return None  # (no free block for one: the scheduler preempts)
        for seq in short:
            bm.append_slot(seq, seq.num_tokens + 1)
        return SchedulerOutput(scheduled_seqs=seqs, query_lens=[1] * len(seqs), context_lens=ctx,
                               is_prefill=False, adapter_memo=sched.adapter_memo), rows

    def _launch_next(self, prev: PendingStep) -> Optional[PendingStep]:
        if prev.out.is_prefill:
            return None  # the scheduler decides what follows a prefill
        try:
            built = self.next_batch(prev.out)
        except Exception as exc:  # noqa: BLE001 - a bug here costs the overlap, not the pending step's tokens
            if is_fatal(exc):
                raise
            logger.exception("async scheduling: building the next step failed; the scheduler decides it")
            return None
        if built is None:
            return None
        out, rows = built
        if self.loras.check_batch(out):
            return None  # the synchronous step fails those requests
        ids = prev.tokens.device
        if rows != list(range(len(prev.tokens))):
            index = torch.tensor(rows, dtype=torch.int64).to(ids.device, non_blocking=True)
            ids = ids.index_select(0, index)
        states = generator_states(out.scheduled_seqs, self.device)
        try:
            tokens = self.runner.launch(out, input_ids=ids, tokens_ahead=1)
        except Exception as exc:  # noqa: BLE001 - the next step runs it synchronously, isolated
            if is_fatal(exc):
                raise
            _restore(states)
            logger.debug("async scheduling: a chained step failed (%r); it runs synchronously", exc)
            return None
        self.chained_steps += 1
        return PendingStep(out, tokens, states)
