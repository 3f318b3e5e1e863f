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
from .ranges import RangeList


class Rights(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    RW = READ | WRITE


_ids = itertools.count(1)

#: pending written ranges a grant keeps byte-exact (`Grant.note_written`); past this,
#: ranges coalesce per block
PENDING_EXACT = 4096

#: pending written ranges of all of one tenant's live grants together (`GrantTable`'s
#: meters: a tenant is the principal tree below a top-most principal such as `uid-N`,
#: so child principals share it): a direct client's write that would note more gets
#: TooManyObjects until it commits. Each costs the daemon ~150 bytes, and a grant may
#: hold as many as the blocks written through it, on up to 4,096 grants on the same
#: blocks: unbounded by any bank before (probe 16, F5). 262,144 is 1 GiB of
#: scattered 4 KiB writes kept uncommitted, ~40 MB of the daemon's memory.
PENDING_RANGES = 1 << 18


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
    #: the holder's callback when the grant is revoked under it (not when the holder
    #: releases it): the shim pushes a "revoked" notification to its client
    #: (`GrantTable.revoke_nowait`; it must not raise nor wait)
    on_revoke: Callable[[Grant], None] | None = dataclasses.field(default=None, repr=False)
    #: opaque reference for the issuer (unused by the kernel)
    file: object = None
    #: byte ranges [start, end) written through this grant and not yet committed,
    #: sorted and merged: a commit makes exactly these part of the file. Past
    #: PENDING_EXACT ranges, ranges that meet inside one block become one
    #: (`note_written`): never more of them than blocks written through the grant
    #: (allocated to, and charged to, its principal), however many small writes a
    #: client pipelines without committing. Kept in chunks (`RangeList`): noting,
    #: finding and taking ranges cost the same at 100,000 ranges as at ten (probe 11,
    #: F4: a pass over all of them was one step of the loop)
    _written: RangeList = dataclasses.field(default_factory=RangeList, repr=False)
    #: ranges a commit took (`take_written`) and has not finished marking written in
    #: the map (sorted, disjoint): they still count as pending for `wrote_in` and
    #: `pending_in` until it has (`committed`), so that another grant's merge of one
    #: of their blocks meanwhile reads it, not zeros (probe 6, W3)
    committing: list[tuple[int, int]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def written(self) -> list[list[int]]:
        """Byte ranges [start, end) written through this grant and not yet committed,
        sorted and merged (see `_written`): a copy, for tests and reports."""
        return self._written.flat()

    @written.setter
    def written(self, ranges: list[list[int]]) -> None:
        meter = self._written.meter
        self._written.clear()
        self._written = RangeList(ranges, meter)

    def stop_counting(self) -> None:
        """The grant is revoked: its pending written ranges leave its tenant's meter
        (`GrantTable.check_pending`). They stay: a commit in parts that a revoke
        (a chmod, an unlink) met between two parts goes on with them, as before the
        meter (review of stop 25, 13); and a revoked grant notes no more."""
        w = self._written
        if w.meter is not None:
            w.meter.n -= len(w)
            w.meter = None

    def note_written(self, start: int, end: int, block: int = 1) -> None:
        """[start, end) was written. `block`: the block size. Once the grant holds
        PENDING_EXACT ranges, a range that starts in the block where another ends (or
        right after it) joins it: the bytes between were written by the kernel's merge
        of a partial block (zeros for an unwritten block, its contents otherwise), and
        the commit then zeroes no bytes between them past the end of the file (R6 is
        kept exactly for the first PENDING_EXACT ranges, all an ordinary client has)."""
        w = self._written
        w.add(start, end, block if len(w) >= PENDING_EXACT else 1)

    def wrote_in(self, start: int, end: int) -> bool:
        """Whether a pending written range meets [start, end)."""
        c = self.committing
        if c:
            k = bisect.bisect_right(c, (start, start))
            if k > 0 and c[k - 1][1] > start or k < len(c) and c[k][0] < end:
                return True
        return self._written.meets(start, end)

    def pending_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pending written ranges (those a commit is marking included) meeting
        [start, end), clipped to it."""
        out = [(max(s, start), min(e, end)) for s, e in self.committing
               if s < end and e > start]
        out.extend(self._written.within(start, end))
        return out

    def pending_end(self, start: int, end: int) -> int:
        """Where the last pending written range inside [start, end) ends, clipped to
        it; 0 when there is none (what `take_written` would take, without taking)."""
        return self._written.last_end(start, end)

    def take_written(self, start: int, end: int, limit: int | None = None
                     ) -> list[tuple[int, int]]:
        """The written ranges inside [start, end), clipped, in order (the first `limit`
        of them; None: all); they are no longer pending. A commit of 100,000 ranges
        takes them a part at a time (probe 11, F4)."""
        return self._written.take(start, end, limit)

    #: requests past the rights check and not yet finished
    inflight: int = 0
    _drained: trio.Event | None = None
    #: of `inflight`, the writes (`GrantTable.wait_writes_drained`)
    inflight_writes: int = 0
    _writes_drained: trio.Event | None = None

    def __repr__(self) -> str:
        return (f"<Grant {self.id} ino={self.inode}.{self.generation} {self.rights!r} "
                f"principal={self.principal}{' revoked' if self.revoked else ''}>")
