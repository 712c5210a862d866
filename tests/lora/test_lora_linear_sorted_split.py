"""The dense LoRA op's sorted path as a split-K shrink + expand (``LoRALinearTileConfig.sorted_split``,
``lora_linear_sorted_split.py``).

Against the float64 loop reference and against ``lora_linear_sorted_kernel``, random data; rows and columns the
op must not change (tokens without an adapter, on a disabled or out-of-range slot; columns outside and between
the slices) come back bit for bit; the partials' scratch is poisoned with NaN (the expand may read only the
blocks the shrink wrote).  The sm_90 compile (no GPU needed) checks both kernels' resources.
"""
import dataclasses

import pytest
import torch

from tests.lora.test_lora_linear_ops import _expected, make_case
from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.triton_ops import lora_linear as op
from vllm.lora.ops.triton_ops import lora_linear_sorted_split as split
from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, kernel0_config, lora_linear_config


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """The partials start as NaN: an expand that read a block the shrink did not write fails."""
    monkeypatch.setattr(op, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device))


def _cfg(x, b, **tiles) -> LoRALinearTileConfig:
    cfg = split.sorted_split_config(x.shape[0], x.shape[1], max(t.shape[1] for t in b), 16, x.dtype)
    assert cfg.sorted_split and not cfg.token_path
    return dataclasses.replace(cfg, **tiles)


# (tokens, K, slice widths, L, R, mapping mode, one buffer, tiles): several K chunks (K not a multiple of
# BLOCK_K), several N tiles, slots of several blocks, separate slice tensors (one launch per slice), odd ranks;
# tiles of at least 16 (a GPU dot's smallest)
CASES = [
    (20, 48, [40], 2, 16, "mixed", True, dict(block_k=16, block_n=16)),
    (37, 72, [32, 16, 8], 3, 8, "mixed", True, dict(block_k=32)),
    (17, 40, [24, 24], 4, 5, "mixed", False, dict(block_k=16, block_n=16)),
    (45, 64, [64, 16, 16], 3, 32, "one", True, dict()),
    (33, 32, [16], 2, 8, "none", True, dict()),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,widths,L,R,mode,one_buffer,tiles", CASES)
def test_matches_reference(T, K, widths, L, R, mode, one_buffer, tiles, dtype, device):
    x, a, b, y, offsets, mapping = make_case(T, K, widths, L, R, mode, one_buffer, dtype, device, seed=T + K)
    want = _expected(x, a, b, y, offsets, mapping)
    add_lora_linear(y, x, a, b, mapping, output_offsets=offsets, config=_cfg(x, b, **tiles))
    assert_close(y.float().cpu(), want.float(), dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaves_other_rows_and_columns_alone(dtype, device):
    """Every slot kind (enabled, disabled, -1, >= max_loras) over 24 tokens; columns before, between and after
    the slices.  y holds finite random values that must come back bit for bit where no delta applies."""
    T, K, widths, L, R = 24, 40, [16, 8, 8], 4, 8
    x, a, b, _, _, _ = make_case(T, K, widths, L, R, "mixed", True, dtype, device, seed=5)
    offsets = [2, 20, 30]
    y = torch.randn(T, 40, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    mapping = torch.tensor([0, 1, 2, 3, -1, 4, 7, 0, 2, -1, 1, 3] * 2, dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=device)  # slot 1 disabled
    writes = torch.tensor([m in (0, 2, 3) for m in mapping.tolist()])
    cols = torch.zeros(40, dtype=torch.bool)
    for o, n in zip(offsets, widths):
        cols[o:o + n] = True
    y0 = y.clone()
    want = _expected(x, a, b, y, offsets, mapping, enabled.cpu())
    add_lora_linear(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets,
                    config=_cfg(x, b, block_k=16, block_n=16))
    y, y0 = y.cpu(), y0.cpu()
    assert torch.equal(_bits(y[~writes]), _bits(y0[~writes]))
    assert torch.equal(_bits(y[:, ~cols]), _bits(y0[:, ~cols]))
    assert not torch.equal(y[writes][:, cols], y0[writes][:, cols])
    assert_close(y[writes][:, cols].float(), want[writes][:, cols].float(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_equals_the_sorted_kernel(dtype, device):
    """The pair and ``lora_linear_sorted_kernel`` on a q/k/v-like launch, within the dtype's rounding of y."""
    x, a, b, y, offsets, mapping = make_case(40, 96, [64, 16, 16], 3, 16, "mixed", True, dtype, device, seed=9)
    y_old, y_new = y.clone(), y.clone()
    add_lora_linear(y_old, x, a, b, mapping, output_offsets=offsets,
                    config=kernel0_config(40, 96, 64, 16, 3, dtype, sorted_path=True))
    add_lora_linear(y_new, x, a, b, mapping, output_offsets=offsets, config=_cfg(x, b, block_k=32))
    assert not torch.equal(y_old, y)  # the delta is not zero
    assert_close(y_new.float().cpu(), y_old.float().cpu(), dtype)


def test_switch_and_config(monkeypatch):
    assert split.SORTED_SPLIT is True  # on since the H200 A/B of the twenty-seventh session
    assert lora_linear_config(split.SORTED_SPLIT_MIN_TOKENS, 2048, 4096, 16, 3, torch.bfloat16).sorted_split
    assert lora_linear_config(256, 2048, 4096, 16, 3, torch.bfloat16).sorted_split
    assert lora_linear_config(split.SORTED_SPLIT_MAX_TOKENS, 2048, 4096, 16, 3, torch.bfloat16).sorted_split
    small = lora_linear_config(split.SORTED_SPLIT_MIN_TOKENS - 1, 2048, 4096, 16, 3, torch.bfloat16)
    assert small.token_path and not small.sorted_split
    prefill = lora_linear_config(split.SORTED_SPLIT_MAX_TOKENS + 1, 2048, 4096, 16, 3, torch.bfloat16)
    assert not prefill.sorted_split and not prefill.token_path  # prefills keep the sorted kernel
    monkeypatch.setattr(split, "SORTED_SPLIT", False)
    assert not lora_linear_config(64, 2048, 4096, 16, 3, torch.bfloat16).sorted_split
    cfg = LoRALinearTileConfig.from_json({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "SORTED_SPLIT": True})
    assert cfg.sorted_split and cfg.to_json()["SORTED_SPLIT"] is True


def test_refuses_the_token_path_with_it(device):
    x, a, b, y, offsets, mapping = make_case(20, 32, [16], 2, 8, "mixed", True, torch.float32, device)
    with pytest.raises(ValueError, match="token_path must be false"):
        add_lora_linear(y, x, a, b, mapping, output_offsets=offsets,
                        config=dataclasses.replace(_cfg(x, b), token_path=True))


def test_compiles_for_hopper_without_spills():
    """sm_90: both kernels at the GPU tiles for the Qwen3-30B-A3B q/k/v and o launches at 64 and 256 tokens,
    ranks 16 and 32, with PDL: no global load or store before the wait
    (``lora_linear_sorted_split_hopper_compile.py``)."""
    out = run_without_interpreter("tests/lora/lora_linear_sorted_split_hopper_compile.py")
    assert out.count("ok ") == 16, out
