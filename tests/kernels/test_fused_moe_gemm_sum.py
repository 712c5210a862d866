"""GEMM2 with the top-k sum in its epilogue (``invoke_fused_moe_gemm(sum_out=...)``; the program storing a token's
last row of an N tile sums the tile's rows): against GEMM2 then ``moe_sum`` (the same rows, the same sums) and an
fp32 reference; the counters are back at zero after each launch; the layer takes it only on steps without LoRA
(``fused_moe_epilogue.FUSED_SUM``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.layers.moe_setup import make_layer, pick_slots, random_weights, router_inputs
from tests.layers.test_fused_moe_layer import _ref
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.ops import fused_moe_epilogue
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size, pairwise_alignment
from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum
from vllm.model_executor.layers.ops import counters


def _cfg(bm: int, bn: int, bk: int, group: int = 1) -> TileConfig:
    return TileConfig(block_size_m=bm, block_size_n=bn, block_size_k=bk, group_size_m=group, num_warps=4,
                      num_stages=1)


@pytest.fixture(autouse=True)
def _fresh_counters(monkeypatch):
    monkeypatch.setattr(counters, "_BUFFERS", {})


def _gemm2(a, w, ids, weights, cfg, pairwise, sum_out=None):
    E = w.shape[0]
    al = pairwise_alignment(ids, cfg.block_size_m) if pairwise else moe_align_block_size(ids, cfg.block_size_m, E)
    out = poison_(torch.empty(ids.numel(), w.shape[1], dtype=a.dtype, device=a.device))
    gemm.invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                               num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=1, topk_weights=weights,
                               mul_routed_weight=True, config=cfg, pairwise=pairwise, sum_out=sum_out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,E,top_k,H,I,cfg,pairwise", [
    (1, 8, 2, 40, 32, _cfg(16, 16, 32), True),  # a decode step: pairwise blocks; H = 40: an N tail
    (3, 8, 4, 64, 48, _cfg(16, 32, 16), True),
    (9, 4, 2, 48, 32, _cfg(16, 32, 32), False),  # sorted blocks: a token's rows in several programs
    (13, 3, 3, 72, 32, _cfg(32, 32, 16, group=2), False),  # BLOCK_M 32, grouped pids, 3 N tiles
])
def test_matches_gemm_then_sum(dtype, M, E, top_k, H, I, cfg, pairwise, device):
    gen = torch.Generator().manual_seed(M * 5 + H)
    ids = make_topk_ids(M, E, top_k, drop=0.0, empty_expert=False).to(device)  # every pair routed (no EP)
    ids[-1, -1] = E - 1  # the last expert is routed
    a = torch.randn(M * top_k, I, generator=gen).to(device, dtype)  # GEMM2's input: one row per pair
    w = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(device, dtype)
    weights = torch.rand(M, top_k, generator=gen).to(device)
    want_rows = _gemm2(a, w, ids, weights, cfg, pairwise)
    want = moe_sum(want_rows.view(M, top_k, H), poison_(torch.empty(M, H, dtype=dtype, device=device)),
                   use_triton=True)
    for _ in range(2):  # the second launch counts from the zeros the first left
        summed = poison_(torch.empty(M, H, dtype=dtype, device=device))
        rows = _gemm2(a, w, ids, weights, cfg, pairwise, sum_out=summed)
        assert torch.equal(rows, want_rows), "GEMM2's rows changed"
        assert not torch.isnan(summed).any(), "a token's sum was not written"
        assert int(counters._BUFFERS[("MoE top-k sum", a.device)].abs().sum()) == 0
        if device.type == "cuda":
            assert_close(summed.float(), want.float(), dtype, name="fused vs moe_sum")
        else:  # the interpreter: the same fp32 sums of the same rows
            assert torch.equal(summed, want)
    e = ids.reshape(-1).long()
    ref = torch.einsum("pk,pnk->pn", a.float(), w.float()[e]) * weights.reshape(-1, 1).float()
    ref = ref.to(dtype).float().view(M, top_k, H).sum(1)  # GEMM2's rounding, then the sum's
    assert_close(summed.float(), ref, dtype, name="vs fp32 reference")


def test_refuses_what_the_epilogue_cannot_do(device):
    ids = make_topk_ids(2, 4, 2, drop=0.0, empty_expert=False).to(device)
    a, w = torch.randn(4, 16, device=device), torch.randn(4, 32, 16, device=device)
    cfg = _cfg(16, 32, 16)
    with pytest.raises(ValueError, match=r"sum_out must be \[tokens, 32\]"):
        _gemm2(a, w, ids, torch.ones(2, 2, device=device), cfg, False, sum_out=torch.empty(3, 32, device=device))
    with pytest.raises(ValueError, match="GEMV=0"):
        _gemm2(a, w, ids, torch.ones(2, 2, device=device), dataclasses.replace(cfg, gemv=1), True,
               sum_out=torch.empty(2, 32, device=device))
    with pytest.raises(ValueError, match="must match out"):
        _gemm2(a, w, ids, torch.ones(2, 2, device=device), cfg, False,
               sum_out=torch.empty(2, 32, dtype=torch.float16, device=device))


@pytest.fixture
def sum_launches(monkeypatch):
    """FUSED_SUM on; counts GEMM launches that write the top-k sum."""
    calls = []
    real = gemm.invoke_fused_moe_gemm

    def spy(*args, **kw):
        calls.append(kw.get("sum_out") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(fused_moe_epilogue, "FUSED_SUM", True)
    monkeypatch.setattr(gemm, "invoke_fused_moe_gemm", spy)
    return calls


@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias", [
    (1, 8, 2, 32, 32, "silu", False),  # a decode step: pairwise blocks
    (33, 8, 4, 64, 32, "swigluoai", True),  # gpt-oss: biases
    (33, 16, 8, 32, 48, "silu", False),
])
def test_layer_matches_reference_and_unfused(M, E, top_k, H, I, activation, bias, sum_launches, monkeypatch, device):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(M * 13 + E)
    w = random_weights(E, H, I, activation, bias, gen)
    layer = make_layer(w, top_k, activation, dtype, device, backend="triton")
    x, logits = router_inputs(M, E, H, dtype, device, gen, top_k=top_k, empty=False)
    fused = layer(x, logits)
    assert sum_launches == [False, True]  # GEMM1, then GEMM2 with the sum
    assert_close(fused.float().cpu(), _ref(w, x, logits, top_k, activation).float(), dtype)
    monkeypatch.setattr(fused_moe_epilogue, "FUSED_SUM", False)
    unfused = layer(x, logits)
    if device.type == "cuda":
        assert_close(fused.float(), unfused.float(), dtype)
    else:
        assert torch.equal(fused, unfused)


@pytest.mark.parametrize("slot_mode,expect_fused", [("mixed", False), ("none", True)])
def test_with_lora_only_adapter_free_steps_fuse(slot_mode, expect_fused, sum_launches, device):
    """LoRA running: GEMM2, the w2 delta, then the sum (a fused sum would drop the delta: the reference would
    differ); no token with an adapter: the fused launch, still the reference's output."""
    h = Harness(E=8, top_k=2, H=32, I=32, activation="silu", dtype=torch.float32, device=device, backend="triton",
                max_loras=2, max_rank=16, seed=4)
    for slot in range(2):
        h.load(slot, h.new_adapter(rank=16))
    x, logits = h.inputs(7)
    slots = pick_slots(7, 2, slot_mode, 0)
    out = h.forward(x, logits, slots)
    assert any(sum_launches) == expect_fused
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.float32)
