"""Places at the I/O limits for requests that go past them (`MClockScheduler.limit_slot`).

A write-through write makes its device requests under locks that other tenants wait
for (a file's inode lock, a merged block's), so those requests go past the writer's
I/O limits (`past_limits`), and the write takes its *place* at the limits before any
lock instead: each limited node on the writer's path keeps a line of places, each
place as long as the write's cost at the node's limits, the next one starting where
the last ends (and never before the node's limit tags, nor before it was taken). The
write waits for its place holding no lock; together the writes go at the limits.

A place's price is the device requests the write will make, and that is known only
under the lock: a large overwrite relocated into fresh blocks that do not continue
each other goes down as one request per run (up to one per block, hostile probe 8,
F1). So a write inside a `place_scope` is priced at the most it can make (`most_ios`)
and, when the scope ends, re-priced at the requests it made past the limits inside
it (never below what its caller priced it at). Each place after it in each line then
moves back by what it was over-priced: the waiting writers are woken and go at once
if their place is now. Priced at its least, a first wave of concurrent writers went
down at once, one over-priced request each (127 a second at a 4 IOPS limit); priced
at its most without the move back, every concurrent writer waited for the others'
most (a tenant writing contiguous blocks held at a fraction of its limit, R1).

The same lines re-count the rest of each wait when a limit changes on a live mount
(`rescale`, `drop_node`): a raised limit shortens the waits it held, in their order
(review of hostile probe 7's fixes, R3; review of d4a70cd, 1).

A place that has gone (its time passed) keeps its start: only the places still
waiting move. Gone places leave the head of a line once they are settled.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

import trio

from .types import PrincipalId

_INF = math.inf
#: a line this long has its gone places between those still waiting or open folded
#: (`_compact`): gone places leave a line from its head only, and a place ahead of them
#: may stay long — an open one until its write ends (its inode lock held by another, a
#: busy device), one bound by another node's limit until then — while a tenant with a
#: high limit takes places by the thousand a second, each gone at once
MAX_LINE = 256


class Place:
    """One request's place at the limits of the nodes on its principal's path: per
    limited node, where it starts in the node's line (`starts`), the earliest it may
    (`floors`: when it was taken, and the node's limit tags then), and its cost there
    (`costs`, seconds at the node's limits). It may go at `until`, the latest start."""

    __slots__ = ("principal", "nbytes", "ios", "least", "open", "starts", "floors",
                 "costs", "until", "woken")

    def __init__(self, principal: PrincipalId, nbytes: int, ios: float) -> None:
        self.principal = principal
        self.nbytes = nbytes
        #: the device requests it is priced at
        self.ios = ios
        #: the least it may be re-priced at (`open`)
        self.least = ios
        #: priced at its most and not yet re-priced (`PlaceBook.reprice`)
        self.open = False
        self.starts: dict[PrincipalId, float] = {}
        self.floors: dict[PrincipalId, float] = {}
        self.costs: dict[PrincipalId, float] = {}
        self.until = -_INF
        #: set when `until` moves earlier (`MClockScheduler.wait_place` sleeps on it)
        self.woken: trio.Event | None = None

    def _moved(self) -> None:
        until = max(self.starts.values(), default=-_INF)
        earlier = until < self.until
        self.until = until
        if earlier and self.woken is not None:
            self.woken.set()


class PlaceBook:
    """The lines of places of the limited nodes (see the module docstring). `cost(nid,
    ios, nbytes)`: seconds `ios` requests of `nbytes` in all take at node `nid`'s limits
    in force."""

    def __init__(self, cost: Callable[[PrincipalId, float, int], float]) -> None:
        self._cost = cost
        #: per node, the places not yet dropped, in order
        self._lines: dict[PrincipalId, deque[Place]] = {}
        #: per node, where the places dropped from the head of its line ended
        self._base: dict[PrincipalId, float] = {}
        #: per node, where its line ends: the next place starts there at the earliest
        self._end: dict[PrincipalId, float] = {}
        #: per node, the length at which its line is next compacted (`_compact`)
        self._compact_at: dict[PrincipalId, int] = {}

    def take(self, place: Place, floors: Iterable[tuple[PrincipalId, float]],
             now: float) -> None:
        """Give `place` its place at the end of each named node's line, no earlier than
        the node's floor (`now` and its limit tags)."""
        for nid, floor in floors:
            line = self._lines.get(nid)
            if line is None:
                line = self._lines[nid] = deque()
            else:
                self._prune(nid, line, now)
                if len(line) >= self._compact_at.get(nid, MAX_LINE):
                    line = self._compact(nid, line, now)
            start = max(self._end.get(nid, self._base.get(nid, -_INF)), floor)
            cost = self._cost(nid, place.ios, place.nbytes)
            place.floors[nid] = floor
            place.costs[nid] = cost
            place.starts[nid] = start
            self._end[nid] = start + cost
            line.append(place)
        place.until = max(place.starts.values(), default=-_INF)

    def reprice(self, place: Place, ios: float, now: float) -> None:
        """`place` made `ios` requests, fewer than it was priced at: its cost shrinks,
        and every place after it that still waits moves back by as much."""
        place.open = False
        if ios >= place.ios:
            return
        place.ios = ios
        for nid in list(place.costs):
            place.costs[nid] = self._cost(nid, ios, place.nbytes)
            self._recount(nid, now)

    def settle(self, place: Place) -> None:
        """`place` is not re-priced (its scope ended without it): it may be dropped."""
        place.open = False

    def withdraw(self, place: Place, now: float) -> None:
        """Take `place` out of every line (it is about to be given a new place): the
        places after it move back."""
        for nid in list(place.starts):
            line = self._lines.get(nid)
            if line is not None:
                try:
                    line.remove(place)
                except ValueError:
                    pass
                self._recount(nid, now)
        place.starts.clear()
        place.floors.clear()
        place.costs.clear()

    def rescale(self, nid: PrincipalId, factor: float, now: float) -> None:
        """Node `nid`'s limits changed, a place lasting `factor` times as long: the rest
        of its line is re-counted at the new limits (a time t after `now` becomes
        now + (t - now) * factor), in its order."""
        def at(t: float) -> float:
            return now + (t - now) * factor if t > now else t

        if nid in self._base:
            self._base[nid] = at(self._base[nid])
        for p in self._lines.get(nid, ()):
            if p.until > now:
                p.floors[nid] = at(p.floors[nid])
                p.costs[nid] = self._cost(nid, p.ios, p.nbytes)
            else:  # gone: the rest of its cost at the new limits
                s = p.starts[nid]
                p.costs[nid] = max(0.0, at(s + p.costs[nid]) - s)
        self._recount(nid, now)

    def drop_node(self, nid: PrincipalId, now: float) -> None:
        """Node `nid` has no limit any more: its line holds no one."""
        line = self._lines.pop(nid, None)
        self._base.pop(nid, None)
        self._end.pop(nid, None)
        self._compact_at.pop(nid, None)
        for p in line or ():
            p.starts.pop(nid, None)
            p.floors.pop(nid, None)
            p.costs.pop(nid, None)
            p._moved()

    def waiting(self, now: float) -> list[Place]:
        """The places not yet gone, each once, earliest first."""
        seen: dict[int, Place] = {}
        for line in self._lines.values():
            for p in line:
                if p.until > now:
                    seen[id(p)] = p
        return sorted(seen.values(), key=lambda p: p.until)

    def _prune(self, nid: PrincipalId, line: deque[Place], now: float) -> None:
        while line:
            p = line[0]
            if p.open or p.until > now:
                return
            line.popleft()
            s = p.starts.pop(nid)
            c = p.costs.pop(nid)
            p.floors.pop(nid, None)
            self._base[nid] = max(self._base.get(nid, -_INF), s + c)

    def _compact(self, nid: PrincipalId, line: deque[Place], now: float) -> deque[Place]:
        """Fold each run of gone, settled places of node `nid`'s line into one place
        that spans them (from the first start to the last end): a gone place keeps its
        start, and what it holds of the places after it is only where it ends, so the
        line means the same with the run folded. Its length is then at most twice the
        places still waiting or open, plus one. Amortised: the next compaction waits
        until the line has doubled."""
        out: deque[Place] = deque()
        first = last = -_INF
        folded = False
        for p in line:
            if p.until <= now and not p.open:
                s = p.starts.pop(nid)
                e = s + p.costs.pop(nid)
                p.floors.pop(nid, None)
                first, last = (s, e) if not folded else (min(first, s), max(last, e))
                folded = True
                continue
            if folded:
                out.append(_span(nid, first, last))
                folded = False
            out.append(p)
        if folded:
            out.append(_span(nid, first, last))
        self._lines[nid] = out
        self._compact_at[nid] = max(MAX_LINE, 2 * len(out))
        return out

    def _recount(self, nid: PrincipalId, now: float) -> None:
        line = self._lines.get(nid)
        t = self._base.get(nid, -_INF)
        if line:
            self._prune(nid, line, now)
            t = self._base.get(nid, -_INF)
            for p in line:
                s = p.starts[nid]
                if p.until > now:  # still waiting: its place follows the one before
                    s = max(t, p.floors[nid])
                    if s != p.starts[nid]:
                        p.starts[nid] = s
                        p._moved()
                t = max(t, s + p.costs[nid])
        if t == -_INF:
            self._end.pop(nid, None)
        else:
            self._end[nid] = t


def _span(nid: PrincipalId, first: float, last: float) -> Place:
    """A gone place standing for a run of them on node `nid`'s line (`_compact`)."""
    p = Place(PrincipalId(0), 0, 0.0)
    p.starts[nid] = p.floors[nid] = first
    p.costs[nid] = last - first
    return p  # (`until` -inf: gone)
