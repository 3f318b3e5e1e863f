"""Cooperative reclaim (`principal`, `hinted`): the pager's reclaim task keeps a
reserve of free frames and principals under their ceilings. Each principal over its
share is asked to release N frames by a deadline (`reclaim_grace` after the request)
if it has subscribers (`on_reclaim`), and reclaimed by policy at once otherwise.
When the principal has dropped the frames itself (dontneed), or a subscriber says it
is done (`answer_reclaim`), or at the deadline, the request is settled — answered or
missed — and what is still above the target is taken by policy. Meanwhile direct
reclaim (pager/replacement.py) prefers other principals but falls back to them
rather than wait, so a client that never answers never stalls anyone; and once a
principal has missed a request, direct reclaim no longer spares it while its next one
is pending, so never answering does not keep its frames either.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import trio

from blockdev import PrincipalId

from .cache import CLEAN, DIRTY
from .policy import NIL
from .replacement import Replacement
from .tickets import ReclaimSubscription, _Request

log = logging.getLogger(__name__)


class Reclaim(Replacement):
    """Reclaim requests, their tickets and deadlines, and the reclaim task."""

    def _init_reclaim(self, *, reclaim_grace: float) -> None:
        self.reclaim_grace = reclaim_grace

    def on_reclaim(self, principal: PrincipalId,
                   callback: Callable[[int, float], object]) -> ReclaimSubscription:
        """Subscribe to reclaim requests for `principal`: `callback(nframes, deadline)`
        means "release nframes by deadline" (trio clock; `pending_reclaim` names the
        request's ticket). The callback must not block: it runs in the pager's
        reclaim task. Every subscriber of the principal gets the same request, one at
        a time per principal.

        Answer by dropping frames of the principal (advise dontneed); the request is
        settled as soon as the principal dropped `nframes` itself, or a subscriber
        calls `answer_reclaim`, or at the deadline, whichever comes first. Then what
        is still above the target is taken by policy at once. It counts as
        `reclaim_answered` if the principal answered (answer_reclaim, or dropped
        nframes itself) before the deadline, else as `reclaim_missed` — frames that
        others' direct reclaim took meanwhile do not make a silent client count as
        answering."""
        sub = ReclaimSubscription(self, principal, callback)
        self._subs.setdefault(int(principal), []).append(sub)
        return sub

    def pending_reclaim(self, principal: PrincipalId) -> tuple[int, int, float] | None:
        """The reclaim request pending for `principal`: (ticket, nframes, deadline), or
        None."""
        r = self._requests.get(int(principal))
        return None if r is None else (r.ticket, r.nframes, r.deadline)

    def answer_reclaim(self, principal: PrincipalId, released: int = 0, *,
                       ticket: int | None = None) -> bool:
        """A subscriber says it is done releasing: the request is settled now rather
        than at the deadline (the pager measures what was really released and takes
        the rest by policy; `released`, the client's own count, is only logged).
        With `ticket`, only the request of that ticket is answered (a late answer to
        an older request answers nothing). Returns whether a request was answered."""
        r = self._requests.get(int(principal))
        if r is None or (ticket is not None and ticket != r.ticket):
            return False
        log.debug("principal %d answered reclaim request %d (%d frames asked, says %d "
                  "released, %d dropped)", int(principal), r.ticket, r.nframes, released,
                  r.released)
        r.answered = True
        self._poke()
        return True

    def _released(self, p: int, n: int) -> None:
        """p let n of its frames go by itself (dontneed): counted towards a pending
        reclaim request."""
        r = self._requests.get(p)
        if r is not None:
            r.released += n

    def _shares(self) -> dict[int, int]:
        """How many frames each principal should give back now."""
        need: dict[int, int] = {}
        for p, a in self._acct.items():
            m = self._max.get(p)
            if m is not None and a.resident > m:
                need[p] = a.resident - m
        short = self.high_watermark - len(self._free) - sum(need.values())
        if len(self._free) < self.low_watermark and short > 0:
            # From those above an equal share of the pool first (and above their
            # guarantee), in proportion to how far: a principal holding less than its
            # share keeps it while another streams through the pool (hostile probe 3,
            # F3: a 6 MiB working set beside a 200 MiB scan fell to ~34% hits when
            # every principal above its guarantee gave in proportion to its size).
            # Only when nobody is above an equal share, from all above their guarantee.
            holders = sum(1 for a in self._acct.values() if a.resident)
            fair = self.nframes // max(1, holders)
            above = {}
            for share in (fair, 0):
                above = {p: a.resident - max(self._min.get(p, 0), share) - need.get(p, 0)
                         for p, a in self._acct.items()}
                above = {p: v for p, v in above.items() if v > 0}
                if above:
                    break
            total = sum(above.values())
            if total:
                for p, v in above.items():
                    n = min(v, math.ceil(short * v / total))
                    if n:
                        need[p] = need.get(p, 0) + n
        return need

    async def _reclaim_from(self, p: int, n: int, *, floor: int) -> int:
        """Take up to n frames from p by policy, not below `floor` frames."""
        a = self._acct_of(p)
        start = a.resident
        # Counted in frames given up, not victims: a dirty discardable victim takes
        # its whole file with it (dropping one file per frame asked for would empty
        # every discardable file of the principal for a reserve of a few frames).
        while start - a.resident < n and a.resident > floor:
            v = self._victim_of(p)
            if v == NIL:
                break
            if self._state_m[v] == DIRTY and not self._droppable(v):
                g = int(self._gen_m[v])
                await self._writeback_frames(self._cluster(v))
                if self._gen_m[v] != g or self._state_m[v] != CLEAN or self._pin_m[v]:
                    continue
            self._evict(v)
        return start - a.resident

    async def _balance(self) -> None:
        now = trio.current_time()
        for p, n in self._shares().items():
            if p in self._requests:
                continue
            subs = self._subs.get(p)
            a = self._acct_of(p)
            if subs:
                self._tickets += 1
                r = self._requests[p] = _Request(self._tickets, n, a.resident - n,
                                                 now + self.reclaim_grace)
                a.sent += 1
                for s in list(subs):
                    try:
                        s.callback(n, r.deadline)
                    except Exception:
                        log.exception("reclaim callback of principal %d failed", p)
            else:
                await self._reclaim_from(p, n, floor=self._min.get(p, 0))

    async def _enforce(self) -> None:
        now = trio.current_time()
        for p, r in list(self._requests.items()):
            replied = r.answered or r.released >= r.nframes
            if not replied and r.deadline > now:
                continue
            del self._requests[p]
            a = self._acct_of(p)
            if replied:
                a.answered += 1
            else:
                a.missed += 1
            a.last_missed = not replied
            if a.resident <= r.target:
                continue
            floor = max(r.target, min(self._min.get(p, 0), a.resident))
            m = self._max.get(p)
            if m is not None and a.resident > m:
                floor = min(floor, max(r.target, m))
            await self._reclaim_from(p, a.resident - r.target, floor=floor)

    async def _reclaim_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            await self._enforce()
            await self._balance()
            deadline = min((r.deadline for r in self._requests.values()), default=math.inf)
            if any(r.answered or r.released >= r.nframes for r in self._requests.values()):
                continue
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
