"""The rank the LoRA kernels of a layer run at: its adapters' rank, not ``max_lora_rank``.

The stacked A / B buffers of a LoRA layer are allocated at ``max_lora_rank`` (R), with each
adapter's rows / columns past its own rank zero (``set_lora`` clears the slot first, so a smaller
adapter replacing a larger one leaves no stale columns).  Running the kernels at R reads and
multiplies those zeros.  Instead each op of a layer (a dense projection; the MoE w13 and w2) keeps
the rank of the adapter in each slot, and its kernels get views of the buffers cut to the *kernel
rank* ``kernel_rank(effective rank, R)``: the op's effective rank (the largest rank among its
slots, 0 when none) rounded up to a power of two >= 8, at most R (the kernels mask their rank tile,
so any rank is correct; a power of two keeps their tile configs on the ranks they are keyed by).

CUDA graphs bake the rank into their launches, so a layer whose kernel rank changes tells the
Punica wrapper (``PunicaWrapperBase.lora_ranks_changed``), which changes the LoRA layer set's
version: graphs of LoRA steps are then captured again before their next replay.
"""
from __future__ import annotations

from vllm.triton_utils import next_power_of_2

MIN_KERNEL_RANK = 8


def kernel_rank(effective_rank: int, max_rank: int) -> int:
    """The rank the kernels run at for adapters of at most ``effective_rank`` in buffers of ``max_rank``."""
    return min(max_rank, next_power_of_2(max(int(effective_rank), MIN_KERNEL_RANK)))


class SlotRanks:
    """The rank of the adapter in each slot for one op of a layer (0 = no adapter there)."""

    def __init__(self, num_slots: int, max_rank: int) -> None:
        self.max_rank = max_rank
        self._ranks = [0] * num_slots

    def set(self, slot: int, rank: int) -> None:
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"adapter rank {rank} is outside [0, max_lora_rank={self.max_rank}]")
        self._ranks[slot] = int(rank)

    @property
    def effective(self) -> int:
        """The largest rank among the slots (0 when every slot is empty)."""
        return max(self._ranks, default=0)

    @property
    def kernel(self) -> int:
        """``kernel_rank(self.effective, max_rank)``."""
        return kernel_rank(self.effective, self.max_rank)
