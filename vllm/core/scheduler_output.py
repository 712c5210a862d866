"""What one scheduler step hands to the model runner, the sampler and the engine (``SchedulerOutput``), and
the prefix cache's running totals (``PrefixCacheStats``); made by ``vllm.core.scheduler.Scheduler``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm.core.batch_adapters import AdapterMemo, BatchAdapters
from vllm.core.block_manager import compute_slot_mapping
from vllm.sequence import Sequence


@dataclass
class SchedulerOutput:
    """One step's batch. Lists are parallel to ``scheduled_seqs``; the lengths
    are snapshots taken at schedule time (postprocess does not change them).

    scheduled_seqs: sequences to run, in batch order.
    query_lens: new tokens fed per sequence (a decode: 1).
    context_lens: tokens already in the KV cache (the first new token's position).
    is_prefill: True for a prefill step, False for decode (empty: False).
    ignored_seqs: finished as FINISHED_IGNORED this step (not in the batch).
    preempted_seqs: running sequences preempted this step (not in the batch).
    adapter_memo: the scheduler's memo of the batch's adapters (``adapters``); None: computed each time.
    """

    scheduled_seqs: list[Sequence] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    is_prefill: bool = False
    ignored_seqs: list[Sequence] = field(default_factory=list)
    preempted_seqs: list[Sequence] = field(default_factory=list)
    adapter_memo: Optional[AdapterMemo] = field(default=None, repr=False, compare=False)

    @property
    def num_scheduled_tokens(self) -> list[int]:
        """Alias of ``query_lens``."""
        return self.query_lens

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_seqs

    @property
    def seq_lens(self) -> list[int]:
        """Context incl. the new tokens: what each sequence attends over."""
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def block_tables(self) -> list[list[int]]:
        return [seq.block_table for seq in self.scheduled_seqs]

    @property
    def adapters(self) -> BatchAdapters:
        """The batch's adapters: per sequence and distinct (the same sequences as the memo's last batch:
        no work per sequence)."""
        if self.adapter_memo is None:
            return BatchAdapters.of(self.scheduled_seqs)
        return self.adapter_memo.get(self.scheduled_seqs)

    @property
    def lora_int_ids(self) -> list[int]:
        """Adapter id per sequence, 0 = base model (shared with the memo: do not mutate)."""
        return self.adapters.ids

    # (the three lists below grow by slices and ranges, not per token: a 16384-token prefill builds them in
    # well under a millisecond)
    def input_token_ids(self) -> list[int]:
        """The new tokens of all sequences, flattened in batch order."""
        out: list[int] = []
        for seq, c, q in zip(self.scheduled_seqs, self.context_lens, self.query_lens):
            out += seq.token_ids[c:c + q]
        return out

    def positions(self) -> list[int]:
        out: list[int] = []
        for c, q in zip(self.context_lens, self.query_lens):
            out += range(c, c + q)
        return out

    def slot_mapping(self, block_size: int) -> list[int]:
        out: list[int] = []
        for seq, c, q in zip(self.scheduled_seqs, self.context_lens, self.query_lens):
            out += compute_slot_mapping(seq.block_table, block_size, c, c + q)
        return out


@dataclass
class PrefixCacheStats:
    """Running totals, in tokens, as vLLM counts them: ``queries``, the tokens of the sequences
    admitted with prefix caching on (those needing prompt logprobs are not looked up);
    ``hits``, those of their tokens taken from cached blocks (or a sibling's, ``n > 1``)."""

    queries: int = 0
    hits: int = 0
