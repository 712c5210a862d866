"""``fused_linear_lora`` above 16 tokens (the tensor-core path over the slot-sorted tokens) against float64.

Reference: ``test_fused_linear_lora``'s (x @ W^T + bias in float64 plus ``lora_linear_reference``).
Cases: 17..80 tokens, slots -1 / disabled / several, 1-3 uneven slices, rank < max rank, bias or not,
fp32 and bf16; tiles of 16 rows so that slot runs cross tile borders and one tile holds three slots;
the step's grouping of fewer tokens than rows (a CUDA-graph replay pads the batch) with stale entries
past them; the grouping made by the op vs given.
"""
import pytest
import torch

from tests.lora.test_fused_linear_lora import ENABLED, L, make_case, reference
from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import FusedLinearLoRABatchTileConfig, FusedLinearLoRATileConfig
from vllm.lora.ops.triton_ops.fused_linear_lora import fused_linear_lora
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import BATCH_MAX_TOKENS, batch_config
from vllm.lora.ops.triton_ops.lora_linear import lora_linear_metadata

SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # several row / column / K tiles
# default: 4 slots shrunk in the main loop (all of a tile's, L = 4); then 1 or 2 (the others after it), none
TILES = {"default": None, "small": SMALL_TILES, "small_one_in_loop": dict(SMALL_TILES, LOOP_SLOTS=1),
         "small_two_in_loop": dict(SMALL_TILES, LOOP_SLOTS=2),
         "small_shrink_after": dict(SMALL_TILES, LOOP_SLOTS=0)}


def tiles_config(tiles: str, x: torch.Tensor, w: torch.Tensor, lora_a):
    """The heuristic's config with ``TILES[tiles]`` (JSON keys) over it; None for the default."""
    if TILES[tiles] is None:
        return None
    base = batch_config(x.shape[0], x.shape[1], w.shape[0], lora_a[0].shape[1], x.dtype, lora_a[0].shape[0])
    return FusedLinearLoRABatchTileConfig.from_json(TILES[tiles], source=f"TILES[{tiles!r}]", base=base)


def _enabled(device):
    return torch.tensor(ENABLED, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,widths,bias", [
    (17, 48, [40], True),
    (40, 40, [24, 8, 16], False),
    (80, 64, [32, 16, 16], True),
])
@pytest.mark.parametrize("tiles", list(TILES))
def test_matches_reference(T, K, widths, bias, dtype, tiles, device):
    x, w, b, lora_a, lora_b, mapping = make_case(T, K, widths, dtype, device, bias=bias, seed=T)
    enabled = _enabled(device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, adapter_enabled=enabled,
                          config=tiles_config(tiles, x, w, lora_a))
    want = reference(x, w, b, lora_a, lora_b, mapping, enabled)
    assert y.dtype == dtype and y.shape == (T, sum(widths))
    assert_close(y.float().cpu(), want.float(), dtype)
    base = reference(x, w, b, lora_a, lora_b, torch.full_like(mapping, -1))
    assert (want - base).abs().max() > 0.3 * want.abs().max()  # the LoRA part matters at this tolerance


def _border_mapping(device):
    """30 tokens, shuffled: 10 on slot 0, 3 on slot 1, 5 on slot 2, 4 on slot 3 (disabled), 8 on none.  In
    sorted order with 16-row tiles: tile 0 holds slots 0, 1 and 2; tile 1 slot 2, slot 3 and the rows
    without a slot."""
    slots = [0] * 10 + [1] * 3 + [2] * 5 + [3] * 4 + [-1] * 8
    perm = torch.randperm(len(slots), generator=torch.Generator().manual_seed(5))
    return torch.tensor(slots, dtype=torch.int32)[perm].to(device)


@pytest.mark.parametrize("tiles", ["small", "small_two_in_loop", "small_one_in_loop", "small_shrink_after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_runs_across_tile_borders(dtype, tiles, device):
    x, w, b, lora_a, lora_b, _ = make_case(30, 32, [16, 8, 8], dtype, device, seed=3)
    mapping = _border_mapping(device)
    enabled = _enabled(device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, adapter_enabled=enabled,
                          config=tiles_config(tiles, x, w, lora_a))
    assert_close(y.float().cpu(), reference(x, w, b, lora_a, lora_b, mapping, enabled).float(), dtype)
    # rows without an (enabled) slot: exactly the kernel's result with every slot disabled (the same tiles:
    # the grouping does not look at adapter_enabled; a row's base may depend on its place in a tile)
    off = torch.zeros_like(enabled)
    base = fused_linear_lora(x, w, b, lora_a, lora_b, mapping, adapter_enabled=off,
                             config=tiles_config(tiles, x, w, lora_a))
    assert_close(base.float().cpu(), reference(x, w, b, lora_a, lora_b, torch.full_like(mapping, -1)).float(), dtype)
    plain = (mapping < 0) | (mapping == 3)
    assert torch.equal(y[plain], base[plain])
    assert not torch.equal(y[~plain], base[~plain])


@pytest.mark.parametrize("tiles", ["default", "small"])
def test_step_grouping_of_fewer_tokens_than_rows(tiles, device):
    """A CUDA-graph replay: the step's grouping covers its n tokens, x has T > n rows (the rows past n on
    slot -1) and the grouping buffers hold stale entries past n; every row must still be written."""
    T, n = 44, 29
    x, w, b, lora_a, lora_b, _ = make_case(T, 32, [16, 8, 8], torch.float32, device, seed=4)
    mapping = torch.full((64,), -1, dtype=torch.int32, device=device)
    mapping[:n] = torch.randint(-1, L, (n,), generator=torch.Generator().manual_seed(6), dtype=torch.int32)
    meta = lora_linear_metadata(mapping[:n], L)
    stale = torch.full((64,), 7, dtype=torch.int32, device=device)  # stale entries: a token that is a row
    stale[:n] = meta.sorted_token_ids
    meta.sorted_token_ids = stale
    enabled = _enabled(device)
    out = torch.full((T, 32), float("nan"), device=device)
    y = fused_linear_lora(x, w, b, lora_a, lora_b, mapping[:T], adapter_enabled=enabled, meta=meta, out=out,
                          config=tiles_config(tiles, x, w, lora_a))
    assert_close(y.cpu(), reference(x, w, b, lora_a, lora_b, mapping[:T], enabled).float(), torch.float32)
    # the same rows as with the op's own grouping of all T rows (each row is computed alone)
    own = fused_linear_lora(x, w, b, lora_a, lora_b, mapping[:T], adapter_enabled=enabled,
                            config=tiles_config(tiles, x, w, lora_a))
    assert torch.equal(y, own)


def test_rounded_once(device):
    """fp16, 20 rows: base 1 + 3u/8 and delta 3u/8 (u = the ulp at 1) sum to 1 + 3u/4, which rounds up to
    1 + u; rounding the base first (to 1) and then 1 + delta would give 1.  Rows on no slot: exactly 1."""
    ulp = 2.0**-10
    x = torch.tensor([[1.0, 3 * ulp / 8]], dtype=torch.float16, device=device).repeat(20, 1)
    w = torch.ones(16, 2, dtype=torch.float16, device=device)
    a = torch.zeros(2, 16, 2, dtype=torch.float16, device=device)
    a[:, 0, 1] = 1  # shrink rank 0 = x[1] = 3u/8
    b = torch.zeros(2, 16, 16, dtype=torch.float16, device=device)
    b[:, :, 0] = 1
    mapping = torch.tensor([0, 1, -1, 1] * 5, dtype=torch.int32, device=device)
    y = fused_linear_lora(x, w, None, (a,), (b,), mapping, config=tiles_config("small", x, w, (a,)))
    want = torch.where(mapping[:, None].cpu() >= 0, 1 + ulp, 1.0).expand(20, 16).to(torch.float16)
    assert torch.equal(y.cpu(), want)


def test_bad_inputs_raise_clear_errors(device):
    x, w, b, lora_a, lora_b, mapping = make_case(20, 32, [16, 8], torch.float32, device)
    many = BATCH_MAX_TOKENS + 1
    with pytest.raises(ValueError, match=f"at most {BATCH_MAX_TOKENS} tokens"):
        fused_linear_lora(x[:1].expand(many, -1), w, b, lora_a, lora_b, mapping[:1].expand(many).contiguous())
    meta = lora_linear_metadata(mapping[:10], L)
    with pytest.raises(ValueError, match="sorted_token_ids"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping, meta=meta)
    meta = lora_linear_metadata(mapping, L)
    meta.slot_counts = meta.slot_counts[:2]
    with pytest.raises(ValueError, match="slot_counts"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping, meta=meta)
    with pytest.raises(TypeError, match="at 20 > 16 tokens config must be a FusedLinearLoRABatchTileConfig"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping, config=FusedLinearLoRATileConfig(16, 16))
    with pytest.raises(ValueError, match="LOOP_SLOTS must be 0, 1, 2, 4 or 8, got 3"):
        fused_linear_lora(x, w, b, lora_a, lora_b, mapping,
                          config=FusedLinearLoRABatchTileConfig(16, 16, 16, loop_slots=3))


def test_kernel_compiles_for_hopper():
    """The interpreter never compiles: compile the heuristic's tiles for sm_90 in a subprocess (no GPU
    needed) and check that the main loop is pipelined and fits in shared memory."""
    assert run_without_interpreter("tests/lora/fused_linear_lora_batch_hopper_compile.py").count("ok ") == 11


def test_benchmark_smoke(tmp_path):
    """The benchmark's smoke mode at a batch above 16 tokens (both paths group the tokens; CPU: interpreter)."""
    from benchmarks.kernels.benchmark_fused_linear_lora import main

    out = tmp_path / "t.md"
    main(["--smoke", "--tokens", "24", "--reps", "3", "--out", str(out)])
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith(("| qkv", "| o ", "| gate"))]
    assert [r[1].strip() for r in rows] == ["qkv", "o", "gate"] and all(r[2].strip() == "24" for r in rows)
    assert all(r[8].strip() != "-" for r in rows)  # the grouping column is filled above 16 tokens
