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
    return p


def test_a_grown_place_moves_the_places_after_it_and_not_the_started() -> None:
    b = book({N: 4.0})
    a = take(b, 0.0, open_=True)   # 0 .. 0.25
    c = take(b, 0.0)               # 0.25
    d = take(b, 0.0)               # 0.5
    b.reprice(a, 32, 0.01)         # it made 32 requests: 0 .. 8
    assert (c.until, d.until) == (8.0, 8.25)
    b.settle(a)
    e = take(b, 8.1, open_=True)   # after d: 8.5
    f = take(b, 8.1)               # 8.75
    b.reprice(e, 3, 8.6)           # at 8.6 c and d have started, f not
    assert (c.until, d.until, f.until) == (8.0, 8.25, 9.25)
    # never before its floor (the limit tags when it was taken), and a smaller price
    # moves the places after it back
    g = take(b, 9.0, open_=True, floor=9.3)  # 9.3
    h = take(b, 9.0, floor=20.0)
    i = take(b, 9.0)                         # after h: 20.25
    b.reprice(g, 8, 9.4)
    assert (h.until, i.until) == (20.0, 20.25)
    b.reprice(g, 1, 9.4)
    assert i.until == 20.25


def test_two_limited_nodes_a_place_goes_at_the_later_of_its_starts() -> None:
    b = book({N: 4.0, M: 1.0})
    p = take(b, 0.0, open_=True, nodes=(N, M))  # N: 0 .. 0.25, M: 0 .. 1
    q = take(b, 0.0, nodes=(N,))                # N 0.25
    r = take(b, 0.0, nodes=(N, M))              # N 0.5, M 1.0
    assert (q.until, r.until) == (0.25, 1.0)
    b.reprice(p, 4, 0.1)                        # N: 0 .. 1, M: 0 .. 4
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
                more = x.ios + rnd.randint(1, 8)
                plain.reprice(x, more, now)
                small.reprice(y, more, now)
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
            if x.until > now:
                assert y.until == pytest.approx(x.until, abs=1e-9), (seed, step)
        # a place still to start on N starts after every place before it ends there
        t = plain._base.get(N, -1e18)
        for x in plain._lines.get(N, ()):
            if places_mod._to_start(x, N, now):
                assert x.starts[N] >= t - 1e-9, (seed, step)
            t = max(t, x.starts[N] + x.costs[N])
        # (compacted to at most twice the places kept, plus one; again once doubled)
        peak = max(peak, sum(1 for x, _y in pairs if x.until > now or x.open))
        assert len(small._lines.get(N, ())) <= 2 * max(4, 2 * peak + 1)
    assert len(went) > 50


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
        stuck = take(b, 0.0, nodes=(N, M))
        take(b, 0.0, nodes=(M,))   # (its sibling on M: far off too)
        assert stuck.until == 0.0 and b._lines[M][-1].until == pytest.approx(1e6)
    now = 0.0
    for _ in range(20_000):
        now += 1e-4
        take(b, now)
    assert len(b._lines[N]) <= places_mod.MAX_LINE
    later = take(b, now)
    b.reprice(stuck, 2, now)
    assert later.until == pytest.approx(now)   # nothing after it was still to start
