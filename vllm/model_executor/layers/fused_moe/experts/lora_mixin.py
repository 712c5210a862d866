"""The two LoRA seams of an experts implementation.

An experts class that supports LoRA inherits ``MoELoRAExpertsMixin`` and, inside
its own ``apply``, calls:

    routing = self.apply_w13_lora(ctx, y=gemm1_out, x=hidden_states, ...)   # before the activation
        (``alignment=``: the LoRA alignment, if the experts made it with their own, see ``lora_align_plan``)
    self.apply_w2_lora(ctx, y=gemm2_out, x=act_out, routing=routing, ...)   # before the top-k sum

The helpers hand the context itself to the Punica wrapper, which reads the fields it
needs; all LoRA compute lives there (``vllm/lora/punica_wrapper``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.lora.ops.moe_lora_align import MoELoRAAlignment, MoELoRAAlignPlan
    from vllm.lora.punica_wrapper.punica_base import MoELoRARouting


class MoELoRAExpertsMixin:
    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @staticmethod
    def lora_runs(ctx: "MoELoRAContext") -> bool:
        """Whether ``apply_w13_lora`` launches anything this step: some token of the step uses an
        adapter of this layer.  Rows dispatched from other ranks (``ctx.token_lora_mapping`` set) may
        use adapters this rank's step does not, so then the kernels always run (they skip rows
        without an adapter)."""
        return ctx.token_lora_mapping is not None or ctx.punica_wrapper.any_active(ctx.enabled_slots)

    @classmethod
    def lora_align_plan(cls, ctx: "MoELoRAContext", x: torch.Tensor) -> Optional["MoELoRAAlignPlan"]:
        """The (adapter, expert) alignment ``apply_w13_lora`` needs for x [M, H] this step, for experts
        that make it in one pass with their own (``moe_align_with_lora``); None when it needs none."""
        return ctx.punica_wrapper.moe_lora_align_plan(x, ctx) if cls.lora_runs(ctx) else None

    @classmethod
    def apply_w13_lora(cls, ctx: "MoELoRAContext", *, y: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor],
                       alignment: Optional["MoELoRAAlignment"] = None) -> Optional["MoELoRARouting"]:
        """y [M*top_k, N] (GEMM1 output) += w13 LoRA delta of x [M, H].

        Returns the routing for ``apply_w2_lora``, or None when no token of the step uses an
        adapter of this layer (``lora_runs``: nothing is launched; ``apply_w2_lora`` then does
        nothing either).  ``alignment``: the one ``lora_align_plan`` asked for, made by the caller.
        """
        if not cls.lora_runs(ctx):
            return None
        return ctx.punica_wrapper.add_lora_w13(y, x, ctx, topk_ids=topk_ids, topk_weights=topk_weights,
                                               expert_map=expert_map, alignment=alignment)

    @staticmethod
    def apply_w2_lora(ctx: "MoELoRAContext", *, y: torch.Tensor, x: torch.Tensor, routing: Optional["MoELoRARouting"],
                      topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor],
                      mul_routed_weight: bool) -> None:
        """y [M*top_k, H] (GEMM2 output) += w2 LoRA delta of x [M*top_k, I_part].

        ``mul_routed_weight``: True exactly when the base GEMM2 output in ``y`` was
        multiplied by the router weight.
        """
        if routing is None:  # apply_w13_lora found no active adapter for this layer
            return
        ctx.punica_wrapper.add_lora_w2(y, x, ctx, routing=routing, topk_ids=topk_ids, topk_weights=topk_weights,
                                       mul_routed_weight=mul_routed_weight, expert_map=expert_map)
