"""The bf16 / fp16 / fp32 expert GEMV of pairwise launches (``GEMV=1``, ``_fused_moe_gemv_kernel.py``) against
an fp64 loop reference and against the tl.dot kernel, its selection and its refusals."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from tests.utils import assert_close, poison_, run_without_interpreter
from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm_mod
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemv as gemv_mod
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import invoke_fused_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (moe_align_block_size, pairwise_alignment,
                                                                           use_pairwise_alignment)


def _problem(M, top_k, E, N, K, per_pair, bias, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)  # made on the device: real sizes stay quick on a GPU
    pairs = M * top_k
    ids = torch.randint(-1, E, (M, top_k), generator=gen, device=device).to(torch.int32)
    ids[0, 0] = E - 1  # the last expert is used
    ids[-1, -1] = -1  # a pair with no local expert (an expert map's -1)
    if pairs > 2:
        ids.view(-1)[1] = 0  # the first expert too
    a = torch.randn(pairs if per_pair else M, K, generator=gen, device=device).to(dtype)
    w = (torch.randn(E, N, K, generator=gen, device=device) / K ** 0.5).to(dtype)
    b = (torch.randn(E, N, generator=gen, device=device) * 0.5).to(dtype) if bias else None
    tw = torch.rand(M, top_k, generator=gen, device=device) * 0.9 + 0.1
    return ids, a, w, b, tw


def _reference(ids, a, w, b, tw, top_k_in, weighted):
    """fp64, one pair at a time: (a_row @ w[e].T + b[e]) * weight; pairs with expert -1 stay zero."""
    flat = ids.reshape(-1).cpu().tolist()
    ref = torch.zeros(len(flat), w.shape[1], dtype=torch.float64, device=w.device)
    for p, e in enumerate(flat):
        if e < 0:
            continue
        y = w[e].double() @ a[p // top_k_in].double()
        if b is not None:
            y = y + b[e].double()
        ref[p] = y * (float(tw.reshape(-1)[p]) if weighted else 1.0)
    return ref.cpu()


def _run(ids, a, w, b, tw, top_k_in, weighted, cfg, *, pairwise=True, out_pad=0):
    pairs = ids.numel()
    al = pairwise_alignment(ids, cfg.block_size_m) if pairwise else moe_align_block_size(ids, cfg.block_size_m,
                                                                                           w.shape[0])
    buf = poison_(torch.empty(pairs, w.shape[1] + out_pad, dtype=a.dtype, device=a.device))
    out = buf[:, : w.shape[1]]
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in, topk_weights=tw,
                          mul_routed_weight=weighted, bias=b, config=cfg, pairwise=pairwise)
    if out_pad:
        assert buf[:, w.shape[1]:].isnan().all(), "columns past N must not be written"
    return out


# (M, top_k, E, N, K, per_pair (GEMM2-style a), bias, weighted, block_n, block_k, split_k)
CASES = [
    (1, 4, 16, 48, 64, False, False, False, 16, 32, 1),  # GEMM1-style, K a multiple of the tile, N tail
    (1, 8, 32, 64, 80, False, True, False, 32, 32, 1),  # K tail (80 = 2 x 32 + 16), bias
    (2, 2, 8, 40, 96, True, True, True, 8, 64, 2),  # GEMM2-style, routed weights, split-K with a K tail
    (3, 1, 4, 32, 128, True, False, True, 16, 16, 4),  # top_k 1, 8 K-tiles over 4 splits
    (1, 2, 8, 16, 48, False, True, True, 4, 16, 2),  # 4-column tiles, bias added once over the splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,top_k,E,N,K,per_pair,bias,weighted,bn,bk,split", CASES)
def test_gemv_matches_reference(M, top_k, E, N, K, per_pair, bias, weighted, bn, bk, split, dtype, device):
    ids, a, w, b, tw = _problem(M, top_k, E, N, K, per_pair, bias, dtype, device, seed=N + K + split)
    top_k_in = 1 if per_pair else top_k
    cfg = TileConfig(16, bn, bk, split_k=split, num_stages=1, gemv=1)
    out = _run(ids, a, w, b, tw, top_k_in, weighted, cfg, out_pad=8).cpu()
    ref = _reference(ids, a, w, b, tw, top_k_in, weighted)
    routed = ids.reshape(-1).cpu() >= 0
    assert_close(out[routed].float(), ref[routed], dtype)
    if split > 1:  # the reduction writes every row: a pair with no local expert gets zeros
        assert torch.equal(out[~routed].float(), torch.zeros_like(out[~routed].float()))
    else:  # like the dot kernel: such rows are not written
        assert out[~routed].isnan().all()
    # the tl.dot kernel on the same routing agrees (not in bf16 on the CPU interpreter: its bf16 dot is wrong)
    if dtype == torch.bfloat16 and device.type == "cpu":
        return
    dot = _run(ids, a, w, b, tw, top_k_in, weighted, TileConfig(16, 16, 16, num_stages=1)).cpu()
    assert_close(out[routed].float(), dot[routed].double(), dtype)


def test_split_k_writes_every_partial_row(device):
    """With SPLIT_K > 1 every (split, pair) row of the partial-sum buffer is written, zeros for a pair without a
    local expert, so a reused buffer needs no zeroing: a NaN-poisoned one gives the same result."""
    ids, a, w, b, tw = _problem(2, 3, 8, 24, 96, False, True, torch.float32, device, seed=11)
    cfg = TileConfig(16, 8, 16, split_k=4, num_stages=1, gemv=1)
    buf = torch.full((4 * 6 * 24 + 5,), float("nan"), device=device)
    out = poison_(torch.empty(6, 24, device=device))
    gemv_mod.invoke_fused_moe_gemv(a, w, out, pair_expert_ids=ids.reshape(-1).contiguous(), top_k_in=3, config=cfg,
                                   topk_weights=tw, mul_routed_weight=True, bias=b, split_buffer=buf)
    ref = _reference(ids, a, w, b, tw, 3, True)
    routed = ids.reshape(-1).cpu() >= 0
    assert_close(out.cpu()[routed], ref[routed], torch.float32)
    assert torch.equal(out.cpu()[~routed], torch.zeros_like(out.cpu()[~routed]))


def test_gemv_exact_in_fp32(device):
    """Small integers: every product and sum is exact in fp32, so the GEMV must equal the reference bit for bit;
    a weight read from the wrong column or a tail counted twice cannot hide inside a tolerance."""
    gen = torch.Generator().manual_seed(3)
    E, N, K, M, top_k = 6, 24, 72, 2, 3
    w = torch.randint(-4, 5, (E, N, K), generator=gen).float()
    a = torch.randint(-4, 5, (M, K), generator=gen).float()
    b = torch.randint(-8, 9, (E, N), generator=gen).float()
    ids = torch.tensor([[5, 0, 3], [2, -1, 5]], dtype=torch.int32)
    tw = torch.full((M, top_k), 0.5)
    args = (ids.to(device), a.to(device), w.to(device), b.to(device), tw.to(device), top_k, True)
    ref = _reference(*args)
    for bn, bk, split in ((8, 16, 1), (16, 32, 2), (32, 64, 1)):
        out = _run(*args, TileConfig(16, bn, bk, split_k=split, num_stages=1, gemv=1)).cpu()
        routed = ids.reshape(-1) >= 0
        assert torch.equal(out[routed].double(), ref[routed]), (bn, bk, split)


def test_gemv_refuses_bad_configs_and_routing(device):
    ids, a, w, b, tw = _problem(1, 2, 8, 16, 32, False, False, torch.float32, device, seed=1)
    good = TileConfig(16, 16, 16, num_stages=1, gemv=1)
    with pytest.raises(ValueError, match="GEMV=2"):
        _run(ids, a, w, b, tw, 2, False, dataclasses.replace(good, gemv=2))
    with pytest.raises(ValueError, match="BLOCK_SIZE_N=24"):
        _run(ids, a, w, b, tw, 2, False, dataclasses.replace(good, block_size_n=24))
    with pytest.raises(ValueError, match="SPLIT_K=32"):
        _run(ids, a, w, b, tw, 2, False, dataclasses.replace(good, split_k=32))
    with pytest.raises(ValueError, match="pairwise routing only"):  # the GEMV never reads a sorted layout
        _run(ids, a, w, b, tw, 2, False, good, pairwise=False)
    al = moe_align_block_size(ids, 16, 8)  # sorted routing claimed to be pairwise
    out = torch.empty(2, 16, device=device)
    with pytest.raises(ValueError, match="one block per pair"):
        invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                              num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=2, config=good,
                              pairwise=True)
    with pytest.raises(ValueError, match="pair_expert_ids must be contiguous int32"):  # the launcher called directly
        gemv_mod.invoke_fused_moe_gemv(a, w, torch.empty(2, 16, device=device), pair_expert_ids=ids.reshape(-1).long(),
                                       top_k_in=2, config=good)
    with pytest.raises(ValueError, match="rows \\* top_k_in"):
        gemv_mod.invoke_fused_moe_gemv(a, w, torch.empty(3, 16, device=device), pair_expert_ids=ids.reshape(-1),
                                       top_k_in=2, config=good)
    # small tiles are fine for the GEMV, not for the dot kernel
    with pytest.raises(ValueError, match="powers of two >= 16"):
        _run(ids, a, w, b, tw, 2, False, dataclasses.replace(good, block_size_n=8, gemv=0))
    assert TileConfig.from_json({"GEMV": 1}, base=TileConfig(16, 16, 16)).gemv == 1


SHAPES = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2),
          "gpt-oss-20b": (2880, 2880, 32, 4)}


@pytest.fixture
def fresh_config_cache():
    """Configs made with patched helpers must not outlive the test in ``get_fused_moe_config``'s cache."""
    gemm_mod._cached_config.cache_clear()
    yield
    gemm_mod._cached_config.cache_clear()


def test_heuristic_off_by_default_and_on_for_pairwise_launches(monkeypatch, fresh_config_cache):
    monkeypatch.setattr(gemm_mod, "triton_interpreting", lambda: False)
    monkeypatch.setattr(gemv_mod, "triton_interpreting", lambda: False)
    monkeypatch.setattr(gemm_mod, "tuned_tiles", lambda base, *a, **k: base)  # the heuristic alone
    assert gemm_mod.GEMV_PAIRWISE is False  # off until timed on a GPU
    for H, I, E, top_k in SHAPES.values():
        for M in (1, 2, 4, 16):
            pairs = M * top_k
            pairwise = use_pairwise_alignment(pairs, E)
            off = gemm_mod.get_two_gemm_configs(pairs, E, 2 * I, H, I, top_k, torch.bfloat16, pairwise=pairwise)
            assert [c.gemv for c in off] == [0, 0]
            monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", True)
            on = gemm_mod.get_two_gemm_configs(pairs, E, 2 * I, H, I, top_k, torch.bfloat16, pairwise=pairwise)
            # a caller that sorts (the default) never gets the GEMV
            assert [c.gemv for c in gemm_mod.get_two_gemm_configs(pairs, E, 2 * I, H, I, top_k, torch.bfloat16)] == [0, 0]
            monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", False)
            assert [c.gemv for c in on] == ([1, 1] if pairwise else [0, 0]), (H, M)
            assert on[0].block_size_m == on[1].block_size_m == off[0].block_size_m  # one alignment
            for cfg, (N, K) in zip(on, ((2 * I, H), (H, I))):
                gemm_mod.check_tile_config(cfg)
                if cfg.gemv:
                    programs = pairs * -(-N // cfg.block_size_n) * cfg.split_k
                    target = gemv_mod.GEMV_PROGRAMS_PER_SM * 132
                    assert programs >= target or cfg.block_size_n == gemv_mod.GEMV_MIN_BLOCK_N, (N, K, cfg)
                    assert cfg.block_size_k >= 256 and cfg.block_size_n * cfg.block_size_k >= 4096
        assert use_pairwise_alignment(top_k, E)  # one token: pairwise on all three shapes


def test_tuned_entries_and_the_gemv(tmp_path, monkeypatch, caplog, fresh_config_cache):
    """Tuned entries vs the GEMV (Qwen3-30B-A3B's GEMM1: 1 and 2 tokens are pairwise, 16 are sorted):
    an entry with GEMV=1 runs the GEMV on pairwise launches, its keys over the GEMV's heuristic tiles, and never
    reaches a sorted launch (the nearest entry to 16 tokens, or a caller that sorts; logged); an entry tuned for
    tl.dot (no GEMV key) is used while GEMV_PAIRWISE is off and bypassed, logged, while it is on."""
    from vllm.kernel_configs import clear_cache, config_file_name

    E, N, K, top_k = 128, 1536, 2048, 8
    name = config_file_name("fused_moe_gemm", {"E": E, "N": N, "K": K}, gemm_mod._device_name())
    dot_entry = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_warps": 8}
    (tmp_path / name).write_text(json.dumps({"1": dot_entry, "2": {"GEMV": 1, "BLOCK_SIZE_K": 1024}}))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own configs
    monkeypatch.setattr(gemv_mod, "triton_interpreting", lambda: False)
    clear_cache()
    try:
        get = lambda tokens, pairwise=True: gemm_mod.get_fused_moe_config(  # noqa: E731
            tokens * top_k, E, N, K, top_k, torch.bfloat16, pairwise=pairwise)
        gemv_2 = gemv_mod.gemv_config(2 * top_k, N, K, torch.bfloat16)
        for on in (False, True):
            monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", on)
            one = get(1)
            if on:  # the dot entry bypassed: the GEMV's heuristic tiles
                assert one == gemv_mod.gemv_config(top_k, N, K, torch.bfloat16)
                assert "run the GEMV, not the tl.dot tiles" in caplog.text
            else:
                assert (one.gemv, one.block_size_n, one.block_size_k, one.num_warps) == (0, 128, 128, 8)
            assert get(2) == dataclasses.replace(gemv_2, block_size_k=1024)
            with caplog.at_level(logging.WARNING):
                sixteen = get(16, pairwise=False)
            assert sixteen == gemm_mod._gpu_config(16 * top_k, E, N, K, torch.bfloat16)
            assert "pairwise routing only" in caplog.text
            caplog.clear()
            with caplog.at_level(logging.WARNING):  # two tokens, but the caller sorts
                assert get(2, pairwise=False) == gemm_mod._gpu_config(2 * top_k, E, N, K, torch.bfloat16)
            assert "pairwise routing only" in caplog.text
            caplog.clear()
    finally:
        clear_cache()


def test_gemv_compiles_for_hopper():
    """The interpreter never compiles: compile the GEMV for sm_90 in a subprocess (no GPU needed)."""
    assert run_without_interpreter("tests/kernels/fused_moe_gemv_hopper_compile.py").count("ok ") == 5


def test_static_report_bf16_rows():
    """The static report (sm_90 SASS, no GPU) at one token: the GEMV's main loop keeps to FMAs and register
    loads (no shared memory, no barrier-bound layout conversion), within the hardware limits, beside the dot
    kernel at the H200's tiles for the same launch."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.test_4bit_decode_tools import _cells
    from tests.kernels.test_4bit_decode_tools import _run as run_script

    proc = run_script(["benchmarks/kernels/kernel_static_report.py", "--kernels", "bf16", "--tokens", "1",
                       "--shapes", "Qwen3-30B-A3B"], interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [_cells(ln) for ln in proc.stdout.splitlines() if ln.startswith("| bf16")]
    assert sorted((r[3], r[4]) for r in rows) == [("w13", "GEMV"), ("w13", "tl.dot"), ("w2", "GEMV"), ("w2", "tl.dot")]
    for r in rows:
        regs, spill, shared = int(r[6]), int(r[7]), int(r[8].split()[0])
        assert 0 < regs <= 255 and spill == 0 and shared <= 232448 and "(sass)" in r[9], r
        if r[4] == "GEMV":  # one FFMA per weight, bf16 widening, the loads: nothing through shared memory
            assert 2.0 <= float(r[10]) <= 4.0 and float(r[12]) == 0.0 and shared <= 1024, r


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_real_shapes_cuda(shape, bias, dtype, monkeypatch):
    """The heuristic's GEMV tiles at one token (both GEMMs) against the reference and the dot kernel."""
    H, I, E, top_k = SHAPES[shape]
    E_used = min(E, 2 * top_k)  # only the experts that get a pair need weights
    for N, K, per_pair in ((2 * I, H, False), (H, I, True)):
        ids, a, w, b, tw = _problem(1, top_k, E_used, N, K, per_pair, bias, dtype, "cuda", seed=N + K)
        top_k_in = 1 if per_pair else top_k
        monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", True)
        cfg = gemm_mod.get_fused_moe_config(top_k, E, N, K, top_k_in, dtype, pairwise=True)
        monkeypatch.setattr(gemm_mod, "GEMV_PAIRWISE", False)
        dot_cfg = gemm_mod.get_fused_moe_config(top_k, E, N, K, top_k_in, dtype, pairwise=True)
        assert cfg.gemv == 1 and dot_cfg.gemv == 0
        out = _run(ids, a, w, b, tw, top_k_in, per_pair, cfg).cpu()
        routed = ids.reshape(-1).cpu() >= 0
        assert_close(out[routed].float(), _reference(ids, a, w, b, tw, top_k_in, per_pair)[routed], dtype)
        dot = _run(ids, a, w, b, tw, top_k_in, per_pair, dot_cfg).cpu()
        assert_close(out[routed].float(), dot[routed].double(), dtype)
