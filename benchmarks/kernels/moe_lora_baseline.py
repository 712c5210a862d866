"""The baseline of issue 11 for ``benchmark_moe_lora.py``: the same MoE layer with its LoRA as separate
shrink and expand launches after each base GEMM, instead of our fused shrink+expand launch.

What differs from the layer's own LoRA path, and nothing else:

    ours:      after GEMM1 / GEMM2: fused_moe_lora        (one launch: shrink kept in registers, expand)
    baseline:  after GEMM1 / GEMM2: moe_lora_shrink       -> fp32 [S, pairs, R] buffer in memory
                                    moe_lora_expand       (a second launch reads it back)

Both use the same (adapter, expert) alignment, or the same small-batch per-pair routing, and the
same base GEMMs, activation and top-k sum; the shrink and the expand each take their own heuristic
tiles (ops ``moe_lora_shrink`` / ``moe_lora_expand``), not the fused op's.  This is the scheme of
upstream vLLM's original MoE LoRA ops (a shrink launch, then an expand launch), built here from our
public ops so that the comparison runs on any GPU with nothing else installed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU


class SeparateShrinkExpandPunica(PunicaWrapperGPU):
    """``PunicaWrapperGPU`` whose MoE LoRA runs as a shrink launch, then an expand launch, after each base
    GEMM."""

    def _fused(self, out: torch.Tensor, x: torch.Tensor, lora_a: Any, lora_b: Any, *, topk_weights: torch.Tensor,
               top_k_in: int, mul_routed_weight: bool, config: Any = None, overwrite: bool = False,
               **kw: Any) -> None:
        del config  # the fused op's tiles; the two ops below take their own heuristics
        if overwrite:  # a delta buffer of its own (experts/lora_overlap.py): the expand adds into it
            out.zero_()
        shrunk = self._shrink(x, lora_a, top_k_in=top_k_in, **kw)  # fp32 [S, pairs, R]
        self._expand(out, shrunk, lora_b, topk_weights=topk_weights, mul_routed_weight=mul_routed_weight, **kw)


def baseline_context(layer: Any, punica: PunicaWrapperGPU) -> tuple[Any, SeparateShrinkExpandPunica]:
    """(the layer's LoRA context with the baseline's Punica wrapper, that wrapper).

    The wrapper holds its own copy of the step mapping: call ``update_metadata`` on it as on ``punica``.
    """
    base = SeparateShrinkExpandPunica(punica.max_num_batched_tokens, punica.max_loras, punica.device)
    return dataclasses.replace(layer._lora_context, punica_wrapper=base), base
