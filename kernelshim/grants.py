"""Grants: capabilities to do I/O on a file's blocks (pNFS layouts).

A grant names an inode and its generation, carries the extent map the holder may use,
the rights it confers and the principal its I/O is charged to. Grants are minted
(copied with fewer rights) and revoked (with everything minted from them). A revoked
grant stays revoked; in-flight requests that passed the check before the revoke are
counted in `inflight`, and `Kernel.revoke` waits for them to finish (fencing).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import itertools
from typing import Callable

import trio

from blockdev import PrincipalId

from .extents import ExtentMap


class Rights(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    RW = READ | WRITE


_ids = itertools.count(1)

#: pending written ranges a grant keeps byte-exact (`Grant.note_written`); past this,
#: ranges coalesce per block
PENDING_EXACT = 4096

#: past PENDING_EXACT, noted ranges wait to be merged in until there are this many, or
#: as many as the grant's merged ranges (`Grant._settle`)
NOTED_MIN = 1024


@dataclasses.dataclass(eq=False, slots=True)
class Grant:
    inode: int
    generation: int
    #: the extents the holder may address; for the metadata server's own grants this is
    #: the inode's live map, for remote clients a snapshot
    extents: ExtentMap
    rights: Rights
    principal: PrincipalId
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    parent: Grant | None = None
    children: list[Grant] = dataclasses.field(default_factory=list)
    revoked: bool = False
    #: whether its holder is still there (None: always; the shim sets its connection's
    #: `Connection.alive`): R6's zeroing keeps only live holders' uncommitted bytes
    alive: Callable[[], bool] | None = dataclasses.field(default=None, repr=False)
    #: whether the grant is charged to its principal's kernel-object bank
    charged: bool = False
    #: opaque reference for the issuer (unused by the kernel)
    file: object = None
    #: byte ranges [start, end) written through this grant and not yet committed,
    #: sorted and merged: a commit makes exactly these part of the file. Past
    #: PENDING_EXACT ranges, ranges that meet inside one block become one
    #: (`note_written`): never more of them than blocks written through the grant
    #: (allocated to, and charged to, its principal), however many small writes a
    #: client pipelines without committing.
    #: (`written`: these with `_noted` merged in)
    _written: list[list[int]] = dataclasses.field(default_factory=list, repr=False)
    #: ranges noted once `_written` held PENDING_EXACT, not merged in yet (`_settle`):
    #: a sorted insert each into a list of ten thousand ranges (a direct client's
    #: pipelined random writes between two commits) cost more than the rest of its
    #: bookkeeping (docs/BENCHMARKS.md, "Stop 16")
    _noted: list[tuple[int, int]] = dataclasses.field(default_factory=list, repr=False)
    _noted_block: int = 1
    #: the blocks `_noted`'s ranges touch: `wrote_in` of whole blocks (every partial
    #: write's merge asks it) answers from these without merging the noted ranges in,
    #: which cost a pass over all the grant's ranges per write (probe 6, P1)
    _noted_blocks: set[int] = dataclasses.field(default_factory=set, repr=False)
    #: ranges a commit took (`take_written`) and has not finished marking written in
    #: the map (sorted, disjoint): they still count as pending for `wrote_in` and
    #: `pending_in` until it has (`committed`), so that another grant's merge of one
    #: of their blocks meanwhile reads it, not zeros (probe 6, W3)
    committing: list[tuple[int, int]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def written(self) -> list[list[int]]:
        """Byte ranges [start, end) written through this grant and not yet committed,
        sorted and merged (see `_written`)."""
        if self._noted:
            self._settle()
        return self._written

    @written.setter
    def written(self, ranges: list[list[int]]) -> None:
        self._written = ranges
        self._noted = []
        self._noted_blocks.clear()

    def note_written(self, start: int, end: int, block: int = 1) -> None:
        """[start, end) was written. `block`: the block size. Once the grant holds
        PENDING_EXACT ranges, a range that starts in the block where another ends (or
        right after it) joins it: the bytes between were written by the kernel's merge
        of a partial block (zeros for an unwritten block, its contents otherwise), and
        the commit then zeroes no bytes between them past the end of the file (R6 is
        kept exactly for the first PENDING_EXACT ranges, all an ordinary client has).
        Past PENDING_EXACT the range is merged in later, with others (`_settle`)."""
        w = self._written
        if len(w) >= PENDING_EXACT:
            noted = self._noted
            noted.append((start, end))
            self._noted_block = block
            self._noted_blocks.update(range(start // block, (end - 1) // block + 1))
            if len(noted) >= max(NOTED_MIN, len(w)):  # (bounded: at most as many as
                self._settle()                        # `_written` holds, amortised)
            return
        if self._noted:
            self._settle()
            w = self._written
        if len(w) < PENDING_EXACT:
            block = 1
        i = bisect.bisect_left(w, [start, start])
        if i > 0 and -(-w[i - 1][1] // block) * block >= start:
            i -= 1
        j = i
        while j < len(w) and w[j][0] <= -(-end // block) * block:
            start = min(start, w[j][0])
            end = max(end, w[j][1])
            j += 1
        w[i:j] = [[start, end]]

    def _settle(self) -> None:
        """Merge the noted ranges into `_written` in one pass, by `note_written`'s rule
        past PENDING_EXACT: a noted range joins a neighbour that ends in the block where
        it starts (or right before), or starts in the block where it ends; two ranges
        neither of which holds a noted one stay as they were."""
        noted = sorted(self._noted)
        self._noted = []
        self._noted_blocks.clear()
        block = self._noted_block
        old = self._written
        out: list[list[int]] = []
        last_new = False
        i = j = 0
        while i < len(old) or j < len(noted):
            # (a noted range before a merged one that starts where it does: it may
            # join the one before, as the sorted insert's bisect put it there)
            if j >= len(noted) or (i < len(old) and old[i][0] < noted[j][0]):
                s, e = old[i]
                i += 1
                new = False
            else:
                s, e = noted[j]
                j += 1
                new = True
            if out and (new or last_new) and -(-out[-1][1] // block) * block >= s:
                if e > out[-1][1]:
                    out[-1][1] = e
                last_new = True
            else:
                out.append([s, e])
                last_new = new
        self._written = out

    def wrote_in(self, start: int, end: int) -> bool:
        """Whether a pending written range meets [start, end). For a few whole blocks
        (a partial write's merge asks of one) the noted ranges are looked up by block,
        not merged in first (`_settle`: a pass over every range of the grant)."""
        if self._noted:
            blk = self._noted_block
            if start % blk or end % blk or end - start > 64 * blk:
                self._settle()
            elif any(b in self._noted_blocks for b in range(start // blk, end // blk)):
                return True
        c = self.committing
        if c:
            k = bisect.bisect_right(c, (start, start))
            if k > 0 and c[k - 1][1] > start or k < len(c) and c[k][0] < end:
                return True
        w = self._written
        i = bisect.bisect_right(w, [start, start])
        if i > 0 and w[i - 1][1] > start:
            return True
        return i < len(w) and w[i][0] < end

    def pending_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pending written ranges (those a commit is marking included) meeting
        [start, end), clipped to it."""
        out = [(max(s, start), min(e, end)) for s, e in self.committing
               if s < end and e > start]
        w = self.written
        i = bisect.bisect_right(w, [start, start])
        if i > 0:
            i -= 1
        while i < len(w) and w[i][0] < end:
            s, e = w[i]
            if e > start:
                out.append((max(s, start), min(e, end)))
            i += 1
        return out

    def pending_end(self, start: int, end: int) -> int:
        """Where the last pending written range inside [start, end) ends, clipped to
        it; 0 when there is none (what `take_written` would take, without taking)."""
        w = self.written
        i = bisect.bisect_left(w, [end, end])
        while i > 0:
            s, e = w[i - 1]
            if e <= start:
                return 0
            if s < end:
                return min(e, end)
            i -= 1
        return 0

    def take_written(self, start: int, end: int, limit: int | None = None
                     ) -> list[tuple[int, int]]:
        """The written ranges inside [start, end), clipped, in order (the first `limit`
        of them; None: all); they are no longer pending. Found by bisection, the rest
        kept by slicing: a commit of 100,000 ranges takes them a part at a time (probe
        11, F4)."""
        w = self.written
        i0 = bisect.bisect_left(w, [start, start])
        if i0 > 0 and w[i0 - 1][1] > start:
            i0 -= 1  # (the range across `start`)
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
            self.written = w[:i0] + keep + w[i:]
        return out
    #: requests past the rights check and not yet finished
    inflight: int = 0
    _drained: trio.Event | None = None
    #: of `inflight`, the writes (`GrantTable.wait_writes_drained`)
    inflight_writes: int = 0
    _writes_drained: trio.Event | None = None

    def __repr__(self) -> str:
        return (f"<Grant {self.id} ino={self.inode}.{self.generation} {self.rights!r} "
                f"principal={self.principal}{' revoked' if self.revoked else ''}>")
