"""Build FusedMoE layers (and LoRA-wrapped ones) with random weights for tests."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from tests.layers.moe_reference import RefAdapter
from vllm.config.lora import LoRAConfig
from vllm.model_executor.layers.fused_moe.layer import FusedMoE

GATED = ("silu", "gelu", "swigluoai")


@dataclass
class MoEWeights:
    """Full (unsharded, all experts) weights, float32, for the reference and loaders."""

    w13: torch.Tensor  # [E, rows, H]
    w2: torch.Tensor  # [E, H, I]
    b13: Optional[torch.Tensor] = None
    b2: Optional[torch.Tensor] = None


def random_weights(E: int, H: int, I: int, activation: str, bias: bool, gen: torch.Generator) -> MoEWeights:
    rows = 2 * I if activation in GATED else I
    w13 = torch.randn(E, rows, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    b13 = torch.randn(E, rows, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(E, H, generator=gen) * 0.1 if bias else None
    return MoEWeights(w13, w2, b13, b2)


def make_layer(weights: MoEWeights, top_k: int, activation: str, dtype: torch.dtype, device, *,
               backend: Optional[str], lora_enabled: bool = False, apply_router_weight_on_input: bool = False,
               ep_size: int = 1, ep_rank: int = 0, tp_size: int = 1, tp_rank: int = 0, **kw) -> FusedMoE:
    E, rows, H = weights.w13.shape
    I = weights.w2.shape[2]
    layer = FusedMoE(E, top_k, H, I, params_dtype=dtype, device=device, activation=activation,
                     has_bias=weights.b13 is not None, apply_router_weight_on_input=apply_router_weight_on_input,
                     ep_size=ep_size, ep_rank=ep_rank, tp_size=tp_size, tp_rank=tp_rank, moe_backend=backend,
                     lora_enabled=lora_enabled, **kw)
    layer.load_fused_experts(gate_up=weights.w13, down=weights.w2, gate_up_bias=weights.b13, down_bias=weights.b2)
    layer.process_weights_after_loading()
    return layer


def random_adapter(E: int, H: int, I: int, rank: int, activation: str, gen: torch.Generator, *,
                   fused: bool = False, scale: float = 0.5) -> RefAdapter:
    """Random non-zero adapter; ``fused`` gives one gate_up slice sharing A."""
    gated = activation in GATED
    if gated and not fused and activation != "swigluoai":
        w13_a = [torch.randn(E, rank, H, generator=gen) / H**0.5 for _ in range(2)]
        w13_b = [torch.randn(E, I, rank, generator=gen) * scale / rank**0.5 for _ in range(2)]
    else:
        rows = 2 * I if gated else I
        w13_a = [torch.randn(E, rank, H, generator=gen) / H**0.5]
        w13_b = [torch.randn(E, rows, rank, generator=gen) * scale / rank**0.5]
    w2_a = torch.randn(E, rank, I, generator=gen) / I**0.5
    w2_b = torch.randn(E, H, rank, generator=gen) * scale / rank**0.5
    return RefAdapter(w13_a, w13_b, w2_a, w2_b)


def load_adapter(lora_layer, slot: int, ad: RefAdapter) -> None:
    lora_layer.set_lora(slot, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)


def router_inputs(M: int, E: int, H: int, dtype, device, gen: torch.Generator, *, top_k: Optional[int] = None,
                  empty: bool = False):
    """Random hidden states and router logits.

    empty: one expert, drawn at random, never gets a token.  top_k: every other expert is
    among the top_k of some token (as far as M * top_k allows): a random permutation of them
    takes the largest logits of the tokens, top_k experts a token, so a layer that skips any
    one expert (the last one say) is seen.  Each token's logits stay a permutation of random
    values.
    """
    x = torch.randn(M, H, generator=gen).to(dtype=dtype, device=device)
    logits = torch.randn(M, E, generator=gen)
    empty_expert = int(torch.randint(E, (1,), generator=gen)) if empty else None
    if top_k is not None:
        others = [e for e in range(E) if e != empty_expert]
        must = [others[i] for i in torch.randperm(len(others), generator=gen).tolist()]
        for row, first in zip(torch.randperm(M, generator=gen).tolist(), range(0, len(must), top_k)):
            chunk = must[first:first + top_k]
            rest = [e for e in torch.randperm(E, generator=gen).tolist() if e not in chunk]
            logits[row, chunk + rest] = logits[row].sort(descending=True).values
    if empty_expert is not None:
        logits[:, empty_expert] = -1e4
    return x, logits.to(device)


def pick_slots(M: int, max_loras: int, mode: str, seed: int = 0) -> list[int]:
    """Per-token slots: 'mixed' (some -1), 'one' (all on slot 0), 'none' (all -1)."""
    rnd = random.Random(seed)
    if mode == "one":
        return [0] * M
    if mode == "none":
        return [-1] * M
    return [rnd.randrange(-1, max_loras) for _ in range(M)]


def lora_config(max_loras: int, rank: int, **kw) -> LoRAConfig:
    return LoRAConfig(max_loras=max_loras, max_lora_rank=rank, **kw)
