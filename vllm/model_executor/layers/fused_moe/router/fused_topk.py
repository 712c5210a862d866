"""Routing: router logits -> (topk_weights, topk_ids).

Three schemes used by the models we serve:
- softmax over all experts, top-k, optionally renormalised over the k
  (Mixtral, Qwen-MoE with ``norm_topk_prob``, OLMoE);
- top-k of the logits, then softmax over those k (gpt-oss) - the same weights
  as softmax + renormalise, but computed without the full softmax;
- sigmoid scores (DeepSeek-V3 style), optionally with a correction bias that
  influences which experts are picked but not their weights.
"""
from __future__ import annotations

from typing import Optional

import torch


def fused_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool, scoring_func: str = "softmax",
               topk_then_softmax: bool = False, router_bias: Optional[torch.Tensor] = None,
               correction_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token.

    router_logits: [M, E].  router_bias: [E], added to the logits first.
    correction_bias: [E], added to the scores for selection only.
    Returns topk_weights [M, top_k] float32 and topk_ids [M, top_k] int32.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts {E}")
    logits = router_logits.float()
    if router_bias is not None:
        logits = logits + router_bias.float()
    if topk_then_softmax:
        if scoring_func != "softmax" or correction_bias is not None:
            raise ValueError("topk_then_softmax applies to softmax scoring without a correction bias")
        vals, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals, dim=-1), ids.to(torch.int32)
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}; expected 'softmax' or 'sigmoid'")
    choose = scores if correction_bias is None else scores + correction_bias.float()
    ids = torch.topk(choose, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, ids.to(torch.int32)


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
