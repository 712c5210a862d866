"""Continuous-batching scheduler (vLLM V0 semantics, no chunked prefill).

One engine step::

    out = scheduler.schedule()             # which sequences, how many new tokens each
    ... model runner: for sequence i of out.scheduled_seqs, feed
        token_ids[c : c + q] at positions c..c+q-1 (c = out.context_lens[i],
        q = out.query_lens[i]); store K/V in out.slot_mapping(block_size);
        attend over out.seq_lens[i] = c + q tokens via out.block_tables[i];
        keep the logits of each sequence's last new token
    ... sampler: one token per scheduled sequence
        (seq.get_generator(device), seq.suppressed_token_ids())
    finished = scheduler.postprocess(out.scheduled_seqs, sampled_token_ids, logprobs, prompt_logprobs)
        # append tokens (and their logprobs when asked), num_computed_tokens += q, stop on EOS / stop token ids /
        # max_tokens / max_model_len, free finished sequences' blocks
    ... detokenizer on every scheduled sequence: update output_text; when a
        stop string fires, scheduler.finish_seq(seq, FINISHED_STOPPED, stop_str)
    ... engine: RequestOutputs for the scheduled and the ignored sequences

A step is either a prefill (whole prompts, or prompt + outputs of a preempted
sequence being recomputed) or a decode (one token per running sequence).
With prefix caching (``BlockManager.enable_prefix_caching``) a prefill feeds only
what follows the sequence's leading full blocks found in the cache (its context
then starts at their end: the attention reads them through the block table); at
least the last token is always fed. ``prefix_cache_stats`` counts the tokens
looked up and found.
Prefill comes first whenever a waiting sequence fits: FCFS from the head of
the waiting queue while the step has fewer than ``max_num_batched_tokens``
tokens, the running set fewer than ``max_num_seqs`` sequences, and the KV cache
free blocks. Otherwise all running sequences decode; when one cannot get a block,
the most recently arrived running sequence is preempted (blocks freed, put back
at the front of the waiting queue, recomputed later; its tokens so far are kept,
so it continues exactly where it was).

LoRA: the distinct adapters (``lora_int_id > 0``) of the running sequences stay
<= ``max_loras``, so any batch respects it. A waiting sequence whose adapter
would exceed it keeps its place; behind it only base-model sequences may be
admitted (later adapter sequences would keep the running adapters busy and
starve it), so it runs as soon as an adapter slot drains.  The adapters of a batch (per sequence,
and distinct) come from ``adapter_memo`` (``vllm.core.batch_adapters``): no per-sequence work while the
batch is the previous one's sequences.

Prompts longer than ``max_model_len`` (capped at the KV cache's capacity) are
finished as FINISHED_IGNORED and returned in ``SchedulerOutput.ignored_seqs``.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Iterable, Optional, Sequence as Seq, Union

import torch

from vllm.config.scheduler import SchedulerConfig
from vllm.core.batch_adapters import AdapterMemo
from vllm.core.block_manager import BlockManager
from vllm.core.scheduler_output import PrefixCacheStats, SchedulerOutput
from vllm.logger import init_logger
from vllm.sequence import Sequence, SequenceStatus, TokenLogprobs

logger = init_logger(__name__)


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    """Owns the waiting queue (FCFS) and the running list (arrival order)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = min(config.max_model_len, block_manager.num_slots)
        if self.max_model_len < config.max_model_len:
            logger.warning("the KV cache holds %d tokens (%d blocks of %d), fewer than max_model_len %d: "
                           "sequences are capped at %d tokens", block_manager.num_slots,
                           block_manager.num_blocks, block_manager.block_size, config.max_model_len,
                           self.max_model_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_cache_stats = PrefixCacheStats()
        self.adapter_memo = AdapterMemo()  # the adapters of the last batch asked about (LoRA)

    # ---- queue management --------------------------------------------------
    def add_seq(self, seq: Sequence) -> None:
        if seq.status != SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"only new sequences can be added to the scheduler, got {seq!r}")
        self.waiting.append(seq)

    def add_seqs(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self.add_seq(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_seqs(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> list[Sequence]:
        """Finish every live sequence of the request(s) as FINISHED_ABORTED, free
        their blocks and return them (unknown or finished ids are ignored)."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        aborted = [s for s in (*self.waiting, *self.running) if s.request_id in ids]
        for seq in aborted:
            self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
        return aborted

    def finish_seq(self, seq: Sequence, status: SequenceStatus, reason: Union[int, str, None] = None) -> None:
        """Finish ``seq`` with a FINISHED_* ``status`` and ``stop_reason = reason``
        (the detokenizer's stop strings come in here), free its blocks and drop
        it from the queues. A sequence already finished by length (this same
        step) may be re-finished as stopped: a stop string wins, as in vLLM."""
        if not SequenceStatus.is_finished(status):
            raise ValueError(f"finish_seq needs a FINISHED_* status, got {status!r}")
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        seq.stop_reason = reason

    # ---- scheduling --------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = self.schedule_prefills()
        if out.scheduled_seqs:
            return out
        out.is_prefill = False
        self._schedule_decodes(out)
        return out

    def schedule_prefills(self) -> SchedulerOutput:
        """The prefill half of ``schedule``: waiting sequences that fit now (too long ones come back as
        ``ignored_seqs``); the running ones are left alone, so async scheduling may call it while a step
        of theirs is queued and its tokens are not recorded yet."""
        out = SchedulerOutput(is_prefill=True, adapter_memo=self.adapter_memo)
        self._schedule_prefills(out)
        return out

    def _schedule_prefills(self, out: SchedulerOutput) -> None:
        cfg, bm = self.config, self.block_manager
        active_loras: Optional[set[int]] = None  # the running adapters, when an adapter sequence waits
        lora_blocked = False  # a waiting adapter sequence was held back by max_loras
        held_back: list[Sequence] = []
        num_tokens = 0
        first_of_request: dict[str, Sequence] = {}  # the first sequence of each request admitted now
        while self.waiting:
            seq = self.waiting[0]
            if seq.num_tokens > self.max_model_len:
                self.waiting.popleft()
                logger.warning("request %s: %d prompt tokens exceed the limit of %d; ignored",
                               seq.request_id, seq.num_tokens, self.max_model_len)
                seq.status = SequenceStatus.FINISHED_IGNORED
                out.ignored_seqs.append(seq)
                continue
            if len(self.running) + len(out.scheduled_seqs) >= cfg.max_num_seqs:
                break
            shared = self._reusable_blocks(seq, first_of_request.get(seq.request_id))
            cached_tokens = len(shared) * bm.block_size
            new_tokens = seq.num_tokens - cached_tokens
            if num_tokens + new_tokens > cfg.max_num_batched_tokens:
                break
            lora_id = seq.lora_int_id
            if lora_id > 0:
                if active_loras is None:  # O(adapters) while the running sequences are the last batch's
                    active_loras = set(self.adapter_memo.get(self.running).distinct)
                if lora_blocked or (lora_id not in active_loras and cfg.max_loras is not None
                                    and len(active_loras) >= cfg.max_loras):
                    lora_blocked = True
                    held_back.append(self.waiting.popleft())
                    continue
            if not bm.can_allocate(seq, shared):
                break
            self.waiting.popleft()
            bm.allocate(seq, shared)
            seq.num_computed_tokens = cached_tokens
            if self._uses_prefix_cache(seq):
                self.prefix_cache_stats.queries += seq.num_tokens
                self.prefix_cache_stats.hits += cached_tokens
            first_of_request.setdefault(seq.request_id, seq)
            seq.status = SequenceStatus.RUNNING
            if active_loras is not None and lora_id > 0:
                active_loras.add(lora_id)
            out.scheduled_seqs.append(seq)
            out.query_lens.append(new_tokens)
            out.context_lens.append(cached_tokens)
            num_tokens += new_tokens
        self.waiting.extendleft(reversed(held_back))
        for seq in out.scheduled_seqs:
            bisect.insort(self.running, seq, key=_arrival_key)

    def _uses_prefix_cache(self, seq: Sequence) -> bool:
        """Whether ``seq`` may start from cached blocks: prefix caching is on, and it does not
        still need its prompt logprobs (they need the logits of every prompt position, so such
        a prefill computes the whole prompt; its blocks are cached for others all the same)."""
        return self.block_manager.enable_prefix_caching and (
            seq.sampling_params.prompt_logprobs is None or seq.prompt_logprobs is not None)

    def _reusable_blocks(self, seq: Sequence, sibling: Optional[Sequence]) -> list[int]:
        """The leading full blocks ``seq`` (waiting: nothing computed) can take instead of computing.

        Only blocks before its last token (the step must compute at least that one: the sampler
        needs its logits). First the prefix cache; then, for a sequence whose request already
        admitted a sibling in this step with the same tokens (``n > 1``), the sibling's blocks:
        the sibling writes their K/V in this very step, and every layer writes the whole batch's
        K/V before it attends (both attention backends), so the shared context is there when
        ``seq`` reads it. Siblings always run (and fail) together: fault isolation splits batches
        by request."""
        if seq.num_computed_tokens:
            raise RuntimeError(f"waiting sequence {seq!r} has computed tokens; it must start from 0")
        if not self._uses_prefix_cache(seq):
            return []
        bs = self.block_manager.block_size
        limit = (seq.num_tokens - 1) // bs
        shared = self.block_manager.cached_blocks(seq, limit)
        if sibling is not None and len(shared) < limit:
            n = min(limit, sibling.num_tokens // bs, len(sibling.block_table))
            while n > len(shared) and sibling.token_ids[:n * bs] != seq.token_ids[:n * bs]:
                n -= 1  # (siblings recomputed after a preemption differ past their prompt)
            if n > len(shared):
                shared = sibling.block_table[:n]
        return shared

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        bm = self.block_manager
        block_size = bm.block_size
        queue = deque(sorted(self.running, key=_arrival_key))
        while queue:
            seq = queue.popleft()
            if len(seq.block_table) * block_size >= seq.num_tokens:
                # the common step: its newest position is in a block it holds (no block-manager work)
                out.scheduled_seqs.append(seq)
                out.query_lens.append(seq.num_uncomputed_tokens)
                out.context_lens.append(seq.num_computed_tokens)
                continue
            while not bm.can_append_slot(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted_seqs.append(victim)
                if victim is seq:
                    break
            else:
                bm.append_slot(seq)
                out.scheduled_seqs.append(seq)
                out.query_lens.append(seq.num_uncomputed_tokens)
                out.context_lens.append(seq.num_computed_tokens)
        self.running = list(out.scheduled_seqs)
        # Victims come latest-first: pushing each to the front leaves the
        # earliest arrival at the head of the waiting queue.
        for victim in out.preempted_seqs:
            self.waiting.appendleft(victim)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %r (recompute)", seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1

    # ---- after the model ---------------------------------------------------
    def postprocess(self, seqs: Seq[Sequence], sampled_token_ids: Union[Seq[int], torch.Tensor],
                    logprobs: Optional[Seq[Optional[TokenLogprobs]]] = None,
                    prompt_logprobs: Optional[Seq[Optional[list[Optional[TokenLogprobs]]]]] = None,
                    errors: Optional[list[tuple[Sequence, Exception]]] = None) -> list[Sequence]:
        """Append one sampled token per sequence (``seqs`` = the step's
        ``scheduled_seqs``), mark the fed tokens computed, apply the token-level
        stop rules and free finished sequences. Returns those finished now.

        ``logprobs`` / ``prompt_logprobs`` (None, or one entry per sequence, None
        where not asked) are recorded on the sequences (``ModelRunnerOutput``).
        Sequences finished between schedule and postprocess (aborted) are skipped.
        With ``errors`` given, a sequence whose bookkeeping raises is left as it is and
        ``(seq, exception)`` appended there (the engine then fails its request); the
        others are processed.
        """
        if isinstance(sampled_token_ids, torch.Tensor):
            sampled_token_ids = sampled_token_ids.tolist()
        for name, unit, values in (("sampled tokens", "token", sampled_token_ids),
                                   ("logprobs entries", "entry", logprobs),
                                   ("prompt logprobs entries", "entry", prompt_logprobs)):
            if values is not None and len(values) != len(seqs):
                raise ValueError(f"postprocess got {len(values)} {name} for {len(seqs)} sequences; "
                                 f"give exactly one {unit} per scheduled sequence")
        finished: list[Sequence] = []
        for i, (seq, token_id) in enumerate(zip(seqs, sampled_token_ids)):
            if seq.is_finished:
                continue
            try:
                if prompt_logprobs is not None and prompt_logprobs[i] is not None and seq.prompt_logprobs is None:
                    seq.prompt_logprobs = list(prompt_logprobs[i])
                seq.num_computed_tokens = seq.num_tokens
                self.block_manager.cache_computed(seq)
                seq.append_token_id(int(token_id), logprobs[i] if logprobs is not None else None)
                if self._check_stop(seq):
                    self.block_manager.free(seq)
                    finished.append(seq)
            except Exception as exc:
                if errors is None:
                    raise
                errors.append((seq, exc))
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    def _check_stop(self, seq: Sequence) -> bool:
        """Token-level stop rules (stop strings are the detokenizer's)."""
        params = seq.sampling_params
        token_id = seq.last_token_id
        num_out = seq.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and seq.eos_token_id is not None and token_id == seq.eos_token_id:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, None
                return True
            if token_id in params.stop_token_ids:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token_id
                return True
        if seq.grammar is not None and token_id == seq.eos_token_id and seq.grammar.is_terminated:
            # the grammar took its end (EOS), even with ignore_eos: nothing more can be generated
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, None
            return True
        if (params.max_tokens is not None and num_out >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            return True
        return False
