"""The int4 multi-row GEMV of SORTED routing (``GEMV=1`` with ``moe_align_block_size``'s outputs,
``_int4_gemv_rows_kernel.py``) against an fp64 reference built from Int4Weight.dequantize (independent of the
packing) and against the tl.dot kernel."""
import dataclasses

import pytest
import torch

from tests.kernels.test_int4_gemv import _case, _reference
from tests.kernels.test_int4_moe_gemm import _packed
from tests.quantization.int4_moe_setup import random_int4
from tests.utils import assert_close, run_without_interpreter
from vllm.kernel_configs.tile_config import Int4TileConfig
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, invoke_int4_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def _ids(rows, top_k, E, seed, device):
    """Routing with experts of 0, 1 and several pairs, the last expert used, -1 pairs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E, (rows, top_k), generator=gen).to(torch.int32)
    flat = ids.view(-1)
    flat[:3] = 0  # expert 0: several pairs (blocks of BLOCK_SIZE_M 1-2 are full, larger ones padded)
    flat[3] = E - 1  # the last expert
    flat[-1] = -1  # a pair with no local expert
    flat[flat == 1] = 2  # expert 1: no pair
    return ids.to(device)


def _run_sorted(a, pw, ids, tw, top_k, cfg, weighted, dtype):
    N = pw.n
    al = moe_align_block_size(ids, cfg.block_size_m, pw.num_experts)
    out = torch.full((ids.numel(), N), float("nan"), dtype=dtype, device=a.device)  # poisoned
    buf = torch.full((cfg.split_k * out.numel(),), float("nan"), device=a.device)  # poisoned too
    invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, topk_weights=tw if weighted else None,
                         mul_routed_weight=weighted, config=cfg, split_buffer=buf,
                         sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                         num_tokens_post_padded=al.num_tokens_post_padded)
    return out


# (rows, top_k, E, N, K, group, has_zeros, act_order, general g_idx, split_k, block_m, block_k)
CASES = [
    (4, 2, 4, 48, 64, 32, False, False, False, 1, 1, 32),  # symmetric, one row per block
    (4, 2, 4, 64, 128, 16, True, False, False, 1, 2, 64),  # 4 groups per K-tile (a scale row per word row)
    (5, 2, 3, 40, 96, 32, True, False, False, 2, 4, 64),  # uneven K tail, an N tail, split-K, sentinels
    (3, 2, 4, 40, 128, 32, True, True, False, 1, 2, 32),  # act-order: perm
    (3, 2, 4, 40, 64, 16, False, True, True, 2, 8, 16),  # act-order with uneven groups: g_idx (per weight)
    (6, 2, 3, 32, 256, 128, True, False, False, 2, 16, 128),  # group 128, zeros up to 16, a mostly padded block
    (4, 2, 3, 32, 192, 32, True, False, False, 4, 2, 32),  # 6 K-steps over 4 splits: the last split empty
]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,top_k,E,N,K,group,has_zeros,act_order,general,split,bm,bk", CASES)
def test_gemv_rows_matches_dequantized_reference(rows, top_k, E, N, K, group, has_zeros, act_order, general, split,
                                                 bm, bk, dtype, weighted, device):
    ws, pw, a, _, tw = _case(rows, top_k, E, N, K, group, has_zeros, act_order, general, rows * 7 + K, device,
                             dtype)
    ids = _ids(rows, top_k, E, rows + K, device)
    cfg = Int4TileConfig(bm, 16, bk, split_k=split, num_stages=1, gemv=1)
    out = _run_sorted(a, pw, ids, tw, top_k, cfg, weighted, dtype).cpu()
    ref, routed = _reference(ws, a, ids, tw, top_k, weighted)
    assert_close(out[routed].float(), ref[routed], dtype)
    if split > 1:  # every row written: pairs with no local expert are zeros
        assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    else:  # pairs with no local expert are left untouched
        assert torch.isnan(out[~routed]).all()
    # the tl.dot kernel (its own alignment of 16 rows) agrees; not in bf16 on the CPU interpreter, where the
    # dot kernel's output is garbage
    if dtype == torch.bfloat16 and a.device.type == "cpu":
        return
    dot_cfg = dataclasses.replace(cfg, gemv=0, block_size_m=16, block_size_n=16, block_size_k=max(bk, 16))
    dot = _run_sorted(a, pw, ids, tw, top_k, dot_cfg, weighted, dtype).cpu()
    assert_close(out[routed].float(), dot[routed].double(), dtype)


def test_gemv_rows_exact_in_fp32(device):
    """Integer activations and power-of-two scales: every product and sum is exact in fp32, so the GEMV must
    equal the reference exactly (a wrong nibble, zero point, row or sentinel cannot hide in a tolerance)."""
    rows, top_k, E, N, K, group = 5, 2, 3, 32, 128, 32
    gen = torch.Generator().manual_seed(11)
    ws = [random_int4(N, K, group, True, False, gen) for _ in range(E)]
    for w in ws:
        w.scales = (2.0 ** torch.randint(-3, 3, tuple(w.scales.shape), generator=gen)).half()
    pw = _packed(ws, group, True, False, device)
    a = torch.randint(-8, 9, (rows, K), generator=gen).float().to(device)
    ids = torch.tensor([[0, 2], [0, 2], [2, 0], [0, 1], [2, -1]], dtype=torch.int32, device=device)
    for bm in (1, 2, 4):
        out = _run_sorted(a, pw, ids, None, top_k, Int4TileConfig(bm, 32, 64, num_stages=1, gemv=1), False,
                          torch.float32)
        ref, routed = _reference(ws, a, ids, None, top_k, False)
        out, routed = out.cpu(), routed.cpu()
        assert torch.equal(out[routed].double(), ref[routed]), bm
        assert torch.isnan(out[~routed]).all()


def test_gemv_rows_config_and_checks(monkeypatch):
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    # 16 tokens of Qwen3-30B-A3B (128 pairs over ~81 of 128 experts: 1.6 rows each) take the GEMV at 2 rows per
    # block, both GEMMs; 32 tokens (2.3 rows) too; Mixtral-8x7B (32 pairs on 8 experts: 4 rows) keeps tl.dot
    for pairs, E, N, K, bm in ((128, 128, 1536, 2048, 2), (128, 128, 2048, 768, 2), (256, 128, 1536, 2048, 2),
                               (64, 128, 1536, 2048, 1), (12, 8, 4096, 14336, 2)):
        cfg = mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, sorted_pairs=True)
        assert cfg.gemv == 1 and cfg.block_size_m == bm, (pairs, E, cfg)
        assert cfg.block_size_m * cfg.block_size_k <= mod.GEMV_BLOCK_K  # the accumulators' register budget
        mod.check_int4_tile_config(cfg)
        assert mod.get_int4_moe_config(pairs, E, N, K, 128, torch.bfloat16, gemv=False).gemv == 0
    for pairs, E in ((32, 8), (8 * 64, 128)):  # 4 rows per expert: the dot kernel
        assert mod.get_int4_moe_config(pairs, E, 4096, 14336, 128, torch.bfloat16).gemv == 0
        forced = mod.get_int4_moe_config(pairs, E, 4096, 14336, 128, torch.bfloat16, gemv=True)
        assert forced.gemv == 1 and forced.block_size_m == 4  # the sweep / static report can still compare it
    monkeypatch.setattr(mod, "GEMV_SORTED_MAX_ROWS", 0.0)
    assert mod.get_int4_moe_config(128, 128, 1536, 2048, 128, torch.bfloat16).gemv == 0
    monkeypatch.undo()
    monkeypatch.setattr(mod, "triton_interpreting", lambda: True)  # (also on a GPU machine, where it is False)
    assert mod.get_int4_moe_config(128, 128, 1536, 2048, 128, torch.bfloat16).gemv == 0  # the interpreter: dot
    with pytest.raises(ValueError, match="BLOCK_SIZE_M=32: the GEMV's rows"):
        mod.check_int4_tile_config(Int4TileConfig(32, 16, 16, gemv=1))
    with pytest.raises(ValueError, match="BLOCK_SIZE_M=3"):
        mod.check_int4_tile_config(Int4TileConfig(3, 16, 16, gemv=1))
    with pytest.raises(ValueError, match="smaller BLOCK_SIZE_M needs GEMV=1"):
        mod.check_int4_tile_config(Int4TileConfig(4, 16, 16, gemv=0))


def test_gemv_rows_compiles_for_hopper():
    """The interpreter never compiles: compile the multi-row GEMV for sm_90 in a subprocess (no GPU needed)."""
    assert run_without_interpreter("tests/kernels/int4_gemv_rows_hopper_compile.py").count("ok ") == 13


def test_static_report_gemv_rows_runs_fewer_instructions_per_weight():
    """The static report (sm_90 SASS, no GPU) at 16 tokens of Qwen3-30B-A3B (sorted routing, where the heuristic
    now runs the multi-row GEMV): fewer main-loop instructions per weight than the dot kernel's default there,
    within the hardware limits."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.test_4bit_decode_tools import _cells
    from tests.kernels.test_4bit_decode_tools import _run as run_script

    proc = run_script(["benchmarks/kernels/kernel_static_report.py", "--kernels", "int4", "--tokens", "16",
                       "--shapes", "Qwen3-30B-A3B", "--variants", "reshape (UNPACK 0)", "GEMV"], interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [_cells(ln) for ln in proc.stdout.splitlines() if ln.startswith("| int4")]
    assert len(rows) == 4  # 2 GEMMs x 2 variants
    per_weight = {(r[3], r[4]): float(r[10]) for r in rows}
    for r in rows:
        regs, spill, shared = int(r[6]), int(r[7]), int(r[8].split()[0])
        assert 0 < regs <= 255 and spill == 0 and shared <= 232448 and "(sass)" in r[9], r
        if r[4] == "GEMV":
            assert r[5].startswith("GEMV rows 2x"), r  # the heuristic's block of 2 rows
    for gemm in ("w13", "w2"):
        assert per_weight[(gemm, "GEMV")] < 0.7 * per_weight[(gemm, "reshape (UNPACK 0)")], per_weight


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,has_zeros", [(128, False), (128, True), (32, True)])
@pytest.mark.parametrize("shape", ["Qwen3-30B-A3B", "Mixtral-8x7B"])
def test_gemv_rows_real_shapes_cuda(shape, group, has_zeros, dtype):
    """The multi-row GEMV at 16 tokens (sorted routing, both GEMMs) on the GPU: the heuristic's config (Qwen3,
    2 rows per block) or the forced one (Mixtral, 4 rows per block), against the reference and the dot kernel."""
    H, I, E, top_k = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2)}[shape]
    M, E_used = 16, {"Qwen3-30B-A3B": 64, "Mixtral-8x7B": 4}[shape]  # only the experts that get pairs need weights
    for N, K in ((2 * I, H), (H, I)):
        gen = torch.Generator().manual_seed(N + K)
        ws = [random_int4(N, K, group, has_zeros, False, gen) for _ in range(E_used)]
        pw = _packed(ws, group, has_zeros, False, "cuda")
        a = torch.randn(M, K, generator=gen).to(dtype=dtype, device="cuda")
        ids = torch.stack([torch.randperm(E_used, generator=gen)[:top_k] for _ in range(M)]).to(torch.int32)
        ids[0, -1] = E_used - 1
        tw = torch.rand(M, top_k, generator=gen).cuda()
        cfg = get_int4_moe_config(M * top_k, E, N, K, group, dtype, gemv=True)
        assert cfg.gemv == 1 and cfg.block_size_m == (2 if shape == "Qwen3-30B-A3B" else 4)
        if shape == "Qwen3-30B-A3B":
            assert get_int4_moe_config(M * top_k, E, N, K, group, dtype) == cfg  # the heuristic's choice
        out = _run_sorted(a, pw, ids.cuda(), tw, top_k, cfg, True, dtype).cpu()
        ref, _ = _reference(ws, a, ids, tw, top_k, True)
        assert_close(out.float(), ref, dtype)
        dot = _run_sorted(a, pw, ids.cuda(), tw, top_k, get_int4_moe_config(M * top_k, E, N, K, group, dtype,
                                                                            gemv=False), True, dtype).cpu()
        assert_close(out.float(), dot.double(), dtype)


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("ep", [False, True])
def test_int4_layer_runs_the_sorted_gemv(ep, split, monkeypatch, device):
    """The whole int4 MoE layer (marlin backend: both GEMMs on one alignment of the GEMV's BLOCK_SIZE_M) with
    the multi-row GEMV forced on its sorted launches (the interpreter's heuristic keeps tl.dot), with an
    expert map (dropped pairs) or not, split-K (epilogues in the reduction) or not, against the reference."""
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod
    from tests.quantization.int4_moe_setup import make_int4_layer, random_int4_experts
    from tests.quantization.test_int4_moe_layer import _inputs, _ref

    get_cfg, invoke, seen = mod.get_int4_moe_config, mod.invoke_int4_moe_gemm, []

    def cfg(*args, **kw):
        c = get_cfg(*args, **kw)
        return dataclasses.replace(c, split_k=split, block_size_k=32) if c.gemv else c

    def spy(a, w, out, **kw):
        seen.append((kw["config"].gemv, kw["config"].block_size_m, "sorted_token_ids" in kw))
        return invoke(a, w, out, **kw)

    monkeypatch.setattr(mod, "get_int4_moe_config", cfg)
    monkeypatch.setattr(mod, "invoke_int4_moe_gemm", spy)
    monkeypatch.setattr(mod, "sorted_gemv_applies", lambda pairs, experts: True)
    monkeypatch.setattr(mod, "use_unsorted_int4_gemm", lambda pairs, experts: False)
    gen = torch.Generator().manual_seed(23)
    ex = random_int4_experts(8, 64, 48, "silu", 16, "asym", gen)
    x, logits = _inputs(7, 8, 64, 2, torch.float32, device, gen)
    ranks = [make_int4_layer(ex, 2, "silu", 16, "asym", torch.float32, device, backend="marlin",
                             **(dict(ep_size=2, ep_rank=r) if ep else {})) for r in range(2 if ep else 1)]
    total = sum(r(x, logits) for r in ranks)
    assert seen and all(g == 1 and srt and bm <= 4 for g, bm, srt in seen), seen
    assert_close(total.cpu(), _ref(ex, x, logits, 2, "silu"), torch.float32)


def test_int4_lora_layer_runs_the_sorted_gemv(monkeypatch, device):
    """With LoRA (the GEMM outputs materialised for the LoRA seams) and the multi-row GEMV forced on the sorted
    launches, act-order weights (perm in the kernel): the layer matches the reference."""
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod
    from tests.quantization.int4_moe_setup import random_int4_experts
    from tests.quantization.test_int4_moe_layer import _inputs
    from tests.layers.moe_setup import pick_slots, random_adapter
    from tests.quantization.test_int4_moe_lora import _lora_layer, _ref

    invoke, seen = mod.invoke_int4_moe_gemm, []
    monkeypatch.setattr(mod, "invoke_int4_moe_gemm", lambda *a, **kw: seen.append(kw["config"]) or invoke(*a, **kw))
    monkeypatch.setattr(mod, "sorted_gemv_applies", lambda pairs, experts: True)
    monkeypatch.setattr(mod, "use_unsorted_int4_gemm", lambda pairs, experts: False)
    E, top_k, H, I, group = 8, 2, 64, 32, 16
    gen = torch.Generator().manual_seed(9)
    ex = random_int4_experts(E, H, I, "silu", group, "act_order", gen)
    layer, punica = _lora_layer(ex, top_k, "silu", group, "act_order", torch.float32, device, "marlin", 2, 8)
    adapters = {s: random_adapter(E, H, I, 8, "silu", gen) for s in range(2)}
    for s, ad in adapters.items():
        layer.set_lora(s, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
    x, logits = _inputs(7, E, H, top_k, torch.float32, device, gen)
    slots = pick_slots(7, 2, "mixed", seed=2)
    punica.update_metadata(slots)
    out = layer(x, logits)
    assert len(seen) == 2 and all(c.gemv == 1 and c.block_size_m == 2 for c in seen), seen
    assert_close(out.cpu(), _ref(ex, x, logits, top_k, "silu", adapters, slots), torch.float32)
