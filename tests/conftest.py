"""Test-suite setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors: the
variable must be set before any ``@triton.jit`` decorator runs (otherwise Triton
fails with "0 active drivers"), so it is set here, before the package is
imported. Triton 3.6's interpreter also needs numpy < 2.4 (with 2.4 its
``range(tl.cdiv(...))`` loops fail: "only 0-dimensional arrays can be converted
to Python scalars"), which scripts/setup.sh installs on CPU machines.
"""
import os
import sys

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy

    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        raise pytest.UsageError(f"numpy {numpy.__version__} breaks Triton 3.6's CPU interpreter; "
                                "run scripts/setup.sh (it installs numpy<2.4 on CPU machines)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the current test runs its kernels on."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
