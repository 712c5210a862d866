"""One expert-parallel rank's FusedMoE (half the experts local, half remote), Triton kernels.

Without and with LoRA (both LoRA paths: sorted and small-batch), against the fp32 loop
reference restricted to the local experts: a pair routed to a remote expert contributes
exactly nothing here.  The remote experts' weights are never read: the layer's expert
weights sit between NaN-filled neighbours (a read of any other expert index would make
the output NaN), and a LoRA slot no token uses holds NaN (a read past a slot's local
experts would land there).  The GPU runs every case; the interpreter the cheap ones.
"""
import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import make_layer, pick_slots, random_weights, router_inputs
from tests.lora.lora_moe_harness import Harness
from tests.lora.test_fused_moe_lora_layer import lora_path  # noqa: F401  (fixture: sorted / small_batch)
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.router import fused_topk

E, TOP_K, H, I = 8, 2, 32, 32
CUDA = pytest.mark.cuda
CASES = [  # (tokens, dtype)
    (1, torch.float32), (9, torch.float32),
    pytest.param(64, torch.float16, marks=CUDA), pytest.param(257, torch.bfloat16, marks=CUDA),
    pytest.param(300, torch.float32, marks=CUDA),
]


def _nan_neighbours(param: torch.nn.Parameter) -> None:
    """Re-home ``param`` [E_local, ...] as the middle third of a NaN-filled [3 * E_local, ...] buffer."""
    n = param.shape[0]
    buf = torch.full((3 * n, *param.shape[1:]), float("nan"), dtype=param.dtype, device=param.device)
    buf[n:2 * n].copy_(param.data)
    param.data = buf[n:2 * n]


def _local_only(topk_weights, topk_ids, ep_rank):
    """Router weights with the pairs of remote experts zeroed (experts [r*E/2, (r+1)*E/2) are local)."""
    lo, hi = ep_rank * E // 2, (ep_rank + 1) * E // 2
    return torch.where((topk_ids >= lo) & (topk_ids < hi), topk_weights, torch.zeros_like(topk_weights))


def _inputs(M, dtype, device, gen, ep_rank):
    """Random inputs; the first rows route only to remote experts (exactly zero output here)."""
    x, logits = router_inputs(M, E, H, dtype, device, gen)
    remote = M // 3
    local = slice(ep_rank * E // 2, (ep_rank + 1) * E // 2)
    logits[:remote, local] = -1e4
    return x, logits, remote


def _reference(w, x, logits, ep_rank, adapters=None, token_adapter=None):
    tw, ti = fused_topk(logits.float().cpu(), TOP_K, renormalize=True)
    return moe_reference(x.float().cpu(), w.w13, w.w2, _local_only(tw, ti, ep_rank), ti, "silu",
                         adapters=adapters, token_adapter=token_adapter).float()


def _check(out, ref, remote, dtype):
    assert torch.isfinite(out).all(), "a remote expert's (NaN) weights were read"
    assert torch.equal(out[:remote].float().cpu(), torch.zeros(remote, H)), "a remote pair contributed"
    assert_close(out.float().cpu(), ref, dtype)


def _skip_slow_interpreter(device, M, dtype):
    if device.type == "cpu" and (dtype != torch.float32 or M > 16):
        pytest.skip("interpreter time: this case runs on the GPU")


@pytest.mark.parametrize("ep_rank", [0, 1])
@pytest.mark.parametrize("M,dtype", CASES)
def test_expert_map_without_lora(M, dtype, ep_rank, device):
    _skip_slow_interpreter(device, M, dtype)
    gen = torch.Generator().manual_seed(100 + M)
    w = random_weights(E, H, I, "silu", False, gen)
    layer = make_layer(w, TOP_K, "silu", dtype, device, backend="triton", ep_size=2, ep_rank=ep_rank)
    _nan_neighbours(layer.w13_weight)
    _nan_neighbours(layer.w2_weight)
    x, logits, remote = _inputs(M, dtype, device, gen, ep_rank)
    _check(layer(x, logits), _reference(w, x, logits, ep_rank), remote, dtype)


@pytest.mark.parametrize("sliced", [False, True], ids=["full_adapter", "sliced_adapter"])
@pytest.mark.parametrize("ep_rank", [0, 1])
@pytest.mark.parametrize("M,dtype", CASES)
def test_expert_map_with_lora(M, dtype, ep_rank, sliced, lora_path, device):  # noqa: F811
    """Two adapters (ranks 16 and 4 in 16-rank slots) and base tokens; slot 2 is never used and holds NaN.
    ``sliced``: the adapters are handed over with only this rank's experts, as the manager keeps them."""
    _skip_slow_interpreter(device, M, dtype)
    h = Harness(E=E, top_k=TOP_K, H=H, I=I, dtype=dtype, device=device, backend="triton", max_loras=3,
                max_rank=16, seed=200 + M, layer_kwargs=dict(ep_size=2, ep_rank=ep_rank))
    adapters = [h.new_adapter(rank=16), h.new_adapter(rank=4)]
    local = h.layer.local_expert_ids()
    assert local == list(range(ep_rank * E // 2, (ep_rank + 1) * E // 2))
    for slot, ad in enumerate(adapters):
        if sliced:
            pick = lambda t: t[local]  # noqa: E731
            h.layer.set_lora(slot, w13_lora_a=[pick(a) for a in ad.w13_a], w13_lora_b=[pick(b) for b in ad.w13_b],
                             w2_lora_a=pick(ad.w2_a), w2_lora_b=pick(ad.w2_b), expert_ids=local)
            h.slots[slot] = ad
        else:
            h.load(slot, ad)
    base = h.layer.base_layer
    _nan_neighbours(base.w13_weight)
    _nan_neighbours(base.w2_weight)
    for buf in (h.layer._w13_a, h.layer._w13_b, h.layer._w2_a, h.layer._w2_b):
        buf[:, 2] = float("nan")  # the slot after the used ones: reached only by an out-of-range expert
    x, logits, remote = _inputs(M, dtype, device, h.gen, ep_rank)
    slots = pick_slots(M, 2, "mixed", seed=M)
    out = h.forward(x, logits, slots)
    ref = _reference(h.weights, x, logits, ep_rank, adapters=h.slots,
                     token_adapter=[s if s >= 0 else None for s in slots])
    _check(out, ref, remote, dtype)


def test_sliced_adapter_must_cover_the_local_experts(device):
    h = Harness(E=E, top_k=TOP_K, H=H, I=I, device=device, backend="torch", max_loras=1, seed=5,
                layer_kwargs=dict(ep_size=2, ep_rank=1))
    ad = h.new_adapter(rank=8)
    other = [0, 1, 2, 3]  # rank 0's experts
    with pytest.raises(ValueError, match=r"lacks this rank's experts \[4, 5, 6, 7\]"):
        h.layer.set_lora(0, w13_lora_a=[a[other] for a in ad.w13_a], w13_lora_b=[b[other] for b in ad.w13_b],
                         w2_lora_a=ad.w2_a[other], w2_lora_b=ad.w2_b[other], expert_ids=other)
