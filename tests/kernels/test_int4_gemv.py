"""The int4 GEMV of the unsorted small-batch path (``GEMV=1``, ``_int4_gemv_kernel.py``; the sorted multi-row
GEMV: test_int4_gemv_rows.py) against an fp64
reference built from Int4Weight.dequantize (independent of the packing) and against the tl.dot kernel."""
import dataclasses

import pytest
import torch

from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import Int4TileConfig
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, invoke_int4_moe_gemm


def _case(rows, top_k, E, N, K, group, has_zeros, act_order, general, seed, device, dtype):
    gen = torch.Generator().manual_seed(seed)
    ws = [random_int4(N, K, group, has_zeros, act_order, gen) for _ in range(E)]
    if general:  # a TP slice of an act-order w2: every channel's group drawn at random (uneven groups)
        for w in ws:
            w.g_idx = torch.randint(0, K // group, (K,), generator=gen, dtype=torch.int32)
    pw = _packed(ws, group, has_zeros, act_order, device)
    assert (pw.g_idx is not None) == general and (pw.perm is not None) == act_order
    a = torch.randn(rows, K, generator=gen).to(dtype=dtype, device=device)
    ids = torch.randint(-1, E, (rows, top_k), generator=gen).to(torch.int32)
    ids[0, 0] = E - 1  # the last expert is used
    ids[-1, -1] = -1  # a pair with no local expert
    tw = torch.rand(rows, top_k, generator=gen)
    return ws, pw, a, ids.to(device), tw.to(device)


def _reference(ws, a, ids, tw, top_k, weighted):
    flat = ids.reshape(-1).long().cpu()
    ref = torch.zeros(flat.numel(), ws[0].q.shape[0], dtype=torch.float64)
    for p, e in enumerate(flat.tolist()):
        if e >= 0:
            ref[p] = ws[e].dequantize(torch.float64) @ a[p // top_k].double().cpu()
            if weighted:
                ref[p] *= float(tw.reshape(-1)[p])
    return ref, flat >= 0


def _run(a, pw, ids, tw, top_k, cfg, weighted, dtype):
    N = pw.n
    out = torch.full((ids.numel(), N), float("nan"), dtype=dtype, device=a.device)  # poisoned
    buf = torch.full((cfg.split_k * out.numel(),), float("nan"), device=a.device)  # poisoned too
    invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, topk_weights=tw if weighted else None,
                         mul_routed_weight=weighted, config=cfg, split_buffer=buf,
                         pair_expert_ids=ids.reshape(-1).contiguous())
    return out


# (rows, top_k, E, N, K, group, has_zeros, act_order, general g_idx, split_k, block_k)
CASES = [
    (3, 2, 4, 48, 64, 32, False, False, False, 1, 32),  # symmetric, one group per K-tile
    (3, 2, 4, 64, 128, 16, True, False, False, 1, 64),  # 4 groups per K-tile (a scale row per word row)
    (3, 1, 3, 40, 96, 32, True, False, False, 2, 64),  # uneven K tail, an N tail, split-K
    (2, 2, 4, 40, 128, 32, True, True, False, 1, 32),  # act-order: perm
    (2, 2, 4, 40, 64, 16, False, True, True, 2, 16),  # act-order with uneven groups: g_idx kept (per-weight path)
    (2, 2, 3, 32, 256, 128, True, False, False, 2, 128),  # group 128, zeros up to 16, split-K
    (2, 2, 3, 32, 192, 32, True, False, False, 4, 32),  # 6 K-steps over 4 splits: the last split empty
]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,top_k,E,N,K,group,has_zeros,act_order,general,split,bk", CASES)
def test_gemv_matches_dequantized_reference(rows, top_k, E, N, K, group, has_zeros, act_order, general, split, bk,
                                            dtype, weighted, device):
    ws, pw, a, ids, tw = _case(rows, top_k, E, N, K, group, has_zeros, act_order, general, rows * 7 + K, device,
                               dtype)
    cfg = Int4TileConfig(16, 16, bk, split_k=split, num_stages=1, gemv=1)
    out = _run(a, pw, ids, tw, top_k, cfg, weighted, dtype).cpu()
    ref, routed = _reference(ws, a, ids, tw, top_k, weighted)
    assert_close(out[routed].float(), ref[routed], dtype)
    if split > 1:  # every row written: pairs with no local expert are zeros
        assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    else:  # pairs with no local expert are left untouched
        assert torch.isnan(out[~routed]).all()
    # the tl.dot kernel at the same tiles agrees (it rounds each dequantised weight to the activation dtype);
    # not in bf16 on the CPU interpreter, where the dot kernel's output is garbage (its bf16 casts; its own
    # tests run fp32 / fp16 only)
    if dtype == torch.bfloat16 and a.device.type == "cpu":
        return
    dot = _run(a, pw, ids, tw, top_k, dataclasses.replace(cfg, gemv=0), weighted, dtype).cpu()
    assert_close(out[routed].float(), dot[routed].double(), dtype)


def test_gemv_exact_in_fp32(device):
    """Integer activations and power-of-two scales: every product and sum is exact in fp32, so the GEMV
    must equal the reference exactly; a code read from the wrong nibble or a wrong zero point cannot hide
    inside a tolerance.  (On the test's device: with a GPU present, CPU tensors reach no Triton backend.)"""
    rows, top_k, E, N, K, group = 2, 2, 3, 32, 128, 32
    gen = torch.Generator().manual_seed(5)
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    for w in ws:
        w.scales = (2.0 ** torch.randint(-3, 3, tuple(w.scales.shape), generator=gen)).half()
    pw = _packed(ws, group, True, False, device)
    a = torch.randint(-8, 9, (rows, K), generator=gen).float().to(device)
    ids = torch.tensor([[0, 2], [1, 2]], dtype=torch.int32, device=device)
    out = _run(a, pw, ids, None, top_k, Int4TileConfig(16, 32, 64, num_stages=1, gemv=1), False, torch.float32)
    ref, _ = _reference(ws, a, ids, None, top_k, False)
    assert torch.equal(out.double().cpu(), ref)


def test_heuristic_gives_the_gemv_to_the_unsorted_launch(monkeypatch):
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    for pairs, E, N, K in ((8, 128, 1536, 2048), (8, 128, 2048, 768), (2, 8, 28672, 4096), (2, 8, 4096, 14336)):
        cfg = mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, sorted_pairs=False)
        assert cfg.gemv == 1 and cfg.block_size_k % 8 == 0
        programs = pairs * -(-N // cfg.block_size_n) * cfg.split_k
        assert programs >= mod.GEMV_PROGRAMS_PER_SM * 132 or cfg.split_k * 2 > -(-K // cfg.block_size_k)
        assert mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, sorted_pairs=False, gemv=False).gemv == 0


def test_gemv_refuses_bad_values():
    from tests.quantization.int4_moe_setup import random_int4 as r4

    pw = _packed([r4(16, 32, 16, False, False, torch.Generator().manual_seed(0))], 16, False, False, "cpu")
    cfg = Int4TileConfig(16, 16, 16, num_stages=1, gemv=1)
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="GEMV=2"):
        invoke_int4_moe_gemm(torch.randn(1, 32), pw, torch.empty(1, 16), top_k_in=1,
                             config=dataclasses.replace(cfg, gemv=2), pair_expert_ids=one)
    assert Int4TileConfig.from_json({"GEMV": 1}, base=cfg).gemv == 1


def test_gemv_compiles_for_hopper():
    """The interpreter never compiles: compile the GEMV for sm_90 in a subprocess (no GPU needed)."""
    assert run_without_interpreter("tests/kernels/int4_gemv_hopper_compile.py").count("ok ") == 7


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,has_zeros", [(128, False), (128, True), (32, True)])
@pytest.mark.parametrize("shape", ["Qwen3-30B-A3B", "Mixtral-8x7B"])
def test_gemv_real_shapes_cuda(shape, group, has_zeros, dtype):
    """The heuristic's GEMV config at the decode shapes (1 token, both GEMMs) on the GPU."""
    H, I, E, top_k = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2)}[shape]
    E_used = min(E, 2 * top_k)  # only the experts that get a pair need weights
    for N, K in ((2 * I, H), (H, I)):
        gen = torch.Generator().manual_seed(N + K)
        ws = [random_int4(N, K, group, has_zeros, False, gen) for _ in range(E_used)]
        pw = _packed(ws, group, has_zeros, False, "cuda")
        a = torch.randn(1, K, generator=gen).to(dtype=dtype, device="cuda")
        ids = torch.randperm(E_used, generator=gen)[:top_k].reshape(1, top_k).to(torch.int32)
        ids[0, -1] = E_used - 1
        tw = torch.rand(1, top_k, generator=gen).cuda()
        cfg = get_int4_moe_config(top_k, E_used, N, K, group, dtype, sorted_pairs=False)
        assert cfg.gemv == 1
        out = _run(a, pw, ids.cuda(), tw, top_k, cfg, True, dtype).cpu()
        ref, _ = _reference(ws, a, ids, tw, top_k, True)
        assert_close(out.float(), ref, dtype)
        dot = _run(a, pw, ids.cuda(), tw, top_k, get_int4_moe_config(top_k, E_used, N, K, group, dtype,
                                                                         sorted_pairs=False, gemv=False),
                   True, dtype).cpu()
        assert_close(out.float(), dot.double(), dtype)


def test_static_report_gemv_runs_fewer_instructions_per_weight():
    """The static report (sm_90 SASS, no GPU): at the heuristic's 1-token tiles the GEMV's main loop runs
    fewer instructions per weight than the dot kernel's default there, within the hardware limits."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.test_4bit_decode_tools import _cells
    from tests.kernels.test_4bit_decode_tools import _run as run_script

    proc = run_script(["benchmarks/kernels/kernel_static_report.py", "--kernels", "int4", "--tokens", "1",
                       "--shapes", "Qwen3-30B-A3B", "--variants", "reshape (UNPACK 0)", "GEMV"], interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [_cells(ln) for ln in proc.stdout.splitlines() if ln.startswith("| int4")]
    assert len(rows) == 4  # 2 GEMMs x 2 variants
    per_weight = {(r[3], r[4]): float(r[10]) for r in rows}
    for r in rows:
        regs, spill, shared = int(r[6]), int(r[7]), int(r[8].split()[0])
        assert 0 < regs <= 255 and spill == 0 and shared <= 232448 and "(sass)" in r[9], r
    for gemm in ("w13", "w2"):
        assert per_weight[(gemm, "GEMV")] < 0.6 * per_weight[(gemm, "reshape (UNPACK 0)")], per_weight
