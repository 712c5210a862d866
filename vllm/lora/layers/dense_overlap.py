"""The dense LoRA delta beside the base projection, on the MoE LoRA's side CUDA stream.

In place, a LoRA linear layer runs its projection, then the LoRA op as a read-modify-write of the projection's
output: at decode both are short and latency-bound, so the layer costs their sum.  Here the LoRA op writes the
delta into a zeroed fp32 buffer of its own on the side stream (``experts/lora_overlap.side_stream``) while the
projection runs on the current stream; after both, one elementwise add joins it: ``y = y + delta`` computed in
fp32 and rounded once to y's dtype, as the in-place op rounds.

Bits: the side stream changes nothing (the same kernels in another order).  Against the in-place op the math is
the same; the LoRA kernels are compiled for an fp32 output instead of y's dtype, which may change their
reduction order on a GPU (the MoE deltas' note in ``lora_overlap``); the interpreter and torch give equal bits.

Off by default: timed on an H200 (``decode_switch_ab.py --switches dense-lora-side-stream --lora``, Qwen3-30B-A3B
width, 12 layers, graphs + async), the LoRA decode step was slower with it at every batch: 1.023 -> 1.093 ms at
batch 1, 5.041 -> 5.081 ms at 64, 6.634 -> 6.910 ms at 256.  The zeroing and the joining add are two more launches
and the join breaks the programmatic-dependent-launch chain, which costs more than the LoRA op it hides; folding the
join into the next kernel (the residual add + RMSNorm after o_proj) would be the next try.  Only the sorted split's
shrink beside the projection (its expand in place after it, no buffer and no join) lost too: NVIDIA H100, thirty-
fourth session, 1.009x at batch 256, 1.000x at 64 (branch ``shrink-beside``).

Taken on CUDA (``lora_overlap.DEVICE_TYPES``) for steps of at most ``MAX_TOKENS`` tokens (decode batches; the
fp32 buffer grows with the tokens) when ``DENSE_LORA_SIDE_STREAM`` is on, wherever the LoRA op runs at all: the
decision depends on shapes and on the step's LoRA state only, so an eager step takes the path its CUDA-graph
replay takes (both streams are captured; nothing synchronises with the host).
"""
from __future__ import annotations

from typing import Callable

import torch

from vllm.model_executor.layers.fused_moe.experts import lora_overlap

#: run the dense LoRA delta on the side stream beside the projection (False, the default since it was timed
#: slower: the in-place op after it)
DENSE_LORA_SIDE_STREAM = False
#: the most tokens a step may have to take the path (its fp32 buffer is tokens x output columns)
MAX_TOKENS = 256


def applies(device: torch.device, tokens: int) -> bool:
    """Whether a LoRA linear layer's forward of ``tokens`` rows on ``device`` takes the delta buffer."""
    return DENSE_LORA_SIDE_STREAM and device.type in lora_overlap.DEVICE_TYPES and 0 < tokens <= MAX_TOKENS


def project_beside(x: torch.Tensor, cols: int, project: Callable[[], torch.Tensor],
                   add_delta: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``project()`` (x's projection, a new [..., cols] tensor) with ``add_delta(buffer)`` (the LoRA op adding
    into an fp32 [tokens, cols] buffer) beside it on the side stream; returns the projection + the delta."""
    delta = lora_overlap.delta_buffer(x.numel() // x.shape[-1], cols, x.device)
    out: list[torch.Tensor] = []

    def side() -> None:
        delta.zero_()
        add_delta(delta)

    lora_overlap.beside(x.device, side, lambda: out.append(project()))
    y = out[0]
    y.view(-1, cols).add_(delta)
    return y
