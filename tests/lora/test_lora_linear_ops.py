"""Dense LoRA op (``add_lora_linear``): Triton (both paths) and torch against the float64 loop reference.

Cases include 0, 1 and odd token counts, tokens without adapter, all tokens on
one slot, a disabled slot, unequal slices (q/k/v) that are views of one buffer
(one launch), separate slice tensors (one launch per slice) and output offsets.
"""
import dataclasses

import pytest
import torch

from tests.utils import assert_close
from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.torch_ops.lora_linear import add_lora_linear_torch, lora_linear_reference
from vllm.lora.ops.triton_ops import lora_linear_sorted_split as sorted_split
from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, lora_linear_config, lora_linear_metadata

def _on_path(x, a, b, token: bool) -> LoRALinearTileConfig:
    """The heuristic's tiles, on the path the test picks: the token path or the sorted kernel (the sorted split
    pair, which takes decode batches from 17 tokens by default, has its own tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sorted_split, "SORTED_SPLIT", False)
        cfg = lora_linear_config(x.shape[0], x.shape[1], max(t.shape[1] for t in b), a[0].shape[1], len(a),
                                 x.dtype)
    return dataclasses.replace(cfg, token_path=token)


# (tokens, K, slice widths, L, R, mapping mode, one buffer for all slices)
CASES = [
    (0, 32, [32], 2, 8, "mixed", True),
    (1, 48, [40], 1, 16, "one", True),
    (5, 48, [32, 16, 16], 3, 8, "mixed", True),
    (17, 64, [24, 24], 4, 16, "mixed", True),
    (17, 40, [32, 16, 8], 2, 4, "mixed", False),
    (40, 64, [64, 16, 16], 3, 16, "one", True),
    (33, 32, [16], 2, 8, "none", True),
]


def _slots(T: int, L: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    if mode == "one":
        return torch.zeros(T, dtype=torch.int32)
    if mode == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    return torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32)


def make_case(T, K, widths, L, R, mode, one_buffer, dtype, device, seed=0, lead_cols=3):
    gen = torch.Generator().manual_seed(seed)
    S = len(widths)
    a_buf = torch.randn(S, L, R, K, generator=gen) / K**0.5
    b_buf = torch.randn(S, L, max(widths), R, generator=gen) / R**0.5
    if one_buffer:
        a_buf, b_buf = a_buf.to(dtype=dtype, device=device), b_buf.to(dtype=dtype, device=device)
        a = tuple(a_buf.unbind(0))
        b = tuple(b_buf[s, :, :n] for s, n in enumerate(widths))
    else:
        a = tuple(a_buf[s].to(dtype=dtype, device=device).clone() for s in range(S))
        b = tuple(b_buf[s, :, :n].to(dtype=dtype, device=device).clone() for s, n in enumerate(widths))
    x = torch.randn(T, K, generator=gen).to(dtype=dtype, device=device)
    cols = lead_cols + sum(widths) + 2
    y = torch.randn(T, cols, generator=gen).to(dtype=dtype, device=device)
    offsets = [lead_cols + sum(widths[:s]) for s in range(S)]
    mapping = _slots(T, L, mode, gen).to(device)
    return x, a, b, y, offsets, mapping


def _expected(x, a, b, y, offsets, mapping, enabled=None):
    delta = lora_linear_reference(x, a, b, mapping.cpu(), out_cols=y.shape[1], output_offsets=offsets,
                                  adapter_enabled=enabled)
    return y.double().cpu() + delta


@pytest.mark.parametrize("path", ["token", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K,widths,L,R,mode,one_buffer", CASES)
def test_triton_matches_reference(T, K, widths, L, R, mode, one_buffer, dtype, path, device):
    if device.type == "cpu" and dtype == torch.float16 and T > 17:
        pytest.skip("interpreter time: larger fp16 cases run on the GPU")
    x, a, b, y, offsets, mapping = make_case(T, K, widths, L, R, mode, one_buffer, dtype, device)
    want = _expected(x, a, b, y, offsets, mapping)
    add_lora_linear(y, x, a, b, mapping, output_offsets=offsets, config=_on_path(x, a, b, path == "token"))
    assert_close(y.float().cpu(), want.float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,widths,L,R,mode,one_buffer", CASES)
def test_torch_matches_reference(T, K, widths, L, R, mode, one_buffer, dtype):
    x, a, b, y, offsets, mapping = make_case(T, K, widths, L, R, mode, one_buffer, dtype, "cpu")
    want = _expected(x, a, b, y, offsets, mapping)
    add_lora_linear_torch(y, x, a, b, mapping, output_offsets=offsets)
    assert_close(y.float(), want.float(), dtype)


@pytest.mark.parametrize("impl", ["triton_token", "triton_sorted", "torch"])
def test_disabled_slot_and_untouched_rows(impl, device):
    """A disabled slot adds nothing; rows without adapter and columns outside the slices are unchanged bit for bit."""
    x, a, b, y, offsets, mapping = make_case(19, 32, [16, 8], 3, 8, "mixed", True, torch.float32, device, seed=3)
    enabled = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=device)
    y0 = y.clone()
    want = _expected(x, a, b, y, offsets, mapping, enabled.cpu())
    if impl == "torch":
        add_lora_linear_torch(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets)
    else:
        add_lora_linear(y, x, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets,
                        config=_on_path(x, a, b, impl == "triton_token"))
    assert_close(y.float().cpu(), want.float(), torch.float32)
    untouched = (mapping < 0) | (enabled[mapping.clamp(min=0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])
    assert torch.equal(y[:, :offsets[0]], y0[:, :offsets[0]])
    assert torch.equal(y[:, offsets[-1] + 8:], y0[:, offsets[-1] + 8:])


@pytest.mark.parametrize("impl", ["triton_token", "triton_sorted", "torch"])
def test_shrink_is_not_rounded_before_expand(impl, device):
    """bf16 inputs whose shrink is 1 + 2^-10 (not a bf16 number): y in fp32 must get it exactly."""
    dt = torch.bfloat16
    x = torch.tensor([[1.0, 2.0**-10]], dtype=dt, device=device).repeat(2, 1)
    a = (torch.zeros(1, 16, 2, dtype=dt, device=device),)
    a[0][0, 0, :] = 1  # rank 0 of slot 0 sums both inputs
    b = (torch.zeros(1, 4, 16, dtype=dt, device=device),)
    b[0][0, :, 0] = 1  # every output column takes rank 0
    y = torch.zeros(2, 4, dtype=torch.float32, device=device)
    mapping = torch.zeros(2, dtype=torch.int32, device=device)
    if impl == "torch":
        add_lora_linear_torch(y, x, a, b, mapping)
    else:
        add_lora_linear(y, x, a, b, mapping, config=_on_path(x, a, b, impl == "triton_token"))
    assert torch.equal(y.cpu(), torch.full((2, 4), 1.0 + 2.0**-10))


def test_metadata_groups_tokens_by_slot():
    mapping = torch.tensor([2, -1, 0, 2, 2, 0, -1, 1, 7], dtype=torch.int32)  # 7: out of range = no adapter
    meta = lora_linear_metadata(mapping, max_loras=3)
    assert meta.slot_counts.tolist() == [2, 1, 3]
    assert meta.sorted_token_ids[:6].tolist() == [2, 5, 7, 0, 3, 4]


def test_bad_arguments_are_rejected():
    x, a, b, y, offsets, mapping = make_case(4, 32, [16], 2, 8, "mixed", True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="int32"):
        add_lora_linear(y, x, a, b, mapping.long())
    with pytest.raises(ValueError, match="columns"):
        add_lora_linear(y, x, a, b, mapping, output_offsets=[y.shape[1] - 4])
    with pytest.raises(ValueError, match="dtype"):
        add_lora_linear(y, x.half(), a, b, mapping)
    # a config is typed: a dict (whose misspelt key would be dropped) is refused, and so are tiles Triton cannot take
    with pytest.raises(TypeError, match="LoRALinearTileConfig"):
        add_lora_linear(y, x, a, b, mapping, config={"tokenpath": False})
    with pytest.raises(ValueError, match="BLOCK_N=24"):
        add_lora_linear(y, x, a, b, mapping, config=dataclasses.replace(_on_path(x, a, b, True), block_n=24))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 16, 32, 64, 128, 513, 4096])
def test_triton_realistic_sizes(T, dtype, device):
    """Qwen3-30B-A3B-like qkv_proj (K 2048, q 4096, k/v 512), rank 16, 4 slots, default configs."""
    x, a, b, y, offsets, mapping = make_case(T, 2048, [4096, 512, 512], 4, 16, "mixed", True, dtype, device)
    want = _expected(x, a, b, y, offsets, mapping)
    add_lora_linear(y, x, a, b, mapping, output_offsets=offsets)
    assert_close(y.float().cpu(), want.float(), dtype)
