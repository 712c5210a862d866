"""vllm.platforms.host_copy: host lists become the tensors torch.tensor would make (values, dtype, shape)."""
import random

import pytest
import torch

from vllm.platforms.host_copy import host_tensor, to_device


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.bool])
@pytest.mark.parametrize("n", [0, 1, 7, 16384])
def test_same_tensor_as_torch_tensor(dtype, n):
    rng = random.Random(n)
    if dtype.is_floating_point:
        values = [rng.uniform(-1e4, 1e4) for _ in range(n)]
    elif dtype == torch.bool:
        values = [rng.random() < 0.5 for _ in range(n)]
    else:
        hi = 2**31 - 1 if dtype == torch.int32 else 2**62
        values = [rng.randint(-hi, hi) for _ in range(n)]
    want = torch.tensor(values, dtype=dtype)
    got = host_tensor(values, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    got = to_device(values, dtype, torch.device("cpu"))
    assert torch.equal(got, want)


def test_out_of_range_is_refused_like_torch():
    with pytest.raises((OverflowError, RuntimeError)):
        host_tensor([2**40], torch.int32)


def test_a_tensor_is_converted():
    t = torch.arange(5)
    assert host_tensor(t, torch.int32).dtype == torch.int32 and torch.equal(host_tensor(t, torch.int32), t.int())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_copy():
    values = list(range(-5, 16379))
    got = to_device(values, torch.int64, torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), torch.tensor(values))
