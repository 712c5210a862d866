"""The tensor-core int4 grouped GEMM (``csrc/capi/int4_mma_moe.cu``) against the fp32 reference on the
dequantised weights (``int4_moe_gemm_reference``, read from the ``Int4PackedWeight`` layout, independent of
the kernel's repacked one), and its repacked layout against the PTX fragment layout (CPU)."""
import dataclasses

import pytest
import torch

from tests.kernels.mma_routing import PADDING_COUNTS, counted_ids
from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.int4_weights import int4_moe_gemm_reference, pack_int4_k
from vllm.model_executor.layers.fused_moe.ops.int4_mma_layout import repack_for_mma, unpack_mma
from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import (
    Int4MmaWeight,
    default_split,
    invoke_int4_mma_moe_gemm,
    mma_block_m,
    mma_unsupported_reason,
    stage_k,
)
from vllm.model_executor.layers.fused_moe.ops import w4_mma_dequant
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def test_layout_roundtrip_and_fragment_positions():
    q = torch.randint(0, 16, (3, 48, 192), dtype=torch.uint8)
    words = repack_for_mma(pack_int4_k(q).transpose(1, 2).contiguous())
    assert words.shape == (3, 3, 3, 32, 4) and words.dtype == torch.int32
    assert torch.equal(unpack_mma(words), q)
    # lane 9 = (g 2, t 1), tile j 3 of chunk 1 in row tile 2 of expert 1: rows 32 + 2 (+ 8), inputs 64 + 48 + 2 (+ 8)
    word = int(words[1, 2, 1, 9, 3]) & 0xFFFFFFFF
    nib = [(word >> (4 * i)) & 0xF for i in range(8)]
    r, k = 34, 114
    assert nib == [q[1, r, k], q[1, r + 8, k], q[1, r, k + 8], q[1, r + 8, k + 8],
                   q[1, r, k + 1], q[1, r + 8, k + 1], q[1, r, k + 9], q[1, r + 8, k + 9]]
    with pytest.raises(ValueError, match="N % 16"):
        repack_for_mma(torch.zeros(1, 8, 40, dtype=torch.int32))


def test_stage_and_split_choices():
    assert stage_k(2048, 128, 8, 96) == 256 and stage_k(1408, 128) == 128 and stage_k(768, 768) == 128
    assert stage_k(2048, 128, 8, 384) == 128  # 128-wide stages hold 3 CTAs per SM: one wave instead of two
    assert stage_k(4096, 128, 32, 96) == 128  # 32+ rows: 128 (shared memory)
    assert stage_k(1152, 384) == 128 and stage_k(96, 32) is None and stage_k(512, 16) is None
    assert default_split(8, 1536, 2048, 256) == 1  # 96 CTAs, but a split would hold < 2048 inputs
    assert default_split(2, 4096, 14336, 256) == 4  # 64 CTAs -> 256, splits of 3584 inputs
    assert default_split(256, 4096, 4096, 256) == 1
    assert mma_block_m(8, 128, True) == 8 and mma_block_m(128, 128, False) == 8  # ~1.6 pairs per expert
    assert mma_block_m(32, 8, False) == 8 and mma_block_m(128, 8, False) == 32 and mma_block_m(2048, 128, False) == 32
    assert mma_block_m(512, 8, False) == 64 and mma_block_m(1536, 8, False) == 64  # 192 pairs per expert
    assert mma_block_m(1544, 8, False) is None  # beyond MMA_MAX_ROWS: the dequant path


@pytest.mark.parametrize("path", ["torch", "element", "words"])  # the torch unpacking, the Triton orders
def test_dequantize_from_the_repacked_words(path, monkeypatch):
    """The dequant path's weights from the repacked words (the torch unpacking, and the Triton launch the GPU
    takes) equal Int4PackedWeight.dequantize_expert bit for bit: zeros or none, scales in the output dtype or
    rounded to it, a group that does not divide K, the last expert."""
    use_triton = path != "torch"
    monkeypatch.setattr(w4_mma_dequant, "ORDER", "words" if path == "words" else "element")
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight

    gen = torch.Generator().manual_seed(3)
    E, N, K = 3, 48, 384
    q = torch.randint(0, 16, (E, N, K), dtype=torch.uint8, generator=gen)
    words = pack_int4_k(q).transpose(1, 2).contiguous()
    for g, zeros, sdtype, dtype in ((128, True, torch.bfloat16, torch.bfloat16), (128, False, torch.bfloat16,
                                    torch.bfloat16), (256, True, torch.float16, torch.float16),
                                    (64, False, torch.float32, torch.bfloat16), (128, True, torch.float16,
                                    torch.float32)):
        G = -(-K // g)
        z = torch.randint(0, 16, (E, G, N), dtype=torch.uint8, generator=gen) if zeros else None
        scales = (torch.rand(E, G, N, generator=gen) * 2 ** torch.randint(-12, 4, (E, G, N), generator=gen)).to(sdtype)
        pw = Int4PackedWeight(words, scales, z, g)
        dev = "cuda" if use_triton and torch.cuda.is_available() else "cpu"  # else the interpreter
        on = Int4PackedWeight(words.to(dev), scales.to(dev), z.to(dev) if zeros else None, g)
        out = torch.full((2, N, K), float("nan"), dtype=dtype, device=dev)
        Int4MmaWeight.from_packed(on).dequantize(out, 1, 3, use_triton=use_triton)
        out = out.cpu()
        want = torch.stack([pw.dequantize_expert(e, dtype) for e in (1, 2)])
        assert torch.equal(out.view(torch.int8 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int8 if dtype != torch.float32 else torch.int32)), (g, zeros, sdtype, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["element", "words"])
def test_cuda_dequantize_from_the_repacked_words_at_width(order, monkeypatch):
    """On the GPU (Triton compiled, each order at its default tiles, ``DEFAULT_TILES``) at a Mixtral-like width,
    every expert: bit for bit."""
    monkeypatch.setattr(w4_mma_dequant, "ORDER", order)
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight

    gen = torch.Generator().manual_seed(4)
    E, N, K, g = 3, 1040, 4096, 128
    q = torch.randint(0, 16, (E, N, K), dtype=torch.uint8, generator=gen)
    pw = Int4PackedWeight(pack_int4_k(q).transpose(1, 2).contiguous().cuda(),
                          torch.rand(E, K // g, N, generator=gen).bfloat16().cuda(),
                          torch.randint(0, 16, (E, K // g, N), dtype=torch.uint8, generator=gen).cuda(), g)
    mw = Int4MmaWeight.from_packed(pw)
    out = torch.full((E, N, K), float("nan"), dtype=torch.bfloat16, device="cuda")
    mw.dequantize(out, 0, E)
    assert torch.equal(out.view(torch.int16), mw.dequantize(torch.empty_like(out), 0, E, use_triton=False).view(torch.int16))


def test_dequantize_words_default_order_small_group(monkeypatch):
    """An int4 group under 16 inputs: the default order falls back to "element" (the words order refuses it when
    asked), bit for bit ``Int4PackedWeight.dequantize_expert``."""
    monkeypatch.setattr(w4_mma_dequant, "ORDER", "words")
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight

    gen = torch.Generator().manual_seed(6)
    E, N, K, g = 2, 32, 128, 8
    q = torch.randint(0, 16, (E, N, K), dtype=torch.uint8, generator=gen)
    pw = Int4PackedWeight(pack_int4_k(q).transpose(1, 2).contiguous(), torch.rand(E, K // g, N, generator=gen),
                          torch.randint(0, 16, (E, K // g, N), dtype=torch.uint8, generator=gen), g)
    mw = Int4MmaWeight.from_packed(pw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter
    words, scales, zeros = mw.words.to(dev), pw.scales.to(dev), pw.zeros.to(dev)
    out = torch.full((E, N, K), float("nan"), dtype=torch.float32, device=dev)
    w4_mma_dequant.dequantize_mma_words(words, scales, out, 0, E, mxfp4=False, zeros=zeros, group_size=g)
    want = torch.stack([pw.dequantize_expert(e, torch.float32) for e in range(E)])
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))
    with pytest.raises(ValueError, match="order 'words' needs groups of >= 16"):
        w4_mma_dequant.dequantize_mma_words(words, scales, out, 0, E, mxfp4=False, zeros=zeros, group_size=g,
                                            order="words")


def test_unsupported_reasons():
    gen = torch.Generator().manual_seed(0)
    ws = [random_int4(32, 256, 128, True, False, gen) for _ in range(2)]
    pw = _packed(ws, 128, True, False, "cpu")
    pw = dataclasses.replace(pw, scales=pw.scales.to(torch.bfloat16))
    assert mma_unsupported_reason(pw, torch.bfloat16) is None
    assert "fp16" in mma_unsupported_reason(pw, torch.float32)
    assert "scales are" in mma_unsupported_reason(pw, torch.float16)
    ao = _packed([random_int4(32, 256, 128, True, True, gen) for _ in range(2)], 128, True, True, "cpu")
    assert "act-order" in mma_unsupported_reason(dataclasses.replace(ao, scales=ao.scales.bfloat16()), torch.bfloat16)


def _ids(rows, top_k, E, seed):
    """Routing with an expert of many pairs (several blocks), one of none, the last one, and -1 pairs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E, (rows, top_k), generator=gen).to(torch.int32)
    flat = ids.view(-1)
    flat[: min(20, flat.numel() // 2)] = 0  # several blocks of 8 / 16, one of 32
    flat[flat == 1] = 2  # expert 1: no pair
    flat[-2] = E - 1
    flat[-1] = -1
    return ids


def _case(rows, top_k, E, N, K, group, has_zeros, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = [random_int4(N, K, group, has_zeros, False, gen) for _ in range(E)]
    pw = _packed(ws, group, has_zeros, False, "cuda")
    pw = dataclasses.replace(pw, scales=pw.scales.to(dtype))  # as Int4MoEMethod stores them
    a = torch.randn(rows, K, generator=gen).to(dtype=dtype, device="cuda")
    tw = torch.rand(rows, top_k, generator=gen).cuda()
    return pw, a, tw


def _run(a, mw, ids, tw, top_k, mode, split, weighted):
    pairs, N = ids.numel(), mw.packed.n
    out = torch.full((pairs, N), float("nan"), dtype=a.dtype, device="cuda")  # poisoned
    buf = torch.full((8 * pairs * N,), float("nan"), device="cuda")  # poisoned too
    kw = dict(top_k_in=top_k, topk_weights=tw if weighted else None, mul_routed_weight=weighted, split_k=split,
              split_buffer=buf)
    if mode == "unsorted":
        invoke_int4_mma_moe_gemm(a, mw, out, block_m=8, pair_expert_ids=ids.reshape(-1).contiguous(), **kw)
    else:
        bm = int(mode[len("sorted"):])
        al = moe_align_block_size(ids, bm, mw.packed.num_experts)
        invoke_int4_mma_moe_gemm(a, mw, out, block_m=bm, sorted_token_ids=al.sorted_token_ids,
                                 block_expert_ids=al.block_expert_ids,
                                 num_tokens_post_padded=al.num_tokens_post_padded, **kw)
    return out


# (rows, top_k, E, N, K, group, has_zeros, mode, split, weighted)
CASES = [
    (3, 2, 8, 128, 256, 128, True, "unsorted", 1, True),
    (3, 2, 8, 128, 512, 128, False, "unsorted", 2, False),
    (16, 4, 8, 256, 512, 128, True, "sorted8", 1, True),  # expert 0: 20 pairs, three blocks of 8
    (16, 4, 8, 384, 768, 64, False, "sorted16", 3, False),  # group 64, 3 stages of 256 over 3 splits
    (9, 2, 5, 80, 384, 32, True, "sorted8", 2, True),  # N = 80: a CTA with 5 of 8 row tiles; stage 128, group 32
    (7, 2, 4, 64, 1024, 512, True, "sorted16", 2, False),  # a group of two stages; split 2 starts mid-group
    (7, 2, 4, 64, 1024, 512, True, "sorted16", 4, True),
    (5, 2, 4, 32, 1024, 256, True, "unsorted", 4, True),  # group = stage
    (64, 8, 16, 256, 1024, 128, True, "sorted16", 1, True),
    (64, 8, 16, 256, 2048, 128, False, "sorted8", 8, False),  # one 256-wide stage per split
    (40, 4, 8, 256, 512, 128, True, "sorted32", 1, True),  # expert 0: 20 pairs in one block
    (96, 4, 4, 128, 1024, 64, True, "sorted64", 2, False),  # ~96 pairs per expert: two blocks of 64
    (96, 4, 8, 384, 384, 32, False, "sorted64", 1, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,top_k,E,N,K,group,has_zeros,mode,split,weighted", CASES)
def test_mma_matches_dequantized_reference(rows, top_k, E, N, K, group, has_zeros, mode, split, weighted, dtype):
    pw, a, tw = _case(rows, top_k, E, N, K, group, has_zeros, dtype, rows * 31 + K + N)
    mw = Int4MmaWeight.from_packed(pw)
    ids = _ids(rows, top_k, E, rows + K).cuda()
    out = _run(a, mw, ids, tw, top_k, mode, split, weighted)
    ref = int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k, topk_weights=tw, mul_routed_weight=weighted)
    routed = ids.reshape(-1) >= 0
    assert_close(out[routed].float(), ref[routed], dtype)
    if split > 1:  # every row written: pairs with no local expert are zeros
        assert torch.equal(out[~routed].float(), torch.zeros_like(ref[~routed]))
    else:  # left untouched
        assert torch.isnan(out[~routed].float()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("mode,split", [("sorted32", 1), ("sorted64", 1), ("sorted64", 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_blocks_ending_in_padding(mode, split, dtype):
    """Sorted 32- / 64-row blocks whose real rows fill a quarter, a half or all of their n8 token tiles
    (``PADDING_COUNTS``): every routed row equals the reference, whichever token tiles the build computes."""
    E, N, K, group = len(PADDING_COUNTS), 256, 512, 128
    ids = counted_ids(seed=len(mode) + split).cuda()
    pw, a, tw = _case(ids.shape[0], 1, E, N, K, group, True, dtype, 5)
    out = _run(a, Int4MmaWeight.from_packed(pw), ids, tw, 1, mode, split, True)
    ref = int4_moe_gemm_reference(a, pw, ids, top_k_in=1, topk_weights=tw, mul_routed_weight=True)
    assert_close(out.float(), ref, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("mode,split", [("unsorted", 1), ("sorted8", 2), ("sorted16", 1)])
def test_mma_exact_on_exact_data(mode, split):
    """Integer activations and power-of-two scales: every product and sum is exact in fp32, so the output must
    equal the reference rounded once to bf16, bit for bit."""
    rows, top_k, E, N, K, group = 12, 4, 8, 128, 512, 128
    gen = torch.Generator().manual_seed(3)
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    for w in ws:
        w.scales = (2.0 ** -torch.randint(2, 6, w.scales.shape, generator=gen)).half()
    pw = _packed(ws, group, True, False, "cuda")
    pw = dataclasses.replace(pw, scales=pw.scales.to(torch.bfloat16))
    a = torch.randint(-4, 5, (rows, K), generator=gen).to(torch.bfloat16).cuda()
    ids = _ids(rows, top_k, E, 5).cuda()
    out = _run(a, Int4MmaWeight.from_packed(pw), ids, None, top_k, mode, split, False)
    ref = int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k)
    routed = ids.reshape(-1) >= 0
    assert torch.equal(out[routed], ref[routed].to(torch.bfloat16))


@pytest.mark.cuda
def test_mma_epilogues_and_graph_replay():
    """The split reduction's activation and top-k sum epilogues; a CUDA-graph replay after the inputs change
    in place equals a fresh eager call."""
    from vllm.model_executor.layers.fused_moe.config import MoEActivation
    from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation

    rows, top_k, E, N, K = 6, 2, 8, 256, 512
    pw, a, tw = _case(rows, top_k, E, N, K, 128, True, torch.bfloat16, 11)
    mw = Int4MmaWeight.from_packed(pw)
    ids = torch.randint(0, E, (rows, top_k), dtype=torch.int32).cuda()
    pair_ids = ids.reshape(-1).contiguous()
    plain = torch.empty(rows * top_k, N, dtype=torch.bfloat16, device="cuda")
    invoke_int4_mma_moe_gemm(a, mw, plain, top_k_in=top_k, block_m=8, pair_expert_ids=pair_ids, split_k=2)
    act = torch.empty(rows * top_k, N // 2, dtype=torch.bfloat16, device="cuda")
    invoke_int4_mma_moe_gemm(a, mw, act, top_k_in=top_k, block_m=8, pair_expert_ids=pair_ids, split_k=2,
                             epilogue_activation=MoEActivation.SILU)
    want = torch.empty_like(act)
    moe_activation(MoEActivation.SILU, plain, out=want)
    assert_close(act.float(), want.float(), torch.bfloat16)
    summed = torch.empty(rows, N, dtype=torch.bfloat16, device="cuda")
    invoke_int4_mma_moe_gemm(a, mw, summed, top_k_in=top_k, block_m=8, pair_expert_ids=pair_ids, split_k=2,
                             epilogue_top_k=top_k)
    assert_close(summed.float(), plain.float().view(rows, top_k, N).sum(1), torch.bfloat16)

    out = torch.empty_like(plain)
    run = lambda: invoke_int4_mma_moe_gemm(a, mw, out, top_k_in=top_k, block_m=8,  # noqa: E731
                                           pair_expert_ids=pair_ids, split_k=2)
    run()  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    a.copy_(torch.randn_like(a))
    pair_ids.copy_(torch.randint(0, E, pair_ids.shape, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.empty_like(out)
    invoke_int4_mma_moe_gemm(a, mw, fresh, top_k_in=top_k, block_m=8, pair_expert_ids=pair_ids, split_k=2)
    assert torch.equal(out, fresh)


def test_block_m_or_dequant(monkeypatch):
    """The tensor-core launchers' choice between their blocks and the dequant path (MarlinExperts, MXFP4 experts)."""
    from vllm.model_executor.layers.fused_moe.experts import dequant_path
    from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import block_m_or_dequant

    asked = []
    takes = lambda: asked.append(1) or True  # noqa: E731
    assert block_m_or_dequant(32, 8, False, takes) == 8 and not asked  # few rows: the kernel, no question
    assert block_m_or_dequant(1536, 8, False, takes) == 64 and not asked  # 192 rows per expert: 64-row blocks
    assert block_m_or_dequant(24576, 128, False, takes) == 64 and not asked  # Mixtral 768 / Qwen3 3072 tokens
    assert block_m_or_dequant(2048, 8, False, takes) is None and asked  # 256 rows per expert: the dequant path
    assert block_m_or_dequant(4096, 8, False, lambda: False) == 64  # ... unless it refuses (graph capture)
    monkeypatch.setattr(dequant_path, "FORCE_PATH", "dequant")
    assert block_m_or_dequant(32, 8, False, takes) is None
