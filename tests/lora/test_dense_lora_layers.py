"""Dense LoRA wrappers (Replicated / Column / Merged / QKV / Row) against full-weight references.

The base layers are ``vllm.model_executor.layers.linear``'s, loaded from full
weights through their weight loaders.  TP ranks are simulated one after the
other: a column-parallel rank's output must be the full output at the rows its
weight holds (found by matching rows, independently of the sharding code), and
the row-parallel ranks' partial outputs (``reduce_results=False``) must sum to it.
"""

import pytest
import torch
from torch import nn

from tests.utils import assert_close
from vllm.config.lora import LoRAConfig
from vllm.lora.layers.linear import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                                     QKVParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA,
                                     linear_lora_class)
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                               ReplicatedLinear, RowParallelLinear)


# ---- helpers ---------------------------------------------------------------------------------
def random_adapter(gen, K: int, out_sizes: list[int], r: int, skip: tuple = ()):
    """Full per-slice A [r, K] and B [N_s, r] (None for skipped slices)."""
    a = [None if s in skip else torch.randn(r, K, generator=gen) / K**0.5 for s in range(len(out_sizes))]
    b = [None if s in skip else torch.randn(n, r, generator=gen) / r**0.5 for s, n in enumerate(out_sizes)]
    return a, b


def full_reference(x, W, bias, adapters, slots, out_sizes):
    """float64 [T, out_full]: x @ W^T + b + per-token delta, slices stacked in order."""
    y = x.double() @ W.double().T + (0 if bias is None else bias.double())
    offs = [sum(out_sizes[:s]) for s in range(len(out_sizes))]
    for t, slot in enumerate(slots):
        if slot < 0 or slot not in adapters:
            continue
        a, b = adapters[slot]
        for s, (aa, bb) in enumerate(zip(a, b)):
            if aa is not None:
                y[t, offs[s]:offs[s] + out_sizes[s]] += bb.double() @ (aa.double() @ x[t].double())
    return y


def wrap(base, max_loras=3, rank=16, kind="cpu", device="cpu"):
    cls = linear_lora_class(base, LoRAConfig(max_loras=max_loras, max_lora_rank=rank))
    layer = cls(base.to(device))
    layer.create_lora_weights(max_loras, LoRAConfig(max_loras=max_loras, max_lora_rank=rank))
    punica = get_punica_wrapper(256, max_loras, device, kind=kind)
    layer.set_mapping(punica)
    return layer, punica


SLOTS = [0, -1, 1, 1, 2, 0, -1, 2, 1]


def _loaded(layer, W, bias=None):
    layer.weight.weight_loader(layer.weight, W)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias)
    return layer


def _make(kind: str, gen, tp_size: int, tp_rank: int, **kw):
    """(base layer, full weight, bias, full output sizes) for one rank."""
    K, tp = 24, dict(tp_size=tp_size, tp_rank=tp_rank)
    if kind == "qkv":
        hd, heads, kv_heads = 4, 8, 2
        ws = [torch.randn(n * hd, K, generator=gen) for n in (heads, kv_heads, kv_heads)]
        W = torch.cat(ws)
        return _loaded(QKVParallelLinear(K, hd, heads, kv_heads, **tp), W), W, None, [w.shape[0] for w in ws]
    if kind == "merged":
        W, bias = torch.randn(32, K, generator=gen), torch.randn(32, generator=gen)
        return _loaded(MergedColumnParallelLinear(K, [16, 16], bias=True, **tp), W, bias), W, bias, [16, 16]
    W, bias = torch.randn(20, K, generator=gen), torch.randn(20, generator=gen)
    if kind == "row":
        return _loaded(RowParallelLinear(K, 20, bias=True, **tp, **kw), W, bias), W, bias, [20]
    if kind == "column":
        return _loaded(ColumnParallelLinear(K, 20, bias=True, **tp), W, bias), W, bias, [20]
    return _loaded(ReplicatedLinear(K, 20, bias=True), W, bias), W, bias, [20]


def held_rows(base, W) -> torch.Tensor:
    """Indices of the full weight's rows that this rank's weight holds, in its order."""
    return (base.weight[:, None, :] == W[None, :, :]).all(-1).float().argmax(1)


WRAPPERS = {"qkv": QKVParallelLinearWithLoRA, "merged": MergedColumnParallelLinearWithLoRA,
            "column": ColumnParallelLinearWithLoRA, "row": RowParallelLinearWithLoRA,
            "replicated": ReplicatedLinearWithLoRA}


@pytest.mark.parametrize("punica_kind", ["cpu", "gpu"])
@pytest.mark.parametrize("kind,tp_size", [("replicated", 1), ("column", 1), ("column", 2), ("merged", 2),
                                          ("qkv", 1), ("qkv", 2), ("qkv", 4), ("row", 1), ("row", 2)])
def test_wrapper_matches_full_reference(kind, tp_size, punica_kind, device):
    if punica_kind == "gpu" and tp_size > 2 and device.type == "cpu":
        pytest.skip("interpreter time")
    device = device if punica_kind == "gpu" else torch.device("cpu")  # the Triton wrapper on the GPU when present
    outs, want = [], None
    for rank in range(tp_size):
        gen = torch.Generator().manual_seed(0)  # same full weights and adapters on every rank
        row_kw = {"reduce_results": False} if kind == "row" else {}
        base, W, bias, out_sizes = _make(kind, gen, tp_size, rank, **row_kw)
        layer, punica = wrap(base, kind=punica_kind, device=device)
        assert type(layer) is WRAPPERS[kind]
        # rank 12 < max 16 (zero-padded); slot 2's adapter leaves slice 1 out (a missing q/k/v part)
        K = W.shape[1]
        adapters = {0: random_adapter(gen, K, out_sizes, 12), 1: random_adapter(gen, K, out_sizes, 16),
                    2: random_adapter(gen, K, out_sizes, 8, skip=(1,) if len(out_sizes) > 1 else ())}
        for slot, (a, b) in adapters.items():
            layer.set_lora(slot, a, b)
        x_full = torch.randn(len(SLOTS), W.shape[1], generator=gen)
        want = full_reference(x_full, W, bias, adapters, SLOTS, out_sizes)
        punica.update_metadata(SLOTS)
        x = x_full
        if kind == "row":
            part = W.shape[1] // tp_size
            x = x_full[:, rank * part:(rank + 1) * part]
        outs.append(layer(x.to(device)).cpu())
    if kind == "row":
        assert_close(sum(outs), want.float(), torch.float32)
        return
    for rank, y in enumerate(outs):
        base, W = _make(kind, torch.Generator().manual_seed(0), tp_size, rank)[:2]
        assert_close(y, want[:, held_rows(base, W)].float(), torch.float32, name=f"rank {rank}")


def test_row_parallel_adds_delta_before_all_reduce():
    """Two ranks in threads with an all-reduce: every rank returns the full output (bias added once)."""
    from tests.lora.test_moe_lora_tensor_parallel import ThreadGroup, _run_ranks

    group = ThreadGroup(2)
    layers, want = [], None
    for rank in range(2):
        gen = torch.Generator().manual_seed(1)
        base, W, bias, out_sizes = _make("row", gen, 2, rank, tp_group=group.rank(rank))
        layer, punica = wrap(base)
        a, b = random_adapter(gen, W.shape[1], out_sizes, 16)
        layer.set_lora(1, a, b)
        x = torch.randn(len(SLOTS), W.shape[1], generator=gen)
        want = full_reference(x, W, bias, {1: (a, b)}, SLOTS, out_sizes)
        punica.update_metadata(SLOTS)
        layers.append((layer, x[:, rank * 12:(rank + 1) * 12]))
    outs = _run_ranks([lambda lx=lx: lx[0](lx[1]) for lx in layers])
    for y in outs:
        assert_close(y, want.float(), torch.float32)


def test_reset_slot_contributes_exactly_zero():
    gen = torch.Generator().manual_seed(2)
    base, W, bias, out_sizes = _make("qkv", gen, 1, 0)
    layer, punica = wrap(base)
    for slot in range(3):
        layer.set_lora(slot, *random_adapter(gen, W.shape[1], out_sizes, 16))
    layer.reset_lora(1)
    layer.set_lora(2, [None] * 3, [None] * 3)  # an adapter that targets none of q/k/v
    x = torch.randn(6, W.shape[1], generator=gen)
    punica.update_metadata([1, 2, 1, 2, 1, 2])
    assert torch.equal(layer(x), base(x))
    assert layer.adapter_enabled.tolist() == [1, 0, 0, 0]


def test_missing_slice_is_zero():
    gen = torch.Generator().manual_seed(3)
    base, W, bias, out_sizes = _make("qkv", gen, 1, 0)
    layer, punica = wrap(base)
    a, b = random_adapter(gen, W.shape[1], out_sizes, 8, skip=(1, 2))  # q_proj only
    layer.set_lora(0, a, b)
    x = torch.randn(4, W.shape[1], generator=gen)
    punica.update_metadata([0] * 4)
    y, y0 = layer(x), base(x)
    q = out_sizes[0]
    assert torch.equal(y[:, q:], y0[:, q:])
    assert not torch.equal(y[:, :q], y0[:, :q])


def test_set_lora_rejects_bad_weights():
    gen = torch.Generator().manual_seed(4)
    base, W, bias, out_sizes = _make("merged", gen, 1, 0)
    layer, _ = wrap(base, rank=8)
    a, b = random_adapter(gen, W.shape[1], out_sizes, 8)
    with pytest.raises(ValueError, match="must be"):
        layer.set_lora(0, [a[0], a[1][:, :-1]], b)
    with pytest.raises(ValueError, match="max_lora_rank"):
        layer.set_lora(0, *random_adapter(gen, W.shape[1], out_sizes, 16))
    with pytest.raises(ValueError, match="slices"):
        layer.set_lora(0, a[:1], b[:1])
    b[1] = b[1].clone()
    b[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.set_lora(0, a, b)
    with pytest.raises(IndexError):
        layer.set_lora(3, a, b)


def test_other_modules_are_not_replaced():
    cfg = LoRAConfig(max_loras=1, max_lora_rank=8)
    assert linear_lora_class(nn.Linear(4, 4), cfg) is None
    assert linear_lora_class(nn.LayerNorm(4), cfg) is None
