"""FusedMoE weight loaders: per-expert checkpoints, fused layouts, TP and EP slicing."""
import pytest
import torch

from tests.layers.moe_setup import random_weights
from vllm.model_executor.layers.fused_moe.layer import FusedMoE


def _layer(E, H, I, activation="silu", **kw):
    return FusedMoE(E, 2, H, I, params_dtype=torch.float32, activation=activation, moe_backend="torch", **kw)


def _load_per_expert(layer, w, activation):
    """As a per-expert checkpoint is read: gate_proj/up_proj [I, H], down_proj [H, I], one expert at a time."""
    I = w.w2.shape[2]
    for e in range(w.w13.shape[0]):
        if activation == "silu":
            layer.weight_loader(layer.w13_weight, w.w13[e, :I], "w1", e)
            layer.weight_loader(layer.w13_weight, w.w13[e, I:], "w3", e)
        else:
            layer.weight_loader(layer.w13_weight, w.w13[e], "w1", e)
        layer.weight_loader(layer.w2_weight, w.w2[e], "w2", e)
        if w.b13 is not None:
            layer.weight_loader(layer.w13_bias, w.b13[e, :I], "w1", e)
            layer.weight_loader(layer.w13_bias, w.b13[e, I:], "w3", e)
            layer.weight_loader(layer.w2_bias, w.b2[e], "w2", e)


@pytest.mark.parametrize("activation", ["silu", "silu_no_mul"])
@pytest.mark.parametrize("tp_size,tp_rank,ep_size,ep_rank", [(1, 0, 1, 0), (2, 1, 1, 0), (1, 0, 2, 1), (2, 0, 2, 1)])
def test_per_expert_and_fused_loading_agree(activation, tp_size, tp_rank, ep_size, ep_rank):
    E, H, I = 4, 16, 8
    w = random_weights(E, H, I, activation, activation == "silu", torch.Generator().manual_seed(1))
    kw = dict(tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank, has_bias=w.b13 is not None)
    a, b = _layer(E, H, I, activation, **kw), _layer(E, H, I, activation, **kw)
    _load_per_expert(a, w, activation)
    b.load_fused_experts(gate_up=w.w13, down=w.w2, gate_up_bias=w.b13, down_bias=w.b2)
    assert torch.equal(a.w13_weight, b.w13_weight) and torch.equal(a.w2_weight, b.w2_weight)
    if w.b13 is not None:  # the down bias counts once in the TP all-reduce: rank 0 holds it, the others zeros
        assert torch.equal(a.w13_bias, b.w13_bias) and torch.equal(a.w2_bias, b.w2_bias)
        E_loc = E // ep_size
        want = w.b2[ep_rank * E_loc:(ep_rank + 1) * E_loc] * (1 if tp_rank == 0 else 0)
        assert torch.equal(b.w2_bias, want)
    # against explicit slicing: local experts, this rank's share of I
    E_loc, I_part = E // ep_size, I // tp_size
    experts = range(ep_rank * E_loc, (ep_rank + 1) * E_loc)
    cols = slice(tp_rank * I_part, (tp_rank + 1) * I_part)
    for loc, e in enumerate(experts):
        if activation == "silu":
            want13 = torch.cat([w.w13[e, :I][cols], w.w13[e, I:][cols]])
        else:
            want13 = w.w13[e][cols]
        assert torch.equal(a.w13_weight[loc], want13)
        assert torch.equal(a.w2_weight[loc], w.w2[e][:, cols])


def test_gpt_oss_transposed_interleaved_layout():
    """gpt-oss checkpoints: gate_up [E, H, 2I] interleaved, down [E, I, H]; TP keeps gate/up pairs together."""
    E, H, I = 2, 8, 4
    gate_up = torch.randn(E, H, 2 * I)
    down = torch.randn(E, I, H)
    bias = torch.randn(E, 2 * I)
    for rank in range(2):
        layer = _layer(E, H, I, "swigluoai", has_bias=True, tp_size=2, tp_rank=rank)
        layer.load_fused_experts(gate_up=gate_up, down=down, gate_up_bias=bias, down_bias=torch.randn(E, H),
                                 transposed=True)
        rows = slice(rank * I, (rank + 1) * I)  # I_part = 2 interleaved (gate, up) pairs = 4 rows
        assert torch.equal(layer.w13_weight[0], gate_up[0].t()[rows])
        assert torch.equal(layer.w13_bias[1], bias[1][rows])
        assert torch.equal(layer.w2_weight[1], down[1].t()[:, rank * 2:(rank + 1) * 2])


def test_loader_errors_are_clear():
    layer = _layer(4, 16, 8)
    with pytest.raises(ValueError, match="expected shape"):
        layer.weight_loader(layer.w13_weight, torch.randn(7, 16), "w1", 0)
    with pytest.raises(ValueError, match="unknown shard_id"):
        layer.weight_loader(layer.w13_weight, torch.randn(8, 16), "w4", 0)
    with pytest.raises(ValueError, match="out of range"):
        layer.weight_loader(layer.w2_weight, torch.randn(16, 8), "w2", 9)
    with pytest.raises(ValueError, match="must have 4 experts"):
        layer.load_fused_experts(gate_up=torch.randn(3, 16, 16), down=torch.randn(3, 16, 8))


def test_other_ranks_experts_are_skipped():
    layer = _layer(4, 16, 8, ep_size=2, ep_rank=0)
    layer.w2_weight.data.normal_()  # created with torch.empty: may hold NaN, which never compares equal
    before = layer.w2_weight.clone()
    layer.weight_loader(layer.w2_weight, torch.randn(16, 8), "w2", 3)  # expert 3 lives on rank 1
    assert torch.equal(layer.w2_weight, before)
