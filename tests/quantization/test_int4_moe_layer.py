"""The int4 FusedMoE layer (Int4MoEMethod + MarlinExperts / TorchInt4Experts) without LoRA against an
fp32 loop reference on the dequantised weights; TP and EP loading; the packed storage."""
import dataclasses

import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import router_inputs
from tests.quantization.int4_moe_setup import SCHEMES, make_int4_layer, poison_workspaces, random_int4_experts
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.router import fused_topk


def _inputs(M, E, H, top_k, dtype, device, gen):
    """Every expert routed (the last included) except one, drawn at random, that gets no token."""
    while True:
        x, logits = router_inputs(M, E, H, dtype, device, gen, top_k=top_k, empty=True)
        _, ids = fused_topk(logits.float().cpu(), top_k, renormalize=True)
        used = set(ids.flatten().tolist())
        if E - 1 in used and len(used) == E - 1:
            return x, logits


def _ref(ex, x, logits, top_k, activation, **kw):
    tw, ti = fused_topk(logits.float().cpu(), top_k, renormalize=True)
    w = ex.float_weights
    return moe_reference(x.float().cpu(), w.w13, w.w2, tw, ti, activation, **kw).float()


def _forward_poisoned(layer, x, logits):
    """Forward twice: the second time with every scratch buffer NaN-poisoned beforehand."""
    first = layer(x, logits)
    poison_workspaces(layer)
    second = layer(x, logits)
    assert torch.equal(first, second)
    return second


# (M, E, top_k, H, I, activation, group)
SHAPES = [(7, 8, 2, 64, 64, "silu", 32), (13, 8, 3, 64, 32, "gelu", 16), (9, 4, 2, 32, 48, "silu_no_mul", 16)]


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("marlin", torch.float32), ("marlin", torch.float16)])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("M,E,top_k,H,I,activation,group", SHAPES)
def test_int4_layer_matches_reference(backend, dtype, scheme, M, E, top_k, H, I, activation, group, device):
    gen = torch.Generator().manual_seed(M * 31 + E + len(scheme))
    ex = random_int4_experts(E, H, I, activation, group, scheme, gen)
    layer = make_int4_layer(ex, top_k, activation, group, scheme, dtype, device, backend=backend)
    assert layer.moe_backend.value == backend
    x, logits = _inputs(M, E, H, top_k, dtype, device, gen)
    assert_close(_forward_poisoned(layer, x, logits).float().cpu(), _ref(ex, x, logits, top_k, activation), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("M", [1, 16, 200])
def test_int4_layer_bf16_on_gpu(scheme, M, device):
    gen = torch.Generator().manual_seed(M)
    ex = random_int4_experts(16, 256, 384, "silu", 128, scheme, gen)
    layer = make_int4_layer(ex, 4, "silu", 128, scheme, torch.bfloat16, device, backend="marlin")
    x, logits = router_inputs(M, 16, 256, torch.bfloat16, device, gen, top_k=4, empty=M > 16)
    assert_close(_forward_poisoned(layer, x, logits).float().cpu(), _ref(ex, x, logits, 4, "silu"), torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "marlin"])
@pytest.mark.parametrize("scheme", ["asym", "act_order"])
def test_tensor_parallel_ranks_sum_to_full_layer(backend, scheme, device):
    """Each TP rank loads its slice of the full int4 weights (act-order: w2's columns keep their groups)."""
    gen = torch.Generator().manual_seed(12)
    ex = random_int4_experts(4, 32, 64, "silu", 16, scheme, gen)
    x, logits = _inputs(5, 4, 32, 2, torch.float32, device, gen)
    parts = [make_int4_layer(ex, 2, "silu", 16, scheme, torch.float32, device, backend=backend, tp_size=2, tp_rank=r)
             for r in range(2)]
    if scheme == "act_order":  # a rank's w2 columns fall into groups of uneven sizes: g_idx is kept
        assert all(p.w2_g_idx.shape == (4, 32) for p in parts) and not hasattr(parts[0], "w13_g_idx")
    total = sum(p(x, logits) for p in parts)
    assert_close(total.cpu(), _ref(ex, x, logits, 2, "silu"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "marlin"])
@pytest.mark.parametrize("group,tp_size", [(-1, 1), (-1, 2), (64, 4)])
def test_group_spanning_a_rank_slice(backend, group, tp_size, device):
    """Per-channel scales (group -1: H for w13, I for w2), and groups wider than a rank's w2 columns:
    each rank keeps the one group its columns fall in."""
    gen = torch.Generator().manual_seed(13)
    ex = random_int4_experts(4, 64, 128, "silu", group, "asym", gen)
    x, logits = _inputs(6, 4, 64, 2, torch.float32, device, gen)
    parts = [make_int4_layer(ex, 2, "silu", group, "asym", torch.float32, device, backend=backend, tp_size=tp_size,
                             tp_rank=r) for r in range(tp_size)]
    assert all(tuple(p.w2_scales.shape) == (4, 1, 64) for p in parts)  # one group per rank: [E, G, H]
    total = sum(p(x, logits) for p in parts)
    assert_close(total.cpu(), _ref(ex, x, logits, 2, "silu"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "marlin"])
def test_expert_parallel_ranks_sum_to_full_layer(backend, device):
    """With an expert_map each rank loads and computes only its experts (the last one on rank 1)."""
    gen = torch.Generator().manual_seed(11)
    ex = random_int4_experts(8, 32, 32, "silu", 16, "act_order", gen)
    x, logits = _inputs(13, 8, 32, 2, torch.float32, device, gen)
    ranks = [make_int4_layer(ex, 2, "silu", 16, "act_order", torch.float32, device, backend=backend, ep_size=2,
                             ep_rank=r) for r in range(2)]
    assert ranks[1].w13_weight.shape[0] == 4
    total = sum(_forward_poisoned(r, x, logits) for r in ranks)
    assert_close(total.cpu(), _ref(ex, x, logits, 2, "silu"), torch.float32)


def test_weights_stay_packed_after_loading(device):
    gen = torch.Generator().manual_seed(3)
    ex = random_int4_experts(4, 64, 32, "silu", 32, "act_order", gen)
    layer = make_int4_layer(ex, 2, "silu", 32, "act_order", torch.float16, device, backend="torch")
    params = dict(layer.named_parameters())
    assert params["w13_weight"].dtype == torch.int32 and tuple(params["w13_weight"].shape) == (4, 8, 64)
    assert tuple(params["w2_weight"].shape) == (4, 4, 64)
    assert tuple(params["w13_scales"].shape) == (4, 2, 64) and params["w13_qzeros"].dtype == torch.uint8
    # act-order without TP: sorted by group, so only the activation permutation remains
    assert "w13_perm" in params and "w13_g_idx" not in params and "w2_g_idx" not in params
    weight_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if n.endswith("_weight"))
    assert weight_bytes * 2 == 4 * (64 * 64 + 64 * 32)  # half a byte per weight
    assert not any(p.dtype == torch.uint8 and p.shape[-1] in (64, 32) and p.dim() == 3 and n.endswith("weight")
                   for n, p in params.items())


@pytest.mark.parametrize("unsorted", [False, True])
@pytest.mark.parametrize("ep", [False, True])
def test_marlin_split_k_path(ep, unsorted, monkeypatch, device):
    """The decode path (K split over programs, partial sums added): forced here, since the interpreter's
    config never splits; the split buffer is NaN-poisoned, so every split must store all its rows (and with
    an expert map the dropped pairs' rows are zeroed).  ``unsorted``: the decode routing without the sort."""
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setenv("VLLM_INT4_MMA", "0")  # the Triton kernels' split-K path
    get_cfg, invoke = mod.get_int4_moe_config, mod.invoke_int4_moe_gemm
    splits, routes = [], []

    def split_cfg(*args, **kw):
        return dataclasses.replace(get_cfg(*args, **kw), split_k=4, block_size_k=16)

    def poisoned(a, w, out, **kw):
        kw["split_buffer"] = torch.full((4 * out.numel(),), float("nan"), device=out.device)
        splits.append(kw["config"].split_k)
        routes.append(kw)
        return invoke(a, w, out, **kw)

    monkeypatch.setattr(mod, "get_int4_moe_config", split_cfg)
    monkeypatch.setattr(mod, "invoke_int4_moe_gemm", poisoned)
    monkeypatch.setattr(mod, "use_unsorted_int4_gemm", lambda pairs, experts: unsorted)
    gen = torch.Generator().manual_seed(21)
    ex = random_int4_experts(8, 64, 48, "silu", 16, "act_order", gen)
    x, logits = _inputs(9, 8, 64, 2, torch.float32, device, gen)
    ranks = [make_int4_layer(ex, 2, "silu", 16, "act_order", torch.float32, device, backend="marlin",
                             **(dict(ep_size=2, ep_rank=r) if ep else {})) for r in range(2 if ep else 1)]
    total = sum(r(x, logits) for r in ranks)
    assert splits and set(splits) == {4}
    assert all(("pair_expert_ids" in kw) == unsorted for kw in routes)
    # without LoRA the split reductions apply the activation and the top-k sum
    assert [("epilogue_activation" in kw, "epilogue_top_k" in kw) for kw in routes[:2]] == [(True, False),
                                                                                            (False, True)]
    assert_close(total.cpu(), _ref(ex, x, logits, 2, "silu"), torch.float32)


def check_graph_replay(M, E, gen, device):
    """An act-order int4 layer (marlin backend, E experts, top 4, silu) captured once in a CUDA graph for M
    tokens (after one eager call outside the capture), replayed with new inputs and routing, against the
    reference."""
    ex = random_int4_experts(E, 256, 256, "silu", 128, "act_order", gen)
    layer = make_int4_layer(ex, 4, "silu", 128, "act_order", torch.bfloat16, device, backend="marlin")
    qm = layer.quant_method
    x, logits = router_inputs(M, E, 256, torch.bfloat16, device, gen, top_k=4)
    tw, ti = fused_topk(logits.float(), 4, renormalize=True)
    qm.apply(layer, x, tw, ti)  # compile and size the workspaces outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qm.apply(layer, x, tw, ti)
    x2, logits2 = router_inputs(M, E, 256, torch.bfloat16, device, gen, top_k=4)
    tw2, ti2 = fused_topk(logits2.float(), 4, renormalize=True)
    x.copy_(x2)
    tw.copy_(tw2)
    ti.copy_(ti2)
    graph.replay()
    assert_close(out.float().cpu(), _ref(ex, x2, logits2, 4, "silu"), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 48])  # the unsorted decode path (split K) and the sorted one
def test_int4_layer_cuda_graph_replay(M, device):
    """MarlinExperts never synchronises with the host: captured once, replayed with new inputs and routing
    (the decode graphs of vllm/worker/cuda_graphs.py rely on it)."""
    check_graph_replay(M, 32, torch.Generator().manual_seed(M + 5), device)
