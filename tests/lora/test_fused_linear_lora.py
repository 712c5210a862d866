"""``fused_linear_lora`` (projection + multi-LoRA delta in one launch) against a float64 reference.

Reference: x @ W^T + bias in float64 plus ``lora_linear_reference``'s per-token loop.
Cases: 1..16 tokens, slots -1 / disabled / several, 1-3 uneven slices (tiles that
straddle slices with BLOCK_N 16), adapters of rank < max rank, bias or not, fp32
and bf16, several K tiles.  Rows without an (enabled) adapter must equal the
kernel's own base result bit for bit, and the output is rounded once.
"""
import pytest
import torch

from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import FusedLinearLoRABatchTileConfig, FusedLinearLoRATileConfig
from vllm.lora.ops.torch_ops.lora_linear import lora_linear_reference
from vllm.lora.ops.triton_ops.fused_linear_lora import fused_linear_lora, fused_linear_lora_config

L, R = 4, 16
SMALL_TILES = dict(BLOCK_N=16, BLOCK_K=16)  # several programs, tiles across slice borders, several K tiles
# tile configs tried: the default, small tiles, and small tiles with every shrink after the main loop
TILES = {"default": None, "small": SMALL_TILES, "small_shrink_after": dict(SMALL_TILES, SHRINK_IN_LOOP=False)}


def tiles_config(tiles: str, x: torch.Tensor, w: torch.Tensor):
    """The heuristic's config with ``TILES[tiles]`` (JSON keys) over it; None for the default."""
    if TILES[tiles] is None:
        return None
    base = fused_linear_lora_config(x.shape[0], x.shape[1], w.shape[0], R, x.dtype)
    return FusedLinearLoRATileConfig.from_json(TILES[tiles], source=f"TILES[{tiles!r}]", base=base)


def make_case(T, K, widths, dtype, device, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S, N = len(widths), sum(widths)
    x = torch.randn(T, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    # one buffer per side, as the LoRA layers allocate; slot 1 holds a rank-5 adapter (rank < R, zero-padded)
    a_buf = torch.randn(S, L, R, K, generator=gen) / K**0.5
    b_buf = torch.randn(S, L, max(widths), R, generator=gen) / R**0.5 * 4  # a delta of the base's size
    a_buf[:, 1, 5:] = 0
    b_buf[:, 1, :, 5:] = 0
    to = dict(dtype=dtype, device=device)
    a_buf, b_buf = a_buf.to(**to), b_buf.to(**to)
    lora_a = tuple(a_buf.unbind(0))
    lora_b = tuple(b_buf[s, :, :n] for s, n in enumerate(widths))
    mapping = torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32)
    mapping[: min(T, 4)] = torch.tensor([1, -1, 3, 0], dtype=torch.int32)[: min(T, 4)]
    return x.to(**to), w.to(**to), None if b is None else b.to(**to), lora_a, lora_b, mapping.to(device)


def reference(x, w, b, lora_a, lora_b, mapping, enabled=None, offsets=None):
    y = x.double().cpu() @ w.double().cpu().T
    if b is not None:
        y += b.double().cpu()
    return y + lora_linear_reference(x, lora_a, lora_b, mapping.cpu(), out_cols=w.shape[0],
                                     adapter_enabled=None if enabled is None else enabled.cpu(),
                                     output_offsets=offsets)


ENABLED = [1, 1, 1, 0]  # slot 3 holds weights but is disabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,widths,bias", [
    (1, 48, [40], True),
    (3, 40, [24, 24], False),
    (7, 72, [40, 8, 24], True),
    (16, 64, [64, 16, 16], True),
])
@pytest.mark.parametrize("tiles", list(TILES))
def test_matches_reference(T, K, widths, bias, dtype, tiles, device):
    x, w, b, lora_a, lora_b, mapping = make_case(T, K, widths, dtype, device, bias=bias)
    enabled = torch.tensor(ENABLED, dtype=torch.int32, device=device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, adapter_enabled=enabled, config=tiles_config(tiles, x, w))
    want = reference(x, w, b, lora_a, lora_b, mapping, enabled)
    assert y.dtype == dtype and y.shape == (T, sum(widths))
    assert_close(y.float().cpu(), want.float(), dtype)
    # the LoRA part must matter at this tolerance, or the comparison proves nothing about it
    base = reference(x, w, b, lora_a, lora_b, torch.full_like(mapping, -1))
    assert (want - base).abs().max() > 0.3 * want.abs().max()


@pytest.mark.parametrize("tiles", ["small", "small_shrink_after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_adapter_are_the_base_bit_for_bit(dtype, tiles, device):
    """Tokens of slot -1 or of a disabled slot get exactly what the kernel gives with no adapter at all."""
    x, w, b, lora_a, lora_b, mapping = make_case(16, 40, [24, 8, 8], dtype, device, seed=1)
    enabled = torch.tensor(ENABLED, dtype=torch.int32, device=device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, adapter_enabled=enabled, config=tiles_config(tiles, x, w))
    base = fused_linear_lora(x, w, b, lora_a, lora_b, torch.full_like(mapping, -1), config=tiles_config(tiles, x, w))
    assert_close(base.float().cpu(), (x.double() @ w.double().T + b.double()).float().cpu(), dtype)
    plain = (mapping < 0) | (mapping == 3)
    assert plain.any() and (~plain).any()
    assert torch.equal(y[plain], base[plain])
    assert not torch.equal(y[~plain], base[~plain])


def test_output_offsets_and_out(device):
    """Slices at given offsets (columns outside every slice get the base only); ``out`` is written in place."""
    x, w, b, lora_a, lora_b, mapping = make_case(5, 32, [16, 8], torch.float32, device, seed=2)
    w = torch.cat([w, torch.randn(9, 32, device=device)])  # 33 columns: slices at 4 and 25, the rest base
    b = torch.cat([b, torch.randn(9, device=device)])
    out = torch.full((5, 33), float("nan"), device=device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, output_offsets=[4, 25], out=out,
                          config=tiles_config("small", x, w))
    assert y.data_ptr() == out.data_ptr()
    assert_close(out.cpu(), reference(x, w, b, lora_a, lora_b, mapping, offsets=[4, 25]).float(), torch.float32)


@pytest.mark.parametrize("dtype,ulp", [
    (torch.float16, 2.0**-10),
    pytest.param(torch.bfloat16, 2.0**-7, marks=pytest.mark.cuda),  # the interpreter's fp32 -> bf16 truncates
])
def test_rounded_once(dtype, ulp, device):
    """base 1 + 3u/8 and delta 3u/8 (u = the ulp at 1) sum to 1 + 3u/4, which rounds up to 1 + u; rounding
    the base first (to 1) and then 1 + delta would give 1."""
    x = torch.tensor([[1.0, 3 * ulp / 8]], dtype=dtype, device=device)
    w = torch.ones(16, 2, dtype=dtype, device=device)
    a = torch.zeros(1, 16, 2, dtype=dtype, device=device)
    a[0, 0, 1] = 1  # shrink rank 0 = x[1] = 3u/8
    b = torch.zeros(1, 16, 16, dtype=dtype, device=device)
    b[0, :, 0] = 1
    y = fused_linear_lora(x, w, None, (a,), (b,), torch.zeros(1, dtype=torch.int32, device=device))
    assert torch.equal(y.cpu(), torch.full((1, 16), 1 + ulp, dtype=dtype))


def test_bad_inputs_raise_clear_errors(device):
    x, w, b, lora_a, lora_b, mapping = make_case(3, 32, [16, 8], torch.float32, device)
    with pytest.raises(ValueError, match="at most 256 tokens"):  # above 16: the batch path (its own tests)
        fused_linear_lora(x.repeat(86, 1), w, b, lora_a, lora_b, mapping.repeat(86))
    with pytest.raises(ValueError, match="must match x"):
        fused_linear_lora(x, w.half(), b, lora_a, lora_b, mapping)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_lora(x, w, b[:-1], lora_a, lora_b, mapping)
    with pytest.raises(ValueError, match="one buffer"):
        fused_linear_lora(x, w, b, tuple(a.clone() for a in lora_a), lora_b, mapping)
    with pytest.raises(ValueError, match="covers columns"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping, output_offsets=[0, 20])
    with pytest.raises(TypeError, match="at 3 <= 16 tokens config must be a FusedLinearLoRATileConfig"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping,  # the batch path's tiles
                          config=FusedLinearLoRABatchTileConfig(16, 16, 16, loop_slots=1))
    with pytest.raises(TypeError, match="FusedLinearLoRATileConfig"):  # a dict (a misspelt key would be lost)
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping, config={"BLOCK_N": 16})
    assert fused_linear_lora(x[:0], w, b, lora_a, lora_b, mapping).shape == (0, 24)


def test_benchmark_smoke(tmp_path):
    """The benchmark's smoke mode (tiny shapes; CPU: interpreter) checks correctness and writes its table."""
    from benchmarks.kernels.benchmark_fused_linear_lora import main

    out = tmp_path / "t.md"
    main(["--smoke", "--tokens", "1", "4", "--reps", "3", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| qkv") or line.startswith("| o ")]
    assert len(rows) == 4


def test_kernel_compiles_for_hopper():
    """The CPU interpreter never compiles: compile the heuristic's tiles for sm_90 in a subprocess (no GPU
    needed) and check that the main loop is pipelined and fits in shared memory."""
    assert run_without_interpreter("tests/lora/fused_linear_lora_hopper_compile.py").count("ok ") == 6
