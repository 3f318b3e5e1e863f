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
F1), a partial block's merge may need a read. So a place taken inside a
`place_scope` is priced at the least its write makes, and grows by each request the
task makes past its limits inside the scope beyond that, as it makes it: each place
after it that still waits moves later by as much. Priced at its least with nothing
more, a first wave of concurrent writers went down at once, one under-priced write
each (127 requests a second at a 4 IOPS limit). Priced at its most and re-priced when
the write ended, each concurrent writer waited for the one before it to end (its
lock, its device requests): a tenant writing contiguous blocks was held to one write
per device latency whatever its limit (the review of that fix, D).

The same lines re-count the rest of each wait when a limit changes on a live mount
(`rescale`, `drop_node`): a raised limit shortens the waits it held, in their order
(review of hostile probe 7's fixes, R3; review of d4a70cd, 1).

A place keeps its starts once its request has gone (its waiter went on, or gave up):
until then it moves with its line. A line ends after a place that went at max(the end
before it, its start) + its cost, so a place that grows after the places behind it
went still moves the places still to start by all of its growth (second review, B).
A growth is counted when its line is next looked at (a place taken, a waiter before it
goes), not at every request. Places that went leave a line once their scope has ended
(settled): from its head, or folded into one place when the line is long.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

import trio

from .types import PrincipalId

_INF = math.inf
#: a line this long has its settled places that went, between those still to start or
#: open, folded (`_compact`): they leave a line from its head only, and a place ahead
#: of them may stay long — an open one until its write ends (its inode lock held by
#: another, a busy device), one waiting for a far-off place on another node — while a
#: tenant with a high limit takes places by the thousand a second, each gone at once
#: (review of F1, A)
MAX_LINE = 256


class Place:
    """One request's place at the limits of the nodes on its principal's path: per
    limited node, where it starts in the node's line (`starts`), the earliest it may
    (`floors`: when it was taken, and the node's limit tags then), and its cost there
    (`costs`, seconds at the node's limits). It may go at `until`, the latest start."""

    __slots__ = ("principal", "nbytes", "ios", "open", "gone", "seq", "starts",
                 "floors", "costs", "until", "woken")

    def __init__(self, principal: PrincipalId, nbytes: int, ios: float) -> None:
        self.principal = principal
        self.nbytes = nbytes
        #: the device requests it is priced at
        self.ios = ios
        #: its scope has not ended: it may still grow (`PlaceBook.grow`)
        self.open = False
        #: its request went (or its waiter gave up): its starts stay where they are
        self.gone = False
        #: the order it was taken in
        self.seq = 0
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
        self._seq = 0
        #: nodes whose lines have a place that grew since they were last re-counted
        #: (`grow`: re-counted when next looked at, not at every request)
        self._dirty: set[PrincipalId] = set()

    def take(self, place: Place, floors: Iterable[tuple[PrincipalId, float]],
             now: float) -> None:
        """Give `place` its place at the end of each named node's line, no earlier than
        the node's floor (`now` and its limit tags)."""
        self._seq += 1
        place.seq = self._seq
        for nid, floor in floors:
            line = self._lines.get(nid)
            if line is None:
                line = self._lines[nid] = deque()
            else:
                if nid in self._dirty:
                    self._recount(nid, now)
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

    def grow(self, place: Place, ios: float, nbytes: int) -> None:
        """`place` makes `ios` more requests, of `nbytes` more bytes: its cost on each
        node grows by theirs there (the rest of it as priced: a limit changed since it
        was taken prices only what comes after the change), and every place after it
        that is still to start moves later by as much — counted when its line is next
        looked at (`refresh`, `take`): a growth comes with every request a write makes
        beyond its price, and a line may be long."""
        place.ios += ios
        place.nbytes += nbytes
        for nid in place.costs:
            place.costs[nid] += self._cost(nid, ios, nbytes)
            self._dirty.add(nid)

    def shrink(self, place: Place, ios: float, now: float) -> None:
        """Undo a growth of `ios` requests (`grow`): the places after it still to start
        move back at once, and their waiters are woken."""
        place.ios -= ios
        for nid in list(place.costs):
            place.costs[nid] = max(0.0, place.costs[nid] - self._cost(nid, ios, 0))
            self._recount(nid, now)

    def refresh(self, place: Place, now: float) -> None:
        """Bring `place`'s starts up to date with the growths before it (its waiter
        looks before it goes)."""
        if self._dirty:
            for nid in list(place.starts):
                if nid in self._dirty:
                    self._recount(nid, now)

    def settle(self, place: Place) -> None:
        """`place`'s scope has ended: it grows no more, and may leave its lines."""
        place.open = False

    def withdraw(self, places: list[Place], now: float) -> None:
        """Take `places` out of every line (they are about to be given new places): the
        places after them move back. Each line is rebuilt once."""
        out = {id(p) for p in places}
        nids: set[PrincipalId] = set()
        for p in places:
            nids.update(p.starts)
        for nid in nids:
            line = self._lines.get(nid)
            if line is not None:
                self._lines[nid] = deque(p for p in line if id(p) not in out)
                self._recount(nid, now)
        for p in places:
            p.starts.clear()
            p.floors.clear()
            p.costs.clear()

    def rescale(self, nid: PrincipalId, factor: float, now: float) -> None:
        """Node `nid`'s limits changed, a place lasting `factor` times as long: the rest
        of its line is re-counted at the new limits (a time t after `now` becomes
        now + (t - now) * factor), in its order."""
        def at(t: float) -> float:
            return now + (t - now) * factor if t > now else t

        if nid in self._dirty:
            self._recount(nid, now)
        if nid in self._base:
            self._base[nid] = at(self._base[nid])
        for p in self._lines.get(nid, ()):
            if _to_start(p, nid, now):
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
        self._dirty.discard(nid)
        for p in line or ():
            p.starts.pop(nid, None)
            p.floors.pop(nid, None)
            p.costs.pop(nid, None)
            p._moved()

    def _prune(self, nid: PrincipalId, line: deque[Place], now: float) -> None:
        while line:
            p = line[0]
            if p.open or _to_start(p, nid, now):
                return
            line.popleft()
            s = p.starts.pop(nid)
            c = p.costs.pop(nid)
            p.floors.pop(nid, None)
            self._base[nid] = max(self._base.get(nid, -_INF), s) + c

    def _compact(self, nid: PrincipalId, line: deque[Place], now: float) -> deque[Place]:
        """Fold each run of settled places of node `nid`'s line that have gone into one
        place that stands for them: such a place keeps its start, and what it
        holds of the places after it is only where the line ends after it — the line
        ends at max(t, start) + cost after a place, and two in a row end it at
        max(t, s1, s2 - c1) + c1 + c2: one place of start max(s1, s2 - c1) and cost
        c1 + c2 — so the line means the same with the run folded. Its length is then at
        most twice the places still to start or open, plus one. Amortised: the next
        compaction waits until the line has doubled."""
        out: deque[Place] = deque()
        first = cost = 0.0
        folded = False
        for p in line:
            if not p.open and not _to_start(p, nid, now):
                s = p.starts.pop(nid)
                c = p.costs.pop(nid)
                p.floors.pop(nid, None)
                first, cost = (s, c) if not folded else (max(first, s - cost), cost + c)
                folded = True
                continue
            if folded:
                out.append(_span(nid, first, cost))
                folded = False
            out.append(p)
        if folded:
            out.append(_span(nid, first, cost))
        self._lines[nid] = out
        self._compact_at[nid] = max(MAX_LINE, 2 * len(out))
        return out

    def _recount(self, nid: PrincipalId, now: float) -> None:
        """Each place still to start on node `nid`'s line starts where the places before
        it end, or at its floor; a place that has gone keeps its start, and the line
        ends after it at max(end before it, its start) + its cost: so a place that grew
        after those behind it started moves the places still to start by all of its
        growth (by the max of the ends, a growth no longer than the started places
        behind it moved nothing: review of F1's second fix, B)."""
        self._dirty.discard(nid)
        line = self._lines.get(nid)
        t = self._base.get(nid, -_INF)
        if line:
            self._prune(nid, line, now)
            t = self._base.get(nid, -_INF)
            for p in line:
                s = p.starts[nid]
                if _to_start(p, nid, now):  # its place follows the one before
                    s = max(t, p.floors[nid])
                    if s != p.starts[nid]:
                        p.starts[nid] = s
                        p._moved()
                t = max(t, s) + p.costs[nid]
        if t == -_INF:
            self._end.pop(nid, None)
        else:
            self._end[nid] = t


def _to_start(p: Place, nid: PrincipalId, now: float) -> bool:
    """Whether `p` is still to start on node `nid`'s line: its request has not gone
    (its waiter has not gone on: a growth counted late still moves it; a place bound
    by another node's limit, far off, stays in the line, folded around when it is
    long)."""
    return not p.gone


def _span(nid: PrincipalId, start: float, cost: float) -> Place:
    """A place that went, standing for a run of them on node `nid`'s line (`_compact`)."""
    p = Place(PrincipalId(0), 0, 0.0)
    p.gone = True
    p.starts[nid] = p.floors[nid] = start
    p.costs[nid] = cost
    return p  # (`until` -inf: gone)
