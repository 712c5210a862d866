"""UNPACK 3 of the int4 tl.dot kernel at 4-64 rows per expert (issue 13): the heuristic gives it (behind
``UNPACK_DECODE_TILES``) only with stages whose shared memory fits an H100 / H200 block (``int4_dot_smem.py``,
its bound checked against the sm_90 compile), and those configs compute the right numbers."""
import dataclasses

import pytest
import torch

from benchmarks.kernels.benchmark_moe_int4 import QUICK_TOKENS, SHAPES, TOKENS
from benchmarks.kernels.benchmark_moe_lora import SHAPES as LAYER_SHAPES
from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from tests.utils import run_without_interpreter
from vllm.model_executor.layers.fused_moe.ops import int4_dot_smem as smem
from vllm.model_executor.layers.fused_moe.ops import int4_moe_gemm as mod
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


@pytest.fixture
def gpu_heuristic(monkeypatch):
    """The GPU heuristic (not the interpreter's few big tiles) with UNPACK 3 on."""
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    monkeypatch.setattr(mod, "UNPACK_DECODE_TILES", True)
    return monkeypatch


def _configs(dtype, group):
    """Every dot-kernel config the int4 benchmark's shapes and token counts give (both GEMMs)."""
    for key in SHAPES:
        _, H, I, E, k = LAYER_SHAPES[key]
        for M in sorted(set(TOKENS) | set(QUICK_TOKENS) | {16, 64}):
            pairs = M * k
            srt = not mod.use_unsorted_int4_gemm(pairs, E)
            for N, K in ((2 * I, H), (H, I)):
                yield key, M, mod._heuristic_config(pairs, E, N, K, group, dtype, srt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, 32])
def test_heuristic_unpack3_never_exceeds_shared_memory(gpu_heuristic, dtype, group):
    chosen = []
    for key, M, cfg in _configs(dtype, group):
        if cfg.unpack == 3:
            need = smem.unpack3_shared_bytes(cfg.block_size_m, cfg.block_size_n, cfg.block_size_k, cfg.num_stages)
            assert need <= smem.SM90_SHARED_LIMIT, f"{key} {M} tokens: {cfg} needs {need} B"
            assert cfg.split_k == 1 and cfg.num_stages >= 2 and group % cfg.block_size_k == 0
            chosen.append((key, M))
    if group == 128:  # the 16-row decode tiles take it: Qwen3 at 64, Mixtral at 16 (32-row ones take 4)
        assert {("qwen3", 64), ("mixtral", 16)} <= set(chosen), chosen
    else:
        assert not chosen  # a 128-wide K-tile spans 4 groups of 32: UNPACK 0


def test_unpack3_is_on_by_default_at_decode_tiles(monkeypatch):
    """On since the H200 A/B (benchmark_moe_int4.py --sweep-variants-only: 1.16-1.46x at Qwen3 64 tokens and
    Mixtral 16 / 64 tokens); the interpreter keeps its own few big tiles, UNPACK 0."""
    assert mod.UNPACK_DECODE_TILES is True
    monkeypatch.setattr(mod, "triton_interpreting", lambda: True)  # (on a GPU too: this test is not cuda-marked)
    assert all(cfg.unpack == 0 for _, _, cfg in _configs(torch.bfloat16, 128))  # interpreter tiles
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    for dtype in (torch.bfloat16, torch.float16):
        chosen = {(key, M) for key, M, cfg in _configs(dtype, 128) if cfg.unpack == 3}
        assert {("qwen3", 64), ("mixtral", 16)} <= chosen, chosen


def test_swapped_operands_on_32_row_decode_tiles(monkeypatch):
    """UNPACK 5 (the operands swapped, int32 words, tf32 dots, pipelined) on the unsplit decode tiles of 32+
    rows since the H200 A/B (eleventh session: Qwen3 256 tokens, Mixtral 64 tokens); 16-row tiles keep 3; 4
    (the same, unpipelined) is the switch's other value."""
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    for dtype in (torch.bfloat16, torch.float16):
        swapped = {(key, M) for key, M, cfg in _configs(dtype, 128) if cfg.unpack == 5}
        assert {("qwen3", 256), ("mixtral", 64)} <= swapped, swapped
        for key, M, cfg in _configs(dtype, 128):
            if cfg.unpack == 5:
                assert cfg.block_size_m >= mod.SWAP_MIN_BLOCK_M and cfg.num_stages == 3 and cfg.split_k == 1
            elif cfg.unpack == 3:
                assert cfg.block_size_m < mod.SWAP_MIN_BLOCK_M
    monkeypatch.setattr(mod, "DECODE_UNPACK", 4)
    assert all(cfg.num_stages == 1 for _, _, cfg in _configs(torch.bfloat16, 128) if cfg.unpack == 4)
    assert any(cfg.unpack == 4 for _, _, cfg in _configs(torch.bfloat16, 128))
    monkeypatch.setattr(mod, "DECODE_UNPACK", 3)  # the switch: 3 on those tiles too
    assert not any(cfg.unpack >= 4 for _, _, cfg in _configs(torch.bfloat16, 128))


def test_bound_matches_the_compiled_figures_it_was_read_from():
    # sm_90, Triton 3.6, bf16 and fp16 alike (tests/kernels/int4_dot_smem_compile.py compiles them)
    assert smem.unpack3_shared_bytes(16, 128, 128, 4) == 32768
    assert smem.unpack3_shared_bytes(16, 128, 128, 2) == 16384
    assert smem.unpack3_shared_bytes(32, 128, 128, 4) == 40960
    assert smem.unpack3_shared_bytes(32, 128, 256, 4) == 65536


def test_heuristic_lowers_stages_then_gives_up(gpu_heuristic):
    real = smem.unpack3_stages_that_fit
    # Mixtral w13 at 16 tokens: 16x128x128, 4 stages (32768 B); 3 stages take 24576 B, 2 stages 16384 B
    for limit, unpack, stages in ((40000, 3, 4), (30000, 3, 3), (20000, 3, 2), (10000, 0, 4)):
        gpu_heuristic.setattr(mod, "unpack3_stages_that_fit",
                              lambda bm, bn, bk, st, lim=limit: real(bm, bn, bk, st, lim))
        cfg = mod.get_int4_moe_config(32, 8, 28672, 4096, 128, torch.bfloat16)
        assert (cfg.block_size_m, cfg.block_size_n, cfg.block_size_k) == (16, 128, 128)
        assert (cfg.unpack, cfg.num_stages) == (unpack, stages), limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows_per_expert,has_zeros", [(4, True), (16, False)])
def test_unpack3_configs_match_fp32_reference(gpu_heuristic, dtype, rows_per_expert, has_zeros, device):
    """The heuristic's UNPACK 3 / 4 config (tiles cut to a small layer; fp32 keeps 16-bit's BLOCK_SIZE_K 128) on
    random weights, 4 or 16 rows per expert, against the fp32 reference on the dequantised weights."""
    E, top_k, N, K, group = 4, 2, 96, 256, 128
    gen = torch.Generator().manual_seed(rows_per_expert + (dtype == torch.float16))
    ws = [random_int4(N, K, group, has_zeros, False, gen) for _ in range(E)]
    pw = _packed(ws, group, has_zeros, False, device)
    M = rows_per_expert * E // top_k
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to(device, torch.int32)
    a = torch.randn(M, K, generator=gen).to(device, dtype)
    cfg = mod.get_int4_moe_config(M * top_k, E, N, K, group, torch.float16)
    unpack = 3 if rows_per_expert <= 8 else 5  # 16 rows: 32-row tiles, the operands swapped
    assert cfg.unpack == unpack and cfg.split_k == 1 and cfg.block_size_k == 128 and not cfg.gemv
    cfg = dataclasses.replace(cfg, block_size_n=64)  # 96 columns: two tiles, the second with an N tail
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    out = torch.full((M * top_k, N), float("nan"), dtype=dtype, device=device)
    tw = torch.rand(M, top_k, generator=gen).to(device)
    mod.invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, config=cfg, sorted_token_ids=al.sorted_token_ids,
                             block_expert_ids=al.block_expert_ids, num_tokens_post_padded=al.num_tokens_post_padded,
                             topk_weights=tw, mul_routed_weight=True)
    ref = mod.int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k, topk_weights=tw, mul_routed_weight=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"UNPACK {cfg.unpack} {cfg}: normalised max error {err:.2e}"


def test_bound_holds_for_the_sm90_compile():
    """The kernel compiled for sm_90 at the heuristic's UNPACK 3 tiles and others, 2-4 stages, bf16 and fp16:
    its shared memory never exceeds the bound (exact where the docstring says)."""
    assert run_without_interpreter("tests/kernels/int4_dot_smem_compile.py").count("ok ") == 24


def test_bound_holds_through_the_jit_binder():
    """The GPU tests' UNPACK 3 cases (1 token unsorted, split or not; 4 / 16 rows per expert), fp16 and bf16,
    2-4 stages, compiled for sm_90 by Triton's own JIT (arguments specialised as on a GPU; stub driver)."""
    assert run_without_interpreter("tests/kernels/int4_unpack3_jit_compile.py").count("ok ") == 24


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stages", [4, 3, 2])
@pytest.mark.parametrize("M,top_k", [(16, 2), (64, 2), (1, 8)])
def test_unpack3_on_gpu_fits_and_is_right(M, top_k, stages, dtype, monkeypatch):
    """On the GPU, the JIT's own compile: 4 and 16 rows per expert (the heuristic's 16x128x128 / 32x128x128
    UNPACK 3 tiles) and one unsorted token (where an H200 once reported 262144 B in fp16, not reproduced by
    the sm_90 compile here), each stage count: shared memory within the bound, numbers against fp32."""
    from tests.utils import assert_close
    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import _int4_moe_gemm_kernel as kern

    monkeypatch.setattr(mod, "UNPACK_DECODE_TILES", True)
    gen = torch.Generator().manual_seed(M + stages)
    E, N, K, group = (8 if top_k == 2 else 32), 1536, 2048, 128
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    pw = _packed(ws, group, True, False, "cuda")
    a = torch.randn(M, K, generator=gen).to("cuda", dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)]).to("cuda", torch.int32)
    unsorted = mod.use_unsorted_int4_gemm(M * top_k, E)
    cfg = mod.get_int4_moe_config(M * top_k, E, N, K, group, dtype, sorted_pairs=not unsorted, gemv=False)
    cfg = dataclasses.replace(cfg, unpack=3, split_k=1, num_stages=stages)
    if unsorted:
        route = dict(pair_expert_ids=ids.reshape(-1).contiguous())
    else:
        al = moe_align_block_size(ids, cfg.block_size_m, E)
        route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                     num_tokens_post_padded=al.num_tokens_post_padded)
    from triton.runtime import driver

    cache = kern.device_caches[driver.active.get_current_device()][0]  # the JIT's compiled kernels (Triton 3.6)
    cache.clear()  # so that the one entry after the launch is this config's
    out = torch.full((M * top_k, N), float("nan"), dtype=dtype, device="cuda")
    mod.invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, config=cfg, **route)
    (compiled,) = cache.values()
    bound = smem.unpack3_shared_bytes(cfg.block_size_m, cfg.block_size_n, cfg.block_size_k, stages)
    assert compiled.metadata.shared <= bound, f"{cfg}: the JIT's kernel takes {compiled.metadata.shared} B > {bound}"
    assert_close(out.float(), mod.int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k), dtype)


def test_wide_swapped_tiles_at_64_and_128_rows(monkeypatch):
    """The 64- / 128-row tiers take WIDE_SWAP_TILES when unsplit with one group per 128-wide K-tile (H200,
    twelfth session: 1.9-2.6x per GEMM over their UNPACK 0 tiles); groups of 32 and fp32 keep UNPACK 0."""
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    got = {(key, M): cfg for key, M, cfg in _configs(torch.bfloat16, 128) if cfg.block_size_m >= 64}
    assert {("mixtral", 256), ("qwen3", 1024), ("mixtral", 1024), ("qwen3", 4096)} <= set(got), sorted(got)
    for (key, M), cfg in got.items():
        bn, bk, warps, unpack, stages = mod.WIDE_SWAP_TILES[cfg.block_size_m]
        assert (cfg.block_size_n, cfg.block_size_k, cfg.num_warps, cfg.unpack, cfg.num_stages, cfg.split_k) == \
            (bn, bk, warps, unpack, stages, 1), (key, M, cfg)
    assert got[("mixtral", 256)].unpack == 5 and got[("mixtral", 1024)].unpack == 4
    for key, M, cfg in _configs(torch.bfloat16, 32):
        assert cfg.unpack == 0, (key, M, cfg)
    for key, M, cfg in _configs(torch.float32, 128):
        assert cfg.block_size_m < 64 or cfg.unpack == 0, (key, M, cfg)
