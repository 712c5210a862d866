"""Prepare/finalize schemes, one file each: ``no_ep`` (everything on this rank) and
``all_gather_reduce_scatter`` (expert parallelism over the layer's ``ep_group``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEPrepareAndFinalize

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE


def make_prepare_finalize(layer: "FusedMoE") -> FusedMoEPrepareAndFinalize:
    """The scheme of a layer: all-gather / reduce-scatter when its experts are split over an
    ``ep_group`` of several ranks, else none (a layer built with ep_size > 1 but no group computes
    only its own experts' share: the layer tests' way of looking at one rank)."""
    group = layer.ep_group
    if layer.moe_config.parallel_config.use_ep and group is not None and group.world_size > 1:
        from vllm.model_executor.layers.fused_moe.prepare_finalize.all_gather_reduce_scatter import (
            MoEPrepareAndFinalizeAllGatherReduceScatter,
        )

        return MoEPrepareAndFinalizeAllGatherReduceScatter(group, tokens_replicated=layer.ep_tokens_replicated)
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_ep import MoEPrepareAndFinalizeNoEP

    return MoEPrepareAndFinalizeNoEP()
