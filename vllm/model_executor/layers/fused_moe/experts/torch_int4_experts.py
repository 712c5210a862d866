"""Int4 (W4A16) experts in plain torch: the CPU backend of int4 layers (also runs on CUDA).

Each routed expert's weight is dequantised on the fly inside ``apply`` (one expert at a time,
never stored), then the pairs routed to it are multiplied as ``TorchExperts`` does.  LoRA at the
same two seams, on the unquantized activations.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig, Int4PackedWeight
from vllm.model_executor.layers.fused_moe.modular_kernel import Support


def int4_grouped_gemm_torch(out: torch.Tensor, a: torch.Tensor, w: Int4PackedWeight, local_ids: torch.Tensor, *,
                            top_k_in: int) -> None:
    """out[p] = a[p // top_k_in][perm_e] @ dequant(w[e_p]).T for every pair p with e_p >= 0; other rows 0."""
    flat = local_ids.reshape(-1)
    out.zero_()
    for e in torch.unique(flat).tolist():
        if e < 0:
            continue
        pairs = torch.nonzero(flat == e).squeeze(1)
        rows = a.index_select(0, pairs // top_k_in)
        if w.perm is not None:
            rows = rows.index_select(1, w.perm[e].long())
        out.index_copy_(0, pairs, (rows @ w.dequantize_expert(e, a.dtype).t()).to(out.dtype))


def check_int4_quant(cls: type, quant_config) -> Support:
    if isinstance(quant_config, Int4MoEQuantConfig) and quant_config.w13 is not None and quant_config.w2 is not None:
        return Support.yes()
    return Support.no(f"{cls.__name__} runs packed int4 expert weights (Int4MoEQuantConfig) only")


class Int4ExpertsBase(TwoGemmExperts):
    """What every packed-int4 experts class shares: the quant config it runs, the activations, GEMM1's width."""

    quant_config: Int4MoEQuantConfig

    @classmethod
    def supports_quant(cls, quant_config) -> Support:
        return check_int4_quant(cls, quant_config)

    @classmethod
    def supports_activation(cls, activation) -> Support:
        if activation.value == "swigluoai":
            return Support.no(f"{cls.__name__} does not run gpt-oss's interleaved swigluoai experts")
        return Support.yes()

    def _w13_rows(self, n_from_weight: int) -> int:
        # from the packed weight: w1 is [E, K/8, N] words, so w1.shape[1] is K/8
        return self.quant_config.w13.n


class TorchInt4Experts(Int4ExpertsBase):
    """GEMM1 -> [w13 LoRA] -> activation -> GEMM2 (router-weighted) -> [w2 LoRA] -> top-k sum
    (``TwoGemmExperts``), each expert's int4 weight dequantised on the fly."""

    triton_glue = False

    def _gemm(self, out, a, w, ids, route, *, stage, top_k_in, topk_weights, weighted) -> None:
        qc = self.quant_config
        int4_grouped_gemm_torch(out, a, qc.w13 if stage == 1 else qc.w2, ids, top_k_in=top_k_in)
        if weighted:
            out.mul_(topk_weights.reshape(-1, 1).to(out.dtype))
