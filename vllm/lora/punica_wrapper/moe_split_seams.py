"""The sorted MoE LoRA seams in two halves: the shrink beside the base GEMM, the expand after it.

In place (``PunicaWrapperBase.add_lora_w13`` / ``add_lora_w2``) a seam is one fused launch after its GEMM:
each program shrinks its rows (x @ A^T, all of A's bytes) and then expands them into the GEMM's output.  The
shrink reads only the seam's input - the hidden states for w13, the activation output for w2 - which exists
before the GEMM starts, so it can run on the side stream while the GEMM runs; only the expand, a read-modify-
write of the GEMM's output, has to wait for it (``experts/lora_overlap.SHRINK_BESIDE``, the experts' mixin
``gemm1_with_lora`` / ``gemm2_with_lora``).

The halves are the fused kernel's own two halves (``moe_lora_shrink`` / ``moe_lora_expand``: the sorted kernel
with ``DO_EXPAND`` / ``DO_SHRINK`` off, the same tiles): the expand loads the fp32 shrink the fused kernel
would hold in registers, so the output is bit for bit the fused seam's.  Slices that read one A (a fused
gate_up adapter, ``fused_moe.SHARE_W13_A``) are shrunk once and every slice's expand reads that shrink.

Only the sorted path (an (adapter, expert) alignment) and not the fully-sharded tensor-parallel path (whose
collectives stay in order on the current stream).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from vllm.kernel_configs.tile_config import MoELoRATileConfig
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.lora.punica_wrapper.punica_base import MoELoRARouting


@dataclass
class MoELoRAShrunk:
    """One seam's first half: the fp32 shrink [S, pairs, R] (stride 0 over S where the slices share A), the
    routing it was made on (``add_lora_w2`` reuses w13's) and the tiles both halves take."""

    shrunk: torch.Tensor
    routing: "MoELoRARouting"
    config: Optional["MoELoRATileConfig"]


def _shared_a(slices: tuple[torch.Tensor, ...]) -> bool:
    """Whether every slice of A is the same view (one buffer, ``SHARE_W13_A``)."""
    s0 = slices[0]
    return len(slices) > 1 and all(s.data_ptr() == s0.data_ptr() and s.stride() == s0.stride()
                                   and s.shape == s0.shape for s in slices[1:])


class MoELoRASplitSeams:
    """Mixed into ``PunicaWrapperBase``: the halves of the sorted seams (see the module docstring)."""

    def moe_lora_splits(self, ctx: "MoELoRAContext", x: torch.Tensor) -> bool:
        """Whether this layer's w13 seam for hidden states x [M, H] can run as two halves: it sorts this step
        (``moe_lora_align_plan``) and is not fully sharded over tensor-parallel ranks."""
        return not (ctx.fully_sharded and ctx.tp_size > 1) and self.moe_lora_align_plan(x, ctx) is not None

    def shrink_w13(self, x: torch.Tensor, ctx: "MoELoRAContext", *, topk_ids: torch.Tensor,
                   expert_map: Optional[torch.Tensor] = None) -> MoELoRAShrunk:
        """The w13 seam's alignment and shrink of x [M, H] (``add_lora_w13`` without its expand)."""
        M = x.shape[0]
        num_pairs = M * ctx.top_k
        mapping = self._w13_mapping(ctx, M)
        alignment = self.moe_lora_alignment(x, ctx, topk_ids=topk_ids, expert_map=expert_map)
        if alignment is None:
            raise ValueError("shrink_w13: this step's w13 seam does not sort (moe_lora_splits is false)")
        from vllm.lora.punica_wrapper.punica_base import MoELoRARouting

        routing = MoELoRARouting(alignment=alignment, token_lora_mapping=mapping, num_pairs=num_pairs)
        cfg = self._w13_config(ctx, x)
        lora_a = ctx.w13_lora_a_stacked
        shared = _shared_a(lora_a)
        shrunk = self._shrink(x, lora_a[:1] if shared else lora_a, topk_ids=topk_ids, token_lora_mapping=mapping,
                              adapter_enabled=ctx.adapter_enabled, top_k_in=ctx.top_k, expert_map=expert_map,
                              alignment=alignment, config=cfg)
        if shared:
            shrunk = shrunk.expand(len(lora_a), *shrunk.shape[1:])
        return MoELoRAShrunk(shrunk=shrunk, routing=routing, config=cfg)

    def expand_w13(self, y: torch.Tensor, half: MoELoRAShrunk, ctx: "MoELoRAContext", *, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor] = None) -> "MoELoRARouting":
        """y [M*top_k, N] (GEMM1 output) += the expand of ``half``; returns the routing for ``add_lora_w2``."""
        routing = half.routing
        self._expand(y.reshape(routing.num_pairs, y.shape[-1]), half.shrunk, ctx.w13_lora_b_stacked,
                     **self._expand_kw(ctx, routing, half.config, topk_ids, topk_weights, expert_map),
                     mul_routed_weight=False)
        return routing

    def shrink_w2(self, x: torch.Tensor, ctx: "MoELoRAContext", *, routing: "MoELoRARouting",
                  topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor] = None) -> MoELoRAShrunk:
        """The w2 seam's shrink of x [M*top_k, I] (the activation output) on w13's routing."""
        if routing.alignment is None:
            raise ValueError("shrink_w2: the routing has no alignment (the per-pair path has no halves)")
        cfg = self._w2_config(ctx, x, routing)
        shrunk = self._shrink(x, ctx.w2_lora_a_stacked, topk_ids=topk_ids,
                              token_lora_mapping=routing.token_lora_mapping, adapter_enabled=ctx.adapter_enabled,
                              top_k_in=1, expert_map=expert_map, alignment=routing.alignment, config=cfg)
        return MoELoRAShrunk(shrunk=shrunk, routing=routing, config=cfg)

    def expand_w2(self, y: torch.Tensor, half: MoELoRAShrunk, ctx: "MoELoRAContext", *, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, mul_routed_weight: bool,
                  expert_map: Optional[torch.Tensor] = None) -> None:
        """y [M*top_k, H] (GEMM2 output) += the expand of ``half`` (router-weighted as ``add_lora_w2``)."""
        routing = half.routing
        self._expand(y.reshape(routing.num_pairs, y.shape[-1]), half.shrunk, ctx.w2_lora_b_stacked,
                     **self._expand_kw(ctx, routing, half.config, topk_ids, topk_weights, expert_map),
                     mul_routed_weight=mul_routed_weight)

    @staticmethod
    def _expand_kw(ctx: "MoELoRAContext", routing: "MoELoRARouting", config: Optional["MoELoRATileConfig"],
                   topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   expert_map: Optional[torch.Tensor]) -> dict[str, Any]:
        return dict(topk_ids=topk_ids, topk_weights=topk_weights, token_lora_mapping=routing.token_lora_mapping,
                    adapter_enabled=ctx.adapter_enabled, expert_map=expert_map, alignment=routing.alignment,
                    config=config)
