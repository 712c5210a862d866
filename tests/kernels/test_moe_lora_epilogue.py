"""The grouped GEMM with the MoE LoRA delta in its epilogue against an fp64 per-pair loop.

The LoRA shrink runs on the *base* expert alignment (blocks mix adapter slots); the GEMM adds each
pair's delta before the bias and the router weight.  Covered: two slices whose boundary falls inside an
N tile, a rank below the kernel's 16-wide tile read through a rank-cut view, tokens without an adapter,
a disabled slot, a dropped pair (expert -1: its row stays poisoned), the last expert, the straight-line
and the branching shrink (few / many slots), fp32 / fp16 (bf16 on the GPU).
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import TileConfig
from vllm.lora.ops.triton_ops import moe_lora_epilogue as epi
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import invoke_fused_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def _reference(a, w, ids, bias, weights, a_slices, b_slices, mapping, enabled, top_k, top_k_in, weighted):
    """fp64 [pairs, N]: (a @ w_e^T + delta + bias_e) * w_p per routed pair; NaN rows for dropped pairs."""
    flat = ids.reshape(-1).tolist()
    N = w.shape[1]
    out = torch.full((len(flat), N), float("nan"), dtype=torch.float64)
    for p, e in enumerate(flat):
        if e < 0:
            continue
        x = a[p // top_k_in].double()
        y = w[e].double() @ x
        slot = int(mapping[p // top_k])
        if 0 <= slot < len(enabled) - 1 and int(enabled[slot]):
            parts = [B[slot, e].double() @ (A[slot, e].double() @ x) for A, B in zip(a_slices, b_slices)]
            y = y + torch.cat(parts)
        if bias is not None:
            y = y + bias[e].double()
        if weighted:
            y = y * float(weights.reshape(-1)[p])
        out[p] = y
    return out


def _stacked(S: int, L: int, E: int, rows: int, cols: int, cut: int, dim: int, dtype, device, scale: float):
    """S slices of one [S, L, E, rows, cols] buffer, cut along ``dim`` (2: rank of A, 3: rank of B) to ``cut``."""
    buf = (torch.randn(S, L, E, rows, cols, device=device) * scale).to(dtype)
    view = buf[:, :, :, :cut] if dim == 2 else buf[..., :cut]
    return tuple(view.unbind(0))


CASES = [
    # M, E, top_k, K, N_s, S, L, R, R_max, stage, block_m, block_n
    (9, 6, 2, 48, 40, 2, 3, 8, 16, 1, 16, 32),   # w13: slice boundary inside a tile, rank 8 on a 16 buffer
    (12, 5, 3, 40, 24, 1, 2, 16, 16, 2, 16, 16),  # w2: per-pair input, router-weighted, bias
    (10, 4, 2, 32, 32, 2, 10, 16, 32, 1, 16, 32),  # 10 slots: the branching shrink
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,E,top_k,K,N_s,S,L,R,R_max,stage,block_m,block_n", CASES)
def test_gemm_with_lora_epilogue_matches_loop(M, E, top_k, K, N_s, S, L, R, R_max, stage, block_m, block_n, dtype,
                                               device):
    if device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds bf16 by truncation: bf16 runs on the GPU")
    ids = make_topk_ids(M, E, top_k, empty_expert=False).to(device)
    ids[0, 0] = -1  # a dropped pair
    ids[-1, -1] = E - 1  # the last expert
    top_k_in = top_k if stage == 1 else 1
    pairs = M * top_k
    N = N_s * S
    a = torch.randn(M if stage == 1 else pairs, K, device=device).to(dtype)
    w = (torch.randn(E, N, K, device=device) / K ** 0.5).to(dtype)
    bias = torch.randn(E, N, device=device).to(dtype) if stage == 2 else None
    weights = torch.rand(M, top_k, device=device)
    a_slices = _stacked(S, L, E, R_max, K, R, 2, dtype, device, K ** -0.5)
    b_slices = _stacked(S, L, E, N_s, R_max, R, 3, dtype, device, 1.0)
    mapping = torch.randint(-1, L, (M,), device=device, dtype=torch.int32)
    mapping[:L] = torch.arange(L, device=device, dtype=torch.int32)[:M]  # every slot used
    enabled = torch.ones(L + 1, dtype=torch.int32, device=device)
    enabled[-1] = 0
    enabled[L - 1] = 0  # a slot whose adapter was removed: no delta
    al = moe_align_block_size(ids, block_m, E, use_triton=device.type == "cuda")
    cfg = TileConfig(block_size_m=block_m, block_size_n=block_n, block_size_k=16, num_stages=2)
    lora = epi.moe_lora_epilogue(a, a_slices, b_slices, sorted_token_ids=al.sorted_token_ids,
                                 block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                                 block_size=block_m, token_lora_mapping=mapping, adapter_enabled=enabled, top_k=top_k,
                                 top_k_in=top_k_in, block_size_k=16)
    out = poison_(torch.empty(pairs, N, device=device, dtype=dtype))
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in, topk_weights=weights,
                          mul_routed_weight=stage == 2, bias=bias, config=cfg, lora=lora)
    ref = _reference(a.cpu(), w.cpu(), ids.cpu(), None if bias is None else bias.cpu(), weights.cpu(),
                     [t.cpu() for t in a_slices], [t.cpu() for t in b_slices], mapping.cpu(), enabled.cpu(), top_k,
                     top_k_in, stage == 2)
    got = out.float().cpu()
    assert torch.isnan(got[0]).all(), "the dropped pair's row was written"
    routed = ids.reshape(-1).cpu() >= 0
    assert_close(got[routed], ref[routed].float(), dtype if device.type == "cpu" or dtype != torch.float32
                 else torch.float16)
    # the delta is really there: without it the result differs
    no_delta = _reference(a.cpu(), w.cpu(), ids.cpu(), None if bias is None else bias.cpu(), weights.cpu(),
                          [t.cpu() for t in a_slices], [t.cpu() for t in b_slices], torch.full_like(mapping.cpu(), -1),
                          enabled.cpu(), top_k, top_k_in, stage == 2)
    assert (ref[routed] - no_delta[routed]).abs().max() > 0.1


def test_epilogue_refuses_other_pairs_or_widths(device):
    E, L, K, N_s = 3, 2, 16, 16
    a = torch.randn(4, K, device=device)
    a_slices = _stacked(1, L, E, 16, K, 16, 2, torch.float32, device, 0.1)
    b_slices = _stacked(1, L, E, N_s, 16, 16, 3, torch.float32, device, 0.1)
    ids = torch.randint(0, E, (4, 2), device=device)
    al = moe_align_block_size(ids, 16, E, use_triton=device.type == "cuda")
    mapping = torch.zeros(4, dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 1, 0], dtype=torch.int32, device=device)
    lora = epi.moe_lora_epilogue(a, a_slices, b_slices, sorted_token_ids=al.sorted_token_ids,
                                 block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                                 block_size=16, token_lora_mapping=mapping, adapter_enabled=enabled, top_k=2,
                                 top_k_in=2)
    with pytest.raises(ValueError, match="columns"):
        lora.check(8, 2 * N_s)
    with pytest.raises(ValueError, match="pairs"):
        lora.check(6, N_s)
    with pytest.raises(ValueError, match="enabled"):
        epi.moe_lora_epilogue(a, a_slices, b_slices, sorted_token_ids=al.sorted_token_ids,
                              block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                              block_size=16, token_lora_mapping=mapping, adapter_enabled=enabled[:2], top_k=2,
                              top_k_in=2)


def test_static_report_epilogue_rows():
    """``moe_lora_static_report.py --epilogue`` (sm_90 compile, no GPU): the shrink of both GEMMs and the grouped
    GEMM with and without the epilogue compile without spills, the shrink's K loop is pipelined (cp.async),
    and the epilogue leaves the GEMM's main loop as it was (same instruction count, within 2)."""
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("benchmarks/kernels/moe_lora_static_report.py", "--tokens", "256", "--splits", "8",
                                  "--epilogue")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines() if ln.startswith("| 256 |")]
    for gemm in ("w13", "w2"):
        shrink = next(r for r in rows if r[1] == gemm and r[3] == "moe_lora_block_shrink_kernel")
        base = next(r for r in rows if r[1] == gemm and r[3] == "_fused_moe_gemm_kernel")
        lora = next(r for r in rows if r[1] == gemm and r[3] == "_fused_moe_gemm_kernel + LoRA")
        assert all(r[6] == "0" for r in (shrink, base, lora)), rows  # no spills
        assert "cp.async" in shrink[8], shrink
        main_loop = lambda r: int(r[8].split()[0])  # noqa: E731 - the first loop with MMAs: the K loop
        assert abs(main_loop(lora) - main_loop(base)) <= 2, (base, lora)
