"""The Prometheus histogram used by /metrics."""
import pytest

pytest.importorskip("fastapi")

from vllm.entrypoints.openai.metrics import Histogram  # noqa: E402


def test_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    rows = dict(h.samples())
    assert rows['_bucket{le="0.1"}'] == 2 and rows['_bucket{le="1.0"}'] == 3 and rows['_bucket{le="+Inf"}'] == 4
    assert rows["_count"] == 4 and rows["_sum"] == pytest.approx(3.65)
