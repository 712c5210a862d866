"""The tensor-core MXFP4 grouped GEMM (``csrc/capi/mxfp4_mma_moe.cu``) against an fp32 reference on the
checkpoint's blocks (``dequantize_mxfp4``, independent of the kernel's repacked layout), and that layout
against the e2m1 table through a torch emulation of the kernel's decode (CPU)."""
import pytest
import torch

from tests.kernels.mma_routing import PADDING_COUNTS, counted_ids
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.ops.int4_mma_layout import fragment_positions
from vllm.model_executor.layers.fused_moe.ops import w4_mma_dequant
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import E2M1_VALUES, dequantize_mxfp4
from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_layout import (
    codes_of_blocks,
    emulate_decode,
    repack_mxfp4_for_mma,
    source_bits,
    unpack_mxfp4_mma,
)
from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import (
    Mxfp4MmaWeight,
    invoke_mxfp4_mma_moe_gemm,
    mx_default_split,
    mx_stage_k,
    mxfp4_mma_unsupported_reason,
)


def _blocks(E, N, K, gen):
    return torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)


def test_layout_roundtrip_and_table():
    gen = torch.Generator().manual_seed(0)
    blocks = _blocks(3, 48, 192, gen)
    words = repack_mxfp4_for_mma(blocks)
    assert words.shape == (3, 3, 3, 32, 4) and words.dtype == torch.int32
    assert torch.equal(unpack_mxfp4_mma(words), codes_of_blocks(blocks))
    assert len(source_bits()) == 32
    with pytest.raises(ValueError, match="K % 64"):
        repack_mxfp4_for_mma(torch.zeros(1, 16, 1, 16, dtype=torch.uint8))


def test_emulated_decode_gives_every_e2m1_value_in_its_fragment_place():
    """The kernel's rotations and masks, read as bf16 and times 2^126, give the e2m1 value (signed zeros
    included) of the code at the PTX A-fragment position of each lane's register."""
    gen = torch.Generator().manual_seed(1)
    E, N, K = 2, 32, 128
    blocks = _blocks(E, N, K, gen)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # every code, both nibbles
    vals = emulate_decode(repack_mxfp4_for_mma(blocks))  # [E, nt, kc, 32, j, r, h]
    ref = torch.tensor(E2M1_VALUES)[codes_of_blocks(blocks).long()]  # [E, N, K]
    rows, cols = fragment_positions(torch.device("cpu"))
    nt, kc = N // 16, K // 64
    for j in range(4):
        for r in range(4):
            for h in range(2):
                R = (torch.arange(nt) * 16)[:, None, None] + rows[:, r, h][None, None, :]
                C = (torch.arange(kc) * 64 + 16 * j)[None, :, None] + cols[:, r, h][None, None, :]
                want = ref[:, R.expand(nt, kc, 32), C.expand(nt, kc, 32)]
                got = vals[..., j, r, h]
                assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_fold_only_where_every_exponent_fits():
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import can_fold

    s = torch.full((2, 16, 4), 127, dtype=torch.uint8)
    assert can_fold(s)
    s[1, 3, 2] = 128
    assert can_fold(s)
    s[0, 0, 0] = 129
    assert not can_fold(s)


@pytest.mark.parametrize("path", ["torch", "element", "words"])  # the torch unpacking, the Triton orders
def test_dequantize_from_the_repacked_words(path, monkeypatch):
    """The dequant path's weights from the repacked words (the torch unpacking, and the Triton launch the GPU
    takes) equal dequantize_mxfp4 on the checkpoint's blocks bit for bit: every code (signed zeros), extreme
    exponents (subnormal results, bf16 overflow to inf), the last expert."""
    use_triton = path != "torch"
    monkeypatch.setattr(w4_mma_dequant, "ORDER", "words" if path == "words" else "element")
    gen = torch.Generator().manual_seed(2)
    E, N, K = 3, 48, 320
    blocks = _blocks(E, N, K, gen)
    blocks[2, 5, 3] = torch.arange(16, dtype=torch.uint8) * 17  # every code, both nibbles
    scales = torch.randint(100, 150, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    scales[1:, 0, :4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)  # extreme exponents, 255 = inf
    scales[2, 5, 3] = 0
    dev = "cuda" if use_triton and torch.cuda.is_available() else "cpu"  # else the interpreter
    mw = Mxfp4MmaWeight.from_blocks(blocks.to(dev), scales.to(dev))
    assert (mw.num_experts, mw.n, mw.k) == (E, N, K) and mw.scales_t.shape == (E, K // 32, N)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full((2, N, K), float("nan"), dtype=dtype, device=dev)
        out = mw.dequantize(out, 1, 3, use_triton=use_triton).cpu()
        want = dequantize_mxfp4(blocks[1:3], scales[1:3], dtype)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        nan = want.isnan()  # 0 x 2^128 (scale 255): any NaN
        assert torch.equal(out.isnan(), nan), (dtype, out[out.isnan() != nan][:4].tolist())
        bad = ((out.view(bits) != want.view(bits)) & ~nan).nonzero()
        assert not len(bad), (dtype, [(out[tuple(b)].item(), want[tuple(b)].item()) for b in bad[:4].tolist()])


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["element", "words"])
def test_cuda_dequantize_from_the_repacked_words_at_width(order, monkeypatch):
    """On the GPU (Triton compiled, each order at its default tiles) at gpt-oss's width (K = 2880: a partial
    tile), every expert: bit for bit the checkpoint's values."""
    monkeypatch.setattr(w4_mma_dequant, "ORDER", order)
    gen = torch.Generator().manual_seed(5)
    E, N, K = 3, 5760, 2880
    blocks, scales = _blocks(E, N, K, gen), torch.randint(110, 135, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    mw = Mxfp4MmaWeight.from_blocks(blocks.cuda(), scales.cuda())
    out = torch.full((E, N, K), float("nan"), dtype=torch.bfloat16, device="cuda")
    mw.dequantize(out, 0, E)
    assert torch.equal(out.cpu().view(torch.int16), dequantize_mxfp4(blocks, scales, torch.bfloat16).view(torch.int16))


def test_unsupported_reasons_and_launch_shape():
    assert mxfp4_mma_unsupported_reason(2880, 2880, torch.bfloat16) is None
    assert "bf16" in mxfp4_mma_unsupported_reason(2880, 2880, torch.float16)
    assert "multiple of 64" in mxfp4_mma_unsupported_reason(2880, 1440, torch.bfloat16)  # TP=2 of gpt-oss
    assert "multiple of 16" in mxfp4_mma_unsupported_reason(2888, 2880, torch.bfloat16)
    assert mx_stage_k(2880, 8, 100) == 256 and mx_stage_k(2880, 8, 300) == 128 and mx_stage_k(2048, 32, 100) == 128
    assert mx_stage_k(640, 8, 10) == 128 and mx_stage_k(64, 8, 10) == 64
    assert mx_default_split(4, 2880, 2880, 256) == 2  # 92 CTAs: two splits of 1440 inputs (6 + 6 stages)
    assert mx_default_split(32, 5760, 2880, 64) == 1


def reference(a, blocks, scales, bias, ids, top_k, tw):
    """fp32 loop over pairs: (a @ W.T + bias) * weight; rows of unrouted pairs NaN."""
    W = dequantize_mxfp4(blocks, scales, torch.float32)  # [E, N, K] exact
    flat = ids.reshape(-1).long()
    out = torch.full((flat.numel(), W.shape[1]), float("nan"), device=a.device)
    for p, e in enumerate(flat.tolist()):
        if e < 0:
            continue
        v = a[p // top_k].float() @ W[e].T
        if bias is not None:
            v = v + bias[e].float()
        out[p] = v * (tw.reshape(-1)[p] if tw is not None else 1.0)
    return out


def _ids(rows, top_k, E, seed):
    """An expert of many pairs, one of none, the last one, and a pair routed nowhere (-1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (rows, top_k), generator=gen).to(torch.int32)
    flat = ids.view(-1)
    flat[: min(20, flat.numel() // 2)] = 0
    flat[flat == 1] = 2
    flat[-2] = E - 1
    flat[-1] = -1
    return ids


def _run(a, mw, ids, tw, bias, top_k, mode, split, stage=None):
    pairs, N = ids.numel(), mw.n
    out = torch.full((pairs, N), float("nan"), dtype=a.dtype, device="cuda")  # poisoned
    buf = torch.full((8 * pairs * N,), float("nan"), device="cuda")
    kw = dict(top_k_in=top_k, topk_weights=tw, mul_routed_weight=tw is not None, bias=bias, split_k=split,
              stage=stage, split_buffer=buf)
    if mode == "unsorted":
        invoke_mxfp4_mma_moe_gemm(a, mw, out, block_m=8, pair_expert_ids=ids.reshape(-1).contiguous(), **kw)
    else:
        bm = int(mode[len("sorted"):])
        al = moe_align_block_size(ids, bm, mw.num_experts)
        invoke_mxfp4_mma_moe_gemm(a, mw, out, block_m=bm, sorted_token_ids=al.sorted_token_ids,
                                  block_expert_ids=al.block_expert_ids,
                                  num_tokens_post_padded=al.num_tokens_post_padded, **kw)
    return out


# (rows, top_k, E, N, K, mode, split, stage, bias, weighted)
CASES = [
    (1, 4, 8, 272, 640, "sorted8", 1, 64, True, False),  # N tail (2 row tiles of a CTA), 10 stages of 64
    (2, 4, 8, 144, 640, "sorted8", 2, 256, True, True),  # 640 = 2 stages of 256 + one of 128 (partial)
    (5, 2, 8, 128, 576, "unsorted", 1, 128, False, True),  # 4 stages of 128 + a half one
    (70, 2, 4, 128, 704, "sorted64", 3, 128, True, False),  # 5.5 stages over 3 splits
    (3, 2, 8, 128, 512, "unsorted", 2, 128, True, True),
    (16, 4, 8, 256, 1024, "sorted8", 3, 256, False, True),  # 4 stages of 256 over 3 splits
    (16, 4, 8, 384, 640, "sorted16", 2, 64, True, True),  # a split starting mid-group pair
    (40, 4, 8, 256, 512, "sorted32", 1, 128, True, False),
    (96, 4, 4, 128, 576, "sorted64", 2, 64, True, True),
    (96, 4, 8, 144, 1024, "sorted64", 1, 128, False, False),
    (12, 4, 32, 2880, 2880, "sorted8", None, None, True, True),  # gpt-oss width, the defaults
    (3, 4, 32, 2880, 2880, "sorted8", 1, 128, True, True),  # 22.5 stages of 128
]


@pytest.mark.cuda
@pytest.mark.parametrize("big", [False, True])  # an exponent above 128: the fp32 group scaling, else the folded one
@pytest.mark.parametrize("rows,top_k,E,N,K,mode,split,stage,bias,weighted", CASES)
def test_mma_matches_fp32_reference(rows, top_k, E, N, K, mode, split, stage, bias, weighted, big):
    gen = torch.Generator().manual_seed(rows * 7 + N + K)
    blocks = _blocks(E, N, K, gen)
    scales = torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    scales[0, :, 0] = 0  # 2^-127: an fp32 subnormal scale, weights down to bf16 subnormals
    scales[E - 1, :, -1] = 140 if big else 128  # 2^13 / 2^1
    a = torch.randn(rows, K, generator=gen).bfloat16().cuda()
    b = (torch.randn(E, N, generator=gen) * 0.1).bfloat16().cuda() if bias else None
    tw = torch.rand(rows, top_k, generator=gen).cuda() if weighted else None
    ids = _ids(rows, top_k, E, rows + K).cuda()
    mw = Mxfp4MmaWeight.from_blocks(blocks.cuda(), scales.cuda())
    assert mw.fold is not big
    out = _run(a, mw, ids, tw, b, top_k, mode, split, stage)
    ref = reference(a, blocks.cuda(), scales.cuda(), b, ids, top_k, tw)
    routed = ids.reshape(-1) >= 0
    assert_close(out[routed].float(), ref[routed], torch.bfloat16)
    if (split or 1) > 1:  # every row written: pairs with no local expert are zeros
        assert torch.equal(out[~routed].float(), torch.zeros_like(ref[~routed]))
    elif split == 1:
        assert torch.isnan(out[~routed].float()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("mode,split", [("sorted32", 1), ("sorted64", 1), ("sorted64", 2)])
def test_mma_blocks_ending_in_padding(mode, split, fold):
    """Sorted 32- / 64-row blocks whose real rows fill a quarter, a half or all of their n8 token tiles
    (``PADDING_COUNTS``), folded scales (the warpgroup MMA at 64 rows) or not: every routed row equals the
    fp32 reference."""
    E, N, K = len(PADDING_COUNTS), 256, 512
    gen = torch.Generator().manual_seed(11 + split)
    blocks = _blocks(E, N, K, gen)
    scales = torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    scales[E - 1, :, -1] = 128 if fold else 140
    ids = counted_ids(seed=len(mode) + split).cuda()
    a = torch.randn(ids.shape[0], K, generator=gen).bfloat16().cuda()
    b = (torch.randn(E, N, generator=gen) * 0.1).bfloat16().cuda()
    tw = torch.rand(ids.shape[0], 1, generator=gen).cuda()
    mw = Mxfp4MmaWeight.from_blocks(blocks.cuda(), scales.cuda())
    assert mw.fold is fold
    out = _run(a, mw, ids, tw, b, 1, mode, split, 128)
    assert_close(out.float(), reference(a, blocks.cuda(), scales.cuda(), b, ids, 1, tw), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("mode,split,stage", [("unsorted", 1, 64), ("sorted8", 2, 128), ("sorted16", 1, 256),
                                              ("sorted64", 1, 64), ("sorted8", 3, 256)])
def test_mma_exact_on_exact_data(mode, split, stage, fold):
    """Small-integer activations, scales 2^-1..2^1, integer-valued biases: every product and sum is exact in
    fp32, so the output equals the reference rounded once to bf16, bit for bit (subnormal codes, -0 included)."""
    rows, top_k, E, N, K = 12, 4, 8, 128, 1088  # 1088 = 4 stages of 256 + a quarter one
    gen = torch.Generator().manual_seed(3)
    blocks = _blocks(E, N, K, gen)
    scales = torch.randint(126, 129, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    a = torch.randint(-4, 5, (rows, K), generator=gen).bfloat16().cuda()
    b = torch.randint(-8, 9, (E, N), generator=gen).bfloat16().cuda()
    ids = _ids(rows, top_k, E, 5).cuda()
    mw = Mxfp4MmaWeight.from_blocks(blocks.cuda(), scales.cuda())
    assert mw.fold
    mw.fold = fold  # the fp32 group scaling is exact here too
    out = _run(a, mw, ids, None, b, top_k, mode, split, stage)
    ref = reference(a, blocks.cuda(), scales.cuda(), b, ids, top_k, None)
    routed = ids.reshape(-1) >= 0
    assert torch.equal(out[routed], ref[routed].to(torch.bfloat16))


@pytest.mark.cuda
def test_mma_graph_replay():
    """A CUDA-graph replay after the inputs change in place equals a fresh eager call."""
    rows, top_k, E, N, K = 6, 2, 8, 256, 640
    gen = torch.Generator().manual_seed(11)
    mw = Mxfp4MmaWeight.from_blocks(_blocks(E, N, K, gen).cuda(),
                                    torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8).cuda())
    a = torch.randn(rows, K, generator=gen).bfloat16().cuda()
    ids = torch.randint(0, E, (rows, top_k), dtype=torch.int32).cuda()
    al = moe_align_block_size(ids, 8, E)
    out = torch.empty(rows * top_k, N, dtype=torch.bfloat16, device="cuda")
    run = lambda dst: invoke_mxfp4_mma_moe_gemm(  # noqa: E731
        a, mw, dst, top_k_in=top_k, block_m=8, sorted_token_ids=al.sorted_token_ids,
        block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded, split_k=2)
    run(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.empty_like(out)
    run(fresh)
    assert torch.equal(out, fresh)


@pytest.mark.parametrize("split", [2, 3])
def test_split_reduction_fuses_swigluoai(split, device):
    """The split reduction's gpt-oss epilogue (ACT 2, interleaved gate / up) equals the sum rounded to the output
    dtype then ``moe_activation``: bit for bit on the GPU (the same Triton arithmetic), to rounding on the CPU
    interpreter (whose activation reference is torch's)."""
    from vllm.model_executor.layers.fused_moe.config import MoEActivation
    from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
    from vllm.model_executor.layers.fused_moe.ops.moe_launch import reduce_splits

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter truncates bf16 stores
    pairs, N = 37, 96
    part = (torch.randn(split, pairs, N) * 4).to(device)  # past the clamp limit 7 too
    out = torch.full((pairs, N // 2), float("nan"), dtype=dtype, device=device)
    reduce_splits(part, out, split, 1, 2, {})
    want = torch.empty_like(out)
    moe_activation(MoEActivation.SWIGLUOAI, part.sum(0).to(dtype), out=want)
    if device.type == "cuda":
        assert torch.equal(out, want)
    else:
        assert_close(out.float(), want.float(), dtype)
