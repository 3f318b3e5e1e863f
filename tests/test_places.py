"""The lines of places at the I/O limits (blockdev/places.py), on their own: a place
re-priced moves the waiting places after it back and never earlier than the line's
capacity allows; folding gone places changes no place; a line stays bounded while an
open place holds its head (hostile probe 8, F1, and its review)."""

from __future__ import annotations

import random

import pytest

from blockdev import places as places_mod
from blockdev.places import Place, PlaceBook
from blockdev.types import PrincipalId

N = PrincipalId(1)
M = PrincipalId(2)
IOPS = {N: 4.0, M: 1.0}


def book() -> PlaceBook:
    return PlaceBook(lambda nid, ios, nbytes: ios / IOPS[nid])


def take(b: PlaceBook, now: float, ios: float, *, most: float | None = None,
         nodes: tuple[PrincipalId, ...] = (N,), floor: float | None = None) -> Place:
    p = Place(PrincipalId(9), 4096, ios)
    if most is not None:
        p.least, p.ios, p.open = ios, most, True
    b.take(p, [(n, now if floor is None else floor) for n in nodes], now)
    return p


def test_a_repriced_place_moves_the_waiting_ones_back_and_not_the_gone() -> None:
    b = book()
    a = take(b, 0.0, 1, most=32)   # 0 .. 8 s priced at its most
    c = take(b, 0.0, 1)            # 8 s
    d = take(b, 0.0, 1)            # 8.25 s
    assert (a.until, c.until, d.until) == (0.0, 8.0, 8.25)
    b.reprice(a, 2, 0.01)          # it made two requests: 0.5 s
    assert (c.until, d.until) == (0.5, 0.75)
    # a place gone keeps its start; a later re-price moves only the waiting
    e = take(b, 0.6, 1, most=8)    # after d: 1.0 .. 3.0
    f = take(b, 0.6, 1)            # 3.0
    b.reprice(e, 1, 1.1)           # at 1.1: c and d have gone
    assert (c.until, d.until, f.until) == (0.5, 0.75, 1.25)
    # never below its floor (the limit tags when it was taken)
    g = take(b, 1.2, 1, most=4, floor=1.2)   # 1.5 .. 2.5
    h = take(b, 1.2, 1, floor=5.0)
    b.reprice(g, 1, 1.6)
    assert h.until == 5.0


def test_two_limited_nodes_a_place_goes_at_the_later_of_its_starts() -> None:
    b = book()
    p = take(b, 0.0, 1, most=4, nodes=(N, M))   # N: 0 .. 1, M: 0 .. 4
    q = take(b, 0.0, 1, nodes=(N,))             # only N: 1.0
    r = take(b, 0.0, 1, nodes=(N, M))           # N 1.25, M 4.0
    assert (q.until, r.until) == (1.0, 4.0)
    b.reprice(p, 1, 0.1)
    assert q.until == 0.25 and r.until == 1.0   # M: 1.0, N: 0.5
    b.drop_node(M, 0.2)                          # M's limit gone
    assert r.until == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_folding_gone_places_changes_no_place(seed: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two books given the same places, re-prices and limit changes, one folding its
    gone places at every fourth place: every place still waiting goes at the same time
    in both; and no second of a line holds more than a second's worth of places (plus
    the longest one) at the limit in force when they went."""
    rnd = random.Random(seed)
    monkeypatch.setitem(IOPS, N, 4.0)
    plain, small = book(), book()
    monkeypatch.setattr(places_mod, "MAX_LINE", 4)
    pairs: list[tuple[Place, Place]] = []
    went: dict[int, list[float]] = {}   # a place gone: [its start on N, its cost, IOPS]
    now = 0.0
    for step in range(400):
        now += rnd.expovariate(8.0)
        for x, _y in pairs:
            if x.until <= now and id(x) not in went and N in x.starts:
                went[id(x)] = [x.starts[N], x.costs[N], IOPS[N]]
        op = rnd.random()
        if op < 0.55:
            ios = float(rnd.randint(1, 3))
            most = ios + rnd.randint(0, 8) if rnd.random() < 0.5 else None
            nodes = (N, M) if rnd.random() < 0.2 else (N,)
            floor = now + rnd.random() if rnd.random() < 0.1 else None
            pairs.append((take(plain, now, ios, most=most, nodes=nodes, floor=floor),
                          take(small, now, ios, most=most, nodes=nodes, floor=floor)))
        elif op < 0.9:
            opened = [(x, y) for x, y in pairs if x.open and x.until <= now]
            if opened:
                x, y = rnd.choice(opened)
                made = rnd.uniform(x.least, x.ios)
                plain.reprice(x, made, now)
                small.reprice(y, made, now)
                if id(x) in went and N in x.costs:
                    went[id(x)][1] = x.costs[N]
        else:
            f = rnd.choice([0.5, 2.0])
            IOPS[N] /= f
            plain.rescale(N, f, now)
            small.rescale(N, f, now)
        for x, y in pairs:
            if x.until > now:
                assert y.until == pytest.approx(x.until, abs=1e-9), (seed, step)
        kept = sum(1 for x, _y in pairs if x.until > now or x.open)
        assert len(small._lines.get(N, ())) <= max(4, 2 * (2 * kept + 1))
    # what went, in requests: at most a second's worth at the limit, plus one place
    rows = sorted(went.values())
    for i, (s, _c, _l) in enumerate(rows):
        held = sum(c for t, c, _l in rows[i:] if t < s + 1.0)
        assert held <= 1.0 + max(c for _t, c, _l in rows) + 1e-9, (seed, s)


def test_an_open_place_at_the_head_does_not_grow_the_line_without_bound() -> None:
    """Review of F1: gone places leave a line only from its head, and an open place
    stays there until its write ends; a high limit's places, gone at once, piled up
    behind it (a place a write: unbounded while the write waited for a lock)."""
    b = PlaceBook(lambda nid, ios, nbytes: ios / 1e6)
    stuck = take(b, 0.0, 1, most=32)
    now = 0.0
    for _ in range(20_000):
        now += 1e-4
        take(b, now, 1)
    assert len(b._lines[N]) <= places_mod.MAX_LINE
    later = take(b, now, 1)
    b.reprice(stuck, 1, now)
    assert later.until == pytest.approx(now)   # (nothing waits: the line's capacity)
