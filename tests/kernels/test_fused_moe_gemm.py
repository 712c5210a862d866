"""The grouped expert GEMM against its fp32 torch reference.

CPU runs go through the Triton interpreter (small shapes, few programs); the
``cuda`` tests use realistic shapes.  ``out`` is poisoned first: every routed
pair must be written, every dropped pair (expert -1) must stay untouched.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (
    fused_moe_gemm_reference,
    get_fused_moe_config,
    invoke_fused_moe_gemm,
)
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (
    align_for_experts,
    moe_align_block_size,
    pairwise_alignment,
    use_pairwise_alignment,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bounds_for(dtype: torch.dtype, device: torch.device):
    # fp32 on a GPU: Triton's default fp32 dot is tf32 (10-bit mantissa, like
    # fp16's), so it gets the fp16 bounds; everything else uses the defaults.
    if dtype == torch.float32 and device.type == "cuda":
        return dict(dtype=torch.float16)
    return dict(dtype=dtype)


def run_case(
    M: int, E: int, top_k: int, N: int, K: int, dtype: torch.dtype, device: torch.device, *,
    per_pair_input: bool, use_bias: bool, mul_routed_weight: bool,
    config: Optional[TileConfig] = None, out_pad: int = 0, topk_ids: Optional[torch.Tensor] = None,
    every_expert: bool = False, pairwise: bool = False,
) -> None:
    """Build a random problem, run the op, compare with the reference.

    per_pair_input: GEMM2-style (a is [M * top_k, K], top_k_in = 1) instead of
    GEMM1-style (a is [M, K], top_k_in = top_k).  out_pad: extra columns in
    the buffer ``out`` is a view of (row stride N + out_pad).  Routing: every
    expert gets pairs (``every_expert``, as far as M * top_k allows), or all
    but one drawn at random.
    """
    ids = make_topk_ids(M, E, top_k, empty_expert=not every_expert) if topk_ids is None else topk_ids
    ids = ids.to(device)
    num_pairs = M * top_k
    top_k_in = 1 if per_pair_input else top_k
    a = torch.randn(num_pairs if per_pair_input else M, K, device=device).to(dtype)
    w = (torch.randn(E, N, K, device=device) / K**0.5).to(dtype)
    bias = torch.randn(E, N, device=device).to(dtype) if use_bias else None
    topk_weights = torch.rand(M, top_k, device=device) * 0.9 + 0.1

    if config is None:
        config = get_fused_moe_config(num_pairs, E, N, K, top_k, dtype)
    al = (pairwise_alignment(ids, config.block_size_m) if pairwise
          else moe_align_block_size(ids, config.block_size_m, E))
    out_buf = poison_(torch.empty(num_pairs, N + out_pad, dtype=dtype, device=device))
    out = out_buf[:, :N]
    invoke_fused_moe_gemm(
        a, w, out,
        sorted_token_ids=al.sorted_token_ids,
        block_expert_ids=al.block_expert_ids,
        num_tokens_post_padded=al.num_tokens_post_padded,
        top_k_in=top_k_in,
        topk_weights=topk_weights,
        mul_routed_weight=mul_routed_weight,
        bias=bias,
        config=config,
        pairwise=pairwise,
    )
    ref = fused_moe_gemm_reference(
        a, w, ids, top_k_in=top_k_in, topk_weights=topk_weights,
        mul_routed_weight=mul_routed_weight, bias=bias,
    )
    routed = ids.reshape(-1) >= 0
    assert_close(out[routed], ref[routed], **bounds_for(dtype, device))
    assert out[~routed].isnan().all(), "rows of dropped pairs must not be written"
    if out_pad:
        assert out_buf[:, N:].isnan().all(), "columns past N must not be written"


# (M, E, top_k, N, K, per_pair_input, use_bias, mul_routed_weight, out_pad, every_expert)
CASES = [
    (0, 4, 2, 48, 80, False, False, False, 0, False),
    (1, 4, 1, 48, 80, False, True, True, 0, False),
    (1, 16, 4, 80, 48, True, False, True, 8, False),
    (7, 8, 2, 48, 80, True, False, True, 0, True),
    (7, 16, 4, 80, 48, False, True, False, 16, False),
    (33, 8, 4, 80, 48, False, True, False, 0, True),
    (33, 16, 2, 48, 80, True, True, True, 0, False),
    (33, 4, 4, 48, 80, False, False, True, 8, True),  # 33 pairs per expert: BLOCK_SIZE_M 32
]


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "M{}-E{}-k{}-N{}-K{}-pp{:d}-b{:d}-w{:d}-pad{}-all{:d}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, device):
    M, E, top_k, N, K, per_pair, use_bias, mul, out_pad, every = case
    run_case(M, E, top_k, N, K, dtype, device, per_pair_input=per_pair, use_bias=use_bias,
             mul_routed_weight=mul, out_pad=out_pad, every_expert=every)


# Small tiles: several N tiles with an N tail, a K loop with and without a K
# tail, and grouped tile ordering.
SMALL_TILES = TileConfig(block_size_m=16, block_size_n=32, block_size_k=32, group_size_m=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("M,E,top_k,per_pair", [(1, 8, 2, False), (2, 32, 4, True), (2, 64, 8, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairwise_alignment_matches_reference(M, E, top_k, per_pair, dtype, device):
    """Decode among many experts: one block per pair, no sort; a dropped pair (-1) is not written."""
    assert use_pairwise_alignment(M * top_k, E)
    ids = make_topk_ids(M, E, top_k, empty_expert=True)
    ids[M - 1, top_k - 1] = -1  # another rank's expert
    run_case(M, E, top_k, 48, 80, dtype, device, per_pair_input=per_pair, use_bias=True, mul_routed_weight=True,
             topk_ids=ids, pairwise=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairwise_routing_of_more_pairs_than_experts(dtype, device):
    """Pairwise routing where experts repeat (7 pairs among 4 experts; the layer never asks for it, a caller
    may): every pair's block is launched, so every routed row is written."""
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [3, -1]], dtype=torch.int32)
    run_case(4, 4, 2, 48, 80, dtype, device, per_pair_input=True, use_bias=False, mul_routed_weight=True,
             topk_ids=ids, pairwise=True, config=SMALL_TILES)


def test_align_for_experts_picks_pairwise_only_for_few_pairs(device):
    few = make_topk_ids(2, 64, 8, empty_expert=True).to(device)  # 16 pairs, 64 experts
    many = make_topk_ids(9, 16, 4, empty_expert=True).to(device)  # 36 pairs, 16 experts
    al = align_for_experts(few, 16, 64)
    assert al.group_padded_counts is None and torch.equal(al.block_expert_ids, few.reshape(-1))
    assert al.sorted_token_ids.tolist()[::16] == list(range(16)) and int(al.num_tokens_post_padded) == 256
    again = align_for_experts(few, 16, 64)
    assert again.sorted_token_ids is al.sorted_token_ids, "made once per pair count, reused (CUDA graphs)"
    assert align_for_experts(many, 16, 16).group_padded_counts is not None


@pytest.mark.parametrize("K", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_k_loop_and_n_tiles(K, dtype, device):
    run_case(7, 4, 2, 48, K, dtype, device, per_pair_input=False, use_bias=True, mul_routed_weight=True,
             config=SMALL_TILES, every_expert=K == 64)


def test_only_one_expert_routed(device):
    """Every pair on the last expert: long runs of blocks of one expert, the others empty."""
    ids = torch.full((20, 2), 7, dtype=torch.int32)
    run_case(20, 8, 2, 48, 80, torch.float16, device, per_pair_input=False, use_bias=False,
             mul_routed_weight=True, topk_ids=ids)


def test_all_pairs_dropped_writes_nothing(device):
    ids = torch.full((5, 2), -1, dtype=torch.int32)
    run_case(5, 4, 2, 48, 80, torch.float32, device, per_pair_input=False, use_bias=True,
             mul_routed_weight=False, topk_ids=ids)


def _args(device, *, M=3, E=4, top_k=2, N=32, K=32, dtype=torch.float32, bm=16):
    ids = make_topk_ids(M, E, top_k).to(device)
    al = moe_align_block_size(ids, bm, E)
    return dict(
        a=torch.randn(M, K, device=device, dtype=dtype),
        w=torch.randn(E, N, K, device=device, dtype=dtype),
        out=torch.empty(M * top_k, N, device=device, dtype=dtype),
        sorted_token_ids=al.sorted_token_ids,
        block_expert_ids=al.block_expert_ids,
        num_tokens_post_padded=al.num_tokens_post_padded,
        top_k_in=top_k,
        config=TileConfig(16, 32, 32),
    )


def test_validation(device):
    def call(**over):
        kw = _args(device)
        kw.update(over)
        a, w, out = kw.pop("a"), kw.pop("w"), kw.pop("out")
        invoke_fused_moe_gemm(a, w, out, **kw)

    call()  # the baseline is valid
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        call(config=TileConfig(32, 32, 32))
    with pytest.raises(ValueError, match="BLOCK_SIZE_N=24: tl.dot tiles must be powers of two"):
        call(config=TileConfig(16, 24, 32))
    with pytest.raises(ValueError, match="SPLIT_K=2"):
        call(config=TileConfig(16, 32, 32, split_k=2))
    with pytest.raises(TypeError, match="TileConfig"):
        call(config=dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32))
    with pytest.raises(ValueError, match="topk_weights"):
        call(mul_routed_weight=True)
    with pytest.raises(ValueError, match="dtype"):
        call(w=torch.randn(4, 32, 32, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(5, 32, device=device))
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.randn(4, 31, device=device))
    with pytest.raises(ValueError, match="int32"):
        kw = _args(device)
        call(sorted_token_ids=kw["sorted_token_ids"].long())


def test_config_is_frozen_and_complete():
    cfg = get_fused_moe_config(64, 8, 1536, 2048, 8, torch.bfloat16)
    assert isinstance(cfg, TileConfig)
    for k, v in cfg.to_json().items():
        assert isinstance(v, int) and v >= (0 if TileConfig.JSON_KEYS[k] in TileConfig.ZERO_OK else 1), k
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size_m = -1  # the cached config cannot be changed by a caller
    assert get_fused_moe_config(64, 8, 1536, 2048, 8, torch.bfloat16).block_size_m >= 16


def test_tuned_config_file_wins(tmp_path, monkeypatch):
    from vllm.kernel_configs import clear_cache, config_file_name
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as mod

    name = config_file_name("fused_moe_gemm", {"E": 8, "N": 96, "K": 64}, mod._device_name())
    (tmp_path / name).write_text('{"1": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64}}')
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own configs
    clear_cache()
    try:
        cfg = get_fused_moe_config(2, 8, 96, 64, 2, torch.float16)
    finally:
        clear_cache()
    assert (cfg.block_size_m, cfg.block_size_n, cfg.block_size_k) == (64, 32, 64)
    heuristic = mod._gpu_config(2, 8, 96, 64, torch.float16)  # the fields the file does not name
    assert (cfg.group_size_m, cfg.num_warps, cfg.num_stages) == (
        heuristic.group_size_m, heuristic.num_warps, heuristic.num_stages)


@pytest.mark.parametrize("entry,match", [
    ({"BLOCK_SIZE_M": 64, "BLOCK_SZE_N": 32}, r"unknown key\(s\) \['BLOCK_SZE_N'\]"),
    ({"BLOCK_SIZE_N": "32"}, "BLOCK_SIZE_N='32' must be an integer"),
    ({"BLOCK_SIZE_N": 0}, "block_size_n must be a positive int"),
    ({"BLOCK_SIZE_N": 48}, "BLOCK_SIZE_N=48: tl.dot tiles must be powers of two"),
    ({"SPLIT_K": 2}, "SPLIT_K=2"),
])
def test_bad_tuned_config_file_is_an_error_naming_it(tmp_path, monkeypatch, entry, match):
    from vllm.kernel_configs import clear_cache, config_file_name
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as mod

    name = config_file_name("fused_moe_gemm", {"E": 8, "N": 96, "K": 64}, mod._device_name())
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}, "4": entry}))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_cache()
    try:
        assert get_fused_moe_config(2, 8, 96, 64, 2, torch.float16).block_size_m == 16  # entry "1": fine
        with pytest.raises(ValueError, match=match) as info:
            get_fused_moe_config(8, 8, 96, 64, 2, torch.float16)  # 4 tokens: entry "4"
    finally:
        clear_cache()
    assert name in str(info.value) and "entry 4" in str(info.value)


# ---- realistic shapes on a GPU ----

QWEN_LIKE = dict(E=64, H=2048, I=768, top_k=8)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64, 128, 300, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gemm", ["w13", "w2"])
def test_realistic_cuda(M, dtype, gemm, device):
    E, H, I, top_k = QWEN_LIKE["E"], QWEN_LIKE["H"], QWEN_LIKE["I"], QWEN_LIKE["top_k"]
    if gemm == "w13":  # per-token input, 2I outputs
        run_case(M, E, top_k, 2 * I, H, dtype, device, per_pair_input=False, use_bias=False, mul_routed_weight=False)
    else:  # per-pair input, router weight applied
        run_case(M, E, top_k, H, I, dtype, device, per_pair_input=True, use_bias=False, mul_routed_weight=True)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 37, 512])
def test_gpt_oss_shape_with_bias_cuda(M, device):
    """gpt-oss-20b widths: K = 2880 is no multiple of 128 (K-tail path), biases on."""
    run_case(M, 32, 4, 5760, 2880, torch.bfloat16, device, per_pair_input=False, use_bias=True,
             mul_routed_weight=False)
    run_case(M, 32, 4, 2880, 2880, torch.bfloat16, device, per_pair_input=True, use_bias=True,
             mul_routed_weight=True)


@pytest.mark.cuda
def test_expert_offsets_past_int32_cuda(device):
    """E * N * K > 2**31 elements: the last experts' weights need 64-bit offsets."""
    E, N, K, M, top_k = 136, 5760, 2816, 40, 2
    assert E * N * K > 2**31
    ids = torch.randint(E - 8, E, (M, top_k), dtype=torch.int32)
    run_case(M, E, top_k, N, K, torch.bfloat16, device, per_pair_input=False, use_bias=False,
             mul_routed_weight=False, topk_ids=ids)
