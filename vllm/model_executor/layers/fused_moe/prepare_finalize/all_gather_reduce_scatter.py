"""Expert parallelism over one process group: all-gather dispatch, reduce-scatter combine.

Every rank of the group holds ``E / ep_size`` whole experts (``FusedMoE.expert_map``
says which).  Routing has already run on each rank's own tokens when ``prepare`` is
called; then

    prepare   (dispatch)  the ranks' activations, routing (topk_ids / topk_weights) and
                          LoRA slots are all-gathered in rank order, so every rank sees
                          every token.  A pair routed to another rank's expert is
                          dropped by the experts through ``expert_map``: it contributes
                          exactly zero here.
    experts               this rank's experts on all tokens (LoRA with the gathered mapping)
    finalize  (combine)   router weighting and the top-k sum, then a reduce-scatter:
                          each rank gets, for its own tokens, the sum over all ranks.

With tensor-parallel attention (the engine today) every rank already holds the
same batch: ``tokens_replicated=True``.  The all-gather is then the identity and is
skipped, and the reduce-scatter followed by the all-gather the next (replicated)
layer needs is one all-reduce.  An all-to-all dispatch is another pair in this
folder with the same interface.

The group is anything with ``world_size``, ``rank``, ``all_gather(t, dim)`` and
``all_reduce(t)`` (``vllm.distributed.TensorParallelGroup``: NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import (
    FusedMoEPrepareAndFinalize,
    PrepareResult,
    TopKWeightAndReduce,
)
from vllm.model_executor.layers.fused_moe.prepare_finalize.no_ep import prepare_input


@dataclass(frozen=True)
class _Dispatched:
    """What finalize needs from prepare: the row count of every rank (rank order)."""

    rows: tuple[int, ...]
    rank: int


def _all_gather_rows(group: Any, t: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """Every rank's ``t`` [rows[r], ...] concatenated along dim 0 (ranks may differ in rows)."""
    most = max(rows)
    if t.shape[0] < most:  # the collective needs equal shapes: pad, gather, cut the padding off
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = group.all_gather(t.contiguous(), dim=0).split(most, dim=0)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


class MoEPrepareAndFinalizeAllGatherReduceScatter(FusedMoEPrepareAndFinalize):
    """All-gather / reduce-scatter over ``group``; see the module docstring."""

    def __init__(self, group: Any, *, tokens_replicated: bool = True) -> None:
        self.group = group
        self.tokens_replicated = tokens_replicated

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(world_size={self.group.world_size}, "
                f"tokens_replicated={self.tokens_replicated})")

    def prepare(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                num_experts: int, expert_map: Optional[torch.Tensor], apply_router_weight_on_input: bool,
                quant_config: FusedMoEQuantConfig,
                token_lora_mapping: Optional[torch.Tensor] = None) -> PrepareResult:
        if expert_map is None:
            raise ValueError("expert-parallel prepare/finalize needs the layer's expert_map (ep_size > 1)")
        a1 = prepare_input(a1, topk_weights, topk_ids, quant_config, apply_router_weight_on_input)
        if self.tokens_replicated or self.group.world_size == 1:
            return PrepareResult(a1q=a1, a1q_scale=None, topk_ids=topk_ids, topk_weights=topk_weights,
                                 token_lora_mapping=token_lora_mapping)
        M = a1.shape[0]
        counts = self.group.all_gather(torch.tensor([M], dtype=torch.int64, device=a1.device), dim=0)
        rows = tuple(int(n) for n in counts.tolist())
        gathered_mapping = None
        if token_lora_mapping is not None:
            gathered_mapping = _all_gather_rows(self.group, token_lora_mapping[:M].to(torch.int32), rows)
        return PrepareResult(
            a1q=_all_gather_rows(self.group, a1, rows), a1q_scale=None,
            topk_ids=_all_gather_rows(self.group, topk_ids, rows),
            topk_weights=_all_gather_rows(self.group, topk_weights, rows),
            token_lora_mapping=gathered_mapping, handle=_Dispatched(rows, self.group.rank))

    def finalize(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, *, apply_router_weight_on_input: bool,
                 weight_and_reduce: TopKWeightAndReduce, handle: Any = None) -> None:
        if not isinstance(handle, _Dispatched):  # tokens replicated: reduce-scatter + all-gather = all-reduce
            weight_and_reduce.apply(output, fused_expert_output, topk_weights, topk_ids,
                                    apply_router_weight_on_input)
            reduced = self.group.all_reduce(output)
            if reduced is not output:
                output.copy_(reduced)
            return
        total = sum(handle.rows)
        local = torch.empty((total, output.shape[1]), dtype=output.dtype, device=output.device)
        weight_and_reduce.apply(local, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input)
        # reduce-scatter as all-reduce + this rank's rows: gloo has no reduce-scatter
        summed = self.group.all_reduce(local)
        start = sum(handle.rows[:handle.rank])
        output.copy_(summed[start:start + handle.rows[handle.rank]])
