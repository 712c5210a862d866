"""Routing: router logits -> (topk_weights, topk_ids).

Three schemes used by the models we serve:
- softmax over all experts, top-k, optionally renormalised over the k
  (Mixtral, Qwen-MoE with ``norm_topk_prob``, OLMoE);
- top-k of the logits, then softmax over those k (gpt-oss) - the same weights
  as softmax + renormalise, but computed without the full softmax;
- sigmoid scores (DeepSeek-V3 style), optionally with a correction bias that
  influences which experts are picked but not their weights.

Softmax routing (either order, renormalised or not, with or without a router
bias) is one Triton launch on CUDA (``_topk_softmax_kernel``) instead of the ~9
kernels of the torch ops (cast, softmax, topk's sorts, gather, sum, clamp,
divide, cast); sigmoid scoring and correction biases take the torch path.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2

# The kernel keeps one token's scores in registers and picks the k experts one by one.
_TRITON_MAX_EXPERTS = 4096
_TRITON_MAX_TOP_K = 32


def fused_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool, scoring_func: str = "softmax",
               topk_then_softmax: bool = False, router_bias: Optional[torch.Tensor] = None,
               correction_bias: Optional[torch.Tensor] = None,
               use_triton: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token.

    router_logits: [M, E].  router_bias: [E], added to the logits first.
    correction_bias: [E], added to the scores for selection only.
    use_triton: None = the fused kernel on CUDA where it applies (softmax scoring, no correction
    bias), torch otherwise; True on CPU runs it in the interpreter (TRITON_INTERPRET=1).
    Returns topk_weights [M, top_k] float32 and topk_ids [M, top_k] int32.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts {E}")
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring_func {scoring_func!r}; expected 'softmax' or 'sigmoid'")
    if topk_then_softmax and (scoring_func != "softmax" or correction_bias is not None):
        raise ValueError("topk_then_softmax applies to softmax scoring without a correction bias")
    if use_triton is None:
        use_triton = router_logits.is_cuda
    if use_triton and not router_logits.is_cuda and not triton_interpreting():
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")
    if (use_triton and scoring_func == "softmax" and correction_bias is None and E <= _TRITON_MAX_EXPERTS
            and top_k <= _TRITON_MAX_TOP_K):
        return _fused_topk_triton(router_logits, top_k, renormalize, topk_then_softmax, router_bias)
    logits = router_logits.float()
    if router_bias is not None:
        logits = logits + router_bias.float()
    if topk_then_softmax:
        vals, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals, dim=-1), ids.to(torch.int32)
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    choose = scores if correction_bias is None else scores + correction_bias.float()
    ids = torch.topk(choose, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, ids.to(torch.int32)


def _fused_topk_triton(logits: torch.Tensor, top_k: int, renormalize: bool, topk_then_softmax: bool,
                       router_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from vllm.model_executor.layers.fused_moe.router._topk_softmax_kernel import _topk_softmax_kernel

    M, E = logits.shape
    weights = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    if M == 0:
        return weights, ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if router_bias is not None:
        if router_bias.shape != (E,):
            raise ValueError(f"router_bias must be [{E}], got {tuple(router_bias.shape)}")
        router_bias = router_bias.contiguous()
    block_e = max(16, next_power_of_2(E))
    _topk_softmax_kernel[(M,)](
        logits, router_bias if router_bias is not None else logits, weights, ids,
        E, logits.stride(0), weights.stride(0), ids.stride(0),
        TOP_K=top_k, K_P=next_power_of_2(top_k), BLOCK_E=block_e, HAS_BIAS=router_bias is not None,
        RENORMALIZE=renormalize, TOPK_THEN_SOFTMAX=topk_then_softmax,
        num_warps=1 if block_e <= 256 else 4, **pdl_launch_kwargs(logits.device),
    )
    return weights, ids


def fused_topk_reference(router_logits: torch.Tensor, top_k: int, *, renormalize: bool,
                         topk_then_softmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop in float64: obviously right."""
    ws, ids = [], []
    for row in router_logits.double():
        order = sorted(range(row.numel()), key=lambda e: -float(row[e]))[:top_k]
        if topk_then_softmax:
            w = torch.softmax(row[order], dim=0)
        else:
            p = torch.softmax(row, dim=0)[order]
            w = p / p.sum() if renormalize else p
        ws.append(w)
        ids.append(torch.tensor(order))
    if not ws:
        return torch.zeros(0, top_k, dtype=torch.float64), torch.zeros(0, top_k, dtype=torch.int32)
    return torch.stack(ws), torch.stack(ids).to(torch.int32)
