"""The dense decode GEMV (``ops/dense_gemv.py``): the Triton kernel (interpreter on CPU, native on CUDA) against
a float64 product written out here; a token's row the same bits whatever batch it runs in; ``linear``'s
dispatch and its errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_close
from vllm.model_executor.layers.ops import dense_gemv as mod
from vllm.model_executor.layers.ops.dense_gemv import DenseGemvConfig, dense_gemv, dense_gemv_config, linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(M: int, N: int, K: int, dtype: torch.dtype, device, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) + 0.25).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(N, generator=gen) * 0.5).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def _f64(x: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    y = x.double().reshape(-1, x.shape[-1]) @ w.double().T
    if b is not None:
        y = y + b.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("delayed", [False, True])  # True: dense_gemv_delayed_kernel (at most 4 tokens)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,bias,cfg", [
    (1, 48, 64, True, None),  # the heuristic's tiles
    (3, 40, 96, False, DenseGemvConfig(16, 32)),  # 3 of 4 rows, an N tail (40 = 2.5 tiles), 3 K-steps
    (8, 24, 80, True, DenseGemvConfig(8, 32)),  # every row of the widest launch, a K tail (80 = 2.5 steps)
    (5, 17, 130, True, DenseGemvConfig(4, 64)),  # odd N and K: masked columns and a 2-value last step
    (2, 64, 512, True, DenseGemvConfig(32, 128, 2)),
])
def test_gemv_matches_float64(M, N, K, bias, cfg, dtype, delayed, device):
    if delayed and M > mod.DELAYED_MAX_BLOCK_M:
        pytest.skip("the delayed kernel takes at most 4 tokens")
    x, w, b = _data(M, N, K, dtype, device, seed=M * 31 + N + K, bias=bias)
    cfg = dataclasses.replace(cfg or dense_gemv_config(N, K, dtype), delayed=delayed)
    y = dense_gemv(x, w, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, _f64(x, w, b), dtype, name="vs float64")


def test_gemv_strided_and_3d_input(device):
    """A strided view (rows of a wider buffer) and a [batch, seq, K] input give the contiguous input's result."""
    x, w, b = _data(4, 40, 64, torch.float16, device, seed=3)
    wide = torch.randn(4, 100, dtype=torch.float16, device=device)
    wide[:, 10:74] = x
    cfg = DenseGemvConfig(8, 32)
    want = dense_gemv(x, w, b, config=cfg)
    assert torch.equal(dense_gemv(wide[:, 10:74], w, b, config=cfg), want)
    assert torch.equal(dense_gemv(x.reshape(2, 2, 64), w, b, config=cfg).reshape(4, 40), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_batch(dtype, device):
    """Eager steps run the real batch and CUDA graphs a padded one: each token's row must be bit-identical
    whether it runs alone, in 3 rows (a 4-row launch) or in 8."""
    x, w, b = _data(8, 72, 160, dtype, device, seed=11)
    cfg = dense_gemv_config(72, 160, dtype)
    full = dense_gemv(x, w, b, config=cfg)
    for m in range(8):
        assert torch.equal(dense_gemv(x[m:m + 1], w, b, config=cfg), full[m:m + 1]), m
    assert torch.equal(dense_gemv(x[2:5], w, b, config=cfg), full[2:5])
    delayed = dataclasses.replace(cfg, delayed=True)
    four = dense_gemv(x[:4], w, b, config=delayed)
    for m in range(4):
        assert torch.equal(dense_gemv(x[m:m + 1], w, b, config=delayed), four[m:m + 1]), m
    assert torch.equal(dense_gemv(x[1:4], w, b, config=delayed), four[1:4])


def test_config_depends_on_the_shape_only(monkeypatch):
    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    assert dense_gemv_config(5120, 2048, torch.bfloat16) == DenseGemvConfig(4, 1024, 8)
    assert dense_gemv_config(128, 100, torch.float16) == DenseGemvConfig(4, 128, 8)  # K-steps no wider than K
    assert dense_gemv_config(4096, 4096, torch.float32) == DenseGemvConfig(4, 256, 8)


def test_linear_dispatch(monkeypatch, device):
    x, w, b = _data(2, 40, 64, torch.bfloat16, device, seed=5)
    assert mod.GEMV_MAX_TOKENS == 1  # the H200 A/B: faster than cuBLAS at one token, slower from two
    assert not mod.gemv_applies(x, w)  # 2 tokens
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert mod.gemv_applies(x[:1], w) == (device.type == "cuda")
    if device.type == "cuda":
        monkeypatch.setattr(mod, "GEMV_MAX_TOKENS", 4)
        assert mod.gemv_applies(x, w)
        assert torch.equal(linear(x, w, b), dense_gemv(x, w, b))
        assert not mod.gemv_applies(torch.cat([x, x, x]), w)  # 6 tokens > 4
        assert not mod.gemv_applies(x.float(), w.float())  # fp32 stays on cuBLAS
    else:
        monkeypatch.setattr(mod, "GEMV_MAX_TOKENS", 4)
        assert not mod.gemv_applies(x, w)  # CPU tensors: never (F.linear)
    assert mod.gemv_applies(x, w, max_tokens=2) == (device.type == "cuda" or mod.triton_interpreting())
    assert not mod.gemv_applies(x, w, max_tokens=1)


def test_errors(device):
    x, w, b = _data(2, 40, 64, torch.float16, device, seed=7)
    with pytest.raises(ValueError, match="does not fit input"):
        dense_gemv(x[:, :32], w)
    with pytest.raises(ValueError, match="one float dtype"):
        dense_gemv(x, w.float())
    with pytest.raises(ValueError, match="bias"):
        dense_gemv(x, w, b[:20])
    with pytest.raises(ValueError, match="at most 8 tokens"):
        dense_gemv(torch.cat([x] * 5), w)
    with pytest.raises(ValueError, match=r"\(delayed\) takes at most 4 tokens"):
        dense_gemv(torch.cat([x] * 3), w, config=DenseGemvConfig(4, 64, delayed=True))


def test_no_tokens(device):
    x, w, b = _data(1, 40, 64, torch.float16, device, seed=9)
    assert dense_gemv(x[:0], w, b).shape == (0, 40)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 4, 8])
@pytest.mark.parametrize("N,K,bias", [(5120, 2048, False), (2048, 4096, False), (128, 2048, False),
                                      (5120, 2880, True), (2880, 4096, True)])
def test_gemv_real_shapes_on_gpu(M, N, K, bias, device):
    """Qwen3-30B-A3B's q/k/v, o and router; gpt-oss-20b's biased q/k/v and o: bf16 at the heuristic's tiles."""
    x, w, b = _data(M, N, K, torch.bfloat16, device, seed=M + N + K, bias=bias)
    y = dense_gemv(x, w, b)
    assert_close(y, _f64(x, w, b), torch.bfloat16, name="vs float64")
    assert_close(y, F.linear(x, w, b), torch.bfloat16, name="vs F.linear")


def test_benchmark_smoke(tmp_path, device, monkeypatch):
    """benchmarks/kernels/benchmark_dense_gemv.py on the CPU interpreter: checked rows, sweep column, table."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    import sys

    import benchmarks.kernels.benchmark_dense_gemv as bench

    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_dense_gemv.py", "--smoke", "--sweep", "--tokens", "1", "3",
                                      "--out", str(out)])
    bench.main()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| smoke |")]
    assert [(r[1], r[3]) for r in rows] == [("qkv", "1"), ("qkv", "3"), ("router", "1"), ("router", "3")]
    assert all(float(r[10]) > 0 for r in rows)  # the other reduction kernel, checked and timed (<= 4 tokens)
    assert all("BLOCK_N" in r[11] for r in rows)


def test_gemvs_compile_for_hopper():
    """The interpreter never compiles: compile both GEMV kernels for sm_90 in a subprocess (no GPU needed)."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/dense_gemv_hopper_compile.py").count("ok ") == 24
