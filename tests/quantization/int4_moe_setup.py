"""Random int4 experts and int4 FusedMoE layers for the int4 MoE tests.

``FakeInt4Config`` stands in for a checkpoint's QuantizationConfig (the real GPTQ / AWQ /
compressed-tensors configs hand the same ``Int4MoEMethod`` the same ``Int4Weight``s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from tests.layers.moe_setup import GATED, MoEWeights
from vllm.model_executor.layers.fused_moe.int4_fused_moe_method import Int4MoEMethod
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.int4 import Int4Weight

# scheme -> (has_zeros, act_order)
SCHEMES = {"sym": (False, False), "asym": (True, False), "act_order": (True, True), "act_order_sym": (False, True)}


class FakeInt4Config(QuantizationConfig):
    name = "fake_int4"

    def __init__(self, group_size: int, has_zeros: bool, act_order: bool) -> None:
        self.group_size, self.has_zeros, self.act_order = group_size, has_zeros, act_order

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FakeInt4Config":
        return cls(config["group_size"], config["has_zeros"], config["act_order"])

    def get_moe_method(self, moe_config, prefix):
        return Int4MoEMethod(moe_config, self.group_size, self.has_zeros, self.act_order)

    def is_quantized(self, prefix: str) -> bool:
        return True


def random_int4(out: int, inp: int, group_size: int, has_zeros: bool, act_order: bool,
                gen: torch.Generator) -> Int4Weight:
    """Random codes, fp16 scales, zeros 0..16 (16 included) or symmetric, a permuted g_idx for act-order."""
    G = inp // group_size
    q = torch.randint(0, 16, (out, inp), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(out, G, generator=gen) + 0.5) / (4 * inp**0.5)
    zeros = None
    if has_zeros:
        zeros = torch.randint(0, 17, (out, G), generator=gen, dtype=torch.uint8)
        zeros[0, 0] = 16  # GPTQ v1's largest stored zero
    g_idx = None
    if act_order:
        g_idx = (torch.arange(inp) // group_size)[torch.randperm(inp, generator=gen)].to(torch.int32)
    return Int4Weight(q=q, scales=scales.half(), zeros=zeros, group_size=group_size, g_idx=g_idx)


@dataclass
class Int4Experts:
    """All experts' int4 projections (global ids) and their fp32 dequantised weights."""

    w1: list
    w3: Optional[list]
    w2: list
    float_weights: MoEWeights


def random_int4_experts(E: int, H: int, I: int, activation: str, group_size: int, scheme: str,
                        gen: torch.Generator, *, act_order_w13: Optional[bool] = None) -> Int4Experts:
    """``group_size`` -1: one group per row (per-channel scales), as the configs pass it."""
    has_zeros, act_order = SCHEMES[scheme]
    gated = activation in GATED
    gs13, gs2 = (H, I) if group_size == -1 else (group_size, group_size)
    w1, w3, w2 = [], [] if gated else None, []
    for _ in range(E):
        g = random_int4(I, H, gs13, has_zeros, act_order, gen)
        w1.append(g)
        if gated:  # gate and up share one activation order
            u = random_int4(I, H, gs13, has_zeros, False, gen)
            w3.append(Int4Weight(u.q, u.scales, u.zeros, gs13, g.g_idx))
        w2.append(random_int4(H, I, gs2, has_zeros, act_order, gen))
    deq = lambda w: w.dequantize(torch.float32)  # noqa: E731
    w13 = torch.stack([torch.cat([deq(a), deq(b)]) if gated else deq(a)
                       for a, b in zip(w1, w3 if gated else w1)])
    return Int4Experts(w1, w3, w2, MoEWeights(w13, torch.stack([deq(w) for w in w2])))


def make_int4_layer(experts: Int4Experts, top_k: int, activation: str, group_size: int, scheme: str,
                    dtype: torch.dtype, device, *, backend: Optional[str], process: bool = True, **kw) -> FusedMoE:
    E = len(experts.w1)
    I, H = experts.w1[0].shape
    has_zeros, act_order = SCHEMES[scheme]
    layer = FusedMoE(E, top_k, H, I, params_dtype=dtype, device=device, activation=activation, moe_backend=backend,
                     quant_config=FakeInt4Config(group_size, has_zeros, act_order), **kw)
    method = layer.quant_method
    for e in range(E):
        method.load_int4(layer, "w1", e, _to(experts.w1[e], device))
        if experts.w3 is not None:
            method.load_int4(layer, "w3", e, _to(experts.w3[e], device))
        method.load_int4(layer, "w2", e, _to(experts.w2[e], device))
    if process:
        layer.process_weights_after_loading()
    return layer


def _to(w: Int4Weight, device) -> Int4Weight:
    mv = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return Int4Weight(mv(w.q), mv(w.scales), mv(w.zeros), w.group_size, mv(w.g_idx))


def poison_workspaces(layer: FusedMoE) -> None:
    """Fill the layer kernel's scratch buffers with NaN: a forward that reads an element it did not
    write shows it."""
    for buf in layer.quant_method.kernel._workspaces.values():
        buf.fill_(float("nan"))
