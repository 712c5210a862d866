"""``vllm/platforms/pdl.EARLY_LOADS``: q/k norm + rotary, the split decode attention and its reduce load the step's
metadata and constant caches before their PDL wait.  Only the order of the loads changes: the outputs bit for
bit those without it (interpreter on CPU, native on a GPU), and the sm_90 builds load before the wait only with
it (pdl_early_loads_compile.py)."""
import math

import pytest
import torch

from tests.unit.test_paged_attention_triton import _scattered_tables
from vllm.attention import allocate_kv_cache, build_metadata
from vllm.attention.triton_backend import paged_attention_triton, write_kv_triton
from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite, qk_norm_rope
from vllm.platforms import pdl


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("sinks,window", [(False, None), (True, None), (True, 24)])
def test_decode_attention_gives_the_same_bits(num_splits, sinks, window, monkeypatch, device):
    gen = torch.Generator().manual_seed(num_splits)
    H, kvH, D, bs = 4, 2, 32, 4
    seq_lens = [37, 1, 300, 64, 65]
    num_blocks = sum(-(-s // bs) + 1 for s in seq_lens) + 3
    tables = _scattered_tables(seq_lens, bs, num_blocks, gen)
    cache = allocate_kv_cache(num_blocks, bs, kvH, D, torch.float32, device)
    cache.copy_(torch.randn(cache.shape, generator=gen))
    meta = build_metadata([1] * len(seq_lens), seq_lens, tables, bs, device)
    q = torch.randn(len(seq_lens), H, D, generator=gen).to(device)
    write_kv_triton(cache, torch.randn(len(seq_lens), kvH, D, generator=gen).to(device),
                    torch.randn(len(seq_lens), kvH, D, generator=gen).to(device), meta.slot_mapping)
    sink = (torch.randn(H, generator=gen) * 3).to(device) if sinks else None
    outs = []
    for early in (False, True):
        monkeypatch.setattr(pdl, "EARLY_LOADS", early)
        outs.append(paged_attention_triton(q, cache, meta, 1 / math.sqrt(D), num_splits=num_splits, sinks=sink,
                                           sliding_window=window))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kv_write", [False, True])
@pytest.mark.parametrize("norm", [None, "per_head"])
def test_qk_norm_rope_gives_the_same_bits(kv_write, norm, monkeypatch, device):
    gen = torch.Generator().manual_seed(3)
    T, hd, nq, nk = 5, 32, 4, 2
    qkv = torch.randn(T, (nq + 2 * nk) * hd, generator=gen).to(device, torch.bfloat16)
    q, k, v = qkv.split([nq * hd, nk * hd, nk * hd], dim=-1)
    pos = torch.tensor([0, 3, 9, 15, 2], device=device)
    ang = torch.rand(16, hd // 2, generator=gen) * 3
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    qw, kw = [(torch.rand(hd, generator=gen) + 0.5).to(device, torch.bfloat16) for _ in range(2)]
    runs = []
    for early in (False, True):
        monkeypatch.setattr(pdl, "EARLY_LOADS", early)
        cache = torch.zeros((2, 4, 4, nk, hd), device=device, dtype=torch.bfloat16)
        w = KVCacheWrite(v, cache, torch.tensor([1, 5, 6, 11, 15], device=device)) if kv_write else None
        out = qk_norm_rope(q, k, pos, cos, sin, head_dim=hd, norm=norm, q_weight=qw if norm else None,
                           k_weight=kw if norm else None, use_triton=True, kv_write=w)
        runs.append((*out, cache))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sm90_builds_load_before_the_wait_only_with_it():
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("tests/kernels/pdl_early_loads_compile.py")
    assert out.count("ok ") == 6, out


def test_fewer_round_trips_after_the_wait():
    """benchmarks/kernels/early_loads_report.py: every kernel the switch changes leaves fewer dependent round
    trips after its PDL wait with the switch than without, and spills nothing (the reason the switch exists)."""
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("benchmarks/kernels/early_loads_report.py")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 3, out
    for r in rows:
        off, on, loads, spills = int(r[2]), int(r[3]), int(r[4]), r[5]
        assert on < off and loads > 0 and spills == "0 B", r


def test_round_trips_after_the_wait_on_hand_written_sass():
    """The model counts only what follows the wait: a load issued before it counts as ready there."""
    from benchmarks.kernels.sass_round_trips import round_trips, round_trips_after_wait

    def sass(*lines: str) -> str:
        return "\n".join(f"        /*{16 * i:04x}*/    {ln} ;" for i, ln in enumerate(lines))

    early = sass("LDG.E R2, desc[UR4][R4.64]", "ACQBULK", "IMAD.WIDE R10, R2, 0x4, R12",
                 "LDG.E.128 R16, desc[UR4][R10.64]", "STG.E desc[UR4][R14.64], R19")
    late = sass("ACQBULK", "LDG.E R2, desc[UR4][R4.64]", "IMAD.WIDE R10, R2, 0x4, R12",
                "LDG.E.128 R16, desc[UR4][R10.64]", "STG.E desc[UR4][R14.64], R19")
    assert round_trips(early) == round_trips(late) == 2
    assert round_trips_after_wait(early) == 1 and round_trips_after_wait(late) == 2
    assert round_trips_after_wait(sass("LDG.E R2, desc[UR4][R4.64]", "STG.E desc[UR4][R14.64], R2")) is None
