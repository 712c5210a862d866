"""The decode GEMV with the dense LoRA expand in its epilogue (``gemv_lora.gemv_with_lora``).

Against a float64 reference of x W^T + bias + the LoRA delta, random data; rows and columns the delta must not
touch (tokens without an adapter, on a disabled or out-of-range slot; columns before, between and after the
slices) must be ``dense_gemv``'s output bit for bit; the split-K scratch is poisoned with NaN (the epilogue may
read only the partials the shrink wrote).  The sm_90 compile (no GPU needed) checks the kernel's resources.
"""
import dataclasses

import pytest
import torch

from tests.lora.test_lora_linear_ops import _expected, make_case
from tests.utils import assert_close, run_without_interpreter
from vllm.lora.ops.triton_ops import gemv_lora
from vllm.lora.ops.triton_ops import lora_linear as op
from vllm.lora.ops.triton_ops.gemv_lora import gemv_lora_applies, gemv_with_lora
from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, split_variant_config
from vllm.model_executor.layers.ops.dense_gemv import GEMV_MAX_BLOCK_M, dense_gemv


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """The split-K partials start as NaN: an epilogue that read an entry the shrink did not write fails."""
    monkeypatch.setattr(op, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device))


def _projection(x, cols, bias, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(cols, x.shape[1], generator=gen) / x.shape[1] ** 0.5).to(dtype=dtype, device=device)
    b = torch.randn(cols, generator=gen).to(dtype=dtype, device=device) if bias else None
    return w, b


def _reference(x, w, bias, a, b, offsets, mapping, enabled=None):
    base = x.double().cpu() @ w.double().cpu().T + (0 if bias is None else bias.double().cpu())
    return _expected(x, a, b, base, offsets, mapping, enabled)


# (tokens, K, slice widths, L, R, mapping mode): K not a multiple of the GEMV's K step, narrow k / v slices,
# odd and larger ranks, a token block of 4 and of 8 rows
CASES = [
    (1, 48, [40], 1, 16, "one"),
    (1, 96, [64, 16, 16], 3, 16, "mixed"),
    (3, 40, [32, 16, 8], 3, 8, "mixed"),
    (2, 72, [24, 24], 2, 5, "mixed"),
    (5, 64, [32], 4, 32, "mixed"),
    (4, 32, [16], 2, 8, "none"),
]


@pytest.mark.parametrize("shrink_k", [None, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,widths,L,R,mode", CASES)
def test_matches_reference(T, K, widths, L, R, mode, dtype, bias, shrink_k, device):
    """``shrink_k`` 16: K chunks of 16 (2-6 partials per token and slice, summed by the epilogue); None: the
    default chunk (all of K here)."""
    x, a, b, y, offsets, mapping = make_case(T, K, widths, L, R, mode, True, dtype, device, seed=T + K + R)
    w, bvec = _projection(x, y.shape[1], bias, dtype, device, seed=K)
    want = _reference(x, w, bvec, a, b, offsets, mapping)
    shrink = split_variant_config(T, K, max(widths), R, len(widths), dtype)
    shrink = dataclasses.replace(shrink, block_k=shrink_k) if shrink_k else None
    got = gemv_with_lora(x, w, bvec, a, b, mapping, output_offsets=offsets, shrink_config=shrink)
    assert got.shape == (T, y.shape[1]) and got.dtype == dtype
    assert_close(got.float().cpu(), want.float(), dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_rows_and_columns_are_the_gemvs(dtype, device):
    """Every slot kind (enabled, disabled, -1, >= max_loras) in one 8-token block; columns before, between and
    after the slices.  Where the delta must not apply, y is ``dense_gemv``'s output bit for bit."""
    T, K, widths, L, R = 8, 40, [16, 8, 8], 4, 8
    x, a, b, _, _, _ = make_case(T, K, widths, L, R, "mixed", True, dtype, device, seed=5)
    offsets = [2, 20, 30]  # columns 0-1, 18-19, 28-29, 38-39 belong to no slice
    w, bvec = _projection(x, 40, True, dtype, device, seed=3)
    mapping = torch.tensor([0, 1, 2, 3, -1, 4, 7, 2], dtype=torch.int32, device=device)
    enabled = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.int32, device=device)  # slot 1 disabled
    writes = torch.tensor([m in (0, 2, 3) for m in mapping.tolist()])
    cols = torch.zeros(40, dtype=torch.bool)
    for o, n in zip(offsets, widths):
        cols[o:o + n] = True
    plain = dense_gemv(x, w, bvec).cpu()
    got = gemv_with_lora(x, w, bvec, a, b, mapping, adapter_enabled=enabled, output_offsets=offsets).cpu()
    assert torch.equal(_bits(got[~writes]), _bits(plain[~writes]))
    assert torch.equal(_bits(got[:, ~cols]), _bits(plain[:, ~cols]))
    assert not torch.equal(got[writes][:, cols], plain[writes][:, cols])
    want = _reference(x, w, bvec, a, b, offsets, mapping, enabled.cpu()[:L])
    assert_close(got[writes][:, cols].float(), want[writes][:, cols].float(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_equals_the_separate_path(dtype, device):
    """dense_gemv then add_lora_linear (today's decode path) against the one epilogue, within one rounding of y
    (the separate path rounds the base, then base + delta)."""
    x, a, b, y, offsets, mapping = make_case(1, 128, [64, 16, 16], 3, 16, "one", True, dtype, device, seed=9)
    w, bvec = _projection(x, y.shape[1], False, dtype, device, seed=4)
    sep = dense_gemv(x, w, bvec)
    add_lora_linear(sep, x, a, b, mapping, output_offsets=offsets)
    got = gemv_with_lora(x, w, bvec, a, b, mapping, output_offsets=offsets)
    assert not torch.equal(sep, dense_gemv(x, w, bvec))  # the delta is not zero
    assert_close(got.float().cpu(), sep.float().cpu(), dtype)


def test_refuses_what_it_cannot_do(device):
    x, a, b, y, offsets, mapping = make_case(1, 32, [16, 8], 2, 8, "one", False, torch.float32, device)
    w, _ = _projection(x, y.shape[1], False, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="one buffer at one stride"):
        gemv_with_lora(x, w, None, a, b, mapping, output_offsets=offsets)  # slices in separate tensors
    x, a, b, y, offsets, mapping = make_case(GEMV_MAX_BLOCK_M + 1, 32, [16], 1, 8, "one", True, torch.float32,
                                             device)
    w, _ = _projection(x, y.shape[1], False, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="at most"):
        gemv_with_lora(x, w, None, a, b, mapping, output_offsets=offsets)
    with pytest.raises(ValueError, match="dtype"):
        gemv_with_lora(x[:1], w, None, [t.half() for t in a], b, mapping, output_offsets=offsets)


def test_applies(monkeypatch, device):
    x, a, b, y, _, _ = make_case(1, 32, [16, 8, 8], 2, 8, "one", True, torch.bfloat16, device)
    w = torch.zeros(y.shape[1], 32, dtype=torch.bfloat16, device=device)
    assert gemv_lora.GEMV_LORA is False  # off until an H200 A/B shows it faster
    assert not gemv_lora_applies(x, w, a, b)
    monkeypatch.setattr(gemv_lora, "GEMV_LORA", True)
    assert gemv_lora_applies(x, w, a, b)  # one token: the projection's GEMV size
    assert not gemv_lora_applies(torch.cat([x, x]), w, a, b)  # two tokens: F.linear's (GEMV_MAX_TOKENS = 1)
    assert not gemv_lora_applies(x, w, [t.clone() for t in a], b)  # separate slice tensors
    assert not gemv_lora_applies(x, w, [t.half() for t in a], b)
    xf, af, bf, _, _, _ = make_case(1, 32, [16, 8, 8], 2, 8, "one", True, torch.float32, device)
    assert not gemv_lora_applies(xf, w.float(), af, bf)  # the GEMV takes 16-bit floats only


def test_compiles_for_hopper_without_spills():
    """sm_90, the GEMV's tiles at one token (q/k/v: 3 slices, rank 16; o: rank 32): no local memory."""
    out = run_without_interpreter("tests/lora/gemv_lora_hopper_compile.py")
    assert out.count("ok ") == 4, out


def test_benchmark_smoke(tmp_path, device, monkeypatch):
    """benchmarks/kernels/benchmark_gemv_lora.py on the CPU interpreter: both paths checked, one row per case."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    import sys

    import benchmarks.kernels.benchmark_gemv_lora as bench

    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_gemv_lora.py", "--smoke", "--tokens", "1", "2", "--out", str(out)])
    bench.main()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| smoke |")]
    assert [(r[1], r[4]) for r in rows] == [("qkv", "1"), ("qkv", "2"), ("o", "1"), ("o", "2")]
    assert all(float(r[7]) > 0 and float(r[8]) > 0 for r in rows)
