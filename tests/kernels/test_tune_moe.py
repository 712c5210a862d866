"""benchmarks/kernels/tune_moe.py: the files it writes are the ones the kernels look up, they load and
the kernels stay correct with them; wrong candidates are never chosen; the budget stops cleanly."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from benchmarks.kernels import tune_moe, tune_moe_space as space
from tests.utils import random_topk_ids
from vllm.kernel_configs import clear_cache, lookup_tuned_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
_NAME = re.compile(r"^([a-z0-9_]+),(.*),device_name=(.+)\.json$")


def _parse_name(fname: str) -> tuple[str, dict, str]:
    op, key, dev = _NAME.match(fname).groups()
    return op, {k: int(v) for k, v in (kv.split("=") for kv in key.split(","))}, dev


@pytest.fixture
def tuned_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    clear_cache()
    yield tmp_path
    clear_cache()


def test_written_files_load_and_the_kernels_stay_correct(tuned_folder, device):
    """Smoke run (CPU: interpreter), then each file entry through lookup_tuned_config into the kernel."""
    from vllm.lora.ops.torch_ops.moe_lora import moe_lora_reference
    from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.triton_ops.moe_lora_config import use_small_batch_path
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (fused_moe_gemm_reference,
                                                                         invoke_fused_moe_gemm)
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

    if device.type == "cuda":
        pytest.skip("--smoke tunes on the CPU interpreter")
    assert tune_moe.main(["--smoke", "--out", str(tuned_folder), "--tokens", "1", "9"]) == 0
    files = sorted(f for f in os.listdir(tuned_folder) if f.endswith(".json"))
    assert {_parse_name(f)[0] for f in files} == {"fused_moe_gemm", "fused_moe_lora_w13", "fused_moe_lora_w2"}
    assert len(files) == 4 and (tuned_folder / "tune_moe.md").is_file()
    _, H, I, E, k = tune_moe.lb.SMOKE_SHAPE
    L, R, dtype = 4, 16, torch.bfloat16
    for fname in files:
        op, key, dev = _parse_name(fname)
        table = json.loads((tuned_folder / fname).read_text())
        assert set(table) == ({"1", "9"} if key.get("N") == 2 * I else {"2", "18"})
        for index, entry in table.items():
            cfg = lookup_tuned_config(op, key, int(index), dev)
            assert cfg == entry
            pairs = int(index) * (1 if key.get("N") == H or op != "fused_moe_gemm" else k)
            M = pairs // k
            ti = random_topk_ids(M, E, k).to(device)
            tw = torch.rand(M, k, device=device)
            if op == "fused_moe_gemm":  # GEMM1 (N = 2I) or GEMM2 (N = H), with the file's tiles
                gemm1 = key["N"] == 2 * I
                a = torch.randn(M if gemm1 else pairs, key["K"], device=device).to(dtype)
                w = (torch.randn(E, key["N"], key["K"], device=device) * key["K"] ** -0.5).to(dtype)
                al = align_for_experts(ti, cfg["BLOCK_SIZE_M"], E)
                out = torch.full((pairs, key["N"]), float("nan"), dtype=dtype, device=device)
                invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids,
                                      block_expert_ids=al.block_expert_ids,
                                      num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=k if gemm1 else 1,
                                      topk_weights=tw, mul_routed_weight=not gemm1, config=space.launch_config(cfg))
                ref = fused_moe_gemm_reference(a, w, ti, top_k_in=k if gemm1 else 1, topk_weights=tw,
                                               mul_routed_weight=not gemm1)
            else:  # LoRA w13 (2 slices of N = I) or w2 (N = H), with the file's tiles
                w13 = op.endswith("w13")
                S, top_k_in = (2, k) if w13 else (1, 1)
                x = torch.randn(M if w13 else pairs, key["K"], device=device).to(dtype)
                la = [(torch.randn(L, E, R, key["K"], device=device) * key["K"] ** -0.5).to(dtype) for _ in range(S)]
                lb_ = [(torch.randn(L, E, key["N"], R, device=device) * R ** -0.5).to(dtype) for _ in range(S)]
                mapping = (torch.arange(M, dtype=torch.int32) % L).to(device)
                enabled = torch.tensor([1] * L + [0], dtype=torch.int32, device=device)
                al = None if use_small_batch_path(pairs, E, L, R) else moe_lora_align_block_size(
                    ti, mapping, num_experts=E, max_loras=L, block_size=cfg["BLOCK_SIZE_M"], adapter_enabled=enabled)
                kw = dict(topk_ids=ti, topk_weights=tw, token_lora_mapping=mapping, adapter_enabled=enabled,
                          top_k_in=top_k_in, mul_routed_weight=not w13)
                out = torch.zeros(pairs, S * key["N"], dtype=dtype, device=device)
                fused_moe_lora(out, x, la, lb_, alignment=al, config=space.launch_config(cfg), **kw)
                ref = moe_lora_reference(x, la, lb_, out_cols=S * key["N"], **kw).to(device)
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            assert err < 2e-2, (fname, index, err)


def test_file_keys_are_the_kernels_lookups(tuned_folder, monkeypatch, device):
    """A distinct entry per token count: each count must get its own entry back through the lookups
    TritonExperts and the Punica wrapper make (GEMM2 and LoRA tables are indexed by pairs)."""
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    from vllm.model_executor.layers.fused_moe.experts.triton_experts import TritonExperts
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import _device_name

    dev_name = _device_name()  # "cpu", or the GPU's name (the LoRA lookups use the same)
    _, H, I, E, k = tune_moe.lb.SHAPES["qwen3"]
    R, L, tokens = 16, 4, [1, 16, 64, 256, 1024, 4096]
    for i, M in enumerate(tokens):
        for kernel, (op, key, index) in space.tuned_file_keys(H, I, E, k, M, R).items():
            stages = 20 + i if kernel.endswith("w2") else 10 + i  # marks (kernel, count)
            cfg = {"BLOCK_SIZE_M": 16, "num_stages": stages}
            tune_moe.write_entry(str(tuned_folder), op, key, index, cfg, dev_name)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own GEMM configs
    experts = TritonExperts.__new__(TritonExperts)  # _route reads no state
    punica = PunicaWrapperGPU(8, L, device)
    for i, M in enumerate(tokens):
        ids = torch.randint(0, E, (M, k), dtype=torch.int32)
        route = experts._route(ids, M * k, E, 2 * I, H, I, torch.bfloat16)
        assert (route.cfg1.num_stages, route.cfg2.num_stages) == (10 + i, 20 + i), M
        common = dict(num_pairs=M * k, num_experts=E, max_loras=L, rank=R, dtype=torch.bfloat16, use_tuned_config=True)
        w13 = punica._config("fused_moe_lora_w13", K=H, N=I, num_slices=2, **common)
        w2 = punica._config("fused_moe_lora_w2", K=I, N=H, num_slices=1, **common)
        assert (w13.num_stages, w2.num_stages) == (10 + i, 20 + i), M


def _tuner(tmp_path, **kw) -> tune_moe.Tuner:
    args = tune_moe.parse_args(["--out", str(tmp_path), *kw.get("argv", [])])
    return tune_moe.Tuner(args, torch.device("cpu"), torch.bfloat16)


def test_search_never_picks_a_wrong_or_failing_candidate(tmp_path):
    ref = torch.randn(64, 32)
    heur = {"BLOCK_SIZE_N": 64}
    wrong, broken, ok = {"BLOCK_SIZE_N": 32}, {"BLOCK_SIZE_N": 16}, {"BLOCK_SIZE_N": 128}

    def run(cfg):
        if cfg == broken:
            raise RuntimeError("out of resources")
        return ref * (1.5 if cfg == wrong else 1.0)

    res = tune_moe.Outcome("s", 1, "gemm_w13")
    best = _tuner(tmp_path, argv=["--min-gain=-1"]).search(res, [heur, wrong, broken, ok], run, ref)
    assert best in (heur, ok) and res.failed == [(wrong, pytest.approx(0.5, rel=1e-3))]
    assert (res.tried, res.errors) == (3, 1)
    res = tune_moe.Outcome("s", 1, "gemm_w13")
    tune_moe.Tuner.search(_tuner(tmp_path), res, [heur, ok], lambda c: ref * 2, ref)  # heuristic itself wrong
    assert res.note.startswith("heuristic output wrong") and res.failed


def test_fused_w13_layout_writes_the_engines_lookup(tuned_folder, device):
    """--w13-layout fused: the w13 LoRA file is the one a FusedMoE3DWithLoRA layer looks up (one slice of 2I
    columns at twice the rank, as peft trains adapters on the fused experts), the w2 file stays at the rank; the
    entries load back through the lookup and launch."""
    if device.type == "cuda":
        pytest.skip("--smoke tunes on the CPU interpreter")
    argv = ["--smoke", "--out", str(tuned_folder), "--tokens", "9", "--ops", "lora", "--w13-layout", "fused"]
    assert tune_moe.main(argv) == 0
    _, H, I, E, k = tune_moe.lb.SMOKE_SHAPE
    names = (_parse_name(p.name) for p in tuned_folder.glob("*.json"))
    keys = {(op, tuple(sorted(key.items()))) for op, key, _ in names}
    assert keys == {("fused_moe_lora_w13", tuple(sorted({"E": E, "K": H, "N": 2 * I, "R": 32}.items()))),
                    ("fused_moe_lora_w2", tuple(sorted({"E": E, "K": I, "N": H, "R": 16}.items())))}
    assert "lora_w13 R=32 (fused)" in (tuned_folder / "tune_moe.md").read_text()
    for f in tuned_folder.glob("*.json"):
        op, key, dev = _parse_name(f.name)
        assert lookup_tuned_config(op, key, 9 * k, dev) == json.loads(f.read_text())[str(9 * k)]


def test_budget_stops_cleanly(tmp_path, device):
    if device.type == "cuda":
        pytest.skip("--smoke tunes on the CPU interpreter")
    assert tune_moe.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0", "--tokens", "1"]) == 0
    text = (tmp_path / "tune_moe.md").read_text()
    assert text.count("not run: budget") == 4 and not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("M", [1, 64, 4096])
def test_search_spaces(M):
    _, H, I, E, k = tune_moe.lb.SHAPES["mixtral"]
    pairs = M * k
    heur = space.heuristic_gemm_config(pairs, E, 2 * I, H, k, torch.bfloat16, on_gpu=True)
    c1 = space.gemm_candidates(heur, pairs=pairs, E=E, N=2 * I, K=H, elt_bytes=2, fixed_block_m=None, limit=24)
    c2 = space.gemm_candidates(heur, pairs=pairs, E=E, N=H, K=I, elt_bytes=2, fixed_block_m=32, limit=24)
    assert c1[0] == heur and len(c1) == len({tuple(sorted(c.items())) for c in c1}) <= 24
    assert {c["BLOCK_SIZE_M"] for c in c2} == {32}
    for c in c1[1:] + c2[1:]:
        assert c["num_stages"] * (c["BLOCK_SIZE_M"] + c["BLOCK_SIZE_N"]) * c["BLOCK_SIZE_K"] * 2 <= space.SMEM_BYTES
        assert c["BLOCK_SIZE_M"] * c["BLOCK_SIZE_N"] <= 8192 * c["num_warps"]
    lh = space.heuristic_lora_config("fused_moe_lora_w2", pairs=pairs, E=E, L=4, R=64, K=I, N=H, S=1,
                                     dtype=torch.bfloat16, device_name="NVIDIA H200")
    lc = space.lora_candidates(lh, sorted_path=M > 1, tune_block_m=False, R=64, K=I, N=H, limit=12)
    assert lc[0] == lh and 1 < len(lc) <= 12 and {c["BLOCK_SIZE_M"] for c in lc} == {lh["BLOCK_SIZE_M"]}
    assert all(c["NUM_N_SPLITS"] <= -(-H // c["BLOCK_SIZE_N"]) for c in lc[1:])


def test_gpu_search_space_configs_launch_and_are_correct(device):
    """Every GPU candidate (decode size, N not a power of two) is a valid launch with the right output."""
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch
    from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (fused_moe_gemm_reference,
                                                                         invoke_fused_moe_gemm)
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

    E, k, H, I, L, R, M, bf16 = 8, 2, 64, 96, 4, 16, 1, torch.bfloat16
    ti, tw = random_topk_ids(M, E, k).to(device), torch.rand(M, k, device=device)
    x = torch.randn(M, H, device=device).to(bf16)
    w = (torch.randn(E, 2 * I, H, device=device) * H ** -0.5).to(bf16)
    heur = space.heuristic_gemm_config(M * k, E, 2 * I, H, k, bf16, on_gpu=True)
    ref = fused_moe_gemm_reference(x, w, ti, top_k_in=k)
    for c in space.gemm_candidates(heur, pairs=M * k, E=E, N=2 * I, K=H, elt_bytes=2, fixed_block_m=None, limit=24):
        al = align_for_experts(ti, c["BLOCK_SIZE_M"], E)
        out = torch.full((M * k, 2 * I), float("nan"), dtype=bf16, device=device)
        invoke_fused_moe_gemm(x, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                              num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=k,
                              config=space.launch_config(c))
        assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2, c
    la = [(torch.randn(L, E, R, H, device=device) * H ** -0.5).to(bf16) for _ in range(2)]
    lb_ = [(torch.randn(L, E, I, R, device=device) * R ** -0.5).to(bf16) for _ in range(2)]
    kw = dict(topk_ids=ti, topk_weights=tw, token_lora_mapping=torch.zeros(M, dtype=torch.int32, device=device),
              adapter_enabled=torch.tensor([1] * L + [0], dtype=torch.int32, device=device), top_k_in=k)
    ref = torch.zeros(M * k, 2 * I, device=device)
    fused_moe_lora_torch(ref, x, la, lb_, **kw)
    heur = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, NUM_N_SPLITS=1, num_warps=4, num_stages=3)
    for c in space.lora_candidates(heur, sorted_path=False, tune_block_m=True, R=R, K=H, N=I, limit=24):
        out = torch.zeros(M * k, 2 * I, dtype=bf16, device=device)
        fused_moe_lora(out, x, la, lb_, config=space.launch_config(c), **kw)
        assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2, c
