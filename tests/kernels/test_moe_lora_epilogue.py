"""The grouped expert GEMM with a MoE LoRA expand in its epilogue, against an fp32 loop.

``invoke_fused_moe_gemm(lora=MoELoRAEpilogue(...))``: each routed pair's row gets its base GEMM row plus, on the
columns of each LoRA slice, ``shrunk[slice, pair] @ B[slice][slot, expert]^T`` (slot: the pair's token's), before
the bias, the router weight and the one rounding.  Poisoned on purpose: ``out`` (every routed pair must be
written), the shrink rows of pairs on no slot and the B of a disabled slot (NaN: read, they would poison the
output).  Tokens on no slot (-1), a disabled slot, an expert without pairs, the last expert.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.utils import assert_close, poison_, run_without_interpreter
from vllm.lora.ops.triton_ops.moe_lora_epilogue import MoELoRAEpilogue
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation_torch
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (fused_moe_gemm_reference, get_fused_moe_config,
                                                                      invoke_fused_moe_gemm)
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size

L = 3  # slots; slot 1 is disabled


def _lora(M, top_k, E, S, n_s, R, col0, slice_cols, dtype, device, gen):
    """A random epilogue: every token on slot 0, 2, -1 or the disabled 1 in turn."""
    pairs = M * top_k
    mapping = torch.tensor([(0, 2, -1, 1)[t % 4] for t in range(M)], dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=device)
    stacked = (torch.randn(S, L, E, n_s, R, generator=gen) * 0.5).to(dtype).to(device)
    stacked[:, 1] = float("nan")  # the disabled slot: never read
    shrunk = torch.randn(S, pairs, R, generator=gen).to(device)
    token_slot = mapping.repeat_interleave(top_k)
    shrunk[:, (token_slot < 0) | (token_slot == 1)] = float("nan")  # pairs on no slot: never read
    return MoELoRAEpilogue(shrunk=shrunk, lora_b=tuple(stacked.unbind(0)), col0=col0, slice_cols=slice_cols,
                           token_lora_mapping=mapping, adapter_enabled=enabled, top_k=top_k)


def _split_into_parts(epi: MoELoRAEpilogue, parts: int, gen) -> MoELoRAEpilogue:
    """The same epilogue with its shrink as ``parts`` random partials [P, S, pairs, R] that sum to it."""
    noise = torch.randn(parts - 1, *epi.shrunk.shape, generator=gen).to(epi.shrunk.device)
    last = epi.shrunk - noise.sum(0)
    return dataclasses.replace(epi, shrunk=torch.cat([noise, last[None]]))


def _delta(epi: MoELoRAEpilogue, ids: torch.Tensor, N: int) -> torch.Tensor:
    """fp32 [pairs, N]: each pair's LoRA delta, a loop over the pairs."""
    flat = ids.reshape(-1).tolist()
    out = torch.zeros(len(flat), N)
    n_s = epi.lora_b[0].shape[2]
    for p, e in enumerate(flat):
        slot = int(epi.token_lora_mapping[p // epi.top_k])
        if e < 0 or slot < 0 or not int(epi.adapter_enabled[slot]):
            continue
        for s, b in enumerate(epi.lora_b):
            c = epi.col0 + s * epi.slice_cols
            out[p, c:c + n_s] += b[slot, e].float().cpu() @ epi.shrunk[s, p].cpu()
    return out


# (M, E, top_k, N, K, slices, n_s, col0, slice_cols, gemm2, bias, shrink partials)
CASES = [
    (9, 4, 2, 64, 48, 2, 32, 0, 32, False, False, 1),    # w13: gate and up slices
    (9, 4, 2, 64, 48, 1, 64, 0, 64, False, True, 1),     # w13: one fused gate_up slice
    (17, 4, 2, 48, 64, 1, 48, 0, 48, True, True, 1),     # w2: router-weighted
    (17, 8, 2, 80, 48, 1, 32, 40, 32, True, False, 1),   # a slice inside the columns (fully sharded w2's offset)
    (9, 4, 2, 64, 48, 2, 32, 0, 32, False, True, 3),     # a shrink split along K: partials summed in the epilogue
]


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "M{}-E{}-k{}-N{}-K{}-S{}-ns{}-c{}-{}-w2{:d}-b{:d}-p{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue_matches_reference(case, dtype, device):
    M, E, top_k, N, K, S, n_s, col0, slice_cols, gemm2, use_bias, parts = case
    gen = torch.Generator().manual_seed(M * 31 + N)
    ids = make_topk_ids(M, E, top_k, empty_expert=True).to(device)
    ids[-1, 0] = E - 1  # the last expert gets a pair
    pairs = M * top_k
    top_k_in = 1 if gemm2 else top_k
    a = torch.randn(pairs if gemm2 else M, K, generator=gen).to(dtype).to(device)
    w = (torch.randn(E, N, K, generator=gen) / K**0.5).to(dtype).to(device)
    bias = torch.randn(E, N, generator=gen).to(dtype).to(device) if use_bias else None
    tw = (torch.rand(M, top_k, generator=gen) * 0.9 + 0.1).to(device)
    epi = _lora(M, top_k, E, S, n_s, 16, col0, slice_cols, dtype, device, gen)
    cfg = get_fused_moe_config(pairs, E, N, K, top_k, dtype)
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    out = poison_(torch.empty(pairs, N, dtype=dtype, device=device))
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in, topk_weights=tw,
                          mul_routed_weight=gemm2, bias=bias, config=cfg,
                          lora=epi if parts == 1 else _split_into_parts(epi, parts, gen))
    base = fused_moe_gemm_reference(a, w, ids, top_k_in=top_k_in, bias=bias).cpu()
    ref = base + _delta(epi, ids, N)
    if gemm2:
        ref = ref * tw.reshape(-1, 1).float().cpu()
    routed = (ids.reshape(-1) >= 0).cpu()
    assert not out[routed].isnan().any(), "a routed pair was not written, or a poisoned value was read"
    assert out[~routed].isnan().all(), "rows of dropped pairs must not be written"
    assert_close(out.float().cpu()[routed], ref[routed], dtype=dtype)


@pytest.mark.parametrize("act", [MoEActivation.SILU, MoEActivation.SWIGLUOAI], ids=lambda a: a.value)
def test_epilogue_with_fused_activation(act, device):
    """GEMM1 with the activation in its epilogue and the LoRA delta on both the gate and the up columns."""
    M, E, top_k, I, K = 9, 4, 2, 32, 48
    N = 2 * I
    gen = torch.Generator().manual_seed(7)
    ids = make_topk_ids(M, E, top_k, empty_expert=True).to(device)
    ids[-1, 0] = E - 1
    pairs = M * top_k
    a = torch.randn(M, K, generator=gen).to(device)
    w = (torch.randn(E, N, K, generator=gen) / K**0.5).to(device)
    epi = _lora(M, top_k, E, 2, I, 16, 0, I, torch.float32, device, gen)
    cfg = get_fused_moe_config(pairs, E, N, K, top_k, torch.float32)
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    out = poison_(torch.empty(pairs, I, device=device))
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k, config=cfg, lora=epi,
                          fused_activation=act)
    y = fused_moe_gemm_reference(a, w, ids, top_k_in=top_k).cpu() + _delta(epi, ids, N)
    ref = moe_activation_torch(act, y)
    routed = (ids.reshape(-1) >= 0).cpu()
    assert not out[routed].isnan().any()
    assert_close(out.cpu()[routed], ref[routed], dtype=torch.float32)


def test_epilogue_refuses_what_it_cannot_do(device):
    M, E, top_k, N, K = 4, 4, 2, 32, 32
    gen = torch.Generator().manual_seed(1)
    ids = make_topk_ids(M, E, top_k).to(device)
    a, w = torch.randn(M, K).to(device), torch.randn(E, N, K).to(device)
    cfg = get_fused_moe_config(M * top_k, E, N, K, top_k, torch.float32)
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    kw = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
              num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k, config=cfg)
    out = torch.empty(M * top_k, N, device=device)
    wide = _lora(M, top_k, E, 2, 32, 16, 0, 32, torch.float32, device, gen)  # 2 x 32 columns > N = 32
    with pytest.raises(ValueError, match="overrun"):
        invoke_fused_moe_gemm(a, w, out, lora=wide, **kw)
    half = _lora(M, top_k, E, 1, 32, 16, 0, 32, torch.bfloat16, device, gen)
    with pytest.raises(ValueError, match="dtype"):
        invoke_fused_moe_gemm(a, w, out, lora=half, **kw)


def test_epilogue_compiles_for_hopper():
    """The interpreter never compiles: the GEMM with the epilogue for sm_90 at the heuristic's tiles from decode to
    prefill, in a subprocess (no GPU needed): no spills, shared memory in budget."""
    assert run_without_interpreter("tests/kernels/moe_lora_epilogue_hopper_compile.py").count("ok ") == 16
