"""The dense LoRA handoff: a projection's delta added by the fused ops around it, not by launches of its own.

At a decode step the dense LoRA of an attention block is four launches in the chain of dependent kernels (the
q/k/v and o projections' shrink and expand; two with the batch-1 prefetch kernel), each a few microseconds of
latency while moving almost nothing: on an H200 (twenty-seventh session) they are most of what the LoRA step costs
above the no-LoRA step at batch 1 (1.16x) and a third of it at batch 64.  With ``HANDOFF`` the model asks each of
the two projections for a ``PendingDelta`` (``ops/pending_delta.py``) and hands it on:

* q/k/v: the input RMSNorm shrinks (``lora_shrink``), the projection runs bare, q/k norm + rotary adds the three
  slices' deltas (``lora_delta``, v in place);
* o: the projection runs bare and shrinks its input itself - in extra programs of its own launch where that is the
  decode GEMV (one token), else one split-K launch after it (``shrink``) -, the residual RMSNorm after it adds the
  delta (``lora_delta``).

A layer hands its delta on only where the result is the same as its own add (the delta is added in fp32 to the
projection's output and rounded once; only the order of the fp32 sums differs): one rank (the o delta joins before
the all-reduce otherwise), at most ``HANDOFF_MAX_TOKENS`` rows, buffers of the input's dtype, B's rows of one
consumer program within ``pending_delta.MAX_DELTA_TILE`` (e.g. rank <= 32 for the o projection at hidden 2048),
neither the fused projection + LoRA nor the side stream on, and the layer's LoRA ops run this step (``any_active``,
so a CUDA graph captured with the LoRA ops on holds the handoff, one captured without them does not).
``HANDOFF`` is on (decode switch ``dense-lora-handoff``): on an H200 (thirtieth session) it took the LoRA step at
batch 1 / 16 / 64 from 1.020 / 3.293 / 4.963 to 0.959 / 3.274 / 4.885 ms, and lost at 256 (6.278 -> 6.388 ms), so
``HANDOFF_MAX_TOKENS`` is 64.  CPU tensors keep the layers' own add unless ``HANDOFF_ON_CPU`` (the tests): there
the torch paths launch nothing, so handing the delta on saves nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from vllm.lora.layers import dense_overlap
from vllm.model_executor.layers.ops.dense_gemv import linear
from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.model_executor.layers.ops.qk_norm_rope import LORA_Q_HEADS
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import triton_interpreting

if TYPE_CHECKING:
    from vllm.lora.layers.linear import BaseLinearLayerWithLoRA

HANDOFF = True
HANDOFF_MAX_TOKENS = 64
HANDOFF_ON_CPU = False


def make_pending(layer: "BaseLinearLayerWithLoRA", x: torch.Tensor) -> Optional[PendingDelta]:
    """``layer.lora_handoff`` (what ``pending_delta.pending_for`` asks): decided from shapes and host state only
    (CUDA-graph safe)."""
    punica = layer.punica_wrapper
    if not HANDOFF or punica is None or layer.tp_size != 1 or x.shape[-1] == 0:
        return None
    if x.device.type == "cpu" and not HANDOFF_ON_CPU:
        return None
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= HANDOFF_MAX_TOKENS or layer.kernel_rank <= 0 or layer._lora_a.dtype != x.dtype:
        return None
    if layer.use_fused_decode or dense_overlap.applies(x.device, rows):
        return None
    if not punica.any_active(layer.enabled_slots):
        return None
    r = layer.kernel_rank
    consumer_cols = _consumer_cols(layer)
    if consumer_cols is None:
        return None
    # a slot without this layer's adapter holds zero A and B (_clear_slot): no enabled flag is needed
    pending = PendingDelta(a=layer._lora_a[:, :, :r], b=layer._lora_b[..., :r], mapping=punica.token_mapping(rows),
                           slice_sizes=tuple(layer.output_slices))
    return pending if pending.fits(consumer_cols) else None


def _consumer_cols(layer: "BaseLinearLayerWithLoRA") -> Optional[int]:
    """The columns one program of the op that adds the delta covers (its B rows stay in registers): a q/k/v layer's
    q/k norm + rotary program (``LORA_Q_HEADS`` query heads, or every key / value head), a row-parallel layer's
    residual-norm row; None for the other kinds (nothing adds their delta)."""
    base = layer.base_layer
    if layer.base_kind == "QKVParallelLinear":
        kv_heads = int(base.num_kv_heads)
        head_dim = layer.output_slices[1] // kv_heads
        return max(min(int(base.num_heads), LORA_Q_HEADS), kv_heads) * head_dim
    if layer.base_kind == "RowParallelLinear":
        return layer.output_slices[0]
    return None


def shrink(pending: PendingDelta, x: torch.Tensor) -> None:
    """The projection's own shrink of its input x [..., K] into ``pending.part``, where no op before it did: the
    split-K shrink of ``lora_linear`` (one launch) on CUDA and under the interpreter, else torch."""
    x2 = x.reshape(-1, x.shape[-1])
    if not (x2.is_cuda or triton_interpreting()):
        pending.shrink_torch(x2)
        return
    from vllm.lora.ops.triton_ops._lora_linear_split_kernels import lora_linear_split_shrink_kernel

    T, K = x2.shape
    a = pending.a
    block_k = pending.shrink_block_k(K)
    splits = -(-K // block_k)
    part = pending.new_part(T, splits, x2.device)
    if T == 0:
        return
    lora_linear_split_shrink_kernel[(T, a.shape[0], splits)](
        x2, a, part, pending.mapping, K, pending.rank, pending.max_loras, x2.stride(0), x2.stride(1), *a.stride(),
        *part.stride()[:3], BLOCK_K=block_k, BLOCK_R=pending.block_r, num_warps=8, num_stages=1,
        **pdl_launch_kwargs(x2.device))


def forward_bare(layer: "BaseLinearLayerWithLoRA", x: torch.Tensor, pending: PendingDelta) -> torch.Tensor:
    """The projection without its delta (the ops around it add ``pending``), shrinking x itself when no op before
    it did: in the projection's own launch where it is the decode GEMV (extra programs), else one launch after."""
    from vllm.lora.layers.linear import _is_plain_linear

    base = layer.base_layer
    if pending.part is None and _is_plain_linear(base, layer.base_kind == "RowParallelLinear"):
        y = linear(x, base.weight, base.bias, lora_shrink=pending)  # one rank: the base layer's own forward
    else:
        y = base(x)
    if pending.part is None:
        shrink(pending, x)
    return y
