"""MXFP4 grouped GEMM with split-K (config ``SPLIT_K`` > 1): fp32 shares of the K loop added by a
second launch with the bias and the router weight, against the dequantised fp64 reference."""
import dataclasses

import pytest
import torch

from tests.kernels.test_mxfp4_moe_gemm import _loop_reference, _run_kernel, all_codes_blocks, extreme_scales
from tests.utils import assert_close
from vllm.kernel_configs.tile_config import Mxfp4TileConfig, TileConfig
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4
from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import (
    auto_split_k,
    get_mxfp4_moe_config,
    invoke_mxfp4_moe_gemm,
)


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_decodes_every_code_and_extreme_scale_exactly(split, dtype, device):
    """Identity activations: each output is one weight; the other shares add exact zeros."""
    gen = torch.Generator().manual_seed(split)
    E, N, K = 2, 32, 256
    lo, hi = (-20, 20) if dtype == torch.float32 else (-14, 10)  # fp16 holds 6 * 2^10 and 0.5 * 2^-14 exactly
    blocks = all_codes_blocks(E, N, K, gen).to(device)
    scales = extreme_scales(E, N, K, gen, lo, hi).to(device)
    w = dequantize_mxfp4(blocks, scales).cpu()
    for e in range(E):
        ids = torch.full((K, 1), e, dtype=torch.int32, device=device)
        out = _run_kernel(torch.eye(K, device=device, dtype=dtype), blocks, scales, ids, top_k_in=1,
                          config=Mxfp4TileConfig(16, 32, 32, num_stages=1, split_k=split))
        # value equality (a sum of shares turns -0 into +0, as any dot product may)
        assert torch.equal(out.cpu().float().t(), w[e]), f"expert {e}: decoded weights differ"


CASES = [  # (tokens, E, top_k, N, K, block_k, split)
    (3, 4, 2, 16, 2880, 256, 2),  # gpt-oss's K: not a multiple of the tile (K-tail masks in the last share)
    (5, 4, 2, 32, 2880, 256, 8),  # 12 K-tiles over 8 shares of 2: the last two shares are empty
    (6, 8, 2, 48, 128, 32, 3),  # a share count that does not divide the K-tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,E,top_k,N,K,block_k,split", CASES)
def test_split_k_matches_fp64_loop(M, E, top_k, N, K, block_k, split, dtype, device):
    gen = torch.Generator().manual_seed(M * 11 + split)
    blocks = all_codes_blocks(E, N, K, gen)
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randn(M, K, generator=gen) * 0.1
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
    ids[0, 0] = E - 1  # the last local expert is used
    ids[ids == 1] = 0  # expert 1 gets no pair
    ids[-1, -1] = -1  # an expert map sent this pair to another rank: its row stays untouched
    b = torch.randn(E, N, generator=gen)
    tw = torch.rand(M, top_k, generator=gen)
    cfg = dataclasses.replace(get_mxfp4_moe_config(M * top_k, E, N, K, top_k, dtype), block_size_k=block_k,
                              split_k=split)
    al = moe_align_block_size(ids.to(device), cfg.block_size_m, E)
    out = torch.full((M * top_k, N), float("nan"), dtype=dtype, device=device)
    buf = torch.full((split * M * top_k * N + 5,), float("nan"), device=device)  # poisoned: every share is written
    invoke_mxfp4_moe_gemm(a.to(device, dtype), blocks.to(device), scales.to(device), out,
                          sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k,
                          topk_weights=tw.to(device), mul_routed_weight=True, bias=b.to(device, dtype), config=cfg,
                          split_buffer=buf)
    routed = ids.reshape(-1) >= 0
    ref = _loop_reference(a.to(dtype).float(), dequantize_mxfp4(blocks, scales), ids.clamp(min=0), top_k,
                          b.to(dtype), tw)
    assert_close(out.cpu().float()[routed], ref.float()[routed], dtype)
    assert torch.isnan(out.cpu()[~routed]).all()
    # without a buffer the launcher allocates one; the result is the same
    out2 = _run_kernel(a.to(device, dtype), blocks.to(device), scales.to(device), ids.to(device), top_k_in=top_k,
                       bias=b.to(device, dtype), topk_weights=tw.to(device), weighted=True, config=cfg)
    assert torch.equal(out2.cpu()[routed], out.cpu()[routed])


def test_auto_split_k_fills_the_gpu_at_decode():
    cfg = Mxfp4TileConfig(block_size_m=16, block_size_n=64, block_size_k=128)
    # gpt-oss-20b, one token (4 pairs on 32 experts): w13 (5760 rows) has 450 tiles, w2 (2880 rows) 225
    assert auto_split_k(cfg, 4, 32, 5760, 2880) == 1
    assert auto_split_k(cfg, 4, 32, 2880, 2880) == 2
    assert auto_split_k(dataclasses.replace(cfg, block_size_n=128), 4, 32, 2880, 2880) == 4
    assert auto_split_k(cfg, 4, 32, 2880, 256) == 1  # two K-tiles: nothing to share
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        Mxfp4TileConfig.from_json(dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, SPLIT_K=0))
    with pytest.raises(TypeError, match="Mxfp4TileConfig"):  # the bf16 GEMM's config: no DECODE_ASM
        _run_kernel(torch.randn(2, 64), torch.zeros(2, 16, 2, 16, dtype=torch.uint8),
                    torch.zeros(2, 16, 2, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.int32), top_k_in=1,
                    config=TileConfig(16, 16, 32))
    with pytest.raises(ValueError, match="DECODE_ASM=2"):
        _run_kernel(torch.randn(2, 64), torch.zeros(2, 16, 2, 16, dtype=torch.uint8),
                    torch.zeros(2, 16, 2, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.int32), top_k_in=1,
                    config=Mxfp4TileConfig(16, 16, 32, decode_asm=2))


@pytest.mark.cuda
@pytest.mark.parametrize("decode_asm", [1, 0])
@pytest.mark.parametrize("M", [1, 16])
def test_split_k_bf16_on_gpu(decode_asm, M):
    """gpt-oss-20b's GEMM2 (K = 2880: a K-tail) on the GPU with bias and router weights, split 1 / 2 / 4 / auto."""
    gen = torch.Generator().manual_seed(M)
    E, top_k, N, K = 32, 4, 2880, 2880
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen).cuda()
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen).cuda()
    a = torch.randn(M, K, generator=gen).cuda().bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32).cuda()
    b = torch.randn(E, N, generator=gen).cuda().bfloat16()
    tw = torch.rand(M, top_k, generator=gen).cuda()
    w = dequantize_mxfp4(blocks, scales)
    ref = torch.cat([(a.float()[p // top_k][None] @ w[e].t() + b[e].float()) * tw.reshape(-1)[p]
                     for p, e in enumerate(ids.reshape(-1).tolist())])
    base = get_mxfp4_moe_config(M * top_k, E, N, K, top_k, torch.bfloat16)
    for split in (1, 2, 4, auto_split_k(base, M * top_k, E, N, K)):
        cfg = dataclasses.replace(base, split_k=split, decode_asm=decode_asm)
        out = _run_kernel(a, blocks, scales, ids, top_k_in=top_k, bias=b, topk_weights=tw, weighted=True, config=cfg)
        assert_close(out.float(), ref, torch.bfloat16)


def test_tuned_file_sets_split_and_decode_and_refuses_unknown_keys(tmp_path, monkeypatch):
    """A tuned entry (op mxfp4_moe_gemm, keys E, N, K, by token count) overrides the heuristic's fields;
    an unknown key is an error naming the file, never silently dropped."""
    from vllm.kernel_configs import clear_cache, config_file_name
    from vllm.platforms import current_platform

    name = config_file_name("mxfp4_moe_gemm", {"E": 32, "N": 2880, "K": 2880}, current_platform().device_name())
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own configs
    clear_cache()
    try:
        (tmp_path / name).write_text('{"1": {"SPLIT_K": 4, "DECODE_ASM": 0, "BLOCK_SIZE_N": 32}}')
        cfg = get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16)
        assert (cfg.split_k, cfg.decode_asm, cfg.block_size_n, cfg.block_size_m) == (4, 0, 32, 16)
        clear_cache()
        (tmp_path / name).write_text('{"1": {"SPLIT_K": 4, "DECODE": 0}}')
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['DECODE'\]") as exc:
            get_mxfp4_moe_config(4, 32, 2880, 2880, 2, torch.bfloat16)  # another top_k: not the cached entry
        assert name in str(exc.value)
    finally:
        clear_cache()
