"""The MXFP4 FMA GEMV for decode (config ``gemv=1``, ``_mxfp4_gemv_kernel.py``) against an fp64 reference
from the torch dequantiser and against the tl.dot kernel, on the sorted routing."""
import dataclasses

import pytest
import torch

from tests.kernels.test_mxfp4_moe_gemm import _loop_reference, _run_kernel, all_codes_blocks
from tests.utils import assert_close
from vllm.kernel_configs.tile_config import Mxfp4TileConfig
from vllm.model_executor.layers.fused_moe.ops import mxfp4_moe_gemm as mod
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4


def _gemv(bn=32, bk=64, split=1, bm=16, rows=1):
    return Mxfp4TileConfig(bm, bn, bk, split_k=split, num_stages=1, gemv=rows)


@pytest.mark.parametrize("split,rows", [(1, 1), (2, 2)])
def test_gemv_decodes_every_code_and_extreme_scale_exactly(split, rows, device):
    """Identity activations: each output is one dequantised weight (every code incl. -0 and the subnormals
    +-0.5, scales e8m0 0 (2^-127, itself subnormal) and 254 (2^127: 6 * 2^127 overflows to inf as in the
    dequantiser)), exact in fp32; 64 rows per expert walk 4 M-blocks of real rows."""
    gen = torch.Generator().manual_seed(5)
    E, N, K = 2, 32, 64
    blocks = all_codes_blocks(E, N, K, gen)
    scales = torch.randint(0, 255, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    scales.view(-1)[:4] = torch.tensor([0, 254, 1, 127], dtype=torch.uint8)
    w = dequantize_mxfp4(blocks, scales)
    for e in range(E):
        ids = torch.full((K, 1), e, dtype=torch.int32, device=device)
        out = _run_kernel(torch.eye(K, device=device), blocks.to(device), scales.to(device), ids, top_k_in=1,
                          config=_gemv(bk=32, split=split, rows=rows))
        # value equality (inf == inf; -0 == +0: a sum that starts at +0 turns -0 into +0, as any dot product)
        assert torch.equal(out.cpu().t(), w[e]), f"expert {e}: decoded weights differ"


CASES = [  # (tokens, E, top_k, N, K, block_n, block_k, split, rows, bias, weighted)
    (1, 4, 2, 32, 64, 32, 64, 1, 1, True, True),
    (3, 4, 2, 48, 160, 32, 64, 1, 2, False, True),  # K-tail (160 = 2.5 tiles), N-tail (48 = 1.5 tiles)
    (6, 4, 2, 32, 256, 16, 64, 2, 1, True, False),  # several rows per block, split-K
    (7, 4, 2, 32, 128, 32, 64, 1, 2, True, True),  # 2 rows per pass: odd row counts leave a half pass
    (5, 8, 3, 64, 192, 64, 64, 3, 2, True, True),  # split that does not divide the 3 K-tiles evenly + K-tail
    (2, 4, 2, 32, 192, 32, 32, 4, 1, True, True),  # 6 K-tiles over 4 splits: the last split empty
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,E,top_k,N,K,bn,bk,split,rows,bias,weighted", CASES)
def test_gemv_matches_fp64_loop_and_dot_kernel(M, E, top_k, N, K, bn, bk, split, rows, bias, weighted, dtype,
                                              device):
    gen = torch.Generator().manual_seed(M * 13 + K + split)
    blocks = all_codes_blocks(E, N, K, gen)
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randn(M, K, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
    ids[0, 0] = E - 1  # the last expert is used
    if E > 4:
        ids[ids == 1] = 0  # expert 1 gets no pair
    ids[-1, -1] = -1  # an expert map sent this pair to another rank: its row stays untouched (NaN poison)
    b = torch.randn(E, N, generator=gen) if bias else None
    tw = torch.rand(M, top_k, generator=gen) if weighted else None
    args = dict(top_k_in=top_k, bias=None if b is None else b.to(device, dtype),
                topk_weights=None if tw is None else tw.to(device), weighted=weighted)
    dev = (a.to(device, dtype), blocks.to(device), scales.to(device), ids.to(device))
    out = _run_kernel(*dev, config=_gemv(bn, bk, split, rows=rows), **args).float().cpu()
    w = dequantize_mxfp4(blocks, scales)
    ref = _loop_reference(a.to(dtype).float(), w, ids.clamp(min=0), top_k, None if b is None else b.to(dtype), tw)
    routed = ids.reshape(-1) >= 0
    assert out[~routed].isnan().all(), "a pair with no local expert was written"
    assert_close(out[routed], ref[routed].float(), dtype)
    if dtype != torch.bfloat16:  # the interpreter's bf16 dot is wrong: the dot kernel is compared in fp32 / fp16
        dot_cfg = dataclasses.replace(mod.get_mxfp4_moe_config(M * top_k, E, N, K, top_k, dtype, gemv=False),
                                      block_size_k=bk)
        dot = _run_kernel(*dev, config=dot_cfg, **args).float().cpu()
        assert_close(out[routed], dot[routed], dtype)


def test_gemv_config_selection():
    cfg = mod.get_mxfp4_moe_config(4, 32, 5760, 2880, 4, torch.float32, gemv=True)
    assert cfg.gemv == 1 and cfg.block_size_m == 16
    assert mod.get_mxfp4_moe_config(4, 32, 5760, 2880, 4, torch.float32, gemv=False).gemv == 0
    # the GPU heuristic (interp=False): the GEMV at decode sizes, the dot kernel beyond
    gpu = lambda pairs: mod._cached_config(pairs, 32, 2880, 2880, 4, torch.bfloat16, False, None, None)  # noqa
    if mod.GEMV_DECODE:  # 1 token: one row per pass
        assert gpu(4).gemv == 1
    assert gpu(8).gemv == 0 and gpu(64).gemv == 0  # 2 and 16 tokens: the dot kernel (timed: the GEMV loses at 16)
    assert gpu(16).gemv == 0  # 4 tokens over 32 experts: 1.26 pairs per touched expert (H200: 0.98x)
    spread = lambda pairs: mod._cached_config(pairs, 128, 2880, 2880, 4, torch.bfloat16, False, None, None)  # noqa
    if mod.GEMV_DECODE:  # 2-4 tokens over 128 experts (gpt-oss-120b): 1.02-1.06 per touched expert (H200: 1.54x)
        assert [spread(p).gemv for p in (8, 12, 16)] == [1, 1, 1]
    assert spread(20).gemv == 0 and spread(64).gemv == 0  # 5 and 16 tokens
    assert gpu(4 * 1024).gemv == 0 and gpu(4 * 32).gemv == 0
    g = mod._gemv_config(4, 32, 2880, 2880, False)
    tiles = (1 + 4) * -(-2880 // g.block_size_n)
    assert tiles * g.split_k >= mod.GEMV_PROGRAMS_PER_SM * 132 or g.split_k * 2 > -(-2880 // g.block_size_k) // 2
    assert Mxfp4TileConfig.from_json({"GEMV": 1}, base=cfg).gemv == 1
    with pytest.raises(ValueError, match="GEMV=3"):
        mod.check_mxfp4_tile_config(dataclasses.replace(cfg, gemv=3))


def test_gemv_rejects_misaligned_codes():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2 * 16 * 32 + 1,), dtype=torch.uint8, generator=gen)
    blocks = raw[1:].view(2, 16, 32)  # rows start at odd byte addresses: no int32 view
    scales = torch.full((2, 16, 2), 127, dtype=torch.uint8)
    ids = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32 words"):
        _run_kernel(torch.randn(1, 64), blocks, scales, ids, top_k_in=1, config=_gemv(16, 32))


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("N,K", [(5760, 2880), (2880, 2880)])  # gpt-oss-20b w13, w2
def test_gemv_bf16_on_gpu(M, N, K):
    gen = torch.Generator().manual_seed(M)
    E, top_k = 32, 4
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen).cuda()
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen).cuda()
    a = torch.randn(M, K, generator=gen).cuda().bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32).cuda()
    b = torch.randn(E, N, generator=gen).cuda().bfloat16()
    tw = torch.rand(M, top_k, generator=gen).cuda()
    w = dequantize_mxfp4(blocks, scales)
    ref = torch.cat([(a.float()[p // top_k][None] @ w[e].t() + b[e].float()) * tw.reshape(-1)[p]
                     for p, e in enumerate(ids.reshape(-1).tolist())])
    dot = _run_kernel(a, blocks, scales, ids, top_k_in=top_k, bias=b, topk_weights=tw, weighted=True,
                      config=mod.get_mxfp4_moe_config(M * top_k, E, N, K, top_k, torch.bfloat16, gemv=False))
    cfg = mod.get_mxfp4_moe_config(M * top_k, E, N, K, top_k, torch.bfloat16, gemv=True)
    for variant in (cfg, dataclasses.replace(cfg, gemv=3 - cfg.gemv), dataclasses.replace(cfg, decode_asm=0),
                    dataclasses.replace(cfg, split_k=1)):  # both row counts, the portable decode, no split
        out = _run_kernel(a, blocks, scales, ids, top_k_in=top_k, bias=b, topk_weights=tw, weighted=True,
                          config=variant)
        assert_close(out.float(), ref, torch.bfloat16, name=str(variant))
        assert_close(out.float(), dot.float(), torch.bfloat16, name=f"{variant} vs the dot kernel")
