"""`kernelshim.ranges.RangeList`, a grant's pending written ranges in chunks, against
the flat sorted list it replaced (probe 11, F4: merging that list was one step of the
loop that grew with the grant)."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kernelshim import ranges as ranges_mod
from kernelshim.grants import Grant, PENDING_EXACT, Rights
from kernelshim.extents import ExtentMap
from kernelshim.ranges import RangeList


class Flat:
    """The flat sorted list a grant kept before (stop 16's code, with each query as
    `Grant` wrote it)."""

    def __init__(self) -> None:
        self.w: list[list[int]] = []

    def add(self, start: int, end: int, block: int) -> None:
        w = self.w
        i = bisect.bisect_left(w, [start, start])
        if i > 0 and -(-w[i - 1][1] // block) * block >= start:
            i -= 1
        j = i
        while j < len(w) and w[j][0] <= -(-end // block) * block:
            start = min(start, w[j][0])
            end = max(end, w[j][1])
            j += 1
        w[i:j] = [[start, end]]

    def meets(self, start: int, end: int) -> bool:
        w = self.w
        i = bisect.bisect_right(w, [start, start])
        if i > 0 and w[i - 1][1] > start:
            return True
        return i < len(w) and w[i][0] < end

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        w, out = self.w, []
        i = bisect.bisect_right(w, [start, start])
        if i > 0:
            i -= 1
        while i < len(w) and w[i][0] < end:
            s, e = w[i]
            if e > start:
                out.append((max(s, start), min(e, end)))
            i += 1
        return out

    def last_end(self, start: int, end: int) -> int:
        w = self.w
        i = bisect.bisect_left(w, [end, end])
        while i > 0:
            s, e = w[i - 1]
            if e <= start:
                return 0
            if s < end:
                return min(e, end)
            i -= 1
        return 0

    def take(self, start: int, end: int, limit: int | None) -> list[tuple[int, int]]:
        w = self.w
        i0 = bisect.bisect_left(w, [start, start])
        if i0 > 0 and w[i0 - 1][1] > start:
            i0 -= 1
        out: list[tuple[int, int]] = []
        keep: list[list[int]] = []
        i = i0
        while i < len(w) and w[i][0] < end and (limit is None or len(out) < limit):
            s, e = w[i]
            out.append((max(s, start), min(e, end)))
            if s < start:
                keep.append([s, start])
            if e > end:
                keep.append([end, e])
            i += 1
        if out:
            self.w = w[:i0] + keep + w[i:]
        return out


SPAN = 400

_pos = st.integers(0, SPAN)
_op = st.one_of(
    st.tuples(st.just("add"), _pos, st.integers(1, 40), st.sampled_from([1, 8, 16])),
    st.tuples(st.just("meets"), _pos, st.integers(1, 40), st.just(0)),
    st.tuples(st.just("within"), _pos, st.integers(1, 120), st.just(0)),
    st.tuples(st.just("last_end"), _pos, st.integers(1, 120), st.just(0)),
    st.tuples(st.just("take"), _pos, st.integers(1, 120), st.sampled_from([0, 1, 2, 5])),
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 256])
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=120))
def test_range_list_is_the_flat_list(monkeypatch: pytest.MonkeyPatch, chunk: int,
                                     ops: list[tuple[str, int, int, int]]) -> None:
    """Every operation, at every chunk size (chunks of 1 and 2 put every join and take
    across chunk boundaries), answers as the flat list did and leaves the same ranges;
    no chunk is ever empty or longer than twice the chunk size, and the index of the
    chunks' first starts stays right."""
    monkeypatch.setattr(ranges_mod, "CHUNK", chunk)
    r, ref = RangeList(), Flat()
    for op, a, n, x in ops:
        b = a + n
        if op == "add":
            r.add(a, b, x)
            ref.add(a, b, x)
        elif op == "meets":
            assert r.meets(a, b) == ref.meets(a, b)
        elif op == "within":
            assert r.within(a, b) == ref.within(a, b)
        elif op == "last_end":
            assert r.last_end(a, b) == ref.last_end(a, b)
        else:
            limit = x or None
            assert r.take(a, b, limit) == ref.take(a, b, limit)
        assert r.flat() == ref.w
        assert len(r) == len(ref.w)
        assert all(0 < len(c) <= 2 * chunk for c in r._chunks)
        assert r._firsts == [c[0][0] for c in r._chunks]


def test_a_grant_of_many_ranges_never_passes_over_all_of_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe 11, F4: a direct client's 40,000 scattered writes between two commits, a
    partial write's question of each block, and a commit taking them 256 at a time.
    The grant never copies or rebuilds its whole list (what one step of the loop did
    every time the noted ranges doubled: 16-18 ms at 20,000 ranges), and every range
    written is taken exactly once."""
    passes = 0
    real_flat = RangeList.flat

    def counting(self: RangeList) -> list[list[int]]:
        nonlocal passes
        passes += 1
        return real_flat(self)

    monkeypatch.setattr(RangeList, "flat", counting)
    g = Grant(1, 1, ExtentMap(), Rights.RW, 0)
    bs = 4096
    n = 40_000
    blocks = list(range(0, 2 * n, 2))
    import random
    random.Random(11).shuffle(blocks)
    for b in blocks:
        assert not g.wrote_in(b * bs, (b + 1) * bs)
        g.note_written(b * bs + 10, b * bs + 20, bs)
        assert g.wrote_in(b * bs, (b + 1) * bs)
    assert len(g._written) == n > PENDING_EXACT
    taken: list[tuple[int, int]] = []
    last = (2 * n - 2) * bs + 20
    while True:
        assert g.pending_end(0, 2 * n * bs) == (last if len(g._written) else 0)
        part = g.take_written(0, 2 * n * bs, 256)
        if not part:
            break
        assert len(part) <= 256
        taken.extend(part)
    assert passes == 0
    assert taken == [(b * bs + 10, b * bs + 20) for b in range(0, 2 * n, 2)]
    assert len(g._written) == 0
