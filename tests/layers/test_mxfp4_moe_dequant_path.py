"""UnfusedOAITritonExperts' large-batch path (dequantise the MXFP4 weights once, then the bf16 grouped GEMM
with its biases), forced on and off, against the fp32 loop reference on transformers-dequantised weights:
with and without LoRA, with an expert map (EP), with the scratch capped so that the experts go in several
chunks; routing reaches the last expert and leaves one expert without tokens."""
import pytest
import torch

import vllm.model_executor.layers.fused_moe.experts.dequant_path as dp
import vllm.model_executor.layers.fused_moe.ops.mxfp4_expert_dequant as mxfp4_expert_dequant
from tests.layers.moe_setup import pick_slots
from tests.layers.mxfp4_setup import dequantized_weights, make_mxfp4_layer
from tests.layers.test_mxfp4_moe_layer import _case, _ref
from tests.lora.test_mxfp4_moe_lora import Mxfp4Harness
from tests.utils import assert_close


@pytest.fixture
def dequant_calls(monkeypatch):
    """Records (K, e0, e1) of every MXFP4 dequantisation (K is H for GEMM1, I for GEMM2)."""
    calls, real = [], mxfp4_expert_dequant.dequantize_mxfp4_experts

    def spy(blocks, scales, out, e0=0, e1=None, **kw):
        calls.append((out.shape[2], e0, e0 + out.shape[0]))
        return real(blocks, scales, out, e0, e1, **kw)

    monkeypatch.setattr(mxfp4_expert_dequant, "dequantize_mxfp4_experts", spy)
    return calls


def _force(monkeypatch, path: str, cap_experts: int = 0, rows: int = 0, K: int = 0, elt: int = 4) -> None:
    """Force the path; with ``cap_experts`` the scratch holds that many [rows, K] weights of ``elt`` bytes."""
    monkeypatch.setattr(dp, "FORCE_PATH", path)
    if cap_experts:
        monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", cap_experts * rows * K * elt)


def _chunks(calls, k):
    return [(e0, e1) for kk, e0, e1 in calls if kk == k]


# (tokens, E, top_k, H, I, activation, bias)
CASES = [(13, 8, 4, 64, 64, "swigluoai", True), (9, 4, 2, 32, 32, "silu", False)]


@pytest.mark.parametrize("path", ["dequant", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias", CASES)
def test_dequant_path_matches_reference(path, dtype, M, E, top_k, H, I, activation, bias, dequant_calls, monkeypatch,
                                        device):
    _force(monkeypatch, path)
    ck, x, logits = _case(M, E, top_k, H, I, activation, bias, False, dtype, device, seed=5)
    layer = make_mxfp4_layer(ck, top_k, dtype, device, backend="triton", activation=activation)
    out = layer(x, logits)
    assert_close(out.float().cpu(), _ref(dequantized_weights(ck), x, logits, top_k, activation), dtype)
    if path == "dequant":
        assert dequant_calls == [(H, 0, E), (I, 0, E)]  # GEMM1 then GEMM2, all experts at once
    else:
        assert not dequant_calls


@pytest.mark.parametrize("ep", [False, True])
def test_dequant_path_in_chunks(ep, dequant_calls, monkeypatch, device):
    """The scratch holds 3 of GEMM1's [2I, H] weights: chunks [0, 3) [3, 6) [6, 8) (EP over 2 ranks: [0, 3)
    [3, 4)); GEMM2's weights are half as big ([0, 6) [6, 8); EP: [0, 4)).  Biases are sliced per chunk."""
    E, H, I = 8, 64, 32
    _force(monkeypatch, "dequant", 3, 2 * I, H)
    ck, x, logits = _case(11, E, 2, H, I, "swigluoai", True, False, torch.float32, device, seed=9)
    ranks = [make_mxfp4_layer(ck, 2, torch.float32, device, backend="triton",
                              **(dict(ep_size=2, ep_rank=r) if ep else {})) for r in range(2 if ep else 1)]
    total = sum(layer(x, logits) for layer in ranks)
    assert_close(total.cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.float32)
    g1 = [(0, 3), (3, 4)] if ep else [(0, 3), (3, 6), (6, 8)]
    g2 = [(0, 4)] if ep else [(0, 6), (6, 8)]
    assert dequant_calls == ([(H, *c) for c in g1] + [(I, *c) for c in g2]) * len(ranks)


@pytest.mark.parametrize("path,cap_experts", [("dequant", 0), ("dequant", 3), ("kernel", 0)])
def test_dequant_path_with_lora(path, cap_experts, dequant_calls, monkeypatch, device):
    """LoRA (FusedMoE3DWithLoRA, interleaved gate/up rows) at the same seams on both paths."""
    E, H, I = 8, 64, 32
    _force(monkeypatch, path, cap_experts, 2 * I, H)
    h = Mxfp4Harness(E=E, top_k=2, H=H, I=I, device=device, backend="triton", max_loras=2, max_rank=16, seed=3)
    for slot, r in enumerate([16, 8]):
        h.load(slot, h.new_adapter(rank=r))
    x, logits = h.inputs(9, empty=True)
    slots = pick_slots(9, 2, "mixed", seed=9)
    out = h.forward(x, logits, slots)
    ref = h.reference(x, logits, slots)
    assert_close(out.float().cpu(), ref, torch.float32)
    assert (ref - h.reference(x, logits, [-1] * 9)).abs().max() > 10 * (out.float().cpu() - ref).abs().max()
    assert bool(dequant_calls) == (path == "dequant")
    if cap_experts:
        assert _chunks(dequant_calls, H) == [(0, 3), (3, 6), (6, 8)]


def test_dequant_path_lora_expert_parallel(dequant_calls, monkeypatch, device):
    """EP ranks with LoRA on the path, in chunks: each rank adds its own experts' deltas; the ranks sum to the layer."""
    E, H, I = 8, 64, 32
    _force(monkeypatch, "dequant", 3, 2 * I, H)
    hs = [Mxfp4Harness(E=E, top_k=2, H=H, I=I, device=device, backend="triton", seed=4,
                       layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    full = Mxfp4Harness(E=E, top_k=2, H=H, I=I, device=device, backend="triton", seed=4)
    ad = full.new_adapter(rank=8)
    for r, h in enumerate(hs):
        local = list(range(r * 4, (r + 1) * 4))
        h.layer.set_lora(0, w13_lora_a=[a[local] for a in ad.w13_a], w13_lora_b=[b[local] for b in ad.w13_b],
                         w2_lora_a=ad.w2_a[local], w2_lora_b=ad.w2_b[local], expert_ids=local)
    full.load(0, ad)
    x, logits = full.inputs(9)
    slots = pick_slots(9, 1, "mixed", seed=2)
    total = sum(h.forward(x, logits, slots) for h in hs)
    assert_close(total.cpu(), full.reference(x, logits, slots), torch.float32)
    assert _chunks(dequant_calls, H) == [(0, 3), (3, 4)] * 2


def test_auto_decision_takes_the_path_by_shape(dequant_calls, monkeypatch, device):
    """Without forcing, the pair counts decide, with the MXFP4 threshold (lowered so a CPU batch crosses it)."""
    monkeypatch.setattr(dp, "MIN_PAIRS", 20)
    monkeypatch.setattr(dp, "MIN_PAIRS_PER_EXPERT", {"int4": 100, "mxfp4": 3})
    for M, taken in ((9, False), (13, True)):  # 18 pairs (< 20), 26 pairs (>= 20 and >= 3 * 8)
        dequant_calls.clear()
        ck, x, logits = _case(M, 8, 2, 32, 32, "swigluoai", True, True, torch.float32, device, seed=2)
        layer = make_mxfp4_layer(ck, 2, torch.float32, device, backend="triton")
        assert_close(layer(x, logits).cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.float32)
        assert bool(dequant_calls) == taken


@pytest.mark.cuda
@pytest.mark.parametrize("cap_experts", [0, 5])
def test_dequant_path_bf16_on_gpu(cap_experts, monkeypatch):
    if cap_experts:
        monkeypatch.setattr(dp, "SCRATCH_CAP_BYTES", cap_experts * 256 * 256 * 2)
    ck, x, logits = _case(1024, 32, 4, 256, 128, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    assert dp.use_dequant_path(1024 * 4, 32, "mxfp4")  # 128 pairs per expert: the default thresholds take it
    layer = make_mxfp4_layer(ck, 4, torch.bfloat16, "cuda", backend="triton")
    assert_close(layer(x, logits).float().cpu(), _ref(dequantized_weights(ck), x, logits, 4, "swigluoai"),
                 torch.bfloat16)
