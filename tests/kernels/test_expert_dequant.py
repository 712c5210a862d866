"""The Triton expert dequantisers of the 4-bit experts' large-batch path, bit for bit against the torch ones:
int4 (``ops/int4_dequant.py``) against ``Int4PackedWeight.dequantize_expert``, MXFP4
(``ops/mxfp4_expert_dequant.py``) against ``dequantize_mxfp4``; random data, every dtype, expert ranges
that include the last expert, K and N that are not multiples of the tile."""
import pytest
import torch

from tests.utils import run_without_interpreter
from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight, pack_int4_k
from vllm.model_executor.layers.fused_moe.ops.int4_dequant import dequantize_int4_experts
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import int4_moe_gemm_reference
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4
from vllm.model_executor.layers.fused_moe.ops.mxfp4_expert_dequant import dequantize_mxfp4_experts

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns (so -0 and +0 differ, NaNs compare by their bits)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.contiguous().view(_BITS[actual.dtype]), expected.contiguous().view(_BITS[expected.dtype])
    diff = (a != e).nonzero()
    assert diff.numel() == 0, (f"{diff.shape[0]} of {a.numel()} values differ, first at {diff[0].tolist()}: "
                               f"{actual[tuple(diff[0])].item()} vs {expected[tuple(diff[0])].item()}")


def random_packed(E: int, N: int, K: int, group: int, *, zeros: bool, g_idx: bool, perm: bool, scale_dtype,
                  gen: torch.Generator) -> Int4PackedWeight:
    """Random codes (0..15), scales (some tiny, some huge: rounding matters in fp16 / bf16), zeros 0..16,
    a permuted g_idx (act-order under TP) and / or a random activation permutation."""
    q = torch.randint(0, 16, (E, N, K), generator=gen, dtype=torch.uint8)
    G = -(-K // group)
    s = (torch.rand(E, G, N, generator=gen) + 0.5) * torch.exp2(torch.randint(-20, 8, (E, G, N), generator=gen))
    z = torch.randint(0, 17, (E, G, N), generator=gen, dtype=torch.uint8) if zeros else None
    gi = None
    if g_idx:
        gi = torch.stack([(torch.arange(K) // group)[torch.randperm(K, generator=gen)] for _ in range(E)]).int()
    pm = torch.stack([torch.randperm(K, generator=gen) for _ in range(E)]).int() if perm else None
    return Int4PackedWeight(pack_int4_k(q).transpose(1, 2).contiguous(), s.to(scale_dtype), z, group, gi, pm)


def on(w: Int4PackedWeight, device) -> Int4PackedWeight:
    mv = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return Int4PackedWeight(mv(w.qweight), mv(w.scales), mv(w.zeros), w.group_size, mv(w.g_idx), mv(w.perm))


def int4_reference(w: Int4PackedWeight, e0: int, e1: int, dtype) -> torch.Tensor:
    """dequantize_expert per expert, stored position j written to column perm[j]."""
    out = torch.empty(e1 - e0, w.n, w.k, dtype=dtype)
    for e in range(e0, e1):
        d = w.dequantize_expert(e, dtype)
        out[e - e0] = d if w.perm is None else d[:, torch.argsort(w.perm[e].long())]
    return out


# (E, N, K, group): K 96 / 264 and N 40 are not multiples of the tiles; group K = per channel
INT4_SHAPES = [(3, 40, 96, 32), (2, 24, 264, 8), (4, 16, 64, 64)]
INT4_SCHEMES = {"sym": dict(zeros=False, g_idx=False, perm=False), "asym": dict(zeros=True, g_idx=False, perm=False),
                "act_order": dict(zeros=True, g_idx=False, perm=True),
                "act_order_sym": dict(zeros=False, g_idx=False, perm=True),
                "g_idx": dict(zeros=True, g_idx=True, perm=False),
                "g_idx_perm": dict(zeros=True, g_idx=True, perm=True)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", list(INT4_SCHEMES))
@pytest.mark.parametrize("E,N,K,group", INT4_SHAPES)
def test_int4_dequant_matches_torch_bit_for_bit(dtype, scheme, E, N, K, group, device):
    gen = torch.Generator().manual_seed(E * 7 + K + len(scheme))
    for scale_dtype in {dtype, torch.float16}:  # scales in another dtype are first rounded to the output's
        w = random_packed(E, N, K, group, scale_dtype=scale_dtype, gen=gen, **INT4_SCHEMES[scheme])
        for e0, e1 in ((0, E), (E - 1, E), (1, E - 1)):
            out = torch.full((e1 - e0, N, K), float("nan"), dtype=dtype, device=device)
            assert dequantize_int4_experts(on(w, device), out, e0, e1, use_triton=True) is out
            expected = int4_reference(w, e0, e1, dtype)
            assert_same_bits(out.cpu(), expected)
            torch_out = dequantize_int4_experts(w, torch.empty_like(expected), e0, e1, use_triton=False)
            assert_same_bits(torch_out, expected)


def test_int4_dense_weight_multiplies_the_unpermuted_activations(device):
    """a @ dense.T equals the in-register GEMM's semantics (a[perm] @ dequant.T), act-order included."""
    gen = torch.Generator().manual_seed(5)
    w = random_packed(3, 32, 64, 16, zeros=True, g_idx=False, perm=True, scale_dtype=torch.float32, gen=gen)
    dense = dequantize_int4_experts(on(w, device), torch.empty(3, 32, 64, device=device), use_triton=True).cpu()
    a = torch.randn(6, 64, generator=gen)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    ref = int4_moe_gemm_reference(a, w, ids, top_k_in=2)
    ours = torch.stack([a[p // 2] @ dense[ids.reshape(-1)[p]].T for p in range(6)])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_int4_dequant_strided_output_and_empty_range(device):
    gen = torch.Generator().manual_seed(6)
    w = random_packed(3, 16, 32, 16, zeros=True, g_idx=False, perm=True, scale_dtype=torch.float16, gen=gen)
    big = torch.full((2, 32, 16), float("nan"), dtype=torch.float16, device=device)
    out = big.transpose(1, 2)  # [2, 16, 32] with K strided
    dequantize_int4_experts(on(w, device), out, 1, 3, use_triton=True)
    assert_same_bits(out.cpu(), int4_reference(w, 1, 3, torch.float16))
    dequantize_int4_experts(on(w, device), torch.empty(0, 16, 32, device=device), 2, 2, use_triton=True)


def test_int4_dequant_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(7)
    w = random_packed(3, 16, 32, 16, zeros=False, g_idx=False, perm=False, scale_dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match=r"out must be .*\[2, 16, 32\]"):
        dequantize_int4_experts(w, torch.empty(3, 16, 32), 1, 3)
    with pytest.raises(ValueError, match=r"expert range \[2, 4\)"):
        dequantize_int4_experts(w, torch.empty(2, 16, 32), 2, 4)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        dequantize_int4_experts(w, torch.empty(3, 16, 32, dtype=torch.int32))


def random_mxfp4(E: int, N: int, K: int, gen: torch.Generator, lo: int = 0, hi: int = 254):
    """Every byte value in the codes (all 16 codes in both nibbles: -0, the subnormal +-0.5) and e8m0 scales
    lo..hi with both ends present (0: the subnormal 2^-127; 254: 6 * 2^127 overflows to inf)."""
    b = torch.randint(0, 256, (E, N, K // 32, 16), generator=gen, dtype=torch.uint8)
    b.view(-1)[:256] = torch.randperm(256, generator=gen).to(torch.uint8)
    b[-1].view(-1)[:256] = torch.randperm(256, generator=gen).to(torch.uint8)  # the last expert too
    s = torch.randint(lo, hi + 1, (E, N, K // 32), generator=gen, dtype=torch.uint8)
    s.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.uint8)
    s[-1].view(-1)[:2] = torch.tensor([hi, lo], dtype=torch.uint8)
    return b, s


# numpy (the interpreter) warns on the float32 overflow of 6 * 2^127 and on 0 * inf; torch does not
_QUIET = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# (E, N, K): K 96 / 320 and N 40 / 24 are not multiples of the tiles
MXFP4_SHAPES = [(3, 40, 96), (2, 24, 320), (4, 16, 64)]


@_QUIET
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,N,K", MXFP4_SHAPES)
def test_mxfp4_dequant_matches_torch_bit_for_bit(dtype, E, N, K, device):
    gen = torch.Generator().manual_seed(E + N + K)
    blocks, scales = random_mxfp4(E, N, K, gen)
    full = None
    for e0, e1 in ((0, E), (E - 1, E), (1, E - 1)):
        expected = dequantize_mxfp4(blocks[e0:e1], scales[e0:e1], dtype)
        for b in (blocks, blocks.flatten(2)):  # [E, N, K/32, 16] or the [E, N, K/2] byte rows
            out = torch.full((e1 - e0, N, K), float("nan"), dtype=dtype, device=device)
            assert dequantize_mxfp4_experts(b.to(device), scales.to(device), out, e0, e1, use_triton=True) is out
            out = out.cpu()
            assert_same_bits(out, expected)
        if (e0, e1) == (0, E):
            full = out
        assert_same_bits(dequantize_mxfp4_experts(blocks, scales, torch.empty_like(out), e0, e1, use_triton=False),
                         expected)
    if dtype == torch.bfloat16:  # the interesting values are there (bf16 keeps fp32's range)
        assert (full == 0).any() and (torch.signbit(full) & (full == 0)).any() and torch.isinf(full).any()
        assert (full.abs() == 2.0 ** -128).any()  # 0.5 * 2^-127: a subnormal


@_QUIET
def test_mxfp4_dequant_nan_scale_and_strided_output(device):
    """e8m0 255 (NaN in the OCP spec): torch's ldexp gives inf * code (0 * inf = NaN); so does the kernel."""
    gen = torch.Generator().manual_seed(3)
    blocks, scales = random_mxfp4(2, 8, 64, gen, lo=250, hi=255)
    expected = dequantize_mxfp4(blocks, scales, torch.float32)
    big = torch.full((2, 64, 8), 7.0, device=device)
    out = big.transpose(1, 2)
    dequantize_mxfp4_experts(blocks.to(device), scales.to(device), out, use_triton=True)
    out = out.cpu()
    assert torch.isnan(expected).any()
    assert torch.equal(out.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(out[ok], expected[ok])


def test_mxfp4_dequant_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    blocks, scales = random_mxfp4(3, 8, 64, gen)
    with pytest.raises(ValueError, match=r"out must be .*\[1, 8, 64\]"):
        dequantize_mxfp4_experts(blocks, scales, torch.empty(2, 8, 64), 2, 3)
    with pytest.raises(ValueError, match=r"expert range \[2, 1\)"):
        dequantize_mxfp4_experts(blocks, scales, torch.empty(0, 8, 64), 2, 1)
    with pytest.raises(ValueError, match="scales must be"):
        dequantize_mxfp4_experts(blocks, scales[:, :, :1], torch.empty(3, 8, 64))



def test_dequantisers_compile_for_hopper():
    """The CPU interpreter never compiles: compile both kernels for sm_90 in a subprocess (no GPU needed)."""
    assert run_without_interpreter("tests/kernels/dequant_hopper_compile.py").count("ok ") == 15
