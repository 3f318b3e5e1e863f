"""The lines of places at the I/O limits (blockdev/places.py), on their own: a place
that grows moves the places still to start after it later, never those that started;
folding started places changes no place; a line stays bounded while a place that stays
long holds its head (hostile probe 8, F1, and the review of its first fix, A)."""

from __future__ import annotations

import random

import pytest

from blockdev import places as places_mod
from blockdev.places import Place, PlaceBook
from blockdev.types import PrincipalId

N = PrincipalId(1)
M = PrincipalId(2)


def book(iops: dict[PrincipalId, float]) -> PlaceBook:
    return PlaceBook(lambda nid, ios, nbytes: ios / iops[nid])


def take(b: PlaceBook, now: float, ios: float = 1.0, *, open_: bool = False,
         nodes: tuple[PrincipalId, ...] = (N,), floor: float | None = None) -> Place:
    p = Place(PrincipalId(9), 4096, ios)
    p.open = open_
    b.take(p, [(n, now if floor is None else floor) for n in nodes], now)
    p.gone = p.until <= now  # (as `limit_slot` does: its caller goes at once)
    return p


def test_a_grown_place_moves_the_places_after_it_and_not_the_started() -> None:
    b = book({N: 4.0})
    a = take(b, 0.0, open_=True)   # 0 .. 0.25
    c = take(b, 0.0)               # 0.25
    d = take(b, 0.0)               # 0.5
    b.grow(a, 31, 0)               # it made 32 requests: 0 .. 8
    b.refresh(c, 0.01)
    assert (c.until, d.until) == (8.0, 8.25)
    b.settle(a)
    c.gone = d.gone = True         # their writers went at 8 and 8.25
    e = take(b, 8.1, open_=True)   # after d: 8.5
    f = take(b, 8.1)               # 8.75
    e.gone = True                  # its writer went at 8.5
    b.grow(e, 2, 0)                # at 8.6
    b.refresh(f, 8.6)
    assert (c.until, d.until, f.until) == (8.0, 8.25, 9.25)
    # never before its floor (the limit tags when it was taken)
    g = take(b, 9.0, open_=True)             # 9.5
    h = take(b, 9.0, floor=20.0)
    i = take(b, 9.0)                         # after h: 20.25
    f.gone = g.gone = True
    b.grow(g, 7, 0)                          # 9.5 .. 11.5
    b.refresh(i, 9.6)
    assert (h.until, i.until) == (20.0, 20.25)


def test_a_growth_moves_the_places_still_to_start_by_all_of_it() -> None:
    """Review of F1's second fix, B: the line ended at the latest end of the places that
    had started, so a place that grew after those behind it started moved nothing while
    its growth was no longer than they were: at 1,000 IOPS 32 writers of 64 requests
    each all went at their first places."""
    b = book({N: 1.0})
    a = take(b, 0.0, open_=True)   # 0 .. 1
    second = take(b, 0.0)          # 1 .. 2
    second.gone = True             # at 1.5 both have gone
    b.grow(a, 8, 0)                # a 0 .. 9
    c = take(b, 1.5)
    assert c.until == 10.0         # (9.0 by the latest end)


def test_two_limited_nodes_a_place_goes_at_the_later_of_its_starts() -> None:
    b = book({N: 4.0, M: 1.0})
    p = take(b, 0.0, open_=True, nodes=(N, M))  # N: 0 .. 0.25, M: 0 .. 1
    q = take(b, 0.0, nodes=(N,))                # N 0.25
    r = take(b, 0.0, nodes=(N, M))              # N 0.5, M 1.0
    assert (q.until, r.until) == (0.25, 1.0)
    b.grow(p, 3, 0)                             # N: 0 .. 1, M: 0 .. 4
    b.refresh(q, 0.1)
    b.refresh(r, 0.1)
    assert (q.until, r.until) == (1.0, 4.0)
    b.drop_node(M, 0.2)                         # M's limit gone
    assert r.until == 1.25


@pytest.mark.parametrize("seed", range(6))
def test_folding_started_places_changes_no_place(seed: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two books given the same places, growths, settlements and limit changes, one
    folding its started places at every fourth place: every place still to start goes
    at the same time in both, each after every place before it on its line ends."""
    rnd = random.Random(seed)
    iops = {N: 4.0, M: 1.0}
    plain, small = book(iops), book(iops)
    monkeypatch.setattr(places_mod, "MAX_LINE", 4)
    pairs: list[tuple[Place, Place]] = []
    went: set[int] = set()   # the places that started on N
    now = 0.0
    peak = 0
    for step in range(400):
        now += rnd.expovariate(8.0)
        for x, _y in pairs:
            if N in x.starts and x.starts[N] <= now:
                went.add(id(x))
        op = rnd.random()
        if op < 0.5:
            nodes = (N, M) if rnd.random() < 0.2 else (N,)
            floor = now + rnd.random() if rnd.random() < 0.1 else None
            ios = float(rnd.randint(1, 3))
            open_ = rnd.random() < 0.5
            pairs.append((take(plain, now, ios, open_=open_, nodes=nodes, floor=floor),
                          take(small, now, ios, open_=open_, nodes=nodes, floor=floor)))
        elif op < 0.8:
            opened = [(x, y) for x, y in pairs if x.open and x.until <= now]
            if opened:
                x, y = rnd.choice(opened)
                more = rnd.randint(1, 8)
                plain.grow(x, more, 0)
                small.grow(y, more, 0)
        elif op < 0.95:
            for x, y in pairs:
                if x.open and x.until <= now and rnd.random() < 0.5:
                    plain.settle(x)
                    small.settle(y)
        else:
            f = rnd.choice([0.5, 2.0])
            iops[N] /= f
            plain.rescale(N, f, now)
            small.rescale(N, f, now)
        for x, y in pairs:
            plain.refresh(x, now)
            small.refresh(y, now)
            if x.until <= now:  # (its waiter goes)
                x.gone = y.gone = True
        for x, y in pairs:
            if x.until > now:
                assert y.until == pytest.approx(x.until, abs=1e-9), (seed, step)
        # a place still to start on N starts after every place before it ends there
        t = plain._base.get(N, -1e18)
        for x in plain._lines.get(N, ()):
            if places_mod._to_start(x, N, now):
                assert x.starts[N] >= t - 1e-9, (seed, step)
            t = max(t, x.starts[N]) + x.costs[N]
        # (compacted to at most twice the places kept, plus one; again once doubled)
        peak = max(peak, sum(1 for x, _y in pairs if x.until > now or x.open))
        assert len(small._lines.get(N, ())) <= 2 * max(4, 2 * peak + 1)
    assert len(went) > 5


@pytest.mark.parametrize("head", ["open", "far"])
def test_a_place_at_the_head_does_not_grow_the_line_without_bound(head: str) -> None:
    """Started places left a line only from its head. A place that stays long at the
    head — open (its write waiting for a lock), or waiting for a far-off place on
    another node (a child limited to 0.000001 IOPS: review of F1, A) — kept every place
    behind it, and a sibling with a high limit takes places by the thousand a second:
    the line grew without bound, and each growth walked all of it (the daemon at 100%
    CPU, another tenant's reads 0.3 -> 5 ms through a mount)."""
    b = book({N: 1e6, M: 1e-6})
    if head == "open":
        stuck = take(b, 0.0, open_=True)
    else:
        take(b, 0.0, nodes=(M,))   # a sibling's place on M: 0 .. 1e6
        stuck = take(b, 0.0, nodes=(N, M), open_=True)
        assert stuck.until == pytest.approx(1e6) and not stuck.gone
    now = 0.0
    for _ in range(20_000):
        now += 1e-4
        take(b, now)
    assert len(b._lines[N]) <= places_mod.MAX_LINE
    later = take(b, now)
    assert later.until == pytest.approx(now + 1e-6)
    b.grow(stuck, 1, 0)
    b.refresh(later, now)
    assert later.until == pytest.approx(now + 2e-6)   # moved by the growth


def test_a_growth_after_a_limit_change_adds_only_its_own_cost() -> None:
    """Review of F1's second fix, D: a growth re-priced the whole place at the limits in
    force, undoing what a change had kept of it (the rest at the new limit): 1 -> 0.1
    IOPS halfway through a 1 s place, then one request more, ended the line at 20 s
    instead of 15.5."""
    iops = {N: 1.0}
    b = book(iops)
    a = take(b, 0.0, open_=True)   # 0 .. 1
    iops[N] = 0.1
    b.rescale(N, 10.0, 0.5)        # the rest, 0.5 s, at a tenth: ends at 5.5
    b.grow(a, 1, 0)                # one request more at 0.1 IOPS: 10 s
    assert take(b, 0.5).until == pytest.approx(15.5)
