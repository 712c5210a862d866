"""MXFP4: the torch dequantiser vs transformers' reference, and the Triton grouped GEMM
(4-bit tiles decoded in registers) vs an fp32 loop over dequantised weights."""
import dataclasses

import pytest
import torch

from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import Mxfp4TileConfig
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4
from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import (
    get_mxfp4_moe_config,
    invoke_mxfp4_moe_gemm,
    mxfp4_moe_gemm_torch,
)

convert_moe_packed_tensors = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors


def all_codes_blocks(E: int, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes in which every (low, high) nibble pair occurs: all 16 codes in both positions,
    including 8 (-0) and the subnormals 1 / 9 (+-0.5)."""
    b = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)
    flat = b.view(-1)
    flat[:256] = torch.randperm(256, generator=gen).to(torch.uint8)
    return b


def extreme_scales(E: int, N: int, K: int, gen: torch.Generator, lo: int = -20, hi: int = 20) -> torch.Tensor:
    """e8m0 bytes 127+lo .. 127+hi, both ends present."""
    s = torch.randint(127 + lo, 127 + hi + 1, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    s.view(-1)[:2] = torch.tensor([127 + lo, 127 + hi], dtype=torch.uint8)
    return s


def test_dequantiser_matches_transformers_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    E, N, K = 3, 40, 128
    blocks = all_codes_blocks(E, N, K, gen)
    for scales in (extreme_scales(E, N, K, gen), extreme_scales(E, N, K, gen, -127, 127)):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
        ours = dequantize_mxfp4(blocks, scales)  # [E, out, in]
        assert ours.shape == (E, N, K)
        # bit patterns: -0.0 and +0.0 differ, so the sign of zero is checked too
        assert torch.equal(ours.transpose(1, 2).contiguous().view(torch.int32), ref.view(torch.int32))
    assert (torch.signbit(ours) & (ours == 0)).any()  # -0 is present
    assert (ours.abs() == 0.5 * 2.0 ** -127).any()  # the subnormal code at the smallest scale


def test_dequantiser_table_and_nibble_order():
    # byte 0x9A: low nibble 0xA = -1.0 (element 0), high nibble 0x9 = -0.5 (element 1); byte 0x71: 0.5, 6.0
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, :2] = torch.tensor([0x9A, 0x71], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8))  # scale 2
    assert out[0, :4].tolist() == [-2.0, -1.0, 1.0, 12.0]


def test_dequantiser_rejects_mismatched_scales():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))


def _run_kernel(a, blocks, scales, ids, *, top_k_in, bias=None, topk_weights=None, weighted=False, config=None):
    E, N = blocks.shape[:2]
    pairs = a.shape[0] * top_k_in
    cfg = config or get_mxfp4_moe_config(pairs, E, N, a.shape[1], top_k_in, a.dtype)
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    out = poison_(torch.empty(pairs, N, dtype=a.dtype, device=a.device))
    invoke_mxfp4_moe_gemm(a, blocks, scales, out, sorted_token_ids=al.sorted_token_ids,
                          block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                          top_k_in=top_k_in, bias=bias, topk_weights=topk_weights, mul_routed_weight=weighted,
                          config=cfg)
    return out


def _loop_reference(a, w, ids, top_k_in, bias=None, topk_weights=None):
    """fp64 loop over pairs; w: [E, N, K] dequantised."""
    out = []
    for p, e in enumerate(ids.reshape(-1).tolist()):
        y = w[e].double() @ a[p // top_k_in].double()
        if bias is not None:
            y = y + bias[e].double()
        if topk_weights is not None:
            y = y * float(topk_weights.reshape(-1)[p])
        out.append(y)
    return torch.stack(out)


def test_kernel_decodes_every_code_and_extreme_scale_exactly(device):
    """a = identity rows: each output is one dequantised weight, so fp32 results must be exact."""
    gen = torch.Generator().manual_seed(1)
    E, N, K = 2, 32, 64
    blocks = all_codes_blocks(E, N, K, gen).to(device)
    scales = extreme_scales(E, N, K, gen).to(device)
    w = dequantize_mxfp4(blocks, scales).cpu()
    for e in range(E):
        a = torch.eye(K, device=device)
        ids = torch.full((K, 1), e, dtype=torch.int32, device=device)
        out = _run_kernel(a, blocks, scales, ids, top_k_in=1,
                          config=Mxfp4TileConfig(16, 32, 64, num_stages=1))
        assert torch.equal(out.cpu().abs(), w[e].t().abs()), f"expert {e}: decoded weights differ"


CASES = [  # (tokens, E, top_k, N, K, bias, weighted, block_k)
    (1, 4, 2, 32, 64, False, False, None),
    (7, 8, 2, 48, 96, True, True, None),  # K not a multiple of the 64-wide tile: K-tail masks
    (33, 8, 4, 64, 128, True, False, 64),
    (5, 4, 1, 16, 32, False, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,E,top_k,N,K,bias,weighted,block_k", CASES)
def test_kernel_matches_fp32_loop(M, E, top_k, N, K, bias, weighted, block_k, dtype, device):
    gen = torch.Generator().manual_seed(M * 7 + E)
    blocks = all_codes_blocks(E, N, K, gen)
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randn(M, K, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
    if M > 3:
        ids[ids == E - 1] = 0  # an expert without pairs (a token may then use expert 0 twice)
    b = torch.randn(E, N, generator=gen) if bias else None
    tw = torch.rand(M, top_k, generator=gen) if weighted else None
    cfg = None
    if block_k:
        cfg = dataclasses.replace(get_mxfp4_moe_config(M * top_k, E, N, K, top_k, dtype), block_size_k=block_k)
    out = _run_kernel(a.to(device, dtype), blocks.to(device), scales.to(device), ids.to(device), top_k_in=top_k,
                      bias=None if b is None else b.to(device, dtype), topk_weights=None if tw is None else tw.to(device),
                      weighted=weighted, config=cfg)
    w = dequantize_mxfp4(blocks, scales)
    ref = _loop_reference(a.to(dtype).float(), w, ids, top_k, None if b is None else b.to(dtype), tw)
    assert_close(out.float().cpu(), ref.float(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 300])
def test_kernel_bf16_on_gpu(M):
    gen = torch.Generator().manual_seed(M)
    E, top_k, N, K = 32, 4, 5760, 2880  # gpt-oss-20b GEMM1
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randn(M, K, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
    out = _run_kernel(a.cuda().bfloat16(), blocks.cuda(), scales.cuda(), ids.cuda(), top_k_in=top_k)
    w = dequantize_mxfp4(blocks.cuda(), scales.cuda())
    ref = torch.cat([a.cuda().bfloat16().float()[p // top_k][None] @ w[e].t()
                     for p, e in enumerate(ids.reshape(-1).tolist())])
    assert_close(out.float(), ref, torch.bfloat16)


def test_torch_path_matches_loop():
    gen = torch.Generator().manual_seed(3)
    E, N, K, M, top_k = 4, 16, 64, 6, 2
    blocks = all_codes_blocks(E, N, K, gen)
    scales = torch.randint(119, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randn(M, K, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
    ids[0, 0] = -1  # a pair of another rank's expert: zero row
    b = torch.randn(E, N, generator=gen)
    out = torch.full((M * top_k, N), float("nan"))
    mxfp4_moe_gemm_torch(out, a, blocks, scales, ids, top_k_in=top_k, bias=b)
    ref = _loop_reference(a, dequantize_mxfp4(blocks, scales), ids.clamp(min=0), top_k, b)
    ref[0] = 0
    assert_close(out, ref.float(), torch.float32)


def test_launcher_rejects_bad_inputs():
    blocks = torch.zeros(2, 16, 2, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 16, 2, dtype=torch.uint8)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="K must be a multiple of 32|holds 64"):
        _run_kernel(torch.randn(3, 48), blocks, scales, ids, top_k_in=1,
                    config=Mxfp4TileConfig(16, 16, 32))
    with pytest.raises(ValueError, match="BLOCK_SIZE_K a power of two >= 32"):
        _run_kernel(torch.randn(3, 64), blocks, scales, ids, top_k_in=1,
                    config=Mxfp4TileConfig(16, 16, 16))
    with pytest.raises(ValueError, match="scales must be"):
        _run_kernel(torch.randn(3, 64), blocks, scales[:, :8], ids, top_k_in=1)
