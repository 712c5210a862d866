"""The dense LoRA as extra columns of the projection's GEMM (``vllm/lora/layers/dense_concat.py``, ``CONCAT_K``).

The concatenated shrink (``lora_concat_shrink``) against a float64 loop: out starts poisoned (NaN), every element
of ``out[:T]`` must be written - x's copy, each row's own slot's shrink, zeros in the other slots' columns - and
rows past T left alone; tokens without a slot (-1), a rank below the buffer's, a partial row block and K tile.
The layers: each wrapper kind with the switch on against the float64 reference of base + per-token delta, the
base weight still equal to the loaded one (now a view of the wide buffer), the base-only forward unchanged, and
slots set, replaced and cleared between forwards reaching the wide weight in place.
"""
from __future__ import annotations

import pytest
import torch

from tests.lora.test_dense_lora_layers import SLOTS, _make, full_reference, random_adapter, wrap
from tests.utils import assert_close
from vllm.lora.layers import dense_concat
from vllm.lora.ops.triton_ops import lora_concat
from vllm.lora.ops.triton_ops.lora_concat import concat_columns, lora_concat_shrink

BF16, F32 = torch.bfloat16, torch.float32


def _reference(x, a, mapping):
    """float64 [T, K + S*L*R]: x, then per (slice, slot) the shrink of the rows of that slot, zeros elsewhere."""
    T, K = x.shape
    S, L, R, _ = a.shape
    ref = torch.zeros(T, K + S * L * R, dtype=torch.float64)
    ref[:, :K] = x.double().cpu()
    for t in range(T):
        slot = int(mapping[t])
        if slot < 0:
            continue
        for s in range(S):
            col = K + (s * L + slot) * R
            ref[t, col:col + R] = a[s, slot].double().cpu() @ x[t].double().cpu()
    return ref


@pytest.mark.parametrize("T,K,S,L,R,dtype", [(37, 80, 3, 3, 8, F32), (20, 200, 1, 4, 16, BF16),
                                             (16, 64, 2, 2, 32, BF16)])
@pytest.mark.parametrize("path", ["kernel", "kernel, slots grouped by 2", "kernel, all slots in one", "torch"])
def test_concat_shrink_matches_reference(T, K, S, L, R, dtype, path, device, monkeypatch):
    group = {"kernel, slots grouped by 2": 2, "kernel, all slots in one": L}.get(path, 1)
    monkeypatch.setattr(lora_concat, "SLOT_GROUP", group)
    if path == "torch":
        if device.type == "cuda":
            pytest.skip("the torch path serves CPU tensors")
        monkeypatch.setattr(lora_concat, "triton_interpreting", lambda: False)
    elif device.type == "cuda" and dtype == F32:
        pytest.skip("fp32 dots run as tf32 on the GPU; the bf16 cases cover it")
    gen = torch.Generator().manual_seed(T + K)
    x = (torch.randn(T, K, generator=gen)).to(dtype).to(device)
    a = (torch.randn(S, L, R, K, generator=gen) / K ** 0.5).to(dtype)
    a[:, 1, R // 2:] = 0  # slot 1 holds a lower-rank adapter (zero-padded), as the layers' buffers do
    a = a.to(device)
    mapping = torch.tensor([(t % (L + 1)) - 1 for t in range(T)] + [0] * 5, dtype=torch.int32, device=device)
    assert {-1, L - 1} <= set(mapping[:T].tolist())
    out = torch.full((T + 3, K + concat_columns(a)), float("nan"), dtype=dtype, device=device)
    lora_concat_shrink(x, a, mapping, out)
    ref = _reference(x, a, mapping[:T])
    assert torch.equal(out[:T, :K], x), "x's copy must be exact"
    assert_close(out[:T].float().cpu(), ref.float(), dtype, name="wide input")
    own = torch.zeros_like(ref, dtype=torch.bool)
    for t in range(T):
        slot = int(mapping[t])
        for s in range(S):
            if slot >= 0:
                own[t, K + (s * L + slot) * R:K + (s * L + slot + 1) * R] = True
    assert (out[:T].cpu()[:, K:][~own[:, K:]] == 0).all(), "other slots' columns must be exact zeros"
    assert torch.isnan(out[T:]).all(), "rows past T must not be written"


def test_concat_shrink_refuses_mismatched_buffers(device):
    x = torch.randn(4, 32, device=device)
    a = torch.randn(1, 2, 4, 32, device=device)
    m = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="do not agree"):
        lora_concat_shrink(x, a, m, torch.empty(4, 32 + 4, device=device))
    with pytest.raises(ValueError, match="out is"):
        lora_concat_shrink(x, a, m, torch.empty(4, 40, dtype=torch.float16, device=device))


def _switch_on(monkeypatch):
    monkeypatch.setattr(dense_concat, "CONCAT_K", True)
    monkeypatch.setattr(dense_concat, "CONCAT_ON_CPU", True)
    monkeypatch.setattr(dense_concat, "CONCAT_MIN_TOKENS", 1)
    monkeypatch.setattr(dense_concat, "CONCAT_MAX_FRACTION", 100.0)  # the tiny layers' K is 24


@pytest.mark.parametrize("kind", ["qkv", "merged", "column", "row"])
def test_layer_concat_matches_reference(kind, device, monkeypatch):
    _switch_on(monkeypatch)
    calls = []
    real = dense_concat.forward
    monkeypatch.setattr(dense_concat, "forward", lambda layer, x: calls.append(1) or real(layer, x))
    gen = torch.Generator().manual_seed(3)
    base, W, bias, out_sizes = _make(kind, gen, 1, 0)
    dtype = F32 if device.type == "cpu" else BF16
    base = base.to(dtype)
    W, bias = W.to(dtype), None if bias is None else bias.to(dtype)
    layer, punica = wrap(base, kind="gpu" if device.type == "cuda" else "cpu", device=device)
    assert layer._concat_w is not None and layer._concat_w.shape[1] == W.shape[1] + concat_columns(layer._lora_a)
    assert layer._concat_rank == layer.kernel_rank == 8  # no adapter yet: the smallest kernel rank
    assert torch.equal(layer.base_layer.weight.cpu(), W), "the base weight must keep its values as a view"
    K = W.shape[1]
    x = torch.randn(len(SLOTS), K, generator=gen).to(dtype)
    punica.update_metadata(SLOTS)
    # no adapter yet: the base path, unchanged
    assert_close(layer(x.to(device)).float().cpu(), full_reference(x, W, bias, {}, SLOTS, out_sizes).float(), dtype)
    assert not calls
    adapters = {0: random_adapter(gen, K, out_sizes, 12), 1: random_adapter(gen, K, out_sizes, 16),
                2: random_adapter(gen, K, out_sizes, 8, skip=(1,) if len(out_sizes) > 1 else ())}
    adapters = {k: ([None if t is None else t.to(dtype) for t in a], [None if t is None else t.to(dtype) for t in b])
                for k, (a, b) in adapters.items()}
    for slot, (a, b) in adapters.items():
        layer.set_lora(slot, a, b)
    y = layer(x.to(device))
    assert calls, "the concatenated path must run"
    assert layer._concat_rank == 16  # ranks 12, 16 and 8: laid out at 16 columns a slot
    assert_close(y.float().cpu(), full_reference(x, W, bias, adapters, SLOTS, out_sizes).float(), dtype)
    # slot 1 replaced by a lower-rank adapter and slot 0 cleared: the wide weight follows in place
    wide_ptr = layer._concat_w.data_ptr()
    adapters[1] = tuple([t.to(dtype) for t in p] for p in random_adapter(gen, K, out_sizes, 4))
    layer.set_lora(1, *adapters[1])
    layer.reset_lora(0)
    del adapters[0]
    y = layer(x.to(device))
    assert layer._concat_w.data_ptr() == wide_ptr
    assert layer._concat_rank == 8  # ranks 4 and 8 left: laid out again at 8
    assert_close(y.float().cpu(), full_reference(x, W, bias, adapters, SLOTS, out_sizes).float(), dtype)


def test_layer_stays_plain_where_concat_does_not_apply(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    base, W, _, _ = _make("qkv", gen, 1, 0)
    layer, _ = wrap(base)  # switch off
    assert layer._concat_w is None and layer.base_layer.weight.is_contiguous()
    _switch_on(monkeypatch)
    for kind, tp in (("column", 2), ("replicated", 1)):  # two ranks; a router-like replicated linear
        base, W, _, _ = _make(kind, gen, tp, tp - 1)
        layer, _ = wrap(base)
        assert layer._concat_w is None and layer.base_layer.weight.is_contiguous(), kind
    monkeypatch.setattr(dense_concat, "CONCAT_MAX_FRACTION", 0.125)  # 3 slots x 8 columns > K / 8 at K 24
    base, W, _, _ = _make("column", gen, 1, 0)
    layer, _ = wrap(base)
    assert layer._concat_w is None


def test_layer_past_the_capacity_keeps_todays_path(device, monkeypatch):
    """A buffer of 8 columns a slot (K / 8 allows no more): adapters of rank <= 8 run concatenated, one of rank 16
    takes today's path until it leaves - both against the reference."""
    _switch_on(monkeypatch)
    monkeypatch.setattr(dense_concat, "CONCAT_MAX_FRACTION", 1.0)  # K 24 / 3 slots -> 8 columns a slot
    calls = []
    real = dense_concat.forward
    monkeypatch.setattr(dense_concat, "forward", lambda layer, x: calls.append(1) or real(layer, x))
    gen = torch.Generator().manual_seed(9)
    base, W, bias, out_sizes = _make("column", gen, 1, 0)
    layer, punica = wrap(base, kind="gpu" if device.type == "cuda" else "cpu", device=device)
    dtype = layer._lora_a.dtype
    assert layer._concat_cap == 8
    x = torch.randn(len(SLOTS), W.shape[1], generator=gen)
    punica.update_metadata(SLOTS)
    adapters = {0: random_adapter(gen, W.shape[1], out_sizes, 4), 1: random_adapter(gen, W.shape[1], out_sizes, 16)}
    for slot, (a, b) in adapters.items():
        layer.set_lora(slot, a, b)
    assert layer.kernel_rank == 16 and layer._concat_rank == 0
    y = layer(x.to(device, dtype))
    assert not calls
    assert_close(y.float().cpu(), full_reference(x, W, bias, adapters, SLOTS, out_sizes).float(), dtype)
    layer.reset_lora(1)
    del adapters[1]
    assert layer._concat_rank == 8
    y = layer(x.to(device, dtype))
    assert calls
    assert_close(y.float().cpu(), full_reference(x, W, bias, adapters, SLOTS, out_sizes).float(), dtype)


def test_concat_shrink_compiles_for_hopper_without_spills():
    """sm_90: the kernel for the Qwen3-30B-A3B q/k/v and o launches (4 slots, rank 16), with PDL: no spills, no
    global load or store before the wait (``lora_concat_hopper_compile.py``)."""
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("tests/lora/lora_concat_hopper_compile.py")
    assert out.count("ok ") == 4, out


def test_benchmark_smoke_checks_both_paths(device, monkeypatch, capsys):
    """benchmarks/kernels/benchmark_dense_concat.py --smoke --sweep: the shrink's configs against the torch path,
both LoRA paths against its fp32 reference."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    import sys

    import benchmarks.kernels.benchmark_dense_concat as bench

    monkeypatch.setattr(dense_concat, "CONCAT_MIN_TOKENS", dense_concat.CONCAT_MIN_TOKENS)  # restored after
    monkeypatch.setattr(sys, "argv", ["benchmark_dense_concat.py", "--smoke", "--sweep"])
    bench.main()
    out = capsys.readouterr().out
    assert out.count("both paths match the reference") == 4
    sweep = [line for line in out.splitlines() if line.startswith(("| qkv |", "| o |"))]
    assert len(sweep) == 8 and not any("wrong" in line for line in sweep), out  # 2 configs x 2 counts x 2
    assert "best overall: --set vllm.lora.ops.triton_ops.lora_concat.BLOCK_M=" in out  # the A/B's flags
