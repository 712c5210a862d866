"""The unfused two-GEMM experts pipeline with its two LoRA seams, shared by the experts classes.

    GEMM1 (+ bias) -> apply_w13_lora -> activation -> GEMM2 (+ bias, router-weighted unless the
    router weight went on the input) -> apply_w2_lora -> top-k sum

(a backend may fold the activation into GEMM1's epilogue, ``_gemm1_activated``, on steps without LoRA).
At decode sizes on CUDA each LoRA seam writes an fp32 delta buffer instead, on a side stream beside its GEMM,
and the activation and the sum add it (``lora_overlap``).

A backend supplies the GEMMs (``_gemm``, stage 1 or 2) and, if both GEMMs share something (tile
configs, the expert sort), ``_route``; a backend that can sort the pairs by (adapter, expert) in the
same pass as by expert overrides ``_route_and_lora_align`` and hands that to the w13 LoRA seam.  The
LoRA deltas are added where ``TritonExperts`` always added them, so a new backend that subclasses this
gets LoRA by construction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.lora_mixin import MoELoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.modular_kernel import (
    FusedMoEExpertsModular,
    WorkspaceShapes,
    two_gemm_workspace_shapes,
)

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.lora.ops.moe_lora_align import MoELoRAAlignment


def local_expert_ids(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """Global expert ids -> this rank's ids (-1 for experts of other ranks)."""
    if expert_map is None:
        return topk_ids
    return expert_map[topk_ids.long()].to(topk_ids.dtype)


class TwoGemmExperts(MoELoRAExpertsMixin, FusedMoEExpertsModular):
    """The pipeline above; subclasses implement ``_gemm`` (and optionally ``_route``, ``_w13_rows``)."""

    #: the activation and the top-k sum run as Triton kernels on CUDA (False: torch only)
    triton_glue: bool = True

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        return two_gemm_workspace_shapes(self.moe_config, M, self._w13_rows(N), K, top_k)

    def _w13_rows(self, n_from_weight: int) -> int:
        """GEMM1's output width, given ``w1.shape[1]`` (packed layouts override it)."""
        return n_from_weight

    def _route(self, ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
               dtype: torch.dtype) -> Optional[Any]:
        """What both GEMMs share (tile configs, the expert sort); None when nothing is shared.
        ids [M, top_k] local expert ids; GEMM1 is [pairs, K] x [N, K]^T, GEMM2 [pairs, act_n] x [K, act_n]^T."""
        return None

    def _route_and_lora_align(self, ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
                              x: torch.Tensor, lora_context: Optional["MoELoRAContext"]
                              ) -> tuple[Optional[Any], Optional["MoELoRAAlignment"]]:
        """``_route``, and the (adapter, expert) alignment of the step's LoRA when the backend makes it in
        the same pass as its expert sort (``lora_align_plan`` says whether LoRA runs and sorts); None
        there (the default): ``apply_w13_lora`` aligns, if it needs to.  x: [M, K] hidden states."""
        return self._route(ids, pairs, num_experts, N, K, act_n, x.dtype), None

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, route: Optional[Any],
              *, stage: int, top_k_in: int, topk_weights: torch.Tensor, weighted: bool) -> None:
        """out = GEMM ``stage`` (1: w13, 2: w2) of the routed pairs, + bias, router-weighted when
        ``weighted``; rows of pairs whose id is -1 are either zero or not written."""
        raise NotImplementedError

    def _gemm1_activated(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                         route: Optional[Any], *, activation: MoEActivation, top_k_in: int) -> bool:
        """GEMM1 with the gated ``activation`` in its epilogue, into out [pairs, N // 2], bit for bit GEMM1 then
        ``moe_activation``; False (nothing written) where the backend cannot.  Only called when no LoRA
        runs this step (the w13 delta joins before the activation)."""
        return False

    def _gemm2_summed(self, output: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                      route: Optional[Any], *, top_k: int, topk_weights: torch.Tensor, weighted: bool) -> bool:
        """GEMM2 and the top-k sum in one go, into output [M, K] (the pairs' rows summed in fp32 before the one
        rounding, so not bit for bit GEMM2 then ``moe_sum``); False (nothing written) where the backend cannot.
        Only called when no LoRA runs this step (the w2 delta joins before the sum)."""
        return False

    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: MoEActivation,
              global_num_experts: int, expert_map: Optional[torch.Tensor], a1q_scale: Optional[torch.Tensor],
              workspace13: torch.Tensor, workspace2: torch.Tensor, apply_router_weight_on_input: bool,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
        from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        E_local, N = w1.shape[0], self._w13_rows(w1.shape[1])
        if pairs == 0:
            output.zero_()
            return
        glue = None if self.triton_glue else False  # None: Triton on CUDA, torch elsewhere
        ids = local_expert_ids(topk_ids, expert_map)
        act_n = N // 2 if activation.is_gated else N
        route, lora_alignment = self._route_and_lora_align(ids, pairs, E_local, N, H, act_n, hidden_states,
                                                           lora_context)

        act_out = workspace2[: pairs * act_n].view(pairs, act_n)
        routing = d13 = None
        lora_runs = lora_context is not None and self.lora_runs(lora_context)
        deltas = self.lora_deltas(lora_context, hidden_states, pairs, (N, H))  # fp32 buffers beside the GEMMs
        if lora_runs or not self._gemm1_activated(act_out, hidden_states, w1, ids, route, activation=activation,
                                                  top_k_in=top_k):
            gemm1 = workspace13[: pairs * N].view(pairs, N)
            routing, d13 = self.gemm1_with_lora(
                lora_context, lambda: self._gemm(gemm1, hidden_states, w1, ids, route, stage=1, top_k_in=top_k,
                                                 topk_weights=topk_weights, weighted=False),
                deltas=deltas, y=gemm1, x=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights,
                expert_map=expert_map, alignment=lora_alignment)
            moe_activation(activation, gemm1, out=act_out, use_triton=glue, delta=d13)

        weighted = not apply_router_weight_on_input
        if not lora_runs and self._gemm2_summed(output, act_out, w2, ids, route, top_k=top_k,
                                                topk_weights=topk_weights, weighted=weighted):
            return
        gemm2 = workspace13[: pairs * H].view(pairs, H)  # gemm1 is dead once the activation has run
        if expert_map is not None:
            gemm2.zero_()  # pairs of other ranks' experts may never be written
        d2 = self.gemm2_with_lora(
            lora_context, lambda: self._gemm(gemm2, act_out, w2, ids, route, stage=2, top_k_in=1,
                                             topk_weights=topk_weights, weighted=weighted),
            deltas=deltas, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids, topk_weights=topk_weights,
            expert_map=expert_map, mul_routed_weight=weighted)
        moe_sum(gemm2.view(M, top_k, H), output, use_triton=glue, delta=None if d2 is None else d2.view(M, top_k, H))
