"""MoE LoRA shrink/expand (Triton sorted + small-batch paths, torch) against the per-pair loop reference.

``out`` always starts as random data and must end as start + delta; entries the
delta does not touch must come back bit-identical.  CPU runs go through the
Triton interpreter, so shapes are small and cases hand-picked (~5-20 ms per
program); the ``cuda`` tests use realistic Qwen3-30B-A3B shapes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from tests.kernels.moe_lora_gpu_cases import _gpu_layer, check_graph_replay
from tests.utils import assert_close, poison_, random_expert, random_topk_ids
from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.lora.ops.torch_ops.moe_lora import (fused_moe_lora_torch, moe_lora_expand_torch, moe_lora_reference,
                                              moe_lora_shrink_torch)
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora, moe_lora_expand, moe_lora_shrink
from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

# The interpreter converts 1-element arrays to ints in range() bounds (a numpy deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Case:
    M: int
    top_k: int
    E: int
    L: int
    R: int
    S: int = 2
    dtype: torch.dtype = F32
    K: int = 64
    N: int = 48
    ranks: tuple = ()  # actual rank per slot (< R: zero-padded tail); () = all R
    mapping: str = "random"  # random | one (all tokens on slot L-1) | none
    disabled: tuple = ()  # slots with adapter_enabled = 0
    mul_w: bool = False
    per_pair_x: bool = False  # w2 style: x is [M*top_k, K], top_k_in = 1
    expert_map: bool = False
    layout: str = "flat"  # flat | view (strided out, n_offset, slice_stride) | 3d | separate (per-slice tensors)
    config: tuple = ()  # config overrides as (field, value) pairs
    every: bool = False  # every local expert gets pairs (else one, drawn at random, gets none)


def build(c: Case, device):
    numel = c.M * c.top_k
    e_global = 2 * c.E + 1 if c.expert_map else c.E
    expert_map = None
    local = list(range(c.E))  # global ids of the local experts 0..E-1
    if c.expert_map:
        local = torch.randperm(e_global)[: c.E].tolist()
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(c.E, dtype=torch.int32)
    empty = () if c.every else (local[random_expert(c.E)],)
    if c.mapping == "random":
        mapping = torch.randint(-1, c.L, (c.M,), dtype=torch.int32)
    else:
        mapping = torch.full((c.M,), c.L - 1 if c.mapping == "one" else -1, dtype=torch.int32)
    enabled = torch.ones(c.L + 1, dtype=torch.int32)
    enabled[-1] = 0
    for s in c.disabled:
        enabled[s] = 0
    # Each local expert (but the empty one) gets a pair, on tokens with an enabled adapter first,
    # so that a kernel skipping any one expert's delta is seen.
    order = torch.randperm(c.M).tolist()
    with_delta = [m for m in order if 0 <= int(mapping[m]) < c.L and enabled[int(mapping[m])]]
    topk_ids = random_topk_ids(c.M, e_global, c.top_k, empty=empty, cover=local,
                               cover_tokens=with_delta + [m for m in order if m not in with_delta])
    n_sizes = [c.N - 8 * s for s in range(c.S)] if c.layout == "separate" else [c.N] * c.S
    a = torch.randn(c.S, c.L, c.E, c.R, c.K) / c.K**0.5
    b = [torch.randn(c.L, c.E, n, c.R) / c.R**0.5 for n in n_sizes]
    for slot, r in enumerate(c.ranks):
        a[:, slot, :, r:] = 0
        for bs in b:
            bs[slot, :, :, r:] = 0
    a = a.to(c.dtype).to(device)
    b = [bs.to(c.dtype).to(device) for bs in b]
    if c.layout == "separate":
        lora_a = tuple(a[s].clone() for s in range(c.S))
        lora_b = tuple(b)
    else:
        lora_a, lora_b = tuple(a.unbind(0)), tuple(torch.stack(b).unbind(0))
    x = torch.randn(numel if c.per_pair_x else c.M, c.K).to(c.dtype).to(device)
    n_offset, slice_stride = (5, c.N + 3) if c.layout == "view" else (0, None)
    cols = n_offset + (c.S * slice_stride if slice_stride else sum(n_sizes)) + (2 if c.layout == "view" else 0)
    if c.layout == "view":
        parent = poison_(torch.empty(numel, cols + 7, dtype=c.dtype, device=device))
        out = parent[:, 4: 4 + cols]
        out.copy_(torch.randn(numel, cols))
    elif c.layout == "3d":
        parent = None
        out = torch.randn(c.top_k, c.M, cols).to(c.dtype).to(device).transpose(0, 1)  # non-contiguous
    else:
        parent = None
        out = torch.randn(numel, cols).to(c.dtype).to(device)
    kw = dict(topk_ids=topk_ids.to(device), topk_weights=torch.rand(c.M, c.top_k, device=device),
              token_lora_mapping=mapping.to(device), adapter_enabled=enabled.to(device),
              expert_map=None if expert_map is None else expert_map.to(device), mul_routed_weight=c.mul_w)
    geo = dict(n_offset=n_offset, slice_stride=slice_stride)
    top_k_in = 1 if c.per_pair_x else c.top_k
    delta = moe_lora_reference(x, lora_a, lora_b, top_k_in=top_k_in, out_cols=cols, **kw, **geo)
    return x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta


def check(c: Case, out, start, delta, parent=None):
    out2 = out.reshape(-1, out.shape[-1])
    start2 = start.reshape(-1, start.shape[-1])
    untouched = (delta == 0).to(out.device)
    assert torch.equal(out2[untouched], start2[untouched]), "entries without a delta were modified"
    if parent is not None:
        assert torch.isnan(parent[:, :4]).all() and torch.isnan(parent[:, 4 + out.shape[-1]:]).all(), \
            "wrote outside the out view"
    assert_close(out2, start2.double() + delta.double().to(out.device), c.dtype)
    assert_close(out2.double() - start2.double(), delta.double().to(out.device), c.dtype, name="delta")


def _config(c: Case, device, numel):
    cfg = get_moe_lora_config("fused_moe_lora", num_pairs=numel, num_experts=c.E, max_loras=c.L, rank=c.R, K=c.K,
                              N=c.N, num_slices=c.S, dtype=c.dtype, use_tuned_config=False,
                              device_name="cpu" if device.type == "cpu" else "cuda")
    return dataclasses.replace(cfg, **dict(c.config))


def _align(c: Case, kw, cfg):
    return moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=c.E, max_loras=c.L,
                                     block_size=cfg.block_size_m, adapter_enabled=kw["adapter_enabled"],
                                     expert_map=kw["expert_map"])


CASES = [
    Case(0, 2, 4, 2, 8),
    Case(1, 1, 4, 1, 8, S=1, mul_w=True),
    Case(7, 2, 5, 3, 16, dtype=F16, disabled=(1,), mul_w=True, every=True),
    Case(7, 8, 12, 2, 16, S=1, per_pair_x=True, mul_w=True, K=48, N=40),
    Case(9, 2, 6, 2, 16, dtype=BF16, layout="separate", mul_w=True, every=True),
    Case(12, 2, 10, 3, 16, S=1, dtype=F16, expert_map=True, per_pair_x=True, mul_w=True, layout="3d"),
    Case(33, 2, 6, 2, 16, mapping="none"),
    Case(33, 2, 8, 4, 64, ranks=(64, 8, 32, 64), dtype=F16, every=True),
    Case(33, 8, 16, 4, 16, dtype=BF16, mapping="one", expert_map=True, every=True),
    Case(200, 2, 8, 4, 16, ranks=(16, 8, 4, 16), dtype=BF16, disabled=(2,), mul_w=True, layout="view"),
    Case(200, 1, 4, 1, 8, S=1, per_pair_x=True, mapping="one", K=48, N=40, every=True),
    # Several K tiles, N tiles and N-splits, also under the interpreter.
    Case(20, 2, 4, 2, 16, dtype=F16, K=80, N=40, mul_w=True, layout="view",
         config=(("block_size_k", 16), ("block_size_n", 16), ("num_n_splits", 2))),
]
SMALL = [c for c in CASES if c.M * c.top_k <= 40]


def _id(c: Case) -> str:
    return f"M{c.M}k{c.top_k}E{c.E}L{c.L}R{c.R}S{c.S}-{str(c.dtype)[6:]}-{c.mapping}-{c.layout}" + (
        "-emap" if c.expert_map else "") + ("-w" if c.mul_w else "") + ("-w2" if c.per_pair_x else "") + (
        "-all" if c.every else "")


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_sorted_path(device, c):
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    cfg = _config(c, device, c.M * c.top_k)
    fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=_align(c, kw, cfg), config=cfg, **kw, **geo)
    check(c, out, start, delta, parent)


@pytest.mark.parametrize("c", SMALL, ids=_id)
def test_small_batch_path(device, c):
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=_config(c, device, c.M * c.top_k), **kw, **geo)
    check(c, out, start, delta, parent)


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_torch_impl(device, c):
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    fused_moe_lora_torch(out, x, lora_a, lora_b, top_k_in=top_k_in, **kw, **geo)
    check(c, out, start, delta, parent)
    out = start.clone()
    shrunk = moe_lora_shrink_torch(x, lora_a, top_k_in=top_k_in, **{k: kw[k] for k in _SHRINK_KEYS})
    moe_lora_expand_torch(out, shrunk, lora_b, **kw, **geo)
    check(c, out, start, delta)


_SHRINK_KEYS = ("topk_ids", "token_lora_mapping", "adapter_enabled", "expert_map")
SPLIT_CASES = [CASES[2], CASES[4], CASES[9]]


@pytest.mark.parametrize("sorted_path", [True, False], ids=["sorted", "small"])
@pytest.mark.parametrize("c", SPLIT_CASES, ids=_id)
def test_shrink_then_expand_equals_fused(device, c, sorted_path):
    if not sorted_path and c not in SMALL:
        pytest.skip("too many pairs for the per-pair kernel under the interpreter")
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    cfg = _config(c, device, c.M * c.top_k)
    al = _align(c, kw, cfg) if sorted_path else None
    sk = {k: kw[k] for k in _SHRINK_KEYS}
    shrunk = moe_lora_shrink(x, lora_a, top_k_in=top_k_in, alignment=al, config=cfg, **sk)
    # The shrink itself: fp32, zero for pairs without a delta.
    ref = moe_lora_shrink_torch(x, lora_a, top_k_in=top_k_in, **sk)
    assert shrunk.dtype == F32 and shrunk.shape == ref.shape
    assert_close(shrunk, ref, c.dtype, name="shrink")
    assert torch.equal(shrunk[ref == 0], ref[ref == 0])
    # The expand reads a strided shrink buffer (as left by a rank all-gather).
    S, numel, R = shrunk.shape
    gathered = torch.empty(numel, S, R + 3, device=device)[:, :, :R].permute(1, 0, 2)
    gathered.copy_(shrunk)
    moe_lora_expand(out, gathered, lora_b, alignment=al, config=cfg, **kw, **geo)
    check(c, out, start, delta, parent)
    fused = start.clone()
    fused_moe_lora(fused, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw, **geo)
    assert_close(out, fused, c.dtype, name="split vs fused")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_intermediate_stays_fp32(device, dtype):
    """Shrink outputs near 1100 whose B-weighted difference is O(5): a bf16/fp16 intermediate loses it."""
    M, top_k, E, L, R, K, N = 16, 1, 2, 1, 16, 32, 32
    a = torch.randn(1, L, E, R, K) / K**0.5
    a[..., 0, :], a[..., 1, :] = 200.0, 201.0  # s0 - s1 = -sum(x), both ~ 1e3
    b = torch.randn(1, L, E, N, R) / R**0.5
    b[..., 1] = -b[..., 0]
    x = torch.randn(M, K).to(dtype)
    x[:, 0] += 3.0  # keeps |sum(x)| away from 0 in every row
    a, b = a.to(dtype), b.to(dtype)
    kw = dict(topk_ids=torch.zeros(M, top_k, dtype=torch.int32), topk_weights=None,
              token_lora_mapping=torch.zeros(M, dtype=torch.int32),
              adapter_enabled=torch.tensor([1, 0], dtype=torch.int32))
    delta = moe_lora_reference(x, a, b, top_k_in=1, out_cols=N, **kw)
    # The test bites: rounding the shrink to bf16 would miss the bound by far.
    s = x.double() @ a[0, 0, 0].double().T
    bad = s.to(BF16).double() @ b[0, 0, 0].double().T
    with pytest.raises(AssertionError):
        assert_close(bad.float(), delta, BF16)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    a, b, x = a.to(device), b.to(device), x.to(device)
    start = torch.randn(M, N).to(dtype).to(device)
    for sorted_path in (True, False):
        out = start.clone()
        al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=E, max_loras=L,
                                       block_size=16, adapter_enabled=kw["adapter_enabled"]) if sorted_path else None
        fused_moe_lora(out, x, a, b, top_k_in=1, alignment=al, **kw)
        assert_close(out.double() - start.double(), delta.double().to(device), dtype, name="delta")


def test_config_must_be_typed(device):
    c = Case(4, 2, 4, 2, 16)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, _ = build(c, device)
    with pytest.raises(TypeError, match="MoELoRATileConfig"):
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in,
                       config={"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64}, **kw)
    with pytest.raises(ValueError, match="BLOCK_SIZE_N=48 must be a power of two"):
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=MoELoRATileConfig(16, 48, 64), **kw)
    empty = Case(0, 2, 4, 2, 16)  # no pair: nothing launches, the config is still checked
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, _ = build(empty, device)
    with pytest.raises(TypeError, match="MoELoRATileConfig"):
        moe_lora_shrink(x, lora_a, top_k_in=top_k_in, config={"BLOCK_SIZE_M": 16},
                        **{k: kw[k] for k in _SHRINK_KEYS})


def test_bad_arguments(device):
    c = Case(4, 2, 4, 2, 16)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, _ = build(c, device)
    with pytest.raises(ValueError, match="top_k_in"):
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=3, **kw)
    with pytest.raises(ValueError, match="x"):
        fused_moe_lora(out, x[:, :10], lora_a, lora_b, top_k_in=top_k_in, **kw)
    with pytest.raises(ValueError, match="columns"):
        fused_moe_lora(out[:, :50], x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    with pytest.raises(ValueError, match="slices"):
        fused_moe_lora(out, x, lora_a, lora_b[:1], top_k_in=top_k_in, **kw)
    with pytest.raises(ValueError, match="adapter_enabled"):
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, **{**kw, "adapter_enabled": kw["adapter_enabled"][:2]})
    with pytest.raises(ValueError, match="shrunk_fp32"):
        moe_lora_expand(out, torch.zeros(2, 8, 16, dtype=F16, device=device), lora_b, **kw)
    with pytest.raises(ValueError, match="alignment"):
        al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=4, max_loras=3,
                                       block_size=16, adapter_enabled=torch.ones(4, dtype=torch.int32, device=device))
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, **kw)


# ---------------------------------------------------------------- GPU, realistic shapes (Qwen3-30B-A3B-like)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("E,R", [(64, 16), (128, 64)])
@pytest.mark.parametrize("M", [1, 16, 64, 256, 2048])
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
def test_cuda_realistic(dtype, E, R, M, w2):
    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(E, R, M, dtype, w2)
    expected = out.float()
    fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    numel = kw["topk_ids"].numel()
    paths = ["sorted", "small"] if M <= 64 else ["sorted"]
    for path in paths:
        cfg = get_moe_lora_config("fused_moe_lora_w2" if w2 else "fused_moe_lora_w13", num_pairs=numel,
                                  num_experts=g["E"], max_loras=g["L"], rank=g["R"], K=g["K"], N=g["N"],
                                  num_slices=g["S"], dtype=dtype, use_tuned_config=True,
                                  device_name=torch.cuda.get_device_name())
        al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=g["E"],
                                       max_loras=g["L"], block_size=cfg.block_size_m,
                                       adapter_enabled=kw["adapter_enabled"]) if path == "sorted" else None
        got = out.clone()
        fused_moe_lora(got, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw)
        assert_close(got, expected, dtype, name=path)
        assert_close(got.float() - out.float(), expected - out.float(), dtype, name=f"{path} delta")
    if M == 1:  # the loop reference as well, at one size
        delta = moe_lora_reference(x, lora_a, lora_b, top_k_in=top_k_in, out_cols=out.shape[1], **kw)
        assert_close(expected - out.float(), delta.cuda(), F32, name="torch impl vs loop")


@pytest.mark.cuda
def test_cuda_graph_replay():
    """Align + fused op captured once in a CUDA graph, replayed with new routing and adapters."""
    check_graph_replay(64, None)
