"""The dense LoRA as extra input columns of the projection's own GEMM: ``y = [x | s] @ [W | B]^T``.

With ``CONCAT_K`` a plain unquantized projection (one rank; not the routers) keeps its weight inside a wider buffer
``[N, K + S * L * cap]`` (S slices, L slots, cap = max_lora_rank or less, ``prepare``): the base weight becomes a
view of its first K columns, and slot l's B of slice s sits in the slice's rows at columns ``K + (s * L + l) * r``
for the layer's kernel rank r (``effective_rank.py``), kept in step by ``sync_slot`` whenever a slot is set or
cleared and laid out again by ``relayout`` when r changes (in place, so CUDA graphs stay valid).  A forward of
``CONCAT_MIN_TOKENS`` or more rows writes the wide input in one launch (``lora_concat_shrink``: x, and each row's
shrink in its own slot's columns, zeros in the others) and runs one GEMM on its first K + S * L * r columns: no
expand launch and no read-modify-write of the output, for K / 8 or fewer extra columns (``CONCAT_MAX_FRACTION``).  The
delta and the projection are summed in the GEMM's fp32 accumulator and rounded once (the shrink itself is rounded
to the input's dtype), so results may differ from the two-launch path by one rounding of the output.

Off until timed on a GPU (decode switch ``dense-lora-concat``): decided when the layer's LoRA buffers are
created.  Below ``CONCAT_MIN_TOKENS`` rows the handoff (``dense_handoff.py``) and the token kernels stay.
H100, thirty-sixth session (Qwen3-30B-A3B attention, 4 rank-16 adapters, 256 rows): the wide GEMM costs +1.0 us
(q/k/v, 192 more K columns) / +0.6 us (o, 64) over the plain one, and the base weight as a strided view nothing;
but the first shrink kernel (a copy of x inside its K loop, 16 K tiles a program) took 27 / 28 us alone, so the
layer lost (q/k/v + LoRA 42.0 us against 30.6 today, o 40.9 against 27.1) and the LoRA decode step at batch 256
too (x1.113; that engine ran max_lora_rank 32, and the buffers then laid B out at 32 columns a slot: q/k/v stayed
out - 384 columns > K / 8 - and the routers' weights moved into wide buffers too).  Now the layout follows the
kernel rank and the routers keep their weights (``CONCAT_KINDS``); the kernel copies x in programs of its own
and runs 8 K tiles a program (optionally all slots of a slice a program, ``lora_concat.SLOT_GROUP``): untimed.
It pays off only if the shrink takes less than what today's shrink + expand add to the projection (13.1 us q/k/v,
10.5 us o): ``benchmark_dense_concat.py --sweep``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from vllm.lora.ops.triton_ops.lora_concat import concat_columns, lora_concat_shrink
from vllm.triton_utils import triton_interpreting

if TYPE_CHECKING:
    from vllm.lora.layers.linear import BaseLinearLayerWithLoRA

CONCAT_K = False
CONCAT_MIN_TOKENS = 65
CONCAT_MAX_FRACTION = 0.125
CONCAT_ON_CPU = False  # tests: the torch path on CPU tensors
# the kinds whose weight moves into a wide buffer: the projections adapters target (not the routers and gates,
# replicated linears that the LoRA manager wraps too)
CONCAT_KINDS = ("QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear", "RowParallelLinear")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def prepare(layer: "BaseLinearLayerWithLoRA") -> None:
    """At ``create_lora_weights``: move the base weight into the wide buffer where the layer qualifies (else
    ``layer._concat_w`` stays None).  The buffer holds ``_concat_cap`` columns a (slice, slot): max_lora_rank,
    or fewer (a multiple of 8) where S * L * max_lora_rank columns would exceed ``CONCAT_MAX_FRACTION`` of K."""
    layer._concat_w, layer._concat_cap, layer._concat_rank = None, 0, 0
    base = layer.base_layer
    w = getattr(base, "weight", None)
    if not CONCAT_K or layer.tp_size != 1 or layer.base_kind not in CONCAT_KINDS:
        return
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOATS or layer._lora_a.dtype != w.dtype:
        return
    if w.device.type != "cuda" and not (CONCAT_ON_CPU or triton_interpreting()):
        return
    from vllm.lora.layers.linear import _is_plain_linear

    if not _is_plain_linear(base, layer.base_kind == "RowParallelLinear"):
        return
    N, K = w.shape
    S, L, R, _ = layer._lora_a.shape
    cap = min(R, int(CONCAT_MAX_FRACTION * K) // (S * L) // 8 * 8)
    if cap < min(R, 8) or N != sum(layer.output_slices):
        return
    wide = torch.zeros(N, K + S * L * cap, dtype=w.dtype, device=w.device)
    wide[:, :K].copy_(w.data)
    w.data = wide[:, :K]  # the base layer reads the same values through a strided view
    layer._concat_w, layer._concat_cap = wide, cap
    relayout(layer)


def relayout(layer: "BaseLinearLayerWithLoRA") -> None:
    """Lay every slot's B out at the layer's kernel rank r (columns ``K + (s * L + l) * r``; the rest zero), or
    nothing where r exceeds the buffer's capacity (the layer then keeps today's path).  Called when the kernel
    rank changes (graphs are captured again then)."""
    wide: Optional[torch.Tensor] = getattr(layer, "_concat_w", None)
    if wide is None:
        return
    K = layer._lora_a.shape[3]
    wide[:, K:].zero_()
    r = layer.kernel_rank
    layer._concat_rank = r if 0 < r <= layer._concat_cap else 0
    for slot in range(layer.max_loras):
        sync_slot(layer, slot)


def sync_slot(layer: "BaseLinearLayerWithLoRA", slot: int) -> None:
    """Copy slot ``slot``'s B of every slice (zeros where cleared) into the wide weight's columns at the laid-out
    rank."""
    wide: Optional[torch.Tensor] = getattr(layer, "_concat_w", None)
    r = getattr(layer, "_concat_rank", 0)
    if wide is None or r == 0:
        return
    S, L, _, K = layer._lora_a.shape
    row = 0
    for s, n in enumerate(layer.output_slices):
        col = K + (s * L + slot) * r
        wide[row:row + n, col:col + r].copy_(layer._lora_b[s, slot, :n, :r])
        row += n


def applies(layer: "BaseLinearLayerWithLoRA", x: torch.Tensor) -> bool:
    """Whether this forward runs concatenated: from shapes and host state only (CUDA-graph safe)."""
    wide = getattr(layer, "_concat_w", None)
    punica = layer.punica_wrapper
    if wide is None or punica is None or layer._concat_rank != layer.kernel_rank or layer._concat_rank == 0:
        return False
    if x.shape[-1] != layer._lora_a.shape[3] or x.dtype != wide.dtype:
        return False
    rows = x.numel() // x.shape[-1]
    return rows >= CONCAT_MIN_TOKENS and punica.any_active(layer.enabled_slots)


def forward(layer: "BaseLinearLayerWithLoRA", x: torch.Tensor) -> torch.Tensor:
    """The projection with its delta: the wide input in one launch, then one GEMM (bias included)."""
    wide = layer._concat_w
    a = layer._lora_a[:, :, :layer._concat_rank]
    K = a.shape[3]
    width = K + concat_columns(a)
    x2 = x.reshape(-1, K)
    T = x2.shape[0]
    wide_in = torch.empty(T, width, dtype=x.dtype, device=x.device)
    lora_concat_shrink(x2, a, layer.punica_wrapper.token_mapping(T), wide_in)
    y = F.linear(wide_in, wide[:, :width], layer.base_layer.bias)
    return y.view(*x.shape[:-1], wide.shape[0])
