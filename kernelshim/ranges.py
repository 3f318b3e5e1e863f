"""Sorted, disjoint byte ranges in chunks: a grant's pending written ranges.

A grant keeps the byte ranges [start, end) written through it and not yet committed
(`Grant.note_written`). A direct client that pipelines small writes at scattered
offsets between two commits gives it tens of thousands of them. One flat sorted list
made each noted range a memmove of the whole list; noting them unsorted and merging
them in one pass when they doubled (stop 16) made that pass one step of the loop that
grew with the grant: 16-18 ms at 20,000 ranges, every other tenant waiting behind it
(probe 11, F4).

`RangeList` keeps them in chunks of at most `2 * CHUNK` ranges, with each chunk's
first start in a list of its own: a range is found by two bisections and changed in
its chunk, so every operation costs O(log n + CHUNK + the ranges it returns or
joins), whatever the number of ranges. The joining rule is the one a sorted insert
into a flat list had (`add`), so the ranges are exactly what that list would hold.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterator

#: ranges per chunk a chunk is split back to (at most twice this in one chunk)
CHUNK = 256


class Meter:
    """The ranges of every RangeList that counts into it (a principal's grants')."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _up(x: int, block: int) -> int:
    return -(-x // block) * block


class RangeList:
    """Sorted, disjoint [start, end) ranges (see the module's docstring)."""

    __slots__ = ("_chunks", "_firsts", "_len", "meter")

    def __init__(self, ranges: list[list[int]] | None = None, meter: Meter | None = None
                 ) -> None:
        self._chunks: list[list[list[int]]] = []
        self._firsts: list[int] = []
        self._len = 0
        #: counts this list's ranges (with others': `Meter`), or None
        self.meter = meter
        if ranges:
            self._build([[s, e] for s, e in ranges])

    def _build(self, flat: list[list[int]]) -> None:
        self._chunks = [flat[k:k + CHUNK] for k in range(0, len(flat), CHUNK)]
        self._firsts = [c[0][0] for c in self._chunks]
        self._count(len(flat) - self._len)

    def _count(self, delta: int) -> None:
        self._len += delta
        if self.meter is not None:
            self.meter.n += delta

    def clear(self) -> None:
        """Drop every range (and their count from the meter)."""
        self._count(-self._len)
        self._chunks, self._firsts = [], []

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[list[int]]:
        for c in self._chunks:
            yield from c

    def flat(self) -> list[list[int]]:
        """Every range, in order (a new list of the same range lists)."""
        return [r for c in self._chunks for r in c]

    # -- positions: (chunk, index in it) -------------------------------------------------

    def _at_or_before(self, x: int) -> tuple[int, int]:
        """The position of the last range that starts at or before `x`; (0, -1) when
        every range starts after it."""
        ci = bisect_right(self._firsts, x) - 1
        if ci < 0:
            return 0, -1
        c = self._chunks[ci]
        return ci, bisect_right(c, [x, 1 << 63]) - 1

    def _before(self, x: int) -> tuple[int, int]:
        """The position of the last range that starts before `x`; (0, -1) if none."""
        ci = bisect_left(self._firsts, x) - 1
        if ci < 0:
            return 0, -1
        c = self._chunks[ci]
        return ci, bisect_left(c, [x, x]) - 1

    def _from(self, ci: int, i: int) -> Iterator[tuple[int, int, list[int]]]:
        """The ranges from position (ci, i) on, with their positions."""
        chunks = self._chunks
        while ci < len(chunks):
            c = chunks[ci]
            while i < len(c):
                yield ci, i, c[i]
                i += 1
            ci += 1
            i = 0

    def _first_meeting(self, x: int) -> tuple[int, int]:
        """The position of the first range that ends after `x` (the one across `x`,
        or the next)."""
        ci, i = self._at_or_before(x)
        if i >= 0 and self._chunks[ci][i][1] <= x:
            i += 1
        elif i < 0:
            i = 0
        if self._chunks and i >= len(self._chunks[ci]):
            ci, i = ci + 1, 0
        return ci, i

    def _splice(self, ci: int, i: int, cj: int, j: int, new: list[list[int]]) -> None:
        """Replace the ranges from position (ci, i) up to (cj, j) (exclusive) by `new`,
        which must keep the list sorted and disjoint."""
        chunks = self._chunks
        removed = 0
        if not chunks:
            if new:
                self._build(new)
            return
        if ci >= len(chunks):  # (at the end)
            ci, i = len(chunks) - 1, len(chunks[-1])
            cj, j = ci, i
        if cj >= len(chunks):
            cj, j = len(chunks) - 1, len(chunks[-1])
        if ci == cj:
            removed = j - i
            chunks[ci][i:j] = new
        else:
            removed = len(chunks[ci]) - i + j + sum(len(chunks[k]) for k in range(ci + 1, cj))
            chunks[ci][i:] = new
            del chunks[cj][:j]
            del chunks[ci + 1:cj]
            del self._firsts[ci + 1:cj]
            cj = ci + 1
        self._count(len(new) - removed)
        # keep the chunk index right: drop empty chunks, split a long one
        for k in (cj, ci) if cj != ci else (ci,):
            c = chunks[k]
            if not c:
                del chunks[k]
                del self._firsts[k]
            elif len(c) > 2 * CHUNK:
                parts = [c[n:n + CHUNK] for n in range(0, len(c), CHUNK)]
                chunks[k:k + 1] = parts
                self._firsts[k:k + 1] = [p[0][0] for p in parts]
            else:
                self._firsts[k] = c[0][0]

    # -- the grant's operations ---------------------------------------------------------

    def add(self, start: int, end: int, block: int = 1) -> None:
        """Add [start, end) as a sorted insert into a flat list would: it joins the
        range before it if that ends in the block where it starts (or after), and every
        range after it that starts in the block where the joined range ends (or
        before). `block` 1: ranges join only where they touch or overlap."""
        chunks = self._chunks
        if not chunks:
            self._build([[start, end]])
            return
        if len(chunks) == 1:              # (most grants: the flat list's insert)
            w = chunks[0]
            i = bisect_left(w, [start, start])
            if i > 0 and _up(w[i - 1][1], block) >= start:
                i -= 1
            j = i
            while j < len(w) and w[j][0] <= _up(end, block):
                start = min(start, w[j][0])
                end = max(end, w[j][1])
                j += 1
            w[i:j] = [[start, end]]
            self._count(len(w) - self._len)
            self._firsts[0] = w[0][0]
            if len(w) > 2 * CHUNK:
                chunks[:] = [w[k:k + CHUNK] for k in range(0, len(w), CHUNK)]
                self._firsts[:] = [c[0][0] for c in chunks]
            return
        ci, i = self._before(start)       # the range before (starts before `start`)
        if i >= 0 and _up(self._chunks[ci][i][1], block) >= start:
            pass                           # ... joins: the splice starts at it
        else:
            i += 1
            if i >= len(self._chunks[ci]) and ci + 1 < len(self._chunks):
                ci, i = ci + 1, 0
        cj, j = ci, i
        for cj, j, r in self._from(ci, i):
            if r[0] > _up(end, block):
                break
            start = min(start, r[0])
            end = max(end, r[1])
        else:
            cj, j = len(self._chunks) - 1, len(self._chunks[-1])
        self._splice(ci, i, cj, j, [[start, end]])

    def meets(self, start: int, end: int) -> bool:
        """Whether a range meets [start, end)."""
        chunks = self._chunks
        if len(chunks) == 1:              # (most grants: the flat list's bisection)
            w = chunks[0]
            i = bisect_right(w, [start, start])
            if i > 0 and w[i - 1][1] > start:
                return True
            return i < len(w) and w[i][0] < end
        if not chunks:
            return False
        ci, i = self._first_meeting(start)
        return ci < len(self._chunks) and self._chunks[ci][i][0] < end

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges meeting [start, end), clipped to it."""
        out: list[tuple[int, int]] = []
        if not self._chunks:
            return out
        for _ci, _i, (s, e) in self._from(*self._first_meeting(start)):
            if s >= end:
                break
            out.append((max(s, start), min(e, end)))
        return out

    def last_end(self, start: int, end: int) -> int:
        """Where the last range meeting [start, end) ends, clipped to it; 0 if none."""
        ci, i = self._before(end)
        if i < 0:
            return 0
        e = self._chunks[ci][i][1]
        return min(e, end) if e > start else 0

    def take(self, start: int, end: int, limit: int | None = None
             ) -> list[tuple[int, int]]:
        """The ranges meeting [start, end), clipped, in order (the first `limit` of
        them; None: all), removed: what lies outside [start, end) of them stays."""
        out: list[tuple[int, int]] = []
        if not self._chunks:
            return out
        ci, i = self._first_meeting(start)
        keep: list[list[int]] = []
        cj, j = ci, i
        for cj, j, (s, e) in self._from(ci, i):
            if s >= end or (limit is not None and len(out) >= limit):
                break
            out.append((max(s, start), min(e, end)))
            if s < start:
                keep.append([s, start])
            if e > end:
                keep.append([end, e])
        else:
            cj, j = len(self._chunks), 0
        if out:
            self._splice(ci, i, cj, j, keep)
        return out
