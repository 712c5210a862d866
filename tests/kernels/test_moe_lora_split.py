"""The split-K variant of the fused MoE LoRA op (``MoELoRATileConfig.shrink_split_k`` > 1, ``moe_lora_split.py``),
and the small-batch path's (``fused_moe_lora.PAIR_KERNEL`` 2, ``launch_pair_split``).

Against the per-pair loop reference and against today's one-launch kernel, on the cases of
``test_fused_moe_lora.py`` (disabled slots, expert maps, routed weights, per-pair x, one or two
slices in one launch or per slice, ranks up to 64, every local expert with pairs).  The partials
scratch is poisoned (NaN): a row read that the shrink did not write shows.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, CASES, F16, SMALL, Case, _align, _config, _id, build, check
from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.lora.ops.triton_ops import fused_moe_lora as op
from vllm.lora.ops.triton_ops import moe_lora_split
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
from vllm.lora.ops.triton_ops.moe_lora_split import split_layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def poisoned_partials(monkeypatch):
    """Partials scratch filled with NaN; returns the list of scratch tensors handed out."""
    made = []
    real = moe_lora_split.alloc_partials

    def alloc(*args, **kw):
        made.append(poison_(real(*args, **kw)))
        return made[-1]

    monkeypatch.setattr(moe_lora_split, "alloc_partials", alloc)
    return made


# (case, shrink_split_k): K = 64 (48 for the w2-style case, 80 for the last) in 2-8 ranges; fp32 (rank 8 in a
# 16-wide tile), fp16 and bf16; one case without any adapter (nothing may change)
SPLIT_CASES = [(CASES[1], 2), (CASES[2], 2), (CASES[3], 3), (CASES[4], 4), (CASES[5], 2), (CASES[6], 4),
               (CASES[7], 4), (CASES[8], 3), (CASES[9], 2), (CASES[11], 8)]


def _one_launch_then_split(c: Case, device, split: int, after_one_launch=lambda: None):
    """Case ``c`` through the one-launch kernel, then (same start) through the split at ``split``:
    (split output, one-launch output, start, delta, parent) for ``check``."""
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    cfg = _config(c, device, c.M * c.top_k)
    alignment = _align(c, kw, cfg)
    fused = out.clone()
    fused_moe_lora(fused, x, lora_a, lora_b, top_k_in=top_k_in, alignment=alignment, config=cfg, **kw, **geo)
    after_one_launch()
    split_cfg = dataclasses.replace(cfg, shrink_split_k=split)
    fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=alignment, config=split_cfg, **kw, **geo)
    return out, fused, start, delta, parent


@pytest.mark.parametrize("c,split", SPLIT_CASES, ids=[f"{_id(c)}-split{s}" for c, s in SPLIT_CASES])
def test_split_equals_reference_and_fused(device, c, split, poisoned_partials):
    def no_partials_yet():
        assert not poisoned_partials, "shrink_split_k=1 must run the one-launch kernel"

    out, fused, start, delta, parent = _one_launch_then_split(c, device, split, no_partials_yet)
    assert poisoned_partials, "shrink_split_k > 1 must run the split launches"
    launches = 1 if c.layout != "separate" else c.S
    assert len(poisoned_partials) == launches
    assert poisoned_partials[0].shape[0] == split_layout(c.K, split)[1]
    check(c, out, start, delta, parent)
    assert_close(out, fused, c.dtype, name="split vs one launch")


def test_split_range_in_several_tiles(device, poisoned_partials, monkeypatch):
    """A split whose K range would not fit shared memory as one tile loops over tiles (K_TILES > 1; forced
    here by a tiny tile budget): same result as the reference and the one-launch kernel."""
    c = CASES[4]
    monkeypatch.setattr(moe_lora_split, "_SHRINK_TILE_BYTES", 1)  # tiles of 16 columns
    tiles = []
    real = moe_lora_split.split_tiles
    monkeypatch.setattr(moe_lora_split, "split_tiles", lambda *a: tiles.append(real(*a)) or tiles[-1])
    out, fused, start, delta, parent = _one_launch_then_split(c, device, 2)
    assert tiles and all(n > 1 for _, n in tiles), tiles
    check(c, out, start, delta, parent)
    assert_close(out, fused, c.dtype, name="split in tiles vs one launch")


@pytest.mark.parametrize("width,bm,br,elem,expected", [(2048, 16, 32, 2, (2048, 1)), (8192, 16, 16, 2, (2048, 4)),
                                                       (8192, 16, 32, 2, (2048, 4)), (4096, 32, 32, 2, (1024, 4)),
                                                       (256, 16, 16, 4, (256, 1)), (64, 16, 16, 1 << 20, (16, 4))])
def test_split_tiles(width, bm, br, elem, expected):
    tile, tiles = moe_lora_split.split_tiles(width, bm, br, elem)
    assert (tile, tiles) == expected and tile * tiles == width
    assert tile == 16 or (bm + br) * tile * elem <= moe_lora_split._SHRINK_TILE_BYTES


def test_small_batch_path_ignores_the_split(device, poisoned_partials):
    c = CASES[2]
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    cfg = dataclasses.replace(_config(c, device, c.M * c.top_k), shrink_split_k=4)
    fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, **kw, **geo)  # no alignment
    assert not poisoned_partials
    check(c, out, start, delta, parent)


@pytest.mark.parametrize("K,split,expected", [(2048, 8, (256, 8)), (2048, 16, (128, 16)), (768, 3, (256, 3)),
                                              (768, 4, (256, 3)), (768, 6, (128, 6)), (48, 8, (16, 3)),
                                              (20, 2, (16, 2)), (2880, 8, (512, 6))])
def test_split_layout(K, split, expected):
    width, parts = split_layout(K, split)
    assert (width, parts) == expected
    assert width * parts >= K and width * (parts - 1) < K  # every split has columns, together all of K


def test_config_json_key():
    base = MoELoRATileConfig(block_size_m=16, block_size_n=64, block_size_k=128)
    assert base.shrink_split_k == 1 and base.to_json()["SHRINK_SPLIT_K"] == 1
    assert MoELoRATileConfig.from_json({"SHRINK_SPLIT_K": 8}, base=base).shrink_split_k == 8
    with pytest.raises(ValueError, match="shrink_split_k"):
        MoELoRATileConfig.from_json({"SHRINK_SPLIT_K": 0}, base=base)


# ---------------------------------------------------------------- GPU, realistic shapes (Qwen3-30B-A3B-like)

@pytest.mark.cuda
@pytest.mark.parametrize("split", [2, 4, 8, 16])
@pytest.mark.parametrize("M", [16, 64, 256])
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
@pytest.mark.parametrize("R", [16, 64])
def test_cuda_split_realistic(split, M, w2, R):
    from tests.kernels.moe_lora_gpu_cases import BF16, _gpu_layer
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(128, R, M, BF16, w2)
    expected = out.float()
    fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    cfg = get_moe_lora_config("fused_moe_lora_w2" if w2 else "fused_moe_lora_w13", num_pairs=kw["topk_ids"].numel(),
                              num_experts=128, max_loras=4, rank=R, K=g["K"], N=g["N"], num_slices=g["S"],
                              dtype=BF16, use_tuned_config=True, device_name=torch.cuda.get_device_name())
    cfg = dataclasses.replace(cfg, shrink_split_k=split)
    al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=128, max_loras=4,
                                   block_size=cfg.block_size_m, adapter_enabled=kw["adapter_enabled"])
    got = out.clone()
    fused_moe_lora(got, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw)
    assert_close(got, expected, BF16)
    assert_close(got.float() - out.float(), expected - out.float(), BF16, name="delta")


@pytest.mark.cuda
@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
def test_cuda_split_mixtral_widths(split, w2):
    """Mixtral-8x7B's widths (K up to 14336) in 2 / 4 / 8 splits: a split's range of 8192 columns does not fit
    shared memory as one tile (it failed to launch before the shrink looped over tiles)."""
    from tests.kernels.moe_lora_gpu_cases import BF16, _gpu_layer
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch

    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(8, 16, 64, BF16, w2, H=4096, I=14336, top_k=2)
    expected = out.float()
    fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    cfg = MoELoRATileConfig(block_size_m=16, block_size_n=256, block_size_k=256, num_n_splits=4, num_stages=3,
                            shrink_split_k=split)
    al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=8, max_loras=4,
                                   block_size=cfg.block_size_m, adapter_enabled=kw["adapter_enabled"])
    got = out.clone()
    fused_moe_lora(got, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw)
    assert_close(got, expected, BF16)
    assert_close(got.float() - out.float(), expected - out.float(), BF16, name="delta")


@pytest.mark.cuda
def test_cuda_split_graph_replay():
    """Align + the split op captured once in a CUDA graph, replayed with new routing and adapters."""
    from tests.kernels.moe_lora_gpu_cases import check_graph_replay

    check_graph_replay(128, MoELoRATileConfig(block_size_m=16, block_size_n=256, block_size_k=128, num_n_splits=3,
                                              shrink_split_k=8))


# ---------------------------------------------------------------- the tuner and the benchmark can time it

def test_split_candidates_launch_configs():
    from benchmarks.kernels import tune_moe_space as space

    heur = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=256, BLOCK_SIZE_K=128, NUM_N_SPLITS=1, num_warps=4, num_stages=3)
    cands = space.split_candidates(heur, K=2048, N=768, splits=[1, 4, 8, 16])
    assert {c["SHRINK_SPLIT_K"] for c in cands} == {4, 8, 16}  # 1 is today's kernel, not a variant
    assert {c["NUM_N_SPLITS"] for c in cands} == {1, 3}  # the heuristic's and one N tile per program
    assert {c["num_stages"] for c in cands} == {1, 3} and {c["num_warps"] for c in cands} == {4, 8}
    assert len(cands) == 24 and all(space.launch_config(c).shrink_split_k == c["SHRINK_SPLIT_K"] for c in cands)
    assert space.split_candidates(heur, K=16, N=768, splits=[2, 4]) == []  # one K tile: nothing to split


@pytest.fixture
def upstream_pairs_factor(monkeypatch):
    """The smoke shapes (9 tokens, top-2, 8 experts, 4 adapters: 18 pairs) on the sorted path, as with
    upstream's per-pair factor 8 (the default, 1, takes them per pair); tile configs recomputed."""
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(mc, "SMALL_BATCH_PAIRS_FACTOR", 8)
    mc._cached_config.cache_clear()
    yield
    mc._cached_config.cache_clear()


def test_tune_smoke_times_the_split_variant(tmp_path, device, poisoned_partials, upstream_pairs_factor):
    from benchmarks.kernels import tune_moe

    if device.type == "cuda":
        pytest.skip("--smoke tunes on the CPU interpreter")
    assert tune_moe.main(["--smoke", "--out", str(tmp_path), "--tokens", "9", "--ops", "lora",
                          "--shrink-splits", "2"]) == 0
    assert poisoned_partials, "the split candidates were not launched"
    for f in tmp_path.glob("fused_moe_lora_*.json"):  # whatever won loads as a typed config
        import json

        for entry in json.loads(f.read_text()).values():
            MoELoRATileConfig.from_json(entry, source=str(f))


def test_benchmark_flag_forces_the_split_on_the_fused_ops(device, monkeypatch, poisoned_partials,
                                                          upstream_pairs_factor):
    import benchmarks.kernels.benchmark_moe_lora as lb
    from benchmarks.kernels.moe_lora_variants import force_shrink_split_k
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(mc, "get_moe_lora_config", mc.get_moe_lora_config)  # restored after the test
    dtype, M = torch.bfloat16, 9  # the sorted path (4 adapters, 8 experts, top-2)
    case = lb.build_case(lb.SMOKE_SHAPE, dtype, device, 16, 4, 16, 0)
    x, _, tw, ti, slots = lb.make_inputs(case, M, 4, dtype, device, 0)
    case.set_mapping(slots)
    force_shrink_split_k(2)
    cfg = mc.get_moe_lora_config("fused_moe_lora_w2", num_pairs=18, num_experts=8, max_loras=4, rank=16, K=64,
                                 N=64, num_slices=1, dtype=dtype, use_tuned_config=False, device_name="cpu")
    assert (cfg.shrink_split_k, cfg.num_n_splits, cfg.num_stages) == (2, -(-64 // cfg.block_size_n), 1)
    out = case.layer.quant_method.apply(case.layer, x, tw, ti, lora_context=case.layer._lora_context)
    assert len(poisoned_partials) == 2  # w13 and w2
    assert lb.norm_err(out, lb.reference(case, x, tw, ti, slots, True)) < lb.TOLERANCE[dtype]
    with pytest.raises(ValueError, match="shrink-split-k"):
        force_shrink_split_k(0)


def test_variant_compiles_for_hopper_with_a_shorter_memory_chain():
    """sm_90 compile of today's kernel and the split variant at 64 tokens (no GPU needed): no spills, and
    each split launch waits for fewer dependent memory round trips than today's one program."""
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("benchmarks/kernels/moe_lora_static_report.py", "--tokens", "64", "--splits", "8")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines() if ln.startswith("| 64 |")]
    # w13, w2: the kernel with its ids in turn, today's (SORTED_EARLY_IDS), the split's shrink and expand
    assert len(rows) == 8, out
    for gemm in ("w13", "w2"):
        before = next(r for r in rows if r[1] == gemm and r[2] == "one launch, ids in turn")
        today = next(r for r in rows if r[1] == gemm and r[2] == "one launch, early ids (today)")
        assert int(today[-1]) <= int(before[-1]), rows  # the ids in one round trip: no longer a chain
        split = [r for r in rows if r[1] == gemm and r[3] in ("shrink", "expand")]
        assert len(split) == 2 and all(r[6] == "0" for r in rows if r[1] == gemm), rows  # no spills
        assert sum(int(r[-1]) for r in split) < int(today[-1]), rows


# the small-batch cases, and A over three K ranges of 512 (K 1100) with N not a multiple of BLOCK_N
PAIR_SPLIT_CASES = SMALL + [Case(5, 2, 4, 2, 16, dtype=F16, K=1100, N=72, mul_w=True, layout="view", every=True),
                            Case(3, 8, 9, 3, 32, S=1, per_pair_x=True, mul_w=True, K=40, N=100, disabled=(0,),
                                 dtype=BF16)]


@pytest.mark.parametrize("fanout", [False, True], ids=["nsplits", "fanout"])
@pytest.mark.parametrize("width", [16, 512])
@pytest.mark.parametrize("c", PAIR_SPLIT_CASES, ids=_id)
def test_pair_split_equals_reference(device, c, width, fanout, poisoned_partials, monkeypatch):
    """PAIR_KERNEL 2 against the fp64 per-pair reference (start values back bit for bit where there is no delta,
    disabled slots, tokens without an adapter, expert maps, routed weights), its expand with the config's
    N-splits or one N tile per program (PAIR_SPLIT_FANOUT); the partials scratch is poisoned, so a partial read
    that no shrink program wrote shows."""
    monkeypatch.setattr(op, "PAIR_KERNEL", 2)
    monkeypatch.setattr(op, "_PAIR_SPLIT_WIDTH", width)
    monkeypatch.setattr(op, "PAIR_SPLIT_FANOUT", fanout)
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    # N tiles of 16 in one N-split: several tiles per expand program, or (fanout) one program per tile
    cfg = dataclasses.replace(_config(c, device, c.M * c.top_k), block_size_n=16, num_n_splits=1)
    op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, **kw, **geo)
    check(c, out, start, delta, parent)
    if c.M:
        assert poisoned_partials, "PAIR_KERNEL 2 must run the two launches"
        assert poisoned_partials[0].shape[0] == split_layout(c.K, -(-c.K // width))[1]


def test_pair_split_by_shape(monkeypatch):
    """On by default (it won on the H200 at Mixtral-8x7B's width): the slices beyond the prefetch kernel's
    (Mixtral's w13 and w2) take it at any pair count, smaller ones keep their kernel below the work threshold;
    AUTO_PAIR_SPLIT off gives the pair kernel back, and without the threshold so do the narrow slices."""
    assert op.PAIR_KERNEL is None and op.AUTO_PAIR_SPLIT is True
    assert op.auto_pair_kernel(2, 14336, 4096, 16) == 2 and op.auto_pair_kernel(32, 4096, 28672, 16) == 2
    assert op.auto_pair_kernel(8, 2048, 1536, 16) == 1 and op.auto_pair_kernel(16, 2048, 1536, 16) == 0
    monkeypatch.setattr(op, "AUTO_PAIR_SPLIT", False)
    assert op.auto_pair_kernel(2, 14336, 4096, 16) == 0
    monkeypatch.setattr(op, "PAIR_SPLIT_MIN_WORK", None)
    assert op.auto_pair_kernel(512, 2048, 768, 32) == 0


def test_pair_split_by_work():
    """From PAIR_SPLIT_MIN_WORK (pairs x K x N of one slice) on, every width takes the two launches: Qwen3-30B-A3B
    from 16 tokens (128 pairs) on, gpt-oss-20b from 4 tokens (16 pairs); up to 8 pairs the prefetch kernel stays."""
    assert op.PAIR_SPLIT_FANOUT is True and op.PAIR_SPLIT_EXPAND_BLOCK_N == 256
    assert op.auto_pair_kernel(128, 2048, 768, 32) == 2 and op.auto_pair_kernel(512, 768, 2048, 16) == 2
    assert op.auto_pair_kernel(64, 2048, 768, 32) == 0 and op.auto_pair_kernel(32, 768, 2048, 16) == 0
    assert op.auto_pair_kernel(16, 2880, 2880, 16) == 2 and op.auto_pair_kernel(8, 2880, 2880, 16) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_pair_split_mixtral_sizes_in_a_cuda_graph(M, w2, monkeypatch):
    """Mixtral-8x7B's widths (K 4096 / 14336) at 1-16 tokens, 4 slots (one token without an adapter), captured in
    a CUDA graph and replayed with new routing and slots, against the torch reference."""
    from tests.kernels.moe_lora_gpu_cases import check_pair_graph_replay

    monkeypatch.setattr(op, "PAIR_KERNEL", 2)
    check_pair_graph_replay(8, M, w2, H=4096, I=14336, top_k=2)


@pytest.mark.cuda
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
@pytest.mark.parametrize("M", [32, 64])
def test_pair_split_fanout_qwen3_sizes_in_a_cuda_graph(M, w2, monkeypatch):
    """Qwen3-30B-A3B's widths at a decode batch of 32-64 tokens (256-512 pairs) through the two launches with one
    N tile per expand program (PAIR_SPLIT_FANOUT), in a CUDA graph replayed with new routing and slots."""
    from tests.kernels.moe_lora_gpu_cases import check_pair_graph_replay

    monkeypatch.setattr(op, "PAIR_KERNEL", 2)
    monkeypatch.setattr(op, "PAIR_SPLIT_FANOUT", True)
    check_pair_graph_replay(128, M, w2, H=2048, I=768, top_k=8)
