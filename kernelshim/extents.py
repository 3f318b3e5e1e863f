"""Extent maps: the map from a file's blocks to device blocks, as grants carry it.

An extent is (file_block, dev_block, count, state, owner). `owner` is the principal
charged for its blocks (so a truncate refunds whoever paid). `state` is one of

- UNWRITTEN: allocated, reads as zeros (the pNFS "invalid" state a write layout hands
  out before commit);
- FRESH: holds the file's data, written since the last metadata commit; no committed
  transaction exposes these blocks' data yet, so they may be written again in place;
- WRITTEN: holds the file's data as of a committed transaction (sealed): never written
  in place again; a change goes to fresh blocks (copy-on-write, see `relocate`), so a
  crash that rolls the metadata back finds the old data and checksums untouched.

FRESH exists only in memory: it is persisted as WRITTEN, and `seal()` turns it into
WRITTEN when the transaction that persisted it commits. File blocks not covered by any
extent are holes and read as zeros.

The map keeps extents sorted and non-overlapping, merges neighbours that continue
each other, and remembers which extents changed since the last `take_changes()` so
that the metadata server can persist only those.
"""

from __future__ import annotations

import bisect
from typing import Iterable, NamedTuple

UNWRITTEN = 0
WRITTEN = 1
FRESH = 2  # in memory only (persisted as WRITTEN)
HOLE = -1  # dev_block of a hole segment


# -- block-range arithmetic (the one home of it, for kernelshim and fs) -----------------


def blocks_to_cover(nbytes: int, block_size: int) -> int:
    """How many blocks the first `nbytes` bytes of a file occupy (a file of that size)."""
    return -(-nbytes // block_size)


def block_span(offset: int, length: int, block_size: int) -> tuple[int, int]:
    """The file blocks [first, end) that bytes [offset, offset + length) touch, the
    partly covered blocks at either edge included (first == end: none)."""
    return offset // block_size, -(-(offset + length) // block_size)


def whole_blocks(lo: int, hi: int, block_size: int) -> tuple[int, int]:
    """The file blocks [first, end) lying wholly inside bytes [lo, hi) (first >= end:
    none)."""
    return -(-lo // block_size), hi // block_size


def partial_edges(lo: int, hi: int, block_size: int) -> list[tuple[int, int]]:
    """The byte ranges of [lo, hi) that cover their block only partly: at most one at
    each edge, one when the range lies within a single block, none when aligned."""
    bs = block_size
    if hi <= lo:
        return []
    if lo // bs == (hi - 1) // bs:
        return [(lo, hi)] if lo % bs or hi % bs else []
    out: list[tuple[int, int]] = []
    if lo % bs:
        out.append((lo, blocks_to_cover(lo, bs) * bs))
    if hi % bs:
        out.append(((hi // bs) * bs, hi))
    return out


class Segment(NamedTuple):
    file_block: int
    count: int  # type: ignore[assignment]  # (shadows tuple.count, by design)
    dev_block: int  # HOLE for a hole
    state: int      # WRITTEN, FRESH, UNWRITTEN; UNWRITTEN for holes too (reads as zeros)


class ExtentMap:
    """Sorted, non-overlapping extents of one file. See the module docstring."""

    __slots__ = ("_starts", "_ext", "_changed", "_new", "_fresh_at", "blocks", "fresh")

    def __init__(self, extents: Iterable[tuple[int, ...]] = ()) -> None:
        self._starts: list[int] = []
        self._ext: list[list[int]] = []  # [file_block, dev_block, count, state, owner]
        self._changed: set[int] = set()   # file_block keys added, changed or removed
        # keys first made a start since the last take_changes (no stored row has them:
        # a key stored and removed since is in _changed before it is made again)
        self._new: set[int] = set()
        #: blocks allocated to the file (written + unwritten)
        self.blocks = 0
        #: whether some extent may be FRESH (cleared by seal())
        self.fresh = False
        # file blocks, one at least inside each FRESH extent (more, and stale ones, may
        # be there): seal() visits these, not the whole map — a file fragmented by
        # random overwrites has tens of thousands of extents, and every commit sealed
        # them all, one Python pass each over the map (docs/BENCHMARKS.md, "Direct
        # 4 KiB random writes")
        self._fresh_at: list[int] = []
        for e in sorted(extents):
            fb, dev, cnt, st = e[:4]
            owner = e[4] if len(e) > 4 else 0
            if self._starts and fb < self._starts[-1] + self._ext[-1][2]:
                raise ValueError(f"overlapping extents at file block {fb}")
            self._starts.append(fb)
            self._ext.append([fb, dev, cnt, st, owner])
            self.blocks += cnt
            if st == FRESH:
                self.fresh = True
                self._fresh_at.append(fb)

    @classmethod
    def load(cls, rows: Iterable[tuple[int, ...]]) -> ExtentMap:
        """The map of a file's stored rows (sorted by file block), neighbours that
        continue each other merged (`merge_all`): rows stored unmerged stay so in the
        database until the file's next change saves the merge."""
        m = cls(rows)
        m.merge_all()
        return m

    def extend_loaded(self, rows: Iterable[tuple[int, ...]]) -> None:
        """Append stored rows, sorted by file block and past the map's end, merged as
        `load` merges them: a map loaded a page of rows at a time (a file of 100,000
        extents loaded in one step held the loop 0.2 s: probe 11, F5)."""
        ext = self._ext
        keep = len(ext) - 1 if ext else 0  # the last extent may merge with the first row
        new: list[list[int]] = ext[keep:]
        for e in rows:
            fb, dev, cnt, st = e[:4]
            owner = e[4] if len(e) > 4 else 0
            if new and fb < new[-1][0] + new[-1][2]:
                raise ValueError(f"overlapping extents at file block {fb}")
            new.append([fb, dev, cnt, st, owner])
            self.blocks += cnt
            if st == FRESH:
                self.fresh = True
                self._fresh_at.append(fb)
        merged = self._merged(new)
        ext[keep:] = merged
        self._starts[keep:] = [e[0] for e in merged]

    def __len__(self) -> int:
        return len(self._ext)

    def extents(self) -> list[tuple[int, int, int, int]]:
        """(file_block, dev_block, count, state) of every extent, in order."""
        return [tuple(e[:4]) for e in self._ext]  # type: ignore[misc]

    def owned_extents(self) -> list[tuple[int, int, int, int, int]]:
        """As extents(), with the owner (charged principal) as a fifth element."""
        return [tuple(e) for e in self._ext]  # type: ignore[misc]

    def copy(self) -> ExtentMap:
        return ExtentMap(self.owned_extents())

    # -- queries -----------------------------------------------------------------

    def segments(self, file_block: int, count: int) -> list[Segment]:
        """Cover [file_block, file_block+count) with extent pieces and holes, in order."""
        out: list[Segment] = []
        end = file_block + count
        pos = file_block
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0:
            i = 0
        ext = self._ext
        n = len(ext)
        while pos < end:
            while i < n and ext[i][0] + ext[i][2] <= pos:
                i += 1
            if i >= n or ext[i][0] >= end:
                out.append(Segment(pos, end - pos, HOLE, UNWRITTEN))
                break
            fb, dev, cnt, st = ext[i][:4]
            if fb > pos:
                out.append(Segment(pos, fb - pos, HOLE, UNWRITTEN))
                pos = fb
            take = min(end, fb + cnt) - pos
            out.append(Segment(pos, take, dev + (pos - fb), st))
            pos += take
            i += 1
        return out

    def seek(self, file_block: int, end: int, data: bool, limit: int) -> tuple[int | None, int]:
        """The first file block in [file_block, end) that is data (inside an extent
        not UNWRITTEN) if `data`, else a hole (no extent there, or UNWRITTEN: it reads
        as zeros), looking at `limit` extents at most: (that block, 0); or (None, pos)
        when there is none before `pos`, where a further call goes on (`pos` >= `end`:
        none at all). Bounded work, as SEEK_DATA/SEEK_HOLE on a map of many extents
        must be (a whole segment list to the end of a file of 50,000 extents held the
        loop 0.2 s)."""
        ext = self._ext
        n = len(ext)
        i = max(bisect.bisect_right(self._starts, file_block) - 1, 0)
        pos = file_block
        seen = 0
        while pos < end:
            if i >= n or ext[i][0] >= end:  # [pos, end) is a hole
                return (None, end) if data else (pos, 0)
            fb, _dev, cnt, st = ext[i][:4]
            i += 1
            if fb + cnt <= pos:
                continue
            if fb > pos:  # a hole before this extent
                if not data:
                    return pos, 0
                pos = fb
            if (st != UNWRITTEN) == data:
                return pos, 0
            pos = fb + cnt
            seen += 1
            if seen >= limit:
                break
        return None, pos

    def fresh_covers(self, file_block: int, count: int) -> bool:
        """Whether one FRESH extent covers [file_block, file_block+count): a write
        there needs no allocation, no relocation and marks nothing."""
        i = bisect.bisect_right(self._starts, file_block) - 1
        if i < 0:
            return False
        e = self._ext[i]
        return e[3] == FRESH and file_block + count <= e[0] + e[2]

    def holes(self, file_block: int, count: int) -> list[tuple[int, int]]:
        """The holes (no extent) of [file_block, file_block+count), in order."""
        end = file_block + count
        out, _pos = self.holes_upto(file_block, end, len(self._ext) + 1)
        return out

    def holes_upto(self, file_block: int, end: int, limit: int
                   ) -> tuple[list[tuple[int, int]], int]:
        """The holes (no extent) of [file_block, end) as (file_block, count) runs, in
        order, looking at `limit` extents at most and making no Segment: (the holes,
        pos), where `pos` is where a further call goes on (>= `end`: the whole range
        looked at). Bounded work a call, as `seek`'s."""
        out: list[tuple[int, int]] = []
        ext = self._ext
        n = len(ext)
        i = max(bisect.bisect_right(self._starts, file_block) - 1, 0)
        pos = file_block
        seen = 0
        while pos < end and seen < limit:
            if i >= n or ext[i][0] >= end:
                out.append((pos, end - pos))
                return out, end
            fb, _dev, cnt = ext[i][:3]
            i += 1
            if fb + cnt <= pos:
                continue
            if fb > pos:
                out.append((pos, fb - pos))
            pos = fb + cnt
            seen += 1
        return out, max(pos, file_block)

    def tally(self, file_block: int, end: int, limit: int) -> tuple[int, int, int]:
        """Count the blocks of [file_block, end) that are data (in an extent not
        UNWRITTEN) and that are holes (no extent), looking at `limit` extents at most:
        (data, holes, pos), where `pos` is where a further call goes on (>= `end`: the
        whole range counted). Bounded work a call, as `seek`'s."""
        ext = self._ext
        n = len(ext)
        i = max(bisect.bisect_right(self._starts, file_block) - 1, 0)
        pos = file_block
        data = holes = seen = 0
        while pos < end and seen < limit:
            if i >= n or ext[i][0] >= end:
                return data, holes + end - pos, end
            fb, _dev, cnt, st = ext[i][:4]
            i += 1
            if fb + cnt <= pos:
                continue
            if fb > pos:
                holes += fb - pos
                pos = fb
            take = min(end, fb + cnt) - pos
            if st != UNWRITTEN:
                data += take
            pos += take
            seen += 1
        return data, holes, pos

    def goal(self, file_block: int) -> int | None:
        """The device block that would continue the extent before `file_block`."""
        i = bisect.bisect_right(self._starts, file_block) - 1
        if i < 0:
            return None
        fb, dev = self._ext[i][:2]
        return dev + (file_block - fb)

    def start_of(self, index: int) -> int:
        """The first file block of the `index`-th extent (in file order)."""
        return self._starts[index]

    def start_back(self, file_block: int, count: int) -> int:
        """The first file block of the `count`-th extent that starts before
        `file_block`, counting back from it (0 when there are fewer): where a part of
        `count` extents ending at `file_block` begins."""
        i = bisect.bisect_left(self._starts, file_block) - count
        return self._starts[i] if i >= 0 else 0

    def end_block(self) -> int:
        """One past the last allocated file block (0 when empty)."""
        if not self._ext:
            return 0
        last = self._ext[-1]
        return last[0] + last[2]

    # -- changes -----------------------------------------------------------------

    def _made(self, fb: int) -> None:
        """`fb` became an extent's start: a change; a new key if it was not one."""
        if fb not in self._changed:
            self._new.add(fb)
            self._changed.add(fb)

    def _split_at(self, fb: int) -> None:
        """Make `fb` an extent boundary if it falls inside an extent."""
        i = bisect.bisect_right(self._starts, fb) - 1
        if i < 0:
            return
        e = self._ext[i]
        if e[0] < fb < e[0] + e[2]:
            head = fb - e[0]
            new = [fb, e[1] + head, e[2] - head, e[3], e[4]]
            e[2] = head
            self._ext.insert(i + 1, new)
            self._starts.insert(i + 1, fb)
            self._changed.add(e[0])
            self._made(fb)
            if e[3] == FRESH:  # each piece keeps a block seal() will visit
                self._fresh_at.append(e[0])
                self._fresh_at.append(fb)

    def _merge_around(self, lo: int, hi: int) -> None:
        """Merge extents that continue each other among indexes lo-1 .. hi+1."""
        ext = self._ext
        i = max(lo - 1, 0)
        hi = min(hi + 1, len(ext) - 1)
        while i < hi and i + 1 < len(ext):
            a, b = ext[i], ext[i + 1]
            if a[0] + a[2] == b[0] and a[1] + a[2] == b[1] and a[3] == b[3] and a[4] == b[4]:
                a[2] += b[2]
                self._changed.add(a[0])
                self._changed.add(b[0])
                del ext[i + 1]
                del self._starts[i + 1]
                hi -= 1
            else:
                i += 1

    def add(self, file_block: int, dev_block: int, count: int, state: int,
            owner: int = 0) -> None:
        """Map a hole [file_block, +count) to device blocks charged to `owner`."""
        if count <= 0:
            return
        i = bisect.bisect_right(self._starts, file_block)
        ext = self._ext
        if i > 0 and ext[i - 1][0] + ext[i - 1][2] > file_block:
            raise ValueError(f"file block {file_block} is already mapped")
        if i < len(ext) and ext[i][0] < file_block + count:
            raise ValueError(f"file blocks {file_block}+{count} overlap a mapped extent")
        ext.insert(i, [file_block, dev_block, count, state, owner])
        self._starts.insert(i, file_block)
        self._made(file_block)
        self.blocks += count
        if state == FRESH:
            self.fresh = True
            self._fresh_at.append(file_block)
        self._merge_around(i, i)

    def mark_written(self, file_block: int, count: int) -> None:
        """Commit: unwritten extents in the range become FRESH (data, not yet sealed)."""
        if count <= 0:
            return  # an empty range: splitting at its point would leave mergeable halves
        end = file_block + count
        if self.fresh_covers(file_block, count) or not any(s.state == UNWRITTEN and s.dev_block != HOLE
                   for s in self.segments(file_block, count)):
            # Nothing to mark (data rewritten in FRESH or WRITTEN blocks): splitting
            # and merging back would record the extents as changed, and each such
            # write would save them again — fio's 16-byte requests into the block the
            # request before made FRESH rewrote a row in SQLite each (BENCHMARKS.md).
            return
        self._split_at(file_block)
        self._split_at(end)
        lo = bisect.bisect_left(self._starts, file_block)
        hi = bisect.bisect_left(self._starts, end)
        touched = False
        for e in self._ext[lo:hi]:
            if e[3] == UNWRITTEN:
                e[3] = FRESH
                self._changed.add(e[0])
                self._fresh_at.append(e[0])
                touched = True
        if touched:
            self.fresh = True
        if touched or hi > lo:
            self._merge_around(lo, hi - 1)

    def relocate(self, file_block: int, dev_block: int, count: int
                 ) -> list[tuple[int, int, int]]:
        """Copy-on-write: map [file_block, +count), which must be allocated, to the
        device blocks [dev_block, +count) as FRESH data, keeping each extent's owner.
        Returns the device runs (dev_block, count, owner) no longer mapped."""
        end = file_block + count
        self._split_at(file_block)
        self._split_at(end)
        lo = bisect.bisect_left(self._starts, file_block)
        hi = bisect.bisect_left(self._starts, end)
        covered = sum(e[2] for e in self._ext[lo:hi])
        if covered != count or (hi > lo and self._ext[lo][0] != file_block):
            raise ValueError(f"relocate of {file_block}+{count}: not entirely mapped")
        old: list[tuple[int, int, int]] = []
        for e in self._ext[lo:hi]:
            old.append((e[1], e[2], e[4]))
            e[1] = dev_block + (e[0] - file_block)
            e[3] = FRESH
            self._changed.add(e[0])
            self._fresh_at.append(e[0])
        self.fresh = True
        self._merge_around(lo, hi - 1)
        return old

    def seal(self) -> None:
        """The transaction that persisted the FRESH extents committed: they become
        WRITTEN (the stored rows say WRITTEN already; neighbours that now continue each
        other merge, and are saved with the next change)."""
        if self.fresh:
            starts, ext = self._starts, self._ext
            sealed: set[int] = set()
            for fb in self._fresh_at:
                i = bisect.bisect_right(starts, fb) - 1
                if i >= 0:
                    e = ext[i]
                    if e[3] == FRESH and fb < e[0] + e[2]:
                        e[3] = WRITTEN
                        sealed.add(i)
            # Only the sealed extents' neighbours can newly continue them. From the
            # last index down: a merge deletes entries at or after the one it starts
            # from, so the indexes still to visit stay where they were.
            for i in sorted(sealed, reverse=True):
                self._merge_around(i, i)
            self._fresh_at.clear()
            self.fresh = False

    def sealed_runs(self, file_block: int, count: int, limit: int | None = None
                    ) -> list[tuple[int, int]]:
        """(file_block, count) of the WRITTEN (sealed) pieces of the range, those next
        to each other joined; the first `limit` of them (None: all). One pass over
        the extents of the range, making no Segment, that stops at the limit (a
        layout over a range of 20,000 extents built them all to take the first few:
        probe 11, F3b)."""
        out: list[tuple[int, int]] = []
        if count <= 0:
            return out
        end = file_block + count
        ext = self._ext
        n = len(ext)
        i = max(bisect.bisect_right(self._starts, file_block) - 1, 0)
        while i < n:
            fb, _dev, cnt, st = ext[i][:4]
            i += 1
            if fb + cnt <= file_block:
                continue
            if fb >= end:
                break
            if st != WRITTEN:
                continue
            a, b = max(fb, file_block), min(fb + cnt, end)
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], out[-1][1] + b - a)
            elif limit is not None and len(out) >= limit:
                break
            else:
                out.append((a, b - a))
        return out

    def sealed_allocated(self, file_block: int, count: int) -> bool:
        """Whether the range has a WRITTEN (sealed) piece and no hole: a write there
        would raise Sealed, not NotAllocated (the order `Kernel.write` checks in)."""
        sealed = False
        for s in self.segments(file_block, count):
            if s.dev_block == HOLE:
                return False
            sealed = sealed or s.state == WRITTEN
        return sealed

    def remove(self, file_block: int, count: int | None = None) -> list[tuple[int, int]]:
        """Unmap [file_block, +count) (to the end when count is None); returns the freed
        device runs (dev_block, count)."""
        return [(d, c) for d, c, _o in self.remove_owned(file_block, count)]

    def remove_owned(self, file_block: int, count: int | None = None
                     ) -> list[tuple[int, int, int]]:
        """As remove(), returning (dev_block, count, owner) runs."""
        end = self.end_block() if count is None else file_block + count
        if end <= file_block:
            return []
        self._split_at(file_block)
        self._split_at(end)
        lo = bisect.bisect_left(self._starts, file_block)
        hi = bisect.bisect_left(self._starts, end)
        freed = [(e[1], e[2], e[4]) for e in self._ext[lo:hi]]
        for e in self._ext[lo:hi]:
            self._changed.add(e[0])
            self.blocks -= e[2]
        del self._ext[lo:hi]
        del self._starts[lo:hi]
        return freed

    def remove_data(self, file_block: int, count: int, *, unwritten: bool = False
                    ) -> list[tuple[int, int, int, int]]:
        """Unmap the data (WRITTEN and FRESH) extents of [file_block, +count), leaving
        UNWRITTEN ones mapped (with `unwritten`, those too: a punched hole frees what
        fallocate reserved, as on ext4); returns (file_block, dev_block, count, owner)
        of each removed piece, in order. One pass over the range, whatever the number
        of extents (a punch of a file of many small extents; remove_owned per run would
        move the tail of the list once per run: quadratic)."""
        end = file_block + count
        if count <= 0:
            return []
        self._split_at(file_block)
        self._split_at(end)
        lo = bisect.bisect_left(self._starts, file_block)
        hi = bisect.bisect_left(self._starts, end)
        kept: list[list[int]] = []
        gone: list[tuple[int, int, int, int]] = []
        for e in self._ext[lo:hi]:
            if e[3] == UNWRITTEN and not unwritten:
                kept.append(e)
            else:
                gone.append((e[0], e[1], e[2], e[4]))
                self._changed.add(e[0])
                self.blocks -= e[2]
        if gone:
            self._ext[lo:hi] = kept
            self._starts[lo:hi] = [e[0] for e in kept]
        # The splits at the edges may have cut an UNWRITTEN extent that stays.
        self._merge_around(lo, lo + len(kept) - 1)
        return gone

    def add_many(self, extents: list[tuple[int, int, int, int, int]]) -> None:
        """add() of each (file_block, dev_block, count, state, owner), sorted by file
        block, each over a hole: one merge pass, not one list insertion each."""
        if not extents:
            return
        # Only the window of the map the new extents fall in (with a neighbour each
        # side, to merge with) is passed over and spliced back, the tail moved once
        # in C: a ZERO_RANGE or a fallocate in parts adds up to EXTENTS_PER_STEP runs
        # at a time into a map of tens of thousands, where a pass over the whole map,
        # or an add() each (two memmoves of the tail each), cost 1-10 ms a part.
        first = extents[0][0]
        last = max(fb + cnt for fb, _d, cnt, _s, _o in extents)
        lo = max(bisect.bisect_right(self._starts, first) - 1, 0)
        hi = min(bisect.bisect_left(self._starts, last) + 1, len(self._ext))
        if len(extents) * 256 < hi - lo:
            # A few spread over a long stretch of the map: add() moves the lists'
            # tails in C, cheaper than a Python pass over the stretch (~300x an
            # element's memmove here).
            for fb, dev, cnt, st, owner in extents:
                self.add(fb, dev, cnt, st, owner)
            return
        old: list[list[int]] = self._ext[lo:hi]
        out: list[list[int]] = []
        i = 0
        prev_end = -1
        for fb, dev, cnt, st, owner in extents:
            if cnt <= 0:
                continue
            if fb < prev_end:
                raise ValueError(f"file blocks {fb}+{cnt} overlap")
            while i < len(old) and old[i][0] < fb:
                out.append(old[i])
                i += 1
            if out and out[-1][0] + out[-1][2] > fb:
                raise ValueError(f"file block {fb} is already mapped")
            if i < len(old) and old[i][0] < fb + cnt:
                raise ValueError(f"file blocks {fb}+{cnt} overlap a mapped extent")
            out.append([fb, dev, cnt, st, owner])
            self._made(fb)
            self.blocks += cnt
            if st == FRESH:
                self.fresh = True
                self._fresh_at.append(fb)
            prev_end = fb + cnt
        out.extend(old[i:])
        merged = self._merged(out)
        self._ext[lo:hi] = merged
        self._starts[lo:hi] = [e[0] for e in merged]

    def _merged(self, ext: list[list[int]]) -> list[list[int]]:
        """`ext` with the neighbours that continue each other merged, in one pass
        (each merge a change to save: the merged extent and the key it absorbed)."""
        merged: list[list[int]] = []
        changed = self._changed
        for e in ext:
            if merged:
                a = merged[-1]
                if a[0] + a[2] == e[0] and a[1] + a[2] == e[1] and a[3] == e[3] \
                        and a[4] == e[4]:
                    a[2] += e[2]
                    changed.add(a[0])
                    changed.add(e[0])
                    continue
            merged.append(e)
        return merged

    def merge_all(self) -> None:
        """Merge every pair of neighbours that continue each other (rows stored
        unmerged: by `retag_owner`'s callers, or by older code), in one pass over the
        map; the merges are saved with the next change (`take_changes`). A loaded
        map is merged so (`load`): the seals merge only around what they sealed
        (direct4), so nothing else would merge them (review of direct4, E2)."""
        merged = self._merged(self._ext)
        if len(merged) != len(self._ext):
            self._ext = merged
            self._starts = [e[0] for e in merged]

    def has_changes(self) -> bool:
        """Whether there are changes `take_changes` has not given yet."""
        return bool(self._changed or self._new)

    def take_changes(self, *, with_owner: bool = False
                     ) -> tuple[list[int], list[tuple[int, ...]]]:
        """(file_block keys to delete, extents to insert or replace) since the last call
        (extents as 4-tuples, or 5-tuples with the owner when `with_owner`; FRESH is
        given as WRITTEN, the state it is stored as)."""
        deleted: list[int] = []
        upserts: list[tuple[int, ...]] = []
        for key in self._changed:
            i = bisect.bisect_left(self._starts, key)
            if i < len(self._starts) and self._starts[i] == key:
                e = self._ext[i]
                row = (e[0], e[1], e[2], WRITTEN if e[3] == FRESH else e[3], e[4])
                upserts.append(row if with_owner else row[:4])
            elif key not in self._new:  # (a key made and gone since: never stored)
                deleted.append(key)
        self._changed.clear()
        self._new.clear()
        return deleted, upserts

    def retag_owner(self, old: int, new: int) -> None:
        """Extents charged to principal `old` are charged to `new` from now on (the
        principal was removed and its storage handed to `new`; the stored rows are
        retagged by the caller, so the retag is not a change to save). Neighbours that
        now continue each other are merged (`merge_all`: those merges are saved with
        the next change; the seals merge only around what they seal, E2)."""
        retagged = False
        for e in self._ext:
            if e[4] == old:
                e[4] = new
                retagged = True
        if retagged:
            self.merge_all()
