"""MXFP4 expert checkpoints for tests: random tensors in the gpt-oss on-disk format, their
dequantised fp32 weights (through transformers' reference dequantiser, not the package's),
and FusedMoE layers built from them with ``quant_config=Mxfp4Config``."""
from __future__ import annotations

from typing import Optional

import torch

from tests.layers.moe_setup import MoEWeights
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config

PREFIX = "model.layers.0.mlp.experts"


def random_codes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """uint8 blocks whose first 256 bytes are every byte value: all 16 codes (incl. -0 and +-0.5) in both nibbles."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    n = min(256, b.numel())
    b.view(-1)[:n] = torch.randperm(256, generator=gen)[:n].to(torch.uint8)
    return b


def random_mxfp4_checkpoint(E: int, H: int, I: int, bias: bool, gen: torch.Generator, *, gated: bool = True,
                            scale_lo: int = 119, scale_hi: int = 123) -> dict[str, torch.Tensor]:
    """The ``mlp.experts.*`` tensors of one layer: suffix -> full tensor (all experts, full I)."""
    rows = 2 * I if gated else I
    ck = {"gate_up_proj_blocks": random_codes((E, rows, H // 32, 16), gen),
          "gate_up_proj_scales": torch.randint(scale_lo, scale_hi + 1, (E, rows, H // 32), dtype=torch.uint8,
                                               generator=gen),
          "down_proj_blocks": random_codes((E, H, I // 32, 16), gen),
          "down_proj_scales": torch.randint(scale_lo, scale_hi + 1, (E, H, I // 32), dtype=torch.uint8,
                                            generator=gen)}
    if bias:
        ck["gate_up_proj_bias"] = torch.randn(E, rows, generator=gen) * 0.1
        ck["down_proj_bias"] = torch.randn(E, H, generator=gen) * 0.1
    return ck


def dequantized_weights(ck: dict[str, torch.Tensor]) -> MoEWeights:
    """fp32 [E, out, in] weights of a checkpoint, by transformers' ``convert_moe_packed_tensors``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    def deq(name: str) -> torch.Tensor:
        w = convert_moe_packed_tensors(ck[f"{name}_blocks"], ck[f"{name}_scales"], dtype=torch.float32)
        return w.transpose(1, 2).contiguous()  # [E, in, out] -> [E, out, in]

    return MoEWeights(deq("gate_up_proj"), deq("down_proj"), ck.get("gate_up_proj_bias"), ck.get("down_proj_bias"))


def make_mxfp4_layer(ck: dict[str, torch.Tensor], top_k: int, dtype: torch.dtype, device, *,
                     backend: Optional[str], activation: str = "swigluoai", **kw) -> FusedMoE:
    E, rows, G, _ = ck["gate_up_proj_blocks"].shape
    H, I = G * 32, ck["down_proj_blocks"].shape[2] * 32
    kw.setdefault("topk_then_softmax", True)
    kw.setdefault("renormalize", False)
    layer = FusedMoE(E, top_k, H, I, params_dtype=dtype, device=device, activation=activation,
                     has_bias="gate_up_proj_bias" in ck, moe_backend=backend, quant_config=Mxfp4Config([]),
                     prefix=PREFIX, **kw)
    for suffix, t in ck.items():
        layer.quant_method.load_checkpoint_tensor(layer, suffix, t.to(device))
    layer.process_weights_after_loading()
    return layer
