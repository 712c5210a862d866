"""A projection's low-rank delta, handed to the fused ops around it instead of a launch of its own.

At a decode step a dense LoRA layer costs launches that move almost nothing: its shrink and expand (two a
projection at batch 1, four with the split-K pair), each a few microseconds of latency in the chain of
dependent kernels.  But the kernels on either side of a projection already hold what those launches need:

* the RMSNorm before q/k/v holds each token's normalised row, the shrink's input: with a ``PendingDelta`` as
  ``lora_shrink`` it also writes the fp32 partial sums ``x @ A[slot]^T`` of the row's K chunks (``part``);
* q/k norm + rotary holds each token's q and k heads and can reach its v: with ``lora_delta`` it adds
  ``sum_j part[t, s, j] @ B_s[slot]^T`` to them (rounded once, as ``add_lora_linear`` rounds ``y + delta``)
  before the norms, v in place;
* the residual RMSNorm after the o projection holds the projection's output row: with ``lora_delta`` it adds
  the o delta first (the o shrink, whose input is the attention's output, is written by extra programs of the
  o projection's decode GEMV at one token - ``dense_gemv(lora_shrink=)`` - else by one launch, the split-K
  shrink of ``lora_linear``, in the same ``part`` layout).

So the projection runs bare and the delta rides on its neighbours.  ``PendingDelta`` is that contract: the A and
B stacks, the step's slot mapping, and, once a producer ran, ``part`` [T, S, K_SPLITS, BLOCK_R] (fp32; rows of
tokens without a slot are never read).  A slot where the layer holds no adapter must hold zero A and B (the LoRA
layers clear a slot so): it adds exactly zero, so no enabled flag is read.  The LoRA layers make
them (``vllm/lora/layers/dense_handoff.py``, switch ``HANDOFF``); the kernels' side is ``_pending_delta.py``;
``shrink_torch`` / ``add_torch`` are the torch paths and the tests' reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vllm.triton_utils import next_power_of_2

# a consumer holds B's rows of its columns, [columns, BLOCK_R], in registers from before its PDL wait: at most this
# many elements a program (``fits``)
MAX_DELTA_TILE = 65536
# elements of A one shrink program multiplies (its K chunk: this many // BLOCK_R columns)
SHRINK_A_ELEMS = 8192


@dataclass
class PendingDelta:
    """``a``: [S, L, R, K]; ``b``: [S, L, N_max, R] (R: the layer's kernel rank; slice s uses its first
    ``slice_sizes[s]`` rows); ``mapping``: [>= T] int32 slot of each row (-1: none); ``part``: None until a
    producer - the op before the projection (``lora_shrink``), else the projection's layer - ran (``new_part``)."""

    a: torch.Tensor
    b: torch.Tensor
    mapping: torch.Tensor
    slice_sizes: tuple[int, ...]
    part: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.b.shape[-1])

    @property
    def max_loras(self) -> int:
        return int(self.b.shape[1])

    @property
    def block_r(self) -> int:
        return max(4, next_power_of_2(self.rank))

    def fits(self, consumer_cols: int) -> bool:
        """Whether a consumer program of ``consumer_cols`` columns can hold its tile of B."""
        return next_power_of_2(consumer_cols) * self.block_r <= MAX_DELTA_TILE

    def shrink_block_k(self, K: int) -> int:
        """One shrink program's K chunk (a power of two)."""
        return max(16, min(next_power_of_2(K), SHRINK_A_ELEMS // self.block_r))

    def new_part(self, T: int, k_splits: int, device: torch.device) -> torch.Tensor:
        """The producer's output buffer (uninitialised: every row a consumer reads is written)."""
        self.part = torch.empty(T, len(self.slice_sizes), k_splits, self.block_r, dtype=torch.float32, device=device)
        return self.part

    def _slots(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot clamped into range, whether the row has a slot) for rows 0..T-1."""
        slot = self.mapping[:T].long()
        valid = (slot >= 0) & (slot < self.max_loras)
        return slot.clamp(0, self.max_loras - 1), valid

    # ---- torch paths (and the tests' reference) ----------------------------------------------------------
    def shrink_torch(self, y: torch.Tensor) -> None:
        """``part`` (one K split) from the projection's input y [T, K]: the fp32 sums y @ A[s, slot]^T."""
        T = y.shape[0]
        part = self.new_part(T, 1, y.device)
        part.zero_()
        slot, on = self._slots(T)
        a = self.a[:, slot].float()  # [S, T, R, K]
        sums = torch.einsum("tk,strk->tsr", y.float(), a)
        part[:, :, 0, :self.rank] = torch.where(on[:, None, None], sums, torch.zeros_like(sums))

    def delta_torch(self, s: int, T: int) -> torch.Tensor:
        """Slice s's fp32 delta [T, N_s] (zero for rows without a slot)."""
        if self.part is None:
            raise ValueError("PendingDelta read before its shrink ran")
        slot, on = self._slots(T)
        shrunk = self.part[:T, s, :, :self.rank].sum(1)  # [T, R]
        shrunk = torch.where(on[:, None], shrunk, torch.zeros_like(shrunk))  # rows never written: masked
        b = self.b[s, slot, :self.slice_sizes[s]].float()  # [T, N_s, R]
        return torch.einsum("tr,tnr->tn", shrunk, b)

    def add_torch(self, s: int, y: torch.Tensor) -> torch.Tensor:
        """y [T, N_s] + slice s's delta, added in fp32 and rounded once to y's dtype."""
        return (y.float() + self.delta_torch(s, y.shape[0]).to(y.device)).to(y.dtype)

    # ---- kernel arguments ----------------------------------------------------------------------------------
    def delta_kernel_args(self) -> dict[str, Any]:
        """A consumer kernel's keywords (``_pending_delta.pending_b`` / ``pending_apply``'s operands)."""
        part = self.part
        if part is None:
            raise ValueError("PendingDelta read before its shrink ran")
        return dict(dp_ptr=part, stride_dpt=part.stride(0), stride_dps=part.stride(1), stride_dpj=part.stride(2),
                    d_splits=part.shape[2], db_ptr=self.b, stride_dbs=self.b.stride(0), stride_dbl=self.b.stride(1),
                    stride_dbn=self.b.stride(2), stride_dbr=self.b.stride(3), dmap_ptr=self.mapping,
                    d_rank=self.rank, d_loras=self.max_loras, DELTA=True, D_BLOCK_J=next_power_of_2(part.shape[2]),
                    D_BLOCK_R=part.shape[3])

    def shrink_kernel_args(self, T: int, K: int, device: torch.device) -> tuple[int, dict[str, Any]]:
        """(programs, keywords) of a producer kernel whose rows are the projection's input [T, K]: one program per
        (row, slice, K chunk), each writing ``part[t, s, j]``."""
        a = self.a
        block_k = self.shrink_block_k(K)
        splits = -(-K // block_k)
        part = self.new_part(T, splits, device)
        S = len(self.slice_sizes)
        return T * S * splits, dict(
            n_norm=T, sa_ptr=a, stride_sas=a.stride(0), stride_sal=a.stride(1), stride_sar=a.stride(2),
            stride_sak=a.stride(3),
            sp_ptr=part, stride_spt=part.stride(0), stride_sps=part.stride(1), stride_spj=part.stride(2),
            smap_ptr=self.mapping, s_slices=S, s_splits=splits, s_rank=self.rank,
            s_loras=self.max_loras, SHRINK=True, S_BLOCK_R=self.block_r, S_BLOCK_K=block_k)

    def check(self, T: int, device: torch.device) -> None:
        """The operands describe T rows on ``device``."""
        if self.mapping.shape[0] < T or self.b.dim() != 4 or len(self.slice_sizes) != self.b.shape[0]:
            raise ValueError(f"PendingDelta: mapping of {self.mapping.shape[0]} rows for {T}, b "
                             f"{tuple(self.b.shape)}, slices {self.slice_sizes}")
        if any(t.device != device for t in (self.a, self.b, self.mapping)):
            raise ValueError(f"PendingDelta operands must be on {device}")


def pending_for(layer: nn.Module, x: torch.Tensor) -> Optional[PendingDelta]:
    """The delta ``layer`` hands on for its input ``x`` this step (its ``lora_handoff``; only x's rows and dtype are
    read, so the layer's input need not exist yet), or None: not a LoRA layer, or it adds its own.  A caller given one must pass it to the projection (``layer(x, pending_delta=...)``) and to
    the op after it that adds it."""
    make = getattr(layer, "lora_handoff", None)
    return None if make is None else make(x)
