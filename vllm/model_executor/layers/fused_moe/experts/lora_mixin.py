"""The two LoRA seams of an experts implementation.

An experts class that supports LoRA inherits ``MoELoRAExpertsMixin`` and, inside
its own ``apply``, calls:

    routing = self.apply_w13_lora(ctx, y=gemm1_out, x=hidden_states, ...)   # before the activation
        (``alignment=``: the LoRA alignment, if the experts made it with their own, see ``lora_align_plan``)
    self.apply_w2_lora(ctx, y=gemm2_out, x=act_out, routing=routing, ...)   # before the top-k sum

The helpers hand the context itself to the Punica wrapper, which reads the fields it
needs; all LoRA compute lives there (``vllm/lora/punica_wrapper``).

``gemm1_with_lora`` / ``gemm2_with_lora`` run a GEMM together with its seam: the delta in place after the
GEMM, or - where ``lora_deltas`` says so (``experts/lora_overlap.py``) - into an fp32 buffer of its own
on a side stream beside the GEMM, which the caller hands to ``moe_activation`` / ``moe_sum`` as ``delta``.
In place, the w13 seam's (adapter, expert) alignment may be made beside GEMM1 (``align_beside``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from vllm.model_executor.layers.fused_moe.experts import lora_overlap

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.lora.ops.moe_lora_align import MoELoRAAlignment, MoELoRAAlignPlan
    from vllm.lora.punica_wrapper.punica_base import MoELoRARouting


class MoELoRAExpertsMixin:
    #: whether this class's pipeline may take the fp32 delta buffers beside its GEMMs (``lora_deltas``)
    lora_deltas_beside: bool = True

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
                       alignment: Optional["MoELoRAAlignment"] = None,
                       overwrite: bool = False) -> Optional["MoELoRARouting"]:
        """y [M*top_k, N] (GEMM1 output) += w13 LoRA delta of x [M, H] (``overwrite``: y = the delta, for a
        delta buffer of its own).

        Returns the routing for ``apply_w2_lora``, or None when no token of the step uses an
        adapter of this layer (``lora_runs``: nothing is launched; ``apply_w2_lora`` then does
        nothing either).  ``alignment``: the one ``lora_align_plan`` asked for, made by the caller.
        """
        if not cls.lora_runs(ctx):
            return None
        return ctx.punica_wrapper.add_lora_w13(y, x, ctx, topk_ids=topk_ids, topk_weights=topk_weights,
                                               expert_map=expert_map, alignment=alignment, overwrite=overwrite)

    @staticmethod
    def apply_w2_lora(ctx: "MoELoRAContext", *, y: torch.Tensor, x: torch.Tensor, routing: Optional["MoELoRARouting"],
                      topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor],
                      mul_routed_weight: bool, overwrite: bool = False) -> None:
        """y [M*top_k, H] (GEMM2 output) += w2 LoRA delta of x [M*top_k, I_part] (``overwrite``: y = the delta).

        ``mul_routed_weight``: True exactly when the base GEMM2 output in ``y`` was
        multiplied by the router weight.
        """
        if routing is None:  # apply_w13_lora found no active adapter for this layer
            return
        ctx.punica_wrapper.add_lora_w2(y, x, ctx, routing=routing, topk_ids=topk_ids, topk_weights=topk_weights,
                                       mul_routed_weight=mul_routed_weight, expert_map=expert_map,
                                       overwrite=overwrite)

    def lora_deltas(self, ctx: Optional["MoELoRAContext"], x: torch.Tensor, pairs: int,
                    widths: tuple[int, int]) -> bool:
        """Whether this forward's LoRA seams write fp32 delta buffers beside the GEMMs (``lora_overlap.applies``:
        the per-pair LoRA path, small buffers, not fully sharded); ``widths``: GEMM1's and GEMM2's output columns."""
        if not self.lora_deltas_beside or ctx is None or not self.lora_runs(ctx):
            return False
        return lora_overlap.applies(x.device, pairs, widths, per_pair=ctx.punica_wrapper.moe_lora_per_pair(ctx, pairs),
                                    fully_sharded_tp=ctx.fully_sharded and ctx.tp_size > 1)

    @classmethod
    def align_beside(cls, ctx: Optional["MoELoRAContext"], x: torch.Tensor) -> bool:
        """Whether the in-place w13 seam's (adapter, expert) alignment is made beside GEMM1, on the side stream
        (``lora_overlap.ALIGN_BESIDE``; host state only): LoRA runs this step and sorts (``lora_align_plan``)."""
        return lora_overlap.ALIGN_BESIDE and ctx is not None and cls.lora_align_plan(ctx, x) is not None

    def gemm1_with_lora(self, ctx: Optional["MoELoRAContext"], gemm: Callable[[], None], *, deltas: bool,
                        y: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        expert_map: Optional[torch.Tensor], alignment: Optional["MoELoRAAlignment"] = None
                        ) -> tuple[Optional["MoELoRARouting"], Optional[torch.Tensor]]:
        """``gemm()`` (GEMM1, writing y [pairs, N]) and the w13 seam: (the routing for the w2 seam, the fp32 delta
        buffer for ``moe_activation`` or None when the delta went into y in place)."""
        def seam(out: torch.Tensor, overwrite: bool = False) -> Optional["MoELoRARouting"]:
            return self.apply_w13_lora(ctx, y=out, x=x, topk_ids=topk_ids, topk_weights=topk_weights,
                                       expert_map=expert_map, alignment=alignment, overwrite=overwrite)

        if deltas:
            delta = lora_overlap.delta_buffer(y.shape[0], y.shape[1], x.device)
            return lora_overlap.beside(x.device, lambda: seam(delta, overwrite=True), gemm), delta
        if alignment is None and self.align_beside(ctx, x):
            assert ctx is not None  # align_beside: LoRA runs
            alignment = lora_overlap.beside(
                x.device, lambda: ctx.punica_wrapper.moe_lora_alignment(x, ctx, topk_ids=topk_ids,
                                                                        expert_map=expert_map), gemm)
        else:
            gemm()
        return (seam(y) if ctx is not None else None), None  # apply_w13_lora: None when no adapter runs

    def gemm2_with_lora(self, ctx: Optional["MoELoRAContext"], gemm: Callable[[], None], *, deltas: bool,
                        y: torch.Tensor, x: torch.Tensor, routing: Optional["MoELoRARouting"], topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor],
                        mul_routed_weight: bool) -> Optional[torch.Tensor]:
        """``gemm()`` (GEMM2, writing y [pairs, H]) and the w2 seam: the fp32 delta buffer for ``moe_sum``, or None
        when the delta (if any) went into y in place."""
        def seam(out: torch.Tensor, overwrite: bool = False) -> None:
            self.apply_w2_lora(ctx, y=out, x=x, routing=routing, topk_ids=topk_ids, topk_weights=topk_weights,
                               expert_map=expert_map, mul_routed_weight=mul_routed_weight, overwrite=overwrite)

        if deltas and routing is not None:
            delta = lora_overlap.delta_buffer(y.shape[0], y.shape[1], x.device)
            lora_overlap.beside(x.device, lambda: seam(delta, overwrite=True), gemm)
            return delta
        gemm()
        if ctx is not None:
            seam(y)
        return None
