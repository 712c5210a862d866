"""An fp32, per-token, per-expert loop reference of a MoE layer with LoRA.

Written to be obviously right, independent of the package's kernels and
activation ops: the activations are spelled out here again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


def act_ref(name: str, h: torch.Tensor) -> torch.Tensor:
    """h: [W] float64 -> activation output (one pair)."""
    silu = lambda v: v / (1 + torch.exp(-v))  # noqa: E731
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    if name == "silu":
        n = h.numel() // 2
        return silu(h[:n]) * h[n:]
    if name == "gelu":
        n = h.numel() // 2
        return gelu(h[:n]) * h[n:]
    if name == "swigluoai":
        gate, up = h[0::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
        return (up + 1) * gate * torch.sigmoid(1.702 * gate)
    if name == "silu_no_mul":
        return silu(h)
    if name == "gelu_no_mul":
        return gelu(h)
    if name == "relu2_no_mul":
        return torch.relu(h) ** 2
    raise ValueError(name)


@dataclass
class RefAdapter:
    """One adapter, all experts (global ids), scaling folded into B.

    w13_a: list of [E, r, H] (two: gate, up; or one fused); w13_b: list of
    [E, rows, r] (rows I each, or the full w13 rows for one fused slice).
    w2_a: [E, r, I]; w2_b: [E, H, r].
    """

    w13_a: list
    w13_b: list
    w2_a: torch.Tensor
    w2_b: torch.Tensor

    def w13_delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        parts = [b[e].double() @ (a[e].double() @ x) for a, b in zip(self.w13_a, self.w13_b)]
        return torch.cat(parts)

    def w2_delta(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.w2_b[e].double() @ (self.w2_a[e].double() @ h)


def moe_reference(x, w13, w2, topk_weights, topk_ids, activation: str, *, b13=None, b2=None,
                  apply_router_weight_on_input: bool = False, adapters: Optional[dict] = None,
                  token_adapter: Optional[list] = None) -> torch.Tensor:
    """out[m] = sum_j w_mj * (W2[e] act(W13[e] x_m + b13 + d13) + b2 + d2)   (float64)

    adapters: {name: RefAdapter}; token_adapter: per token a name or None.
    With apply_router_weight_on_input the weight scales x_m instead of the output.
    """
    M, H = x.shape
    out = torch.zeros(M, H, dtype=torch.float64)
    for m in range(M):
        ad = adapters[token_adapter[m]] if (adapters and token_adapter and token_adapter[m] is not None) else None
        for j in range(topk_ids.shape[1]):
            e, w = int(topk_ids[m, j]), float(topk_weights[m, j])
            xin = x[m].double() * (w if apply_router_weight_on_input else 1.0)
            h = w13[e].double() @ xin
            if b13 is not None:
                h = h + b13[e].double()
            if ad is not None:
                h = h + ad.w13_delta(e, xin)
            a = act_ref(activation, h)
            y = w2[e].double() @ a
            if b2 is not None:
                y = y + b2[e].double()
            if ad is not None:
                y = y + ad.w2_delta(e, a)
            out[m] += y if apply_router_weight_on_input else w * y
    return out
