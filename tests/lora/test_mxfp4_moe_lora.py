"""MXFP4 experts with LoRA (gpt-oss: FusedMoE3DWithLoRA, interleaved gate/up rows) against the
fp32 loop reference on transformers-dequantised weights.

Backends: TorchMxfp4Experts + the torch Punica wrapper, UnfusedOAITritonExperts + the Triton
wrapper (interpreter on CPU, bf16 on the GPU); both Triton LoRA paths (sorted, small batch).
"""
import pytest
import torch

from tests.layers.moe_setup import lora_config, pick_slots
from tests.layers.mxfp4_setup import dequantized_weights, make_mxfp4_layer, random_mxfp4_checkpoint
from tests.lora.lora_moe_harness import PUNICA_KIND, Harness, assert_delta_paths_agree, delta_paths
from tests.utils import assert_close
from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU


class Mxfp4Harness(Harness):
    """The LoRA test harness around a layer built from a random MXFP4 checkpoint."""

    def __init__(self, *, E, top_k, H, I, dtype=torch.float32, device="cpu", backend="torch", max_loras=2,
                 max_rank=16, seed=0, layer_kwargs=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.E, self.H, self.I, self.top_k, self.activation = E, H, I, top_k, "swigluoai"
        self.dtype, self.device, self.max_rank, self.fused = dtype, torch.device(device), max_rank, True
        ck = random_mxfp4_checkpoint(E, H, I, True, self.gen)
        self.weights = dequantized_weights(ck)
        base = make_mxfp4_layer(ck, top_k, dtype, device, backend=backend, lora_enabled=True,
                                **(layer_kwargs or {}))
        self.layer = FusedMoE3DWithLoRA(base)
        self.layer.create_lora_weights(max_loras, lora_config(max_loras, max_rank))
        self.punica = get_punica_wrapper(4096, max_loras, device, kind=PUNICA_KIND[backend])
        self.layer.set_mapping(self.punica)
        self.slots = {}


@pytest.fixture(params=["sorted", "small_batch"])
def lora_path(request, monkeypatch):
    small = request.param == "small_batch"
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)
    return request.param


# (tokens, E, top_k, H, I, max_loras, ranks, slot_mode, every)
CASES = [
    (1, 4, 2, 32, 32, 1, [8], "one", False),
    (7, 8, 2, 64, 32, 2, [16, 8], "mixed", False),
    (13, 8, 4, 32, 64, 3, [16, 4, 16], "mixed", True),
    (5, 4, 2, 32, 32, 2, [16, 16], "none", True),
]


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float16), ("triton", torch.bfloat16)])
@pytest.mark.parametrize("M,E,top_k,H,I,max_loras,ranks,slot_mode,every", CASES)
def test_mxfp4_lora_matches_reference(backend, dtype, M, E, top_k, H, I, max_loras, ranks, slot_mode, every,
                                      lora_path, device):
    if backend == "torch" and lora_path == "small_batch":
        pytest.skip("the torch wrapper has one path")
    if device.type == "cpu" and backend == "triton" and (dtype == torch.bfloat16 or (dtype != torch.float32 and M > 7)):
        pytest.skip("interpreter: bf16 stores truncate (see tests/lora), and time; runs on the GPU")
    h = Mxfp4Harness(E=E, top_k=top_k, H=H, I=I, dtype=dtype, device=device, backend=backend,
                     max_loras=max_loras, max_rank=16, seed=M + E)
    for slot, r in enumerate(ranks):
        h.load(slot, h.new_adapter(rank=r))
    x, logits = h.inputs(M, empty=not every)
    slots = pick_slots(M, max_loras, slot_mode, seed=M)
    out = h.forward(x, logits, slots)
    ref = h.reference(x, logits, slots)
    assert_close(out.float().cpu(), ref, dtype)
    if slot_mode != "none":  # the adapters matter: the base-only output is far from the reference
        base = h.reference(x, logits, [-1] * M)
        assert (ref - base).abs().max() > 10 * (out.float().cpu() - ref).abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mxfp4_lora_expert_parallel_ranks_sum(backend, device):
    """EP: each rank's LoRA-wrapped MXFP4 layer computes its experts' base + delta; the sum is the layer."""
    M, E = 9, 8
    hs = [Mxfp4Harness(E=E, top_k=2, H=32, I=32, device=device, backend=backend, seed=4,
                       layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    full = Mxfp4Harness(E=E, top_k=2, H=32, I=32, device=device, backend=backend, seed=4)
    ad = full.new_adapter(rank=8)
    full.load(0, ad)
    for r, h in enumerate(hs):  # each rank gets the adapter's rank-local experts, named by expert_ids
        local = list(range(r * 4, (r + 1) * 4))
        h.layer.set_lora(0, w13_lora_a=[a[local] for a in ad.w13_a], w13_lora_b=[b[local] for b in ad.w13_b],
                         w2_lora_a=ad.w2_a[local], w2_lora_b=ad.w2_b[local], expert_ids=local)
    x, logits = full.inputs(M)
    slots = pick_slots(M, 1, "mixed", seed=2)
    total = sum(h.forward(x, logits, slots) for h in hs)
    assert_close(total.cpu(), full.reference(x, logits, slots), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 7])
def test_mxfp4_lora_deltas_beside(dtype, M, monkeypatch, device):
    """UnfusedOAITritonExperts with the LoRA deltas in fp32 buffers beside its GEMMs (``lora_deltas_beside``, on by
    default since timed on an H200): the side stream changes no bits; against the in-place seams the same bits on CPU
    (within tolerance on a GPU, whose kernels compiled for an fp32 output may sum in another order)."""
    from vllm.model_executor.layers.fused_moe.experts.oai_triton_experts import UnfusedOAITritonExperts

    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    h = Mxfp4Harness(E=8, top_k=2, H=64, I=32, dtype=dtype, device=device, backend="triton", max_loras=2, seed=30 + M)
    h.load(0, h.new_adapter(rank=16))
    h.load(1, h.new_adapter(rank=8))
    x, logits = h.inputs(M, empty=M > 1)
    slots = [1] if M == 1 else pick_slots(M, 2, "mixed", seed=M)
    beside, in_order, in_place, seams = delta_paths(lambda: h.forward(x, logits, slots), monkeypatch, UnfusedOAITritonExperts)
    assert seams == 4  # both seams, beside and in order
    assert_delta_paths_agree(beside, in_order, in_place, dtype)
    assert_close(beside.float().cpu(), h.reference(x, logits, slots), dtype)
