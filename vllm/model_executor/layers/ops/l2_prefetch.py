"""Warming L2 with the next projection's weights while the small kernels before it run (issue 10, batch 1).

At one decode token a layer's GPU time is a chain of dependent launches: the weight streams (q/k/v, o, the
MoE GEMMs, ~62-65 % of the copy rate at batch 1) and, between them, ~10 small kernels (norms, q/k norm +
rotary, KV write, attention and its reduce, top-k, ...) of 1-4 us each that move almost no bytes.  While
those run, DRAM is idle; the projection after them then starts cold and ramps up.  A kernel of that chain
can instead ask the memory system to fetch the next projection's weights into L2 (``cp.async.bulk.prefetch.L2``
on sm_90+, a hint: nothing waits for it and no value changes), so that the projection reads them from L2:

* the q/k norm + rotary launch prefetches the o projection's weight (16.8 MB at Qwen3-30B-A3B width: ~4 us at
  the copy rate, under the ~6 us of q/k norm + rotary, KV write, attention and reduce);
* the input RMSNorm prefetches the q/k/v projection's weight - before its PDL wait, beside the MoE top-k sum
  before it (``INPUT_NORM_EARLY``) -, the post-attention RMSNorm the MLP's first weight (the router, or a dense
  MLP's gate/up);
* the router's top-k launch prefetches the start of each chosen expert's gate/up weights and the MoE activation
  each pair's down weights - what the experts' GEMMs stream (``stream_weights``: bf16 weights, or the 4-bit
  backends' packed words; not the scales) - without expert parallelism, up to ``EXPERT_MAX_PAIRS`` (token,
  expert) pairs and ``EXPERT_BUDGET_BYTES`` in all: the GEMM that follows reads them from L2 instead of ramping
  up from DRAM (``plan_experts``).

A launch that takes a prefetch grows by ``programs`` programs, each of which - after the launch's PDL wait, so
that it does not compete with the weight stream still finishing before it - issues the bulk prefetches of one
``CHUNK_BYTES`` chunk (``_l2_prefetch.py``).  ``L2_PREFETCH`` (off until timed on a GPU; decode switch
``l2-prefetch``) turns it on, for launches of at most ``L2_PREFETCH_MAX_TOKENS`` tokens, on sm_90+ (and under
the interpreter, where the same programs run without the instruction, for the CPU tests).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vllm.platforms.interface import triton_interpreting

L2_PREFETCH = False
L2_PREFETCH_MAX_TOKENS = 256
CHUNK_BYTES = 512 * 1024  # one program's share
PIECE_BYTES = 64 * 1024  # one bulk prefetch instruction
INPUT_NORM_EARLY = True  # the input norm's q/k/v prefetch before its wait (the previous layer's sum streams nothing)
EXPERT_MAX_PAIRS = 32  # (token, expert) pairs of a top-k launch that prefetches its experts
EXPERT_BUDGET_BYTES = 32 << 20  # all of its prefetches together (the H100 / H200 L2: 50 MB)


@dataclass(frozen=True)
class L2Prefetch:
    """The launch arguments of one prefetch: ``data`` (the weight's bytes, a flat uint8 view), ``nbytes`` (a
    multiple of 16) and the number of extra programs."""

    data: torch.Tensor
    nbytes: int
    programs: int

    def kernel_args(self) -> dict[str, Any]:
        return dict(pf_ptr=self.data, pf_bytes=self.nbytes, PREFETCH=True, PF_CHUNK=CHUNK_BYTES,
                    PF_PIECE=PIECE_BYTES, PF_INTERP=triton_interpreting())

    def early_args(self) -> dict[str, Any]:
        """``kernel_args`` issuing the prefetch before the PDL wait (the RMSNorm kernel's ``PF_EARLY``): for a
        launch whose predecessor streams nothing, so that the prefetch overlaps it too."""
        return dict(self.kernel_args(), PF_EARLY=True)


def _device_ok(device: torch.device) -> bool:
    return _device_ok_cached(device.type, device.index, triton_interpreting())


@functools.lru_cache(maxsize=None)
def _device_ok_cached(device_type: str, index: Optional[int], interpreting: bool) -> bool:
    if interpreting:
        return True
    return device_type == "cuda" and torch.cuda.get_device_capability(index)[0] >= 9  # the bulk prefetch: sm_90+


def plan(weight: Optional[torch.Tensor], num_tokens: int) -> Optional[L2Prefetch]:
    """The prefetch of ``weight`` for a launch of ``num_tokens`` tokens, or None (switch off, too many tokens,
    no weight, a device without the instruction, or a weight that is not one contiguous 16-byte aligned
    block)."""
    if not L2_PREFETCH or weight is None or not 0 < num_tokens <= L2_PREFETCH_MAX_TOKENS:
        return None
    if not weight.is_contiguous() or weight.data_ptr() % 16 or not _device_ok(weight.device):
        return None
    nbytes = (weight.numel() * weight.element_size()) // 16 * 16
    if nbytes == 0:
        return None
    return L2Prefetch(weight.reshape(-1).view(torch.uint8), nbytes, -(-nbytes // CHUNK_BYTES))


def weight_of(module: Optional[nn.Module]) -> Optional[torch.Tensor]:
    """The weight a linear layer's forward streams first: its own ``weight``, or its base layer's (a LoRA
    wrapper); None for anything else (a quantized layer's packed words included)."""
    while module is not None and not isinstance(getattr(module, "weight", None), torch.Tensor):
        module = getattr(module, "base_layer", None)
    w = None if module is None else module.weight
    return w if w is not None and w.dtype in (torch.float16, torch.bfloat16, torch.float32) else None


@dataclass(frozen=True)
class L2ExpertPrefetch:
    """The launch arguments of the top-k launch's prefetch: the first ``nbytes`` bytes of each chosen expert of
    ``data`` (all experts' weights as one flat uint8 view, ``expert_bytes`` apart), ``chunks`` programs each."""

    data: torch.Tensor
    expert_bytes: int
    nbytes: int
    chunks: int

    def kernel_args(self) -> dict[str, Any]:
        return dict(pf_ptr=self.data, pf_expert_bytes=self.expert_bytes, pf_bytes=self.nbytes,
                    PF_CHUNKS=self.chunks, PREFETCH=True, PF_CHUNK=CHUNK_BYTES, PF_PIECE=PIECE_BYTES,
                    PF_INTERP=triton_interpreting())


def plan_experts(weights: Optional[torch.Tensor], num_tokens: int, top_k: int) -> Optional[L2ExpertPrefetch]:
    """The prefetch of the chosen experts' ``weights`` [E, ...] (one contiguous block per expert, any dtype: bytes)
    by a launch of ``num_tokens`` tokens routed to ``top_k`` experts each, or None: each of the num_tokens x top_k pairs fetches the first
    ``EXPERT_BUDGET_BYTES / pairs`` bytes of its expert (a 16-byte multiple; none past ``EXPERT_MAX_PAIRS``)."""
    if not L2_PREFETCH or weights is None or weights.dim() < 2 or num_tokens <= 0:
        return None
    pairs = num_tokens * top_k
    if pairs > EXPERT_MAX_PAIRS or not weights.is_contiguous() or weights.data_ptr() % 16:
        return None
    if not _device_ok(weights.device):
        return None
    expert_bytes = weights[0].numel() * weights.element_size()
    nbytes = min(expert_bytes, EXPERT_BUDGET_BYTES // pairs) // 16 * 16
    if expert_bytes % 16 or nbytes == 0:
        return None
    return L2ExpertPrefetch(weights.reshape(-1).view(torch.uint8), expert_bytes, nbytes, -(-nbytes // CHUNK_BYTES))
