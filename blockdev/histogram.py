"""A log-linear latency histogram (the HdrHistogram layout) in one numpy array.

Values are recorded in nanoseconds. Below 2**SUB_BITS ns every nanosecond has its own
bucket; above, each power of two is split into 2**(SUB_BITS-1) equal buckets, so a
bucket is never wider than 1/128 of the values it holds. A percentile is reported as
the middle of its bucket (clamped to the largest value recorded), which is within
0.4% of the exact order statistic — where a power-of-two histogram reporting the
upper edge is off by up to 100% (a 1.1 ms p99 shown as 2.05 ms).

Recording is one `bit_length`, a shift and one array increment: cheap enough for the
scheduler's hot path. Range: 0 .. 2**MAX_SHIFT+SUB_BITS ns (about 9.8 hours); larger
values land in the last bucket (and `max` keeps the exact one).
"""

from __future__ import annotations

import numpy as np

SUB_BITS = 8
_HALF = 1 << (SUB_BITS - 1)
_FULL = 1 << SUB_BITS
MAX_SHIFT = 37
N_BUCKETS = _HALF * MAX_SHIFT + _FULL


def bucket_of(ns: int) -> int:
    """The bucket index holding `ns` nanoseconds."""
    if ns < _FULL:
        return ns if ns > 0 else 0
    shift = ns.bit_length() - SUB_BITS
    if shift > MAX_SHIFT:
        return N_BUCKETS - 1
    return _HALF * shift + (ns >> shift)


def _bucket_bounds() -> tuple[np.ndarray, np.ndarray]:
    lo = np.zeros(N_BUCKETS, dtype=np.float64)
    width = np.ones(N_BUCKETS, dtype=np.float64)
    lo[:_FULL] = np.arange(_FULL)
    for shift in range(1, MAX_SHIFT + 1):
        idx = np.arange(_HALF * shift + _HALF, _HALF * shift + _FULL)
        lo[idx] = (idx - _HALF * shift) << shift
        width[idx] = 1 << shift
    return lo, width


_LO, _WIDTH = _bucket_bounds()
#: the value reported for each bucket: its middle (ns)
_MID = _LO + (_WIDTH - 1) / 2


class LatencyHistogram:
    """Counts of latencies; `record(seconds)`, `percentile(q)` in seconds."""

    __slots__ = ("counts", "total", "max_ns", "sum_ns", "max_s")

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.total = 0
        self.max_ns = 0
        self.sum_ns = 0
        #: the largest value recorded, exactly (seconds)
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        ns = int(seconds * 1e9)
        if ns < 0:
            ns = 0
        self.counts[bucket_of(ns)] += 1
        self.total += 1
        self.sum_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        if seconds > self.max_s:
            self.max_s = seconds

    def percentile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1) in seconds; 0.0 when empty."""
        if not self.total:
            return 0.0
        rank = max(1, int(np.ceil(q * self.total)))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min(float(_MID[idx]), float(self.max_ns)) * 1e-9

    def percentiles(self, qs: tuple[float, ...]) -> list[float]:
        if not self.total:
            return [0.0] * len(qs)
        cum = np.cumsum(self.counts)
        out = []
        for q in qs:
            rank = max(1, int(np.ceil(q * self.total)))
            idx = int(np.searchsorted(cum, rank))
            out.append(min(float(_MID[idx]), float(self.max_ns)) * 1e-9)
        return out

    @property
    def mean_s(self) -> float:
        return self.sum_ns / self.total * 1e-9 if self.total else 0.0

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.total += other.total
        self.sum_ns += other.sum_ns
        self.max_ns = max(self.max_ns, other.max_ns)
        self.max_s = max(self.max_s, other.max_s)
