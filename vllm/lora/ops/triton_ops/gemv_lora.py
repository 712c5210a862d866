"""A dense projection at decode's GEMV sizes with its multi-LoRA delta: the split-K shrink, then the GEMV with
the expand in its epilogue (two launches; the separate path is three: GEMV, shrink + expand, and y rewritten).

    y = x @ W^T (+ bias) + the LoRA delta of every token

with the delta of ``add_lora_linear`` (``lora_linear.py``): per token t whose slot = token_lora_mapping[t] is
in [0, L) (and enabled), per slice s, ``y[t, off_s + j] += sum_r (sum_k x[t, k] A_s[slot, r, k]) B_s[slot, j,
r]``.  The shrink is ``lora_linear_split_shrink_kernel`` (fp32 partials over K chunks, as the token path's
split-K variant), the GEMV ``dense_gemv_kernel``'s sums (``ops/dense_gemv.py``: W read once, a row's bits
independent of the batch), and the epilogue (``_gemv_lora_kernel.py``) adds base, bias and delta in fp32 and
rounds y once: so y may differ from the separate path (base rounded, then base + delta rounded) by one
rounding of the dtype, as ``fused_linear_lora``'s.  Tokens without an (enabled) slot, and columns in no slice,
get exactly ``dense_gemv``'s result.

Why: at batch 1 the dense LoRA op runs in line after each projection (24 x 5.2 us of a 1.03 ms Qwen3-30B-A3B
decode step of 12 layers on an H200, twenty-fourth session): one launch, two dependent round trips and a rewrite
of y.  Here the expand costs the GEMV two small loads per token and slice before its K loop, and the shrink
launch's weight-independent part is one round trip after the previous kernel.  ``GEMV_LORA`` (off) switches
the LoRA layers to it (``lora.layers.linear``) until a GPU A/B (``decode_switch_ab.py --switches
dense-gemv-lora``, ``benchmarks/kernels/benchmark_gemv_lora.py``) shows it faster.

Shapes: x [T, K] with T <= ``GEMV_MAX_BLOCK_M`` (fp16 / bf16 / fp32), weight [N, K] and optional bias [N] in
x's dtype; lora_a_stacked S <= 3 tensors [L, R, K], lora_b_stacked S tensors [L, N_s, R] (x's dtype), each list
views of one buffer at one stride (as the LoRA layers allocate them); token_lora_mapping [>= T] int32 (-1 = no
adapter); adapter_enabled optional [>= L] int32; output_offsets: first column of each slice (default 0, N_0,
...), each slice inside [0, N).  No host reads of device values: safe in CUDA graphs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.slices import slice_offsets
from vllm.lora.ops.triton_ops.lora_linear import (_check, _slice_stride, launch_split_shrink, one_launch_slices,
                                                  split_variant_config)
from vllm.model_executor.layers.ops.dense_gemv import (GEMV_MAX_BLOCK_M, DenseGemvConfig, dense_gemv,
                                                       dense_gemv_config, gemv_applies)
from vllm.model_executor.layers.ops.dense_gemv import _check as _check_gemv
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2, triton_interpreting

#: whether the dense LoRA layers take this path where it applies (``lora.layers.linear``); off until timed
GEMV_LORA = False


def gemv_lora_applies(x: torch.Tensor, weight: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                      lora_b_stacked: Sequence[torch.Tensor]) -> bool:
    """Whether ``gemv_with_lora`` serves this projection: ``GEMV_LORA`` on, the plain projection would take the
    GEMV (``gemv_applies``: CUDA, ``GEMV_MAX_TOKENS`` tokens; under the interpreter up to that many), the LoRA
    buffers in x's dtype and the slices in one launch.  Shapes and host state only (CUDA-graph safe)."""
    from vllm.model_executor.layers.ops.dense_gemv import GEMV_MAX_TOKENS

    if not GEMV_LORA or not lora_a_stacked:
        return False
    if not gemv_applies(x, weight, GEMV_MAX_TOKENS if triton_interpreting() else None):
        return False
    return lora_a_stacked[0].dtype == x.dtype and lora_b_stacked[0].dtype == x.dtype and one_launch_slices(
        lora_a_stacked, lora_b_stacked)


def gemv_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor],
                   token_lora_mapping: torch.Tensor, *, adapter_enabled: Optional[torch.Tensor] = None,
                   output_offsets: Optional[Sequence[int]] = None,
                   config: Optional[DenseGemvConfig] = None,
                   shrink_config: Optional[LoRALinearTileConfig] = None) -> torch.Tensor:
    """x @ weight^T (+ bias) + the LoRA delta, y [..., N] in x's dtype (see the module docstring).
    ``config``: the GEMV's tiles (default ``dense_gemv_config``'s; its ``delayed`` kernel has no LoRA
    epilogue and is not used); ``shrink_config``: the split-K shrink's (default ``split_variant_config``'s:
    ``block_k`` is one program's K chunk, ``num_warps`` its warps)."""
    from vllm.lora.ops.triton_ops._gemv_lora_kernel import dense_gemv_lora_kernel

    _check_gemv(x, weight, bias)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T > GEMV_MAX_BLOCK_M:
        raise ValueError(f"gemv_with_lora takes at most {GEMV_MAX_BLOCK_M} tokens, got {T}")
    a_list, b_list = list(lora_a_stacked), list(lora_b_stacked)
    if not one_launch_slices(a_list, b_list):
        raise ValueError(f"gemv_with_lora needs 1-3 slices, each list views of one buffer at one stride; got "
                         f"{len(a_list)} slices (use add_lora_linear after the projection)")
    n_sizes = [b.shape[1] for b in b_list]
    offs = slice_offsets(n_sizes, output_offsets)
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    _check(y, x2, a_list, b_list, token_lora_mapping, adapter_enabled, offs)
    L, R = a_list[0].shape[:2]
    if T == 0 or N == 0 or R == 0:
        return dense_gemv(x, weight, bias, config)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    cfg = config or dense_gemv_config(N, K, x.dtype)
    ns = len(a_list)
    stride_as = _slice_stride(a_list) if ns > 1 else 0
    stride_bs = _slice_stride(b_list) if ns > 1 else 0
    shrink_cfg = shrink_config or split_variant_config(T, K, max(n_sizes), R, ns, x.dtype)
    part = launch_split_shrink(x2, a_list[0], token_lora_mapping, shrink_cfg, ns, stride_as, triton_interpreting())
    pad = 3 - ns
    b = b_list[0]
    dense_gemv_lora_kernel[(-(-N // cfg.block_n),)](
        x2, w, bias if bias is not None else w, y, T, N, K, x2.stride(0), w.stride(0), y.stride(0),
        part, b, token_lora_mapping, adapter_enabled if adapter_enabled is not None else token_lora_mapping,
        R, L, part.shape[2], *(n_sizes + [0] * pad), *(offs + [0] * pad), *part.stride()[:3], stride_bs,
        *b.stride(), HAS_BIAS=bias is not None, EVEN_K=K % cfg.block_k == 0, BLOCK_M=max(1, next_power_of_2(T)),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_ENABLED=adapter_enabled is not None, NUM_SLICES=ns,
        BLOCK_R=part.shape[3], BLOCK_J=next_power_of_2(part.shape[2]), num_warps=cfg.num_warps,
        **pdl_launch_kwargs(x2.device))
    return y.reshape(*x.shape[:-1], N)
