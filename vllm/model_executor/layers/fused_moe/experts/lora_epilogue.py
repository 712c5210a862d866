"""The sorted MoE LoRA path with each seam's expand in the base GEMM's epilogue.

On the sorted (aligned) path each seam runs one fused LoRA kernel after its GEMM, a read-modify-write of the
GEMM's whole output on the critical path.  Where ``applies``, the seam is split in two instead
(``PunicaWrapperGPU.lora_w13_epilogue`` / ``lora_w2_epilogue``): the shrink launches before the GEMM (fp32
[slices, pairs, rank]), and the GEMM adds each pair's expand to its fp32 tile before its bias, router weight and
one rounding (``vllm/lora/ops/triton_ops/moe_lora_epilogue.py``).  The output is written once; the activation
and the top-k sum read it as without LoRA.  Experts take it through ``TwoGemmExperts._gemm_with_lora`` where
``_takes_lora_epilogue`` (``TritonExperts``: the tl.dot kernel).

Bits: one rounding of base + delta instead of the base's and then the sum's, so not bit for bit the in-place
path (within the dtype's rounding of it).  Off until timed on a GPU (``benchmark_moe_lora.py --lora-epilogue``,
``decode_switch_ab.py --switches moe-lora-epilogue``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext

#: split the sorted path's seams: the shrink before the GEMM, the expand in its epilogue (off until timed)
LORA_EPILOGUE = False
#: only up to this many expected pairs per local expert (None: any).  A tile of mixed adapters runs one small dot
#: per slot present (three bf16 MMAs each for the fp32 shrink), so where the GEMMs are compute bound (prefill) the
#: epilogue adds up to 3 x slots x rank / K of their MMA work (Qwen3-30B-A3B, 4 adapters: ~19 % on GEMM1 at rank
#: 32, ~25 % on GEMM2 at rank 16) against the read-modify-write it saves: the crossover is for a GPU to find
MAX_PAIRS_PER_EXPERT: Optional[float] = None


def applies(ctx: "MoELoRAContext", pairs: int) -> bool:
    """Whether a MoE forward of ``pairs`` (token, expert) pairs with LoRA ``ctx`` splits its seams (decided from
    shapes and host state only: graph-safe): ``LORA_EPILOGUE``, a wrapper that can, the sorted path, not the
    fully-sharded tensor-parallel one (its collectives), slices one epilogue can address, and at most
    ``MAX_PAIRS_PER_EXPERT`` expected pairs per expert."""
    from vllm.lora.ops.triton_ops.moe_lora_epilogue import MoELoRAEpilogue

    from vllm.model_executor.layers.fused_moe.ops.moe_launch import pairs_per_touched_expert

    wrapper = ctx.punica_wrapper
    if MAX_PAIRS_PER_EXPERT is not None and pairs_per_touched_expert(pairs, ctx.local_num_experts) > \
            MAX_PAIRS_PER_EXPERT:
        return False
    return (LORA_EPILOGUE and wrapper.moe_lora_epilogue and pairs > 0 and not wrapper.moe_lora_per_pair(ctx, pairs)
            and not (ctx.fully_sharded and ctx.tp_size > 1) and MoELoRAEpilogue.fits(ctx.w13_lora_b_stacked)
            and MoELoRAEpilogue.fits(ctx.w2_lora_b_stacked))
