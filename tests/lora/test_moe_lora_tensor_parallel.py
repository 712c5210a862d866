"""Tensor-parallel MoE LoRA, plain and fully sharded, with TP ranks simulated by threads.

Each rank holds its shard of the base weights and of the adapters; the
fully-sharded path all-gathers the fp32 w13 shrink along rank and all-reduces
the w2 shrink.  The ranks' partial outputs are summed, as the MoE all-reduce
does, and compared with the unsharded reference.  Adapters of rank below
max_lora_rank catch zeros landing in the middle of the gathered rank dimension
(upstream bug #31994).
"""
import threading

import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close


class ThreadGroup:
    """All-gather / all-reduce among threads of one process (a stand-in for NCCL)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def rank(self, r: int) -> "RankView":
        return RankView(self, r)


class RankView:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.g, self.r = group, rank

    def _exchange(self, t):
        self.g.slots[self.r] = t
        self.g.barrier.wait()
        parts = list(self.g.slots)
        self.g.barrier.wait()
        return parts

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(t), dim=dim)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return sum(self._exchange(t))


def _run_ranks(fns):
    results, errors = [None] * len(fns), []

    def work(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("fully_sharded", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_tp2_lora_matches_unsharded_reference(fully_sharded, fused, device):
    tp = 2
    group = ThreadGroup(tp)
    hs = [Harness(E=8, top_k=2, H=32, I=64, backend="torch", device=device, max_loras=3, max_rank=16, seed=21,
                  fused=fused, layer_kwargs=dict(tp_size=tp, tp_rank=r),
                  lora_kwargs=dict(fully_sharded_loras=fully_sharded),
                  punica_kwargs=dict(tp_group=group.rank(r)))
          for r in range(tp)]
    adapters = [hs[0].new_adapter(rank=16), hs[0].new_adapter(rank=6), hs[0].new_adapter(rank=8)]
    for h in hs:
        for s, ad in enumerate(adapters):
            h.load(s, ad)
    assert hs[1].layer.fully_sharded == fully_sharded
    x, logits = hs[0].inputs(11, empty=bool(fused))  # one random expert empty, or every one used
    slots = pick_slots(11, 3, "mixed", seed=2)
    for h in hs:
        h.punica.update_metadata(slots)
    outs = _run_ranks([lambda h=h: h.layer(x, logits) for h in hs])
    assert_close(sum(outs).cpu(), hs[0].reference(x, logits, slots), torch.float32)


def test_fully_sharded_buffers_are_rank_shards(device):
    h = Harness(E=4, top_k=2, H=32, I=32, backend="torch", device=device, max_loras=1, max_rank=16,
                layer_kwargs=dict(tp_size=2, tp_rank=1), lora_kwargs=dict(fully_sharded_loras=True))
    ctx = h.layer.base_layer.lora_context
    assert ctx.fully_sharded and ctx.tp_rank == 1 and ctx.tp_size == 2
    assert ctx.w13_lora_a_stacked[0].shape == (1, 4, 8, 32)  # R/tp rows of A
    assert ctx.w2_lora_b_stacked[0].shape == (1, 4, 16, 16)  # H/tp rows of B
    ad = h.new_adapter(rank=6)
    h.load(0, ad)
    # rank 1 holds padded rows 8..15 of A: all padding, since the adapter's rank is 6
    assert torch.count_nonzero(ctx.w13_lora_a_stacked[0]) == 0
    torch.testing.assert_close(ctx.w2_lora_b_stacked[0][0, :, :, :6].cpu(), ad.w2_b[:, 16:, :])
