"""MarlinExperts: W4A16 experts as Triton grouped GEMMs over packed int4 weights.

The role of vLLM's Marlin MoE kernels (weights repacked once at load, 4 bits a weight on the
device, dequantised in registers), written here as a Triton kernel (``ops/_int4_moe_gemm_kernel.py``)
that shares ``moe_align_block_size`` and the grouped-GEMM structure of ``TritonExperts``.
LoRA at the same two seams, reading the unquantized activations.

On CUDA, weights repacked at load for the tensor-core kernel (``Int4MoEMethod._repack_for_tensor_cores``,
``VLLM_INT4_MMA``, on by default) run their GEMMs on ``ops/int4_mma_moe.py`` (``csrc/capi/int4_mma_moe.cu``)
instead, at the same two seams (``_mma_plan``).

Large batches (``dequant_path.use_dequant_path``) take the ``TwoGemmExperts`` pipeline instead,
each GEMM dequantising its int4 weights once (``ops/int4_dequant.py``) before the bf16 grouped
GEMM: there the in-register kernel, which dequantises every tile for every M-block, is slower.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum
from vllm.model_executor.layers.fused_moe.experts.dequant_path import (
    dense_route,
    dequant_grouped_gemm,
    take_dequant_path,
)
from vllm.model_executor.layers.fused_moe.experts.two_gemm import local_expert_ids
from vllm.model_executor.layers.fused_moe.experts.int4_experts_base import Int4ExpertsBase
from vllm.model_executor.layers.fused_moe.modular_kernel import Support
from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import (
    MmaPlan,
    block_m_or_dequant,
    expected_blocks,
    launch_shape,
)

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.config import MoEActivation


class MarlinExperts(Int4ExpertsBase):
    """int4 GEMM1 -> [w13 LoRA] -> activation -> int4 GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum;
    at large batches the same pipeline with dequantise + bf16 GEMMs (``_route`` / ``_gemm``)."""


    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.triton_on(device)

    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: MoEActivation,
              global_num_experts: int, expert_map: Optional[torch.Tensor], a1q_scale: Optional[torch.Tensor],
              workspace13: torch.Tensor, workspace2: torch.Tensor, apply_router_weight_on_input: bool,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
        from vllm.model_executor.layers.fused_moe.config import MoEActivation
        from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import invoke_int4_mma_moe_gemm
        from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import (
            get_int4_moe_config,
            invoke_int4_moe_gemm,
            use_unsorted_int4_gemm,
        )
        from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size

        M, H = hidden_states.shape
        top_k = topk_ids.shape[1]
        pairs = M * top_k
        qc = self.quant_config
        E_local, N = qc.w13.num_experts, qc.w13.n
        if pairs == 0:
            output.zero_()
            return
        unsorted = use_unsorted_int4_gemm(pairs, E_local)
        plan = self._mma_plan(pairs, E_local, unsorted, hidden_states.device)
        if plan is None and take_dequant_path(pairs, E_local, "int4", hidden_states.device):
            # TwoGemmExperts.apply: the same steps and LoRA seams, its GEMMs are _gemm below
            return super().apply(output, hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
                                 global_num_experts=global_num_experts, expert_map=expert_map, a1q_scale=a1q_scale,
                                 workspace13=workspace13, workspace2=workspace2,
                                 apply_router_weight_on_input=apply_router_weight_on_input, lora_context=lora_context)
        dtype = hidden_states.dtype
        ids = local_expert_ids(topk_ids, expert_map)

        if plan is None:  # the Triton kernels
            cfg1 = get_int4_moe_config(pairs, E_local, N, H, qc.w13.group_size, dtype, sorted_pairs=not unsorted)
            cfg2 = dataclasses.replace(  # one alignment for both GEMMs
                get_int4_moe_config(pairs, E_local, H, N // 2 if activation.is_gated else N, qc.w2.group_size, dtype,
                                    sorted_pairs=not unsorted),
                block_size_m=cfg1.block_size_m)
            bm, splits = cfg1.block_size_m, (cfg1.split_k, cfg2.split_k)

            def gemm(stage: int, a: torch.Tensor, out: torch.Tensor, **kw: Any) -> None:
                invoke_int4_moe_gemm(a, qc.w13 if stage == 1 else qc.w2, out, config=cfg1 if stage == 1 else cfg2, **kw)
        else:  # the tensor-core kernel (csrc/capi/int4_mma_moe.cu)
            bm, splits = plan.block_m, plan.splits

            def gemm(stage: int, a: torch.Tensor, out: torch.Tensor, **kw: Any) -> None:
                invoke_int4_mma_moe_gemm(a, plan.w13 if stage == 1 else plan.w2, out, block_m=bm,
                                         split_k=splits[stage - 1], stage=plan.stages[stage - 1], **kw)
        if unsorted:  # decode among many experts: one program per pair, no alignment launches
            route = dict(pair_expert_ids=ids.reshape(-1).to(torch.int32).contiguous())
        else:
            align = moe_align_block_size(ids, bm, E_local)
            route = dict(sorted_token_ids=align.sorted_token_ids, block_expert_ids=align.block_expert_ids,
                         num_tokens_post_padded=align.num_tokens_post_padded)
        route["may_drop_pairs"] = expert_map is not None  # only an expert map sends pairs to -1
        act_n = N // 2 if activation.is_gated else N
        act_out = workspace2[: pairs * act_n].view(pairs, act_n)
        routing = d13 = None
        deltas = self.lora_deltas(lora_context, hidden_states, pairs, (N, H))
        if lora_context is None and splits[0] > 1 and activation is not MoEActivation.SWIGLUOAI:
            # split K: the reduction of the splits applies the activation (one launch fewer)
            gemm(1, hidden_states, act_out, top_k_in=top_k, epilogue_activation=activation, **route)
        else:
            gemm1 = workspace13[: pairs * N].view(pairs, N)
            routing, d13 = self.gemm1_with_lora(
                lora_context, lambda: gemm(1, hidden_states, gemm1, top_k_in=top_k, **route), deltas=deltas,
                y=gemm1, x=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights, expert_map=expert_map)
            moe_activation(activation, gemm1, out=act_out, delta=d13)

        # GEMM2 writes over workspace13: gemm1 is dead once the activation has run.
        gemm2 = workspace13[: pairs * H].view(pairs, H)
        weighted = not apply_router_weight_on_input
        if lora_context is None and splits[1] > 1:  # the split reduction sums the top-k too
            gemm(2, act_out, output, top_k_in=1, topk_weights=topk_weights, mul_routed_weight=weighted,
                 epilogue_top_k=top_k, **route)
            return
        if expert_map is not None and splits[1] == 1:
            gemm2.zero_()  # pairs routed to other ranks' experts are never written by the kernel
        d2 = self.gemm2_with_lora(
            lora_context, lambda: gemm(2, act_out, gemm2, top_k_in=1, topk_weights=topk_weights,
                                       mul_routed_weight=weighted, **route),
            deltas=deltas, y=gemm2, x=act_out, routing=routing, topk_ids=topk_ids, topk_weights=topk_weights,
            expert_map=expert_map, mul_routed_weight=weighted)
        moe_sum(gemm2.view(M, top_k, H), output, delta=None if d2 is None else d2.view(M, top_k, H))

    def _mma_plan(self, pairs: int, num_experts: int, unsorted: bool, device: torch.device) -> Optional[MmaPlan]:
        """The tensor-core kernel's launch plan when the weights were repacked for it at load (``VLLM_INT4_MMA``,
        ``Int4MoEMethod._repack_for_tensor_cores``); None: the Triton kernels, or with those words the dequant
        path (more than ``MMA_MAX_ROWS`` expected rows per expert, outside graph capture).  Inside a capture such
        a launch still takes the kernel, its largest blocks several per expert: there is no other copy."""
        qc = self.quant_config
        if qc.w13_mma is None:
            return None
        bm = block_m_or_dequant(pairs, num_experts, unsorted,
                                lambda: take_dequant_path(pairs, num_experts, "int4", device))
        if bm is None:
            return None
        w13, w2 = qc.w13_mma, qc.w2_mma
        blocks = expected_blocks(pairs, num_experts, bm, unsorted)
        shapes = [launch_shape(blocks, w.packed.n, w.packed.k, w.packed.group_size, bm) for w in (w13, w2)]
        return MmaPlan(bm, w13, w2, (shapes[0][1], shapes[1][1]), (shapes[0][0], shapes[1][0]))

    # The large-batch path (``dequant_path.py``), run by TwoGemmExperts.apply.
    def _route(self, ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
               dtype: torch.dtype) -> dict[str, Any]:
        return dense_route(ids, pairs, num_experts, N, K, act_n, dtype)

    def _gemm(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
              route: Optional[dict[str, Any]], *, stage: int, top_k_in: int, topk_weights: torch.Tensor,
              weighted: bool) -> None:
        from vllm.model_executor.layers.fused_moe.ops.int4_dequant import dequantize_int4_experts

        qc = self.quant_config
        packed = qc.w13 if stage == 1 else qc.w2
        words = qc.w13_mma if stage == 1 else qc.w2_mma
        if words is not None:  # only the tensor-core copy is kept
            dequant = words.dequantize
        else:
            dequant = lambda dst, e0, e1: dequantize_int4_experts(packed, dst, e0, e1, use_triton=True)  # noqa: E731
        dequant_grouped_gemm(out, a, dequant,
                             packed.num_experts, packed.n, packed.k, route, stage=stage, top_k_in=top_k_in,
                             topk_weights=topk_weights, weighted=weighted, bias=None)
