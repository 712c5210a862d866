"""What the grouped GEMM (``fused_moe_gemm.invoke_fused_moe_gemm``) may do after its product, on steps without
LoRA: the gated activation (GEMM1, ``FUSED_ACTIVATION``) and the top-k sum (GEMM2, ``FUSED_SUM``).  Each removes
one launch and one write + read of an intermediate per MoE layer; each is bit for bit the separate kernel's math
(the activation kernel's ``gated_act``; ``moe_sum``'s fp32 sum of a token's rows, rounded once)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.platforms.interface import triton_interpreting
from vllm.triton_utils import next_power_of_2

# GEMM2 writes each token's top-k sum itself on steps without LoRA or expert parallelism (the program storing
# a token's last row of an N tile sums the tile's rows): off until timed on a GPU
# (benchmark_decode.py --moe-fused-sum).
FUSED_SUM = False


def fused_act_code(act: Optional[MoEActivation], N: int, mul_routed_weight: bool, config: TileConfig) -> int:
    """The kernel's FUSED_ACT for ``fused_activation``: -1 for none; refuses what the epilogue cannot do."""
    if act is None:
        return -1
    codes = {MoEActivation.SILU: 0, MoEActivation.GELU: 1, MoEActivation.SWIGLUOAI: 2}
    if act not in codes:
        raise ValueError(f"fused_activation must be a gated activation ({', '.join(a.value for a in codes)}), "
                         f"got {act}")
    if N % 2 or mul_routed_weight or config.gemv:
        raise ValueError(f"fused_activation needs an even N (got {N}), no mul_routed_weight and a tl.dot config "
                         "(GEMV=0)")
    return codes[act]


def fused_sum_args(sum_out: Optional[torch.Tensor], out: torch.Tensor, num_pairs: int, n_out: int, block_n: int,
                   act_code: int, config: TileConfig) -> dict[str, Any]:
    """The kernel's top-k sum arguments for ``sum_out`` [tokens, N] (none without it); refuses what it cannot
    do.  The counters [tokens, N tiles] come from ``ops/counters.py``."""
    if sum_out is None:
        return {}
    from vllm.model_executor.layers.ops.counters import zeroed_counters

    tokens = sum_out.shape[0] if sum_out.dim() == 2 else 0
    if sum_out.dim() != 2 or sum_out.shape[1] != n_out or tokens == 0 or num_pairs % tokens:
        raise ValueError(f"sum_out must be [tokens, {n_out}] with the pairs ({num_pairs}) a multiple of the tokens, "
                         f"got {tuple(sum_out.shape)}")
    if act_code >= 0 or config.gemv:
        raise ValueError("sum_out needs a tl.dot config (GEMV=0) and no fused_activation")
    if sum_out.dtype != out.dtype or sum_out.device != out.device:
        raise ValueError(f"sum_out ({sum_out.dtype}, {sum_out.device}) must match out ({out.dtype}, {out.device})")
    top_k = num_pairs // tokens
    n_tiles = -(-n_out // block_n)
    return dict(sum_out_ptr=sum_out, counter_ptr=zeroed_counters("MoE top-k sum", tokens * n_tiles, out.device),
                stride_sm=sum_out.stride(0), stride_sn=sum_out.stride(1), SUM_TOP_K=top_k,
                SUM_K_P=max(2, next_power_of_2(top_k)), FENCE=not triton_interpreting())
