"""Gateway latency and request counts by model and status, for /metrics.

Kept by hand rather than with prometheus_client's Histogram: one observation is a dict
lookup, a bisect and three additions (no locks, no label validation), which matters on a
path whose whole budget is well under a millisecond. Exported at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds; from sub-millisecond (the gateway itself) to long streams.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Series:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.count = 0
        self.total = 0.0


class GatewayStats:
    def __init__(self) -> None:
        self.series: dict[tuple[str, int], _Series] = {}

    def observe(self, model: str, status: int, seconds: float) -> None:
        """`model` must be a model that exists (or ""): request bodies must not create label values."""
        series = self.series.get((model, status))
        if series is None:
            series = self.series[(model, status)] = _Series()
        series.buckets[bisect_left(BUCKETS, seconds)] += 1
        series.count += 1
        series.total += seconds

    def forget(self, model: str) -> None:
        """A deleted model's series go (its name may come back as another model)."""
        for key in [k for k in self.series if k[0] == model]:
            del self.series[key]

    def snapshot(self) -> list[tuple[str, int, list[tuple[str, int]], int, float]]:
        """(model, status, cumulative [(le, count)], count, sum) per series."""
        out = []
        for (model, status), series in sorted(self.series.items()):
            cumulative, running = [], 0
            for bound, n in zip((*(str(b) for b in BUCKETS), "+Inf"), series.buckets):
                running += n
                cumulative.append((bound, running))
            out.append((model, status, cumulative, series.count, series.total))
        return out
