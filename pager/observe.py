"""What the pager tells about itself: the per-principal statistics snapshot
(`statistics()`, frozen records from pager/cache.py) and the trace of every access
(`start_trace`/`stop_trace`, format in pager/trace.py)."""

from __future__ import annotations

from typing import Collection

import trio

from blockdev import PrincipalId

from . import trace as tr
from .banks import Banks
from .cache import PagerStatistics, PrincipalCacheStats
from .frames import _Acct


class Observed(Banks):
    """Statistics and tracing."""

    # -- tracing ---------------------------------------------------------------------

    def start_trace(self, sink: tr.Sink) -> None:
        """Record every access to `sink` (a binary file or a callable taking record
        arrays) until `stop_trace`. See pager/trace.py."""
        self.stop_trace()
        self._tw = tr.TraceWriter(sink)

    def stop_trace(self) -> None:
        if self._tw is not None:
            self._tw.flush()
            self._tw = None

    def _trace_op(self, op: int, principal: int, block: int, count: int, file: int,
                  fblock: int) -> None:
        if self._tw is None:
            return
        prio, disc, seq = self._hints.get(file, (0, False, False)) if file else (0, False, False)
        flags = (tr.F_DISCARDABLE if disc else 0) | (tr.F_SEQUENTIAL if seq else 0)
        try:
            now = trio.current_time()
        except RuntimeError:
            now = 0.0
        self._tw.add(now, int(principal), count, file, fblock, int(block), op, flags, prio)

    # -- statistics ------------------------------------------------------------------

    def statistics(self, principals: Collection[int] | None = None) -> PagerStatistics:
        """The pager's counters; the rows per principal (`per_principal`, `resident`)
        of `principals` only, if given (a tenant's `stats` page shows a few)."""
        per: dict[PrincipalId, PrincipalCacheStats] = {}
        keys = set(self._acct) | set(self.banks)
        if principals is not None:
            keys &= set(principals)
        for p in sorted(keys):
            a = self._acct.get(p) or _Acct()
            per[PrincipalId(p)] = PrincipalCacheStats(
                a.resident, self._min.get(p, 0), self._max.get(p), a.hits, a.misses,
                a.evictions, a.discarded, a.dirty, a.wb_bytes, a.sent, a.answered,
                a.missed, a.prefetched)
        return PagerStatistics(
            self.nframes, len(self._where), self.hits, self.misses, self.bypassed,
            self.evictions,
            {PrincipalId(p): a.resident for p, a in sorted(self._acct.items())
             if a.resident and (principals is None or p in keys)},
            self.policy, self.writeback, sum(a.dirty for a in self._acct.values()),
            sum(a.wb_bytes for a in self._acct.values()),
            sum(a.discarded for a in self._acct.values()), per)
