"""The adapters of a step's batch, remembered while the batch stays the same sequences.

A LoRA engine needs, every step, the adapter of each sequence of the batch (the model runner's token ->
adapter mapping) and the batch's distinct adapters (the registry's check that their weights are cached;
the scheduler's ``max_loras`` count over the running sequences).  Both depend only on which sequences
the batch holds, in which order: a sequence's adapter is fixed when it is made.  A decode step mostly
runs the sequences of the previous one, so ``AdapterMemo`` keeps the last batch's answer and hands it
out again while the batch is the same list of sequences.  That is checked with one list comparison,
done in C (each element compared by identity: ``Sequence`` keeps ``object``'s equality), instead of a
Python loop over the sequences.  A sequence that joins, finishes or is preempted, or a new order,
changes the list, and the answer is computed afresh.

What the memo does not hold: whether an adapter's weights are cached (``LoRARegistry.check_batch`` asks
the LoRA manager every step, per distinct adapter) and which slot holds it
(``LoRAModelManager.set_adapter_mapping`` checks that every step), so loading, unloading, swapping or
evicting an adapter needs no invalidation here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence as Seq

if TYPE_CHECKING:
    from vllm.sequence import Sequence


@dataclass(frozen=True)
class BatchAdapters:
    """ids: the ``lora_int_id`` of each sequence, in batch order (0 = base model); one list shared by
    every user of the memo: read it, never mutate it.  distinct: the adapters (ids > 0) of the batch."""

    ids: list[int]
    distinct: frozenset[int]

    @classmethod
    def of(cls, seqs: Seq["Sequence"]) -> "BatchAdapters":
        """Computed from the sequences (no memo)."""
        ids = [0 if s.lora_request is None else s.lora_request.lora_int_id for s in seqs]
        return cls(ids, frozenset(i for i in set(ids) if i > 0))


class AdapterMemo:
    """One-entry memo of ``BatchAdapters`` keyed on the batch's sequences (identity and order).

    ``hits`` / ``misses`` count the answers given again / computed (tests, benchmarks)."""

    def __init__(self) -> None:
        self._seqs: list["Sequence"] = []  # a copy: the caller's list (e.g. Scheduler.running) changes in place
        self._value: Optional[BatchAdapters] = None
        self.hits = 0
        self.misses = 0

    def get(self, seqs: Seq["Sequence"]) -> BatchAdapters:
        """The adapters of ``seqs`` (a list of sequences)."""
        if self._value is not None and seqs == self._seqs:
            self.hits += 1
            return self._value
        self.misses += 1
        self._value = BatchAdapters.of(seqs)
        self._seqs = list(seqs)
        return self._value

    def clear(self) -> None:
        """Forget the last batch (its sequences are no longer referenced)."""
        self._seqs, self._value = [], None
