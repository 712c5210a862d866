"""A dense projection and its multi-LoRA delta in one launch, for decode-sized batches.

    y = x @ W^T (+ bias) + the LoRA delta of every token

with the delta of ``add_lora_linear`` (``lora_linear.py``): per token t whose slot
= token_lora_mapping[t] is in [0, L) (and enabled), per slice s::

    y[t, off_s + j] += sum_r (sum_k x[t, k] * A_s[slot, r, k]) * B_s[slot, j, r]

For T <= ``BATCH_MAX_TOKENS`` tokens, where a projection is memory-bound: the
separate path (cuBLAS F.linear, then the LoRA kernel reading and rewriting y)
costs two launches, and the second is pure latency.  Up to ``SMALL_BATCH_TOKENS``
tokens the kernel below runs (one token block, no grouping); above, the
tensor-core kernel of ``fused_linear_lora_batch`` over the slot-sorted tokens
(``meta``: the step's ``LoRALinearMetadata``, made here when not given).

Rounding contract: the base product is accumulated in fp32, the bias and the
delta (its shrink kept in fp32, as in ``add_lora_linear``) are added in fp32 to
that accumulator, and y is rounded ONCE into x's dtype.  The separate path rounds
the base into y and then y + delta again, so the two differ by at most one
rounding of the output dtype (plus the summation order of the base product,
which differs between any two GEMM kernels).  Tokens without an (enabled) slot
get exactly this kernel's base result: their delta is never added, not even a 0.

Shapes (L = max_loras slots, R = max rank, N = W's rows):
    x: [T, K] fp32/fp16/bf16, any strides, T <= BATCH_MAX_TOKENS (T = 0 gives an empty y)
    weight: [N, K], x's dtype (an unquantized linear weight), any strides
    bias: optional [N], x's dtype
    lora_a_stacked: S <= 3 tensors [L, R, K]; lora_b_stacked: S tensors [L, N_s, R]
        (x's dtype), each list views of one buffer with one stride between slices
        (as the LoRA layers allocate them)
    token_lora_mapping: [>= T] int32, -1 = no adapter; adapter_enabled: optional [>= L] int32, 0 = skip
    output_offsets: first column of each slice (default 0, N_0, N_0 + N_1, ...); slice s
        must lie in [0, N)
    out: optional [T, N] y (x's dtype), written (not added to)

Grid (T <= 16): one program per BLOCK_N columns (``fused_linear_lora_config``); every
program reads its own W rows, so W streams once, and recomputes the small shrink
of the slots its tokens use (one slot at batch 1).  No host reads of device
values: safe inside CUDA graphs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from vllm.kernel_configs.tile_config import FusedLinearLoRABatchTileConfig, FusedLinearLoRATileConfig
from vllm.lora.ops.slices import slice_offsets
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import BATCH_MAX_TOKENS, launch_batch
from vllm.lora.ops.triton_ops.lora_linear import SMALL_BATCH_TOKENS, LoRALinearMetadata, _check, _slice_stride
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.triton_utils import next_power_of_2, triton_interpreting

_MIN_PROGRAMS = 132  # one per SM of an H100 / H200: fewer cannot stream W at full bandwidth
_BLOCK_T = 16  # token rows of every program (a dot needs 16; padding rows are masked)


def fused_linear_lora_config(num_tokens: int, K: int, N: int, R: int,
                             dtype: torch.dtype) -> FusedLinearLoRATileConfig:
    """Tiles of one launch up to ``SMALL_BATCH_TOKENS`` tokens (``config=`` takes it, changed by
    ``dataclasses.replace``).

    On a GPU: the widest BLOCK_N in 64 / 32 / 16 that still gives one program per SM
    (qkv of Qwen3-30B-A3B, N = 5120: 32; o, N = 2048: 16), BLOCK_K 256 (128 in fp32).
    ``SHRINK_IN_LOOP``: one (slice, slot) shrink accumulated in the main K loop (see the kernel).
    Untimed so far: ``benchmarks/kernels/benchmark_fused_linear_lora.py --sweep`` times the alternatives.
    """
    del num_tokens, R  # the tiles do not depend on them yet (T <= 16 is one token block)
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():  # ~5 ms per loop iteration per program: few programs, one K tile
        return FusedLinearLoRATileConfig(block_n=min(n_cap, 128), block_k=min(k_cap, 512), num_warps=4,
                                         num_stages=1, shrink_in_loop=True)
    block_n = next((bn for bn in (64, 32) if -(-N // bn) >= _MIN_PROGRAMS), 16)
    block_k = min(k_cap, 128 if dtype == torch.float32 else 256)
    return FusedLinearLoRATileConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=4,
                                     shrink_in_loop=True)


def _check_base(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor],
                mapping: torch.Tensor, adapter_enabled: Optional[torch.Tensor]) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [T, K] and [N, K]")
    if x.shape[0] > BATCH_MAX_TOKENS:
        raise ValueError(f"fused_linear_lora takes at most {BATCH_MAX_TOKENS} tokens, got {x.shape[0]}; "
                         "use F.linear then add_lora_linear for larger batches")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device}): "
                         "an unquantized linear weight in the activations' dtype")
    N = weight.shape[0]
    if mapping.device != x.device or (adapter_enabled is not None and adapter_enabled.device != x.device):
        raise ValueError(f"token_lora_mapping and adapter_enabled must be on x's device ({x.device})")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} must be [{N}] {x.dtype} on {x.device}")
    if out is not None and (tuple(out.shape) != (x.shape[0], N) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be [{x.shape[0]}, {N}] {x.dtype} on {x.device}")


def fused_linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor],
                      token_lora_mapping: torch.Tensor, *, adapter_enabled: Optional[torch.Tensor] = None,
                      output_offsets: Optional[Sequence[int]] = None, out: Optional[torch.Tensor] = None,
                      meta: Optional[LoRALinearMetadata] = None,
                      config: Optional[Union[FusedLinearLoRATileConfig,
                                             FusedLinearLoRABatchTileConfig]] = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias) + LoRA delta, one launch (see the module docstring); returns y.

    ``meta`` (above ``SMALL_BATCH_TOKENS`` tokens, else unused): the tokens grouped by slot, as
    ``lora_linear_metadata`` makes them, for the first n <= T tokens of the mapping (rows past n must be on
    slot -1); ``config``: tiles of the path the token count picks (a ``FusedLinearLoRATileConfig`` up to
    ``SMALL_BATCH_TOKENS`` tokens, a ``FusedLinearLoRABatchTileConfig`` above; default the heuristic's)."""
    from vllm.lora.ops.triton_ops._fused_linear_lora_kernel import fused_linear_lora_kernel

    _check_base(x, weight, bias, out, token_lora_mapping, adapter_enabled)
    T, K = x.shape
    N = weight.shape[0]
    y = out if out is not None else torch.empty(T, N, dtype=x.dtype, device=x.device)
    a_list, b_list = list(lora_a_stacked), list(lora_b_stacked)
    n_sizes = [b.shape[1] for b in b_list]
    offs = slice_offsets(n_sizes, output_offsets)
    _check(y, x, a_list, b_list, token_lora_mapping, adapter_enabled, offs)
    S = len(a_list)
    stride_as, stride_bs = _slice_stride(a_list), _slice_stride(b_list)
    one_buffer = stride_as is not None and stride_bs is not None
    if S > 3 or not one_buffer:
        raise ValueError(f"fused_linear_lora takes at most 3 slices, each list views of one buffer with one "
                         f"stride between slices (got {S} slices, one buffer: {one_buffer}); "
                         "use F.linear then add_lora_linear")
    if T == 0:
        return y
    if T > SMALL_BATCH_TOKENS:
        launch_batch(x, weight, bias, a_list[0], b_list[0], y, token_lora_mapping, adapter_enabled, n_sizes, offs,
                     stride_as, stride_bs, meta, config)
        return y
    L, R = a_list[0].shape[:2]
    cfg = config if config is not None else fused_linear_lora_config(T, K, N, R, x.dtype)
    if not isinstance(cfg, FusedLinearLoRATileConfig):
        raise TypeError(f"at {T} <= {SMALL_BATCH_TOKENS} tokens config must be a FusedLinearLoRATileConfig "
                        f"(fused_linear_lora_config, changed by dataclasses.replace), got {type(cfg).__name__}")
    interp = triton_interpreting()
    pad = 3 - S
    a, b = a_list[0], b_list[0]
    grid = (-(-N // cfg.block_n),)
    fused_linear_lora_kernel[grid](
        x, weight, bias if bias is not None else weight, a, b, y, token_lora_mapping,
        adapter_enabled if adapter_enabled is not None else token_lora_mapping,
        T, N, K, R, L, *(n_sizes + [0] * pad), *(offs + [0] * pad),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        stride_as, *a.stride(), stride_bs, *b.stride(), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_ENABLED=adapter_enabled is not None, NUM_SLICES=S if R > 0 else 0,
        UPCAST=interp, BASE_PRECISION="ieee", FP32_PRECISION="ieee" if interp else "tf32x3",
        EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0, SHRINK_IN_LOOP=cfg.shrink_in_loop,
        BLOCK_T=_BLOCK_T, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=rank_block(R),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
