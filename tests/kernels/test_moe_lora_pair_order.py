"""The MoE LoRA per-pair kernels' visiting order (``moe_lora_pair_order.py``): the ranking kernel against torch's
stable sort, and the kernels giving the same bits in any order of their programs (through the op and through a
LoRA-wrapped layer, whose w2 seam reuses the w13 seam's order)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, F16, F32, Case, _config, _id, build
from vllm.lora.ops.triton_ops import fused_moe_lora as op
from vllm.lora.ops.triton_ops import moe_lora_pair_order as po

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("M,top_k,E,L,emap", [(1, 8, 16, 4, False), (37, 4, 12, 3, False), (75, 4, 40, 4, True),
                                              (16, 8, 128, 4, False)])
def test_kernel_order_is_the_stable_sort_of_the_keys(M, top_k, E, L, emap, device):
    gen = torch.Generator().manual_seed(M)
    e_global = 2 * E if emap else E
    ids = torch.randint(0, e_global, (M, top_k), generator=gen, dtype=torch.int32)
    ids[0, -1] = -1  # a pair sent nowhere
    expert_map = None
    if emap:
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(e_global, generator=gen)[:E]] = torch.arange(E, dtype=torch.int32)
        expert_map = expert_map.to(device)
    mapping = torch.randint(-1, L, (M + 3,), generator=gen, dtype=torch.int32)  # longer than M, like the step's
    ids, mapping = ids.to(device), mapping.to(device)
    got = po.pair_order(ids, mapping, E, L, expert_map, use_triton=True)
    want = po.pair_order(ids.cpu(), mapping.cpu(), E, L, None if expert_map is None else expert_map.cpu(),
                         use_triton=False)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    keys = po.pair_keys(ids.cpu(), mapping.cpu(), E, L, None if expert_map is None else expert_map.cpu())
    k = keys[want.long()]
    assert torch.equal(torch.sort(want).values, torch.arange(M * top_k, dtype=torch.int32))  # a permutation
    assert bool((k[1:] >= k[:-1]).all())  # grouped by (slot, expert), live routes first
    ties = k[1:] == k[:-1]
    assert bool((want[1:][ties] > want[:-1][ties]).all())  # stable
    assert int(keys.max()) == L * E  # the pair sent nowhere keys last


CASES = [Case(7, 2, 5, 3, 16, dtype=F16, disabled=(1,), mul_w=True, every=True),
         Case(6, 4, 12, 2, 16, S=1, per_pair_x=True, mul_w=True, K=48, N=40, expert_map=True),
         Case(5, 2, 6, 2, 16, dtype=BF16, layout="separate", mul_w=True, every=True),
         Case(6, 2, 4, 2, 16, dtype=F16, K=80, N=40, mul_w=True, layout="view")]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kernel", [0, 1, 2])
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_same_bits_in_any_order(device, c, kernel, overwrite, monkeypatch):
    """Token order, the grouped order and a random permutation: equal outputs (kernel 0 ignores the order)."""
    if c.dtype == BF16 and device.type == "cpu":
        c = Case(**{**c.__dict__, "dtype": F32})  # the interpreter truncates bf16
    monkeypatch.setattr(op, "PAIR_KERNEL", kernel)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, _ = build(c, device)
    cfg = _config(c, device, c.M * c.top_k)
    numel = c.M * c.top_k
    grouped = po.pair_order(kw["topk_ids"], kw["token_lora_mapping"], c.E, c.L, kw["expert_map"], use_triton=True)
    shuffled = torch.randperm(numel, generator=torch.Generator().manual_seed(1)).to(torch.int32).to(device)
    outs = []
    for order in (None, grouped, shuffled):
        o = out.clone()
        op.fused_moe_lora(o, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, overwrite=overwrite, pair_order=order,
                          **kw, **geo)
        outs.append(o)
    assert not torch.equal(outs[0], out)  # the delta is not zero
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), (o.float() - outs[0].float()).abs().max()


def test_a_bad_order_is_refused(device):
    c = Case(3, 2, 4, 2, 8)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, _ = build(c, device)
    for bad in (torch.arange(6, dtype=torch.int64), torch.arange(5, dtype=torch.int32)):
        with pytest.raises(ValueError, match="pair_order must be int32"):
            op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, pair_order=bad.to(device), **kw, **geo)


def test_taken_on_cuda_between_the_thresholds():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert po.orders(po.PAIR_ORDER_MIN_PAIRS, cuda) and po.orders(po.PAIR_ORDER_MAX_PAIRS, cuda)
    assert not po.orders(po.PAIR_ORDER_MIN_PAIRS - 1, cuda) and not po.orders(po.PAIR_ORDER_MAX_PAIRS + 1, cuda)
    assert not po.orders(512, cpu)


@pytest.mark.parametrize("beside", [False, True])
def test_layer_w13_and_w2_seams_share_the_order(device, beside, monkeypatch):
    """A LoRA-wrapped layer on the per-pair path with the order forced on (CPU too): the same bits as token order;
    the order is made once, at the w13 seam, and the w2 seam's launch gets it too."""
    from tests.lora.lora_moe_harness import Harness, poisoned_delta_buffer
    from tests.layers.moe_setup import pick_slots
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    from vllm.model_executor.layers.fused_moe.experts import lora_overlap

    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    monkeypatch.setattr(op, "PAIR_KERNEL", 2)
    if beside:
        monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(lora_overlap, "delta_buffer", poisoned_delta_buffer)
    h = Harness(E=8, top_k=2, H=32, I=48, dtype=torch.float32, device=device, backend="triton", max_loras=3, seed=5)
    h.load(0, h.new_adapter(rank=16))
    h.load(2, h.new_adapter(rank=8))
    x, logits = h.inputs(9)
    slots = pick_slots(9, 3, "mixed", seed=9)
    plain = h.forward(x, logits, slots)
    made, seen = [], []
    real_order, real_fused = po.pair_order, op.fused_moe_lora
    monkeypatch.setattr(po, "orders", lambda n, d: True)
    monkeypatch.setattr(po, "pair_order", lambda *a, **k: made.append(1) or real_order(*a, **k))
    monkeypatch.setattr(op, "fused_moe_lora", lambda *a, **k: seen.append(k.get("pair_order")) or real_fused(*a, **k))
    ordered = h.forward(x, logits, slots)
    assert made == [1] and len(seen) == 2 and seen[0] is not None and seen[1] is seen[0]
    assert torch.equal(ordered, plain)
