"""The large-batch path of the 4-bit experts (``MarlinExperts``, ``UnfusedOAITritonExperts``):
each GEMM dequantises its weights once into a scratch buffer, then runs the bf16 grouped GEMM.

Why (NVIDIA H200, one MoE layer, microseconds, in-register 4-bit kernel vs bf16 ``TritonExperts``;
docs/performance.md): the 4-bit kernels redo the dequantisation for every M-block, so they lose at
large token counts -

    int4 (group 128)  Qwen3-30B-A3B (E 128, top-8)  821 vs 346 at 256 tokens, 7600 vs 894 at 4096
                      Mixtral-8x7B (E 8, top-2)    5760 vs 945 at 256,      65653 vs 5098 at 4096
    MXFP4             gpt-oss-20b (E 32, top-4)     513 vs 473 at 256,       8046 vs 1693 at 4096
                      gpt-oss-120b (E 128, top-4)  1160 vs 1526 at 256,      9737 vs 2866 at 4096

while dequantising a whole layer to bf16 is memory bound (read 4.25 bits, write 16 a weight, at
~4.8 TB/s: about 0.3 ms for Qwen3, 0.75 Mixtral, 0.4 / 1.7 gpt-oss 20b / 120b), after which the GEMM
runs at bf16 speed.  vLLM does the same for AWQ dense layers (dequantise, then matmul, from 256
tokens).  The path is taken from ``MIN_PAIRS`` routed (token, expert) pairs and
``MIN_PAIRS_PER_EXPERT[kind]`` pairs per local expert on average; the 4-bit kernels stay for
smaller batches (decode).  ``--compare-paths`` of ``benchmarks/kernels/benchmark_moe_int4.py`` /
``_mxfp4.py`` timed both paths (NVIDIA H200, kernel vs dequant + bf16, us):

    int4 Qwen3-30B-A3B   820 vs 897 at 16 pairs per expert (256 tokens), 2013 vs 1020 at 64 (1024 tokens)
    MXFP4 gpt-oss-20b    505 vs 1050 at 32 (256 tokens),                 2491 vs 1290 at 128 (1024 tokens)
    MXFP4 gpt-oss-120b  1943 vs 4382 at 32 (1024 tokens),                9610 vs 5268 at 128 (4096 tokens)

Interpolated on log-log axes, the two cross at about 19 pairs per expert for int4, hence 20, and at
about 66 (20b) / 71 (120b) for MXFP4, hence 64.  Those thresholds serve the Triton kernels; where the
weights were repacked for the tensor-core kernels (CUDA, bf16 / fp16 activations) the kernel keeps every
launch of up to ``int4_mma_moe.MMA_MAX_ROWS`` (192) expected pairs per expert, its own measured crossover,
and this path dequantises those words (``ops/w4_mma_dequant.py``).

The scratch holds at most ``SCRATCH_CAP_BYTES``: larger layers are processed in chunks of experts
[e0, e1), each dequantised and multiplied with its own alignment of the pairs routed to it (the
GEMM's grid is sized from its weight's expert count, so it must see only the chunk's blocks).
The scratch is allocated per call (the caching allocator reuses it across layers); the KV cache
is sized without a profiling run (``vllm/engine/kv_cache.py``), so it has to stay small and
transient.  For the same reason the path is not taken while a CUDA graph is captured (a
captured allocation stays in the graphs' pool for good) unless ``IN_CUDA_GRAPHS``: decode
batches keep the 4-bit kernels.  The choice depends on shapes only, never on device values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import AlignResult

#: the path needs at least this many routed (token, k) pairs ...
MIN_PAIRS = 256
#: ... and at least this many pairs per local expert on average (the crossovers measured above)
MIN_PAIRS_PER_EXPERT = {"int4": 20, "mxfp4": 64}
#: the most bytes of dequantised weights held at once; above it the experts go in chunks
SCRATCH_CAP_BYTES = 1 << 30
#: take the path inside a CUDA-graph capture too (benchmarks set it: they time graph replays)
IN_CUDA_GRAPHS = False
#: tests and benchmarks: "kernel" or "dequant" overrides the thresholds (None: decide by them)
FORCE_PATH: Optional[str] = None


def use_dequant_path(num_pairs: int, num_experts: int, kind: str) -> bool:
    """Whether a batch of ``num_pairs`` routed pairs over ``num_experts`` local experts of a ``kind``
    ("int4" or "mxfp4") layer dequantises the weights and runs the bf16 GEMM (see the module docstring)."""
    if kind not in MIN_PAIRS_PER_EXPERT:
        raise ValueError(f"unknown 4-bit kind {kind!r}; expected one of {sorted(MIN_PAIRS_PER_EXPERT)}")
    if FORCE_PATH is not None:
        if FORCE_PATH not in ("kernel", "dequant"):
            raise ValueError(f"FORCE_PATH must be 'kernel', 'dequant' or None, got {FORCE_PATH!r}")
        return FORCE_PATH == "dequant"
    return num_pairs >= MIN_PAIRS and num_pairs >= MIN_PAIRS_PER_EXPERT[kind] * num_experts


def take_dequant_path(num_pairs: int, num_experts: int, kind: str, device: torch.device) -> bool:
    """``use_dequant_path``, except while a CUDA graph is being captured (unless ``IN_CUDA_GRAPHS`` or forced)."""
    if not use_dequant_path(num_pairs, num_experts, kind):
        return False
    if FORCE_PATH is None and not IN_CUDA_GRAPHS and device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return True


def dense_route(ids: torch.Tensor, pairs: int, num_experts: int, N: int, K: int, act_n: int,
                dtype: torch.dtype) -> dict[str, Any]:
    """What both dense GEMMs share, as ``TritonExperts`` makes it: the bf16 tile configs (``TileConfig``s,
    one block_size_m) and the expert sort; ``ids`` [M, top_k] local expert ids (-1: another rank's), kept for
    chunking."""
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import get_two_gemm_configs
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

    cfg1, cfg2 = get_two_gemm_configs(pairs, num_experts, N, K, act_n, ids.shape[1], dtype)
    align = align_for_experts(ids, cfg1.block_size_m, num_experts)
    return dict(cfg1=cfg1, cfg2=cfg2, ids=ids, aligned={(0, num_experts): align})


def experts_per_chunk(num_experts: int, N: int, K: int, dtype: torch.dtype) -> int:
    """How many experts' dense [N, K] weights fit ``SCRATCH_CAP_BYTES`` (at least one)."""
    per_expert = N * K * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(num_experts, SCRATCH_CAP_BYTES // max(per_expert, 1)))


def _chunk_alignment(route: dict[str, Any], e0: int, e1: int) -> "AlignResult":
    """The alignment of the pairs routed to experts [e0, e1), renumbered 0..e1-e0-1 (others -1); cached per chunk."""
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

    key = (e0, e1)
    if key not in route["aligned"]:
        ids = route["ids"]
        inside = (ids >= e0) & (ids < e1)
        local = torch.where(inside, ids - e0, torch.full_like(ids, -1))
        route["aligned"][key] = align_for_experts(local, route["cfg1"].block_size_m, e1 - e0)
    return route["aligned"][key]


def dequant_grouped_gemm(out: torch.Tensor, a: torch.Tensor, dequantize: Callable[[torch.Tensor, int, int], Any],
                         num_experts: int, N: int, K: int, route: dict[str, Any], *, stage: int, top_k_in: int,
                         topk_weights: torch.Tensor, weighted: bool, bias: Optional[torch.Tensor]) -> None:
    """One expert GEMM of the path: ``dequantize(dst, e0, e1)`` writes experts [e0, e1) as dense [e1 - e0, N, K]
    weights into ``dst`` (``a.dtype``), then ``invoke_fused_moe_gemm`` multiplies the pairs routed to them
    (``out`` rows of other pairs are left untouched), chunk after chunk when the scratch cap asks for it."""
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import invoke_fused_moe_gemm

    cfg = route[f"cfg{stage}"]
    chunk = experts_per_chunk(num_experts, N, K, a.dtype)
    scratch = torch.empty((chunk, N, K), dtype=a.dtype, device=a.device)
    for e0 in range(0, num_experts, chunk):
        e1 = min(num_experts, e0 + chunk)
        w = scratch[: e1 - e0]
        dequantize(w, e0, e1)
        align = _chunk_alignment(route, e0, e1)
        invoke_fused_moe_gemm(a, w, out, sorted_token_ids=align.sorted_token_ids,
                              block_expert_ids=align.block_expert_ids,
                              num_tokens_post_padded=align.num_tokens_post_padded, top_k_in=top_k_in,
                              topk_weights=topk_weights, mul_routed_weight=weighted,
                              bias=bias[e0:e1] if bias is not None else None, config=cfg)
