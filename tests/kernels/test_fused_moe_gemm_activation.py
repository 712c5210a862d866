"""GEMM1 with the gated activation in its epilogue (``invoke_fused_moe_gemm(fused_activation=...)``): against the
unfused GEMM1 + ``moe_activation`` (the same bits) and an fp32 reference; the layer takes it only without LoRA.

``out`` is poisoned first: every routed pair must be written, every dropped one (expert -1) left alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.utils import assert_close, poison_, tolerance
from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation, moe_activation_torch
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size, pairwise_alignment

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [MoEActivation.SILU, MoEActivation.GELU, MoEActivation.SWIGLUOAI]


def _cfg(bm: int, bn: int, bk: int, group: int = 1) -> TileConfig:
    return TileConfig(block_size_m=bm, block_size_n=bn, block_size_k=bk, group_size_m=group, num_warps=4,
                      num_stages=1)


def _problem(M: int, E: int, top_k: int, I: int, K: int, dtype: torch.dtype, device, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = make_topk_ids(M, E, top_k, empty_expert=False).to(device)
    ids[0, 0] = E - 1  # the last expert is routed
    a = (torch.randn(M, K, generator=gen) * 2).to(device=device, dtype=dtype)  # gates well past silu's knee
    w = (torch.randn(E, 2 * I, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(device=device, dtype=dtype) if bias else None
    return ids, a, w, b


def _run(a, w, b, ids, config: TileConfig, *, act, pairwise: bool) -> torch.Tensor:
    top_k, E = ids.shape[1], w.shape[0]
    al = pairwise_alignment(ids, config.block_size_m) if pairwise else moe_align_block_size(ids, config.block_size_m, E)
    cols = w.shape[1] // 2 if act is not None else w.shape[1]
    out = poison_(torch.empty(ids.numel(), cols, dtype=a.dtype, device=a.device))
    gemm.invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                               num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k, bias=b,
                               config=config, pairwise=pairwise, fused_activation=act)
    return out


@pytest.mark.parametrize("act", ACTS, ids=[a.value for a in ACTS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,E,top_k,I,K,cfg,pairwise", [
    (5, 4, 2, 24, 48, _cfg(16, 32, 32), False),  # I = 24: an N tail in BLOCK_N 16; K tail
    (3, 8, 2, 32, 64, _cfg(16, 64, 32), True),  # decode-style pairwise blocks, 2 K steps
    (9, 3, 3, 40, 32, _cfg(32, 32, 16, group=2), False),  # BLOCK_M 32, grouped pids, 2 N tiles + tail
])
def test_matches_gemm_then_activation(act, dtype, M, E, top_k, I, K, cfg, pairwise, device):
    ids, a, w, b = _problem(M, E, top_k, I, K, dtype, device, bias=act == MoEActivation.SWIGLUOAI, seed=M * 7 + I)
    fused = _run(a, w, b, ids, cfg, act=act, pairwise=pairwise)
    gemm1 = _run(a, w, b, ids, cfg, act=None, pairwise=pairwise)
    routed = (ids.reshape(-1) >= 0).to(device)
    assert torch.isnan(fused[~routed]).all(), "a dropped pair was written"
    unfused = moe_activation(act, gemm1[routed])
    if device.type == "cuda":
        assert torch.equal(fused[routed], unfused)
    else:  # the interpreter's dots (numpy) may sum a [16, 32] and a [16, 16] tile in different orders
        assert_close(fused[routed], unfused, dtype=dtype)
    # independent fp32 reference: the dequantised math written out here
    x = a.float()[torch.arange(ids.numel(), device=device) // top_k][routed]
    e = ids.reshape(-1)[routed].long()
    ref = torch.einsum("pk,pnk->pn", x, w.float()[e]) + (b.float()[e] if b is not None else 0)
    ref = moe_activation_torch(act, ref.to(dtype).float()).float()
    # two roundings (GEMM1's output, then the activation's): twice the one-rounding bounds
    max_b, rms_b = tolerance(dtype)
    assert_close(fused[routed].float(), ref, bounds=(2 * max_b, 2 * rms_b))


def test_refuses_what_the_epilogue_cannot_do(device):
    ids, a, w, b = _problem(2, 4, 2, 16, 32, torch.float32, device, bias=False, seed=1)
    cfg = _cfg(16, 32, 32)
    with pytest.raises(ValueError, match="gated activation"):
        _run(a, w, b, ids, cfg, act=MoEActivation.SILU_NO_MUL, pairwise=False)
    with pytest.raises(ValueError, match="GEMV=0"):
        _run(a, w, b, ids, dataclasses.replace(cfg, gemv=1), act=MoEActivation.SILU, pairwise=True)
    al = moe_align_block_size(ids, 16, 4)
    with pytest.raises(ValueError, match="mul_routed_weight"):
        gemm.invoke_fused_moe_gemm(a, w, torch.empty(4, 16, device=device), sorted_token_ids=al.sorted_token_ids,
                                   block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                                   top_k_in=2, topk_weights=torch.ones(2, 2, device=device), mul_routed_weight=True,
                                   config=cfg, fused_activation=MoEActivation.SILU)
    with pytest.raises(ValueError, match=r"out must be \[4, 16\]"):  # the activated width, N // 2
        gemm.invoke_fused_moe_gemm(a, w, torch.empty(4, 32, device=device), sorted_token_ids=al.sorted_token_ids,
                                   block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                                   top_k_in=2, config=cfg, fused_activation=MoEActivation.SILU)
