"""The token path's variants of the dense LoRA op: the prefetch kernel (``LoRALinearTileConfig.token_kernel
= 1``) and the split-K shrink + expand (``token_kernel = 2``).

Against the float64 loop reference and against today's token kernel (``token_kernel = 0``), random data;
rows and columns the op must not change (tokens without an adapter, on a disabled or out-of-range slot,
columns outside and between the slices) must come back bit for bit, and the split-K scratch is poisoned
with NaN (the expand may read only partials the shrink wrote).  The sm_90
compile (no GPU needed) checks the reason the variants exist: no spills, two dependent round trips per kernel.
"""
import dataclasses

import pytest
import torch

from benchmarks.kernels.sass_round_trips import round_trips
from tests.lora.test_lora_linear_ops import _expected, make_case
from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.triton_ops import lora_linear as op
from vllm.lora.ops.triton_ops import lora_linear_sorted_split as sorted_split
from vllm.lora.ops.triton_ops.lora_linear import (add_lora_linear, lora_linear_config, split_variant_config,
                                                  token_variant_config)

KERNELS = [1, 2]


def _variant(x, a, b, kernel: int = 1, **tiles) -> LoRALinearTileConfig:
    make = token_variant_config if kernel == 1 else split_variant_config
    cfg = make(x.shape[0], x.shape[1], max(t.shape[1] for t in b), a[0].shape[1], len(a), x.dtype)
    assert cfg.token_path and cfg.token_kernel == kernel
    return dataclasses.replace(cfg, **tiles)


# (tokens, K, slice widths, L, R, mapping mode, one buffer, tiles): K not a multiple of BLOCK_K (several K tiles),
# slices narrower than others (programs past their end), odd and large ranks, separate slice tensors
CASES = [
    (1, 48, [40], 1, 16, "one", True, dict(block_n=16, block_k=32)),
    (3, 40, [32, 16, 8], 3, 8, "mixed", True, dict(block_n=16, block_k=16)),
    (5, 72, [24, 24], 2, 5, "mixed", False, dict(block_n=8, block_k=64)),
    (2, 32, [16, 8, 8], 2, 64, "mixed", True, dict(block_n=8, block_k=16)),
    (7, 64, [32], 4, 16, "mixed", True, dict()),
    (4, 32, [16], 2, 8, "none", True, dict()),
]


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """The split-K partials start as NaN: an expand that read an entry the shrink did not write fails."""
    monkeypatch.setattr(op, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K,widths,L,R,mode,one_buffer,tiles", CASES)
def test_variant_matches_reference(T, K, widths, L, R, mode, one_buffer, tiles, dtype, kernel, device):
    x, a, b, y, offsets, mapping = make_case(T, K, widths, L, R, mode, one_buffer, dtype, device, seed=T + K)
    want = _expected(x, a, b, y, offsets, mapping)
    add_lora_linear(y, x, a, b, mapping, output_offsets=offsets, config=_variant(x, a, b, kernel, **tiles))
    assert_close(y.float().cpu(), want.float(), dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_leaves_other_rows_and_columns_alone(dtype, kernel, device):
    """Every slot kind: enabled, disabled, -1 and >= max_loras (whose enabled entry, past the L slots, is 1);
    columns before, between and after the slices.  y is accumulated into, so it holds finite random values
    (NaN poison would survive an added delta) that must come back bit for bit."""
    T, K, widths, L, R = 12, 40, [16, 8, 8], 4, 8
    x, a, b, _, _, _ = make_case(T, K, widths, L, R, "mixed", True, dtype, device, seed=5)
    offsets = [2, 20, 30]  # columns 0-1, 18-19, 28-29, 38-39 belong to no slice
    y = torch.randn(T, 40, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    mapping = torch.tensor([0, 1, 2, 3, -1, 4, 7, 0, 2, -1, 1, 3], dtype=torch.int32, device=device)
    # slot 1 disabled; the entry before slot 0 (what slot -1 would read) is 1 too
    enabled = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.int32, device=device)[1:]
    writes = ((mapping >= 0) & (mapping < L)).cpu()
    writes &= torch.tensor([m in (0, 2, 3) for m in mapping.tolist()])
    cols = torch.zeros(40, dtype=torch.bool)
    for o, n in zip(offsets, widths):
        cols[o:o + n] = True
    y0 = y.clone()
    want = _expected(x, a, b, y, offsets, mapping, enabled.cpu()[:L])
    add_lora_linear(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets,
                    config=_variant(x, a, b, kernel, block_n=8, block_k=16))
    y, y0 = y.cpu(), y0.cpu()
    assert torch.equal(_bits(y[~writes]), _bits(y0[~writes]))
    assert torch.equal(_bits(y[:, ~cols]), _bits(y0[:, ~cols]))
    assert not torch.equal(y[writes][:, cols], y0[writes][:, cols])
    assert_close(y[writes][:, cols].float(), want[writes][:, cols].float(), dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variant_equals_todays_kernel(dtype, kernel, device):
    """Both token kernels at their own default tiles on a q/k/v-like launch, within the dtype's rounding of y."""
    x, a, b, y, offsets, mapping = make_case(6, 96, [64, 16, 16], 3, 16, "mixed", True, dtype, device, seed=9)
    y_old, y_new = y.clone(), y.clone()
    old = op.kernel0_config(6, 96, 64, 16, 3, dtype)
    add_lora_linear(y_old, x, a, b, mapping, output_offsets=offsets, config=old)
    add_lora_linear(y_new, x, a, b, mapping, output_offsets=offsets, config=_variant(x, a, b, kernel, block_k=32))
    assert not torch.equal(y_old, y)  # the delta is not zero
    assert_close(y_new.float().cpu(), y_old.float().cpu(), dtype)


def test_token_kernel_key_and_default(monkeypatch):
    monkeypatch.setattr(op, "triton_interpreting", lambda: False)  # the GPU heuristic's tiles
    cfg = LoRALinearTileConfig.from_json({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 2048, "token_path": True,
                                          "TOKEN_KERNEL": 1})
    assert cfg.token_kernel == 1 and cfg.to_json()["TOKEN_KERNEL"] == 1
    assert LoRALinearTileConfig(block_m=16, block_n=64, block_k=64).token_kernel == 0  # today's kernel by default
    assert op.TOKEN_KERNEL is None  # by shape (the H200 A/B): prefetch while A spans <= 2 K tiles, else split-K
    assert lora_linear_config(1, 2048, 4096, 16, 3, torch.bfloat16).token_kernel == 1  # qkv, rank 16 / 32
    assert lora_linear_config(1, 2048, 4096, 32, 3, torch.bfloat16).token_kernel == 1
    assert lora_linear_config(1, 4096, 2048, 16, 1, torch.bfloat16).token_kernel == 1  # o: 2 tiles at rank 16
    assert lora_linear_config(1, 4096, 2048, 32, 1, torch.bfloat16).token_kernel == 2  # 4 tiles at rank 32
    # rank 64 (H200 A/B): split-K (the prefetch kernel's A spans 4 K tiles), the sorted path from 37.7M
    assert lora_linear_config(1, 2048, 4096, 64, 3, torch.bfloat16).token_kernel == 2
    assert lora_linear_config(16, 4096, 2048, 64, 1, torch.bfloat16).token_kernel == 2
    assert lora_linear_config(32, 2048, 4096, 64, 3, torch.bfloat16).token_path is False
    assert lora_linear_config(1, 2048, 4096, 128, 3, torch.bfloat16).token_kernel == 0  # rank 128: not timed
    assert op.auto_token_kernel(1, 2048, 32) == 1 and op.auto_token_kernel(1, 4096, 32) == 2
    # above 16 tokens, without the sorted split pair (on by default for 17-512 tokens): the token path while
    # T * R * S * (K + N) <= 20M, split-K above 32 tokens
    monkeypatch.setattr(sorted_split, "SORTED_SPLIT", False)
    assert lora_linear_config(32, 2048, 4096, 16, 3, torch.bfloat16).token_kernel == 1
    assert lora_linear_config(64, 2048, 4096, 16, 3, torch.bfloat16).token_kernel == 2  # 18.9M
    assert lora_linear_config(128, 2048, 4096, 16, 3, torch.bfloat16).token_path is False  # 37.7M: sorted
    assert lora_linear_config(128, 4096, 2048, 16, 1, torch.bfloat16).token_kernel == 2  # o: 12.6M
    assert lora_linear_config(128, 4096, 2048, 32, 1, torch.bfloat16).token_path is False  # 25.2M
    split = lora_linear_config(64, 4096, 2048, 16, 1, torch.bfloat16)
    assert split.block_k == 1024 and lora_linear_config(8, 4096, 2048, 32, 1, torch.bfloat16).block_k == 256
    assert op.kernel0_config(1, 2048, 4096, 16, 3, torch.bfloat16).token_kernel == 0
    x, a, b, y, offsets, mapping = make_case(2, 32, [16], 2, 8, "mixed", True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TOKEN_KERNEL=3"):
        add_lora_linear(y, x, a, b, mapping, config=dataclasses.replace(_variant(x, a, b), token_kernel=3))


@pytest.mark.parametrize("kernel", [0] + KERNELS)
def test_flipping_the_default_gives_the_variant(kernel, monkeypatch):
    monkeypatch.setattr(op, "TOKEN_KERNEL", kernel)
    assert lora_linear_config(1, 2048, 4096, 16, 3, torch.bfloat16).token_kernel == kernel
    assert lora_linear_config(256, 2048, 4096, 16, 3, torch.bfloat16).token_path is False  # sorted path unchanged
    if kernel == 0:  # today's kernel only up to SMALL_BATCH_TOKENS
        assert lora_linear_config(32, 2048, 4096, 16, 3, torch.bfloat16).token_path is False


def _sass(*lines: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/    {ln} ;" for i, ln in enumerate(lines))


def test_round_trip_model_on_hand_written_sass():
    """The static model counts chained loads, and loads held back by in-order issue (a wait on an earlier
    load, a barrier after a shared store of a loaded value, a branch on one), not independent ones."""
    independent = _sass("LDG.E R2, desc[UR4][R4.64]", "LDG.E R6, desc[UR4][R8.64]", "FADD R10, R2, R6",
                        "STG.E desc[UR4][R12.64], R10")
    chained = _sass("LDG.E R2, desc[UR4][R4.64]", "IMAD.WIDE R10, R2, 0x4, R12", "LDG.E.128 R16, desc[UR4][R10.64]",
                    "STG.E desc[UR4][R14.64], R19")
    held_by_barrier = _sass("LDG.E.64 R2, desc[UR4][R4.64]", "STS.64 [R20], R2", "BAR.SYNC.DEFER_BLOCKING 0x0",
                            "LDG.E R6, desc[UR4][R8.64]", "STG.E desc[UR4][R12.64], R6")
    held_by_branch = _sass("LDG.E R2, desc[UR4][R4.64]", "ISETP.GE.AND P0, PT, R2, RZ, PT", "@!P0 EXIT",
                           "LDG.E R6, desc[UR4][R8.64]", "LDG.E R7, desc[UR4][R10.64]", "FADD R9, R6, R7",
                           "STG.E desc[UR4][R12.64], R9")
    trace: list = []
    assert round_trips(independent) == 1
    assert round_trips(chained) == 2
    assert round_trips(held_by_barrier) == 2
    assert round_trips(held_by_branch, trace) == 2
    assert [(t, op) for _, t, op in trace] == [(0, "LDG.E"), (1, "EXIT"), (1, "LDG.E"), (1, "LDG.E"), (2, "STG.E")]


def test_variants_compile_for_hopper_in_two_round_trips():
    """sm_90, as the engine launches them (qkv and o at Qwen3-30B-A3B width, rank 16, 1 token): no spills, and
    the static model counts 2 dependent global round trips per variant kernel against more for today's."""
    out = run_without_interpreter("benchmarks/kernels/lora_linear_static_report.py", "--tokens", "1")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[1] == "1"]
    assert sorted(r[2] for r in rows) == ["0", "0", "1", "1", "2", "2"], out
    for r in rows:
        spill, trips = int(r[5]), [int(t) for t in r[9].split("+")]
        assert spill == 0, r
        assert max(trips) <= 2 if r[2] != "0" else trips[0] > 2, r


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("proj", ["qkv", "o"])
def test_variant_realistic_sizes_in_a_cuda_graph(proj, T, dtype, kernel, device):
    """Qwen3-30B-A3B-like q/k/v (K 2048; 4096, 512, 512) and o (K 4096; 2048), rank 16, 4 slots, at the
    variant's default tiles: captured in a CUDA graph, replayed after the mapping changes in place."""
    K, widths = (2048, [4096, 512, 512]) if proj == "qkv" else (4096, [2048])
    x, a, b, y, offsets, mapping = make_case(T, K, widths, 4, 16, "mixed", True, dtype, device, seed=T)
    enabled = torch.tensor([1, 1, 0, 1, 1], dtype=torch.int32, device=device)
    cfg = _variant(x, a, b, kernel)
    y0 = y.clone()
    add_lora_linear(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets, config=cfg)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora_linear(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets, config=cfg)
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        mapping.copy_(torch.randint(-1, 4, (T,), generator=gen, dtype=torch.int32))
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        want = _expected(x, a, b, y0, offsets, mapping, enabled.cpu()[:4])
        assert_close(y.float().cpu(), want.float(), dtype)
