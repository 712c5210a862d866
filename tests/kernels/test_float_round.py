"""The dequantisers' float rounding helpers (``ops/_float_round.py``) against torch's own conversion, bit for bit:
ties, subnormals, overflow to inf, and NaNs of any payload (the GPU's 0 * inf is 0x7FFFFFFF, which a plain
round-to-nearest-even on the bits carries into -0.0)."""
import pytest
import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._float_round import out_kind, round_f32_to, storage_value, storage_view


@triton.jit
def _round_kernel(x_ptr, out_ptr, rounded_ptr, n, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok)
    tl.store(out_ptr + offs, storage_value(x, OUT_KIND), mask=ok)
    tl.store(rounded_ptr + offs, round_f32_to(x, OUT_KIND), mask=ok)


def _inputs() -> torch.Tensor:
    special = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000,
                            0x7F7FFFFF, 0x00000001, 0x00008000, 0x00018000, 0x80000000, 0x3F808000, 0x3F818000,
                            0x3F80C000, 0x477FF000], dtype=torch.int64)
    special = torch.where(special >= 2**31, special - 2**32, special).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([special, torch.randn(240, generator=gen) * 2.0 ** torch.randint(-140, 120, (240,), generator=gen)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_matches_torch(dtype, device):
    x = _inputs().to(device)
    out = torch.full(x.shape, 7, dtype=dtype, device=device)
    rounded = torch.full(x.shape, 7.0, device=device)
    _round_kernel[(1,)](x, storage_view(out), rounded, x.numel(), OUT_KIND=out_kind(dtype), BLOCK=256)
    want = x.cpu().to(dtype)
    got = out.cpu()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"NaN where torch has {got[nan != got.isnan()].tolist()}"
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])
    r = rounded.cpu()
    assert torch.equal(r.isnan(), nan) and torch.equal(r[~nan].view(torch.int32), want.float()[~nan].view(torch.int32))
