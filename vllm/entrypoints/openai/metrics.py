"""A Prometheus histogram, rendered in the text exposition format."""
from __future__ import annotations

import bisect

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[tuple[str, float]]:
        """(suffix+labels, value) rows: cumulative buckets, then _sum and _count."""
        rows, running = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            rows.append((f'_bucket{{le="{le}"}}', running))
        return rows + [("_sum", self.sum), ("_count", self.count)]
