"""Request scheduling in front of the timing model, and per-principal accounting.

A scheduler decides the order in which principals' requests get one of the device's
`queue_depth` service slots. `FifoScheduler` is the baseline: one global order, as a
kernel without QoS would give. The mClock scheduler of the QoS work plugs in here
with the same `slot()` interface.

Invariant: at most `queue_depth` requests hold a slot at any time; slots are handed
out in arrival order (trio's Semaphore is FIFO-fair).
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from typing import AsyncIterator

import numpy as np
import trio

from .types import BankTree, PrincipalId

#: latency histogram buckets: bucket i holds latencies in [2**(i-1), 2**i) microseconds
N_BUCKETS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalIOStats:
    principal: PrincipalId
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    #: latency percentiles in seconds (queue + service), from the histogram
    p50_s: float
    p99_s: float
    max_s: float


class _Counters:
    __slots__ = ("reads", "writes", "bytes_read", "bytes_written", "hist", "max_s")

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.hist = np.zeros(N_BUCKETS, dtype=np.int64)
        self.max_s = 0.0

    def percentile(self, q: float) -> float:
        total = int(self.hist.sum())
        if not total:
            return 0.0
        idx = int(np.searchsorted(np.cumsum(self.hist), q * total))
        return (2.0 ** idx) * 1e-6  # upper edge of the bucket


class FifoScheduler:
    """Serves requests in one global arrival order, `queue_depth` at a time."""

    name = "fifo"

    def __init__(self, queue_depth: int) -> None:
        self._slots = trio.Semaphore(queue_depth)
        self._counters: dict[PrincipalId, _Counters] = {}
        #: every principal's I/O bank (FIFO ignores them: it is the baseline)
        self.banks: BankTree = {}

    def configure_banks(self, tree: BankTree) -> None:
        self.banks = tree

    @asynccontextmanager
    async def slot(self, principal: PrincipalId, nbytes: int, *, write: bool) -> AsyncIterator[None]:
        async with self._slots:
            yield

    def record(self, principal: PrincipalId, nbytes: int, *, write: bool, latency_s: float) -> None:
        c = self._counters.get(principal)
        if c is None:
            c = self._counters[principal] = _Counters()
        if write:
            c.writes += 1
            c.bytes_written += nbytes
        else:
            c.reads += 1
            c.bytes_read += nbytes
        us = latency_s * 1e6
        bucket = min(N_BUCKETS - 1, max(0, int(us).bit_length()))
        c.hist[bucket] += 1
        if latency_s > c.max_s:
            c.max_s = latency_s

    def statistics(self) -> list[PrincipalIOStats]:
        return [PrincipalIOStats(p, c.reads, c.writes, c.bytes_read, c.bytes_written,
                                 c.percentile(0.5), c.percentile(0.99), c.max_s)
                for p, c in sorted(self._counters.items())]
