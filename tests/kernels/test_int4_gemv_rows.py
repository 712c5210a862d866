"""The int4 multi-row GEMV of SORTED routing (``GEMV=1`` with ``moe_align_block_size``'s outputs,
``_int4_gemv_rows_kernel.py``) against an fp64 reference built from Int4Weight.dequantize (independent of the
packing) and against the tl.dot kernel."""
import dataclasses

import pytest
import torch

from tests.kernels.test_int4_gemv import _case, _reference
from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from tests.utils import assert_close
from vllm.kernel_configs.tile_config import Int4TileConfig
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, invoke_int4_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def _ids(rows, top_k, E, seed, device):
    """Routing with experts of 0, 1 and several pairs, the last expert used, -1 pairs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E, (rows, top_k), generator=gen).to(torch.int32)
    flat = ids.view(-1)
    flat[:3] = 0  # expert 0: several pairs (blocks of BLOCK_SIZE_M 1-2 are full, larger ones padded)
    flat[3] = E - 1  # the last expert
    flat[-1] = -1  # a pair with no local expert
    flat[flat == 1] = 2  # expert 1: no pair
    return ids.to(device)


def _run_sorted(a, pw, ids, tw, top_k, cfg, weighted, dtype):
    N = pw.n
    al = moe_align_block_size(ids, cfg.block_size_m, pw.num_experts)
    out = torch.full((ids.numel(), N), float("nan"), dtype=dtype, device=a.device)  # poisoned
    buf = torch.full((cfg.split_k * out.numel(),), float("nan"), device=a.device)  # poisoned too
    invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, topk_weights=tw if weighted else None,
                         mul_routed_weight=weighted, config=cfg, split_buffer=buf,
                         sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                         num_tokens_post_padded=al.num_tokens_post_padded)
    return out


# (rows, top_k, E, N, K, group, has_zeros, act_order, general g_idx, split_k, block_m, block_k)
CASES = [
    (4, 2, 4, 48, 64, 32, False, False, False, 1, 1, 32),  # symmetric, one row per block
    (4, 2, 4, 64, 128, 16, True, False, False, 1, 2, 64),  # 4 groups per K-tile (a scale row per word row)
    (5, 2, 3, 40, 96, 32, True, False, False, 2, 4, 64),  # uneven K tail, an N tail, split-K, sentinels
    (3, 2, 4, 40, 128, 32, True, True, False, 1, 2, 32),  # act-order: perm
    (3, 2, 4, 40, 64, 16, False, True, True, 2, 8, 16),  # act-order with uneven groups: g_idx (per weight)
    (6, 2, 3, 32, 256, 128, True, False, False, 2, 16, 128),  # group 128, zeros up to 16, a mostly padded block
]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,top_k,E,N,K,group,has_zeros,act_order,general,split,bm,bk", CASES)
def test_gemv_rows_matches_dequantized_reference(rows, top_k, E, N, K, group, has_zeros, act_order, general, split,
                                                 bm, bk, dtype, weighted, device):
    ws, pw, a, _, tw = _case(rows, top_k, E, N, K, group, has_zeros, act_order, general, rows * 7 + K, device,
                             dtype)
    ids = _ids(rows, top_k, E, rows + K, device)
    cfg = Int4TileConfig(bm, 16, bk, split_k=split, num_stages=1, gemv=1)
    out = _run_sorted(a, pw, ids, tw, top_k, cfg, weighted, dtype).cpu()
    ref, routed = _reference(ws, a, ids, tw, top_k, weighted)
    assert_close(out[routed].float(), ref[routed], dtype)
    if split > 1:  # every row written: pairs with no local expert are zeros
        assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    else:  # pairs with no local expert are left untouched
        assert torch.isnan(out[~routed]).all()
    # the tl.dot kernel (its own alignment of 16 rows) agrees; not in bf16 on the CPU interpreter, where the
    # dot kernel's output is garbage
    if dtype == torch.bfloat16 and a.device.type == "cpu":
        return
    dot_cfg = dataclasses.replace(cfg, gemv=0, block_size_m=16, block_size_n=16, block_size_k=max(bk, 16))
    dot = _run_sorted(a, pw, ids, tw, top_k, dot_cfg, weighted, dtype).cpu()
    assert_close(out[routed].float(), dot[routed].double(), dtype)


def test_gemv_rows_exact_in_fp32():
    """Integer activations and power-of-two scales: every product and sum is exact in fp32, so the GEMV must
    equal the reference exactly (a wrong nibble, zero point, row or sentinel cannot hide in a tolerance)."""
    rows, top_k, E, N, K, group = 5, 2, 3, 32, 128, 32
    gen = torch.Generator().manual_seed(11)
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    for w in ws:
        w.scales = (2.0 ** torch.randint(-3, 3, tuple(w.scales.shape), generator=gen)).half()
    pw = _packed(ws, group, True, False, "cpu")
    a = torch.randint(-8, 9, (rows, K), generator=gen).float()
    ids = torch.tensor([[0, 2], [0, 2], [2, 0], [0, 1], [2, -1]], dtype=torch.int32)
    for bm in (1, 2, 4):
        out = _run_sorted(a, pw, ids, None, top_k, Int4TileConfig(bm, 32, 64, num_stages=1, gemv=1), False,
                          torch.float32)
        ref, routed = _reference(ws, a, ids, None, top_k, False)
        assert torch.equal(out[routed].double(), ref[routed]), bm
        assert torch.isnan(out[~routed]).all()


def test_gemv_rows_config_and_checks(monkeypatch):
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    # 16 tokens of Qwen3-30B-A3B (128 pairs over ~81 of 128 experts: 1.6 rows each) take the GEMV at 2 rows per
    # block, both GEMMs; 32 tokens (2.3 rows) too; Mixtral-8x7B (32 pairs on 8 experts: 4 rows) keeps tl.dot
    for pairs, E, N, K, bm in ((128, 128, 1536, 2048, 2), (128, 128, 2048, 768, 2), (256, 128, 1536, 2048, 2),
                               (64, 128, 1536, 2048, 1), (12, 8, 4096, 14336, 2)):
        cfg = mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, sorted_pairs=True)
        assert cfg.gemv == 1 and cfg.block_size_m == bm, (pairs, E, cfg)
        assert cfg.block_size_m * cfg.block_size_k <= mod.GEMV_BLOCK_K  # the accumulators' register budget
        mod.check_int4_tile_config(cfg)
        assert mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, gemv=False).gemv == 0
    for pairs, E in ((32, 8), (8 * 64, 128)):  # 4 rows per expert: the dot kernel
        assert mod.get_int4_moe_config(pairs, E, 4096, 14336, 128, torch.bfloat16).gemv == 0
        forced = mod.get_int4_moe_config(pairs, E, 4096, 14336, 128, torch.bfloat16, gemv=True)
        assert forced.gemv == 1 and forced.block_size_m == 4  # the sweep / static report can still compare it
    monkeypatch.setattr(mod, "GEMV_SORTED_MAX_ROWS", 0.0)
    assert mod.get_int4_moe_config(128, 128, 1536, 2048, 128, torch.bfloat16).gemv == 0
    monkeypatch.undo()  # the interpreter keeps the dot kernel on sorted launches
    assert mod.get_int4_moe_config(128, 128, 1536, 2048, 128, torch.bfloat16).gemv == 0
    with pytest.raises(ValueError, match="BLOCK_SIZE_M=32: the GEMV's rows"):
        mod.check_int4_tile_config(Int4TileConfig(32, 16, 16, gemv=1))
    with pytest.raises(ValueError, match="BLOCK_SIZE_M=3"):
        mod.check_int4_tile_config(Int4TileConfig(3, 16, 16, gemv=1))
    with pytest.raises(ValueError, match="smaller BLOCK_SIZE_M needs GEMV=1"):
        mod.check_int4_tile_config(Int4TileConfig(4, 16, 16, gemv=0))
