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
    written: list[list[int]] = dataclasses.field(default_factory=list)

    def note_written(self, start: int, end: int, block: int = 1) -> None:
        """[start, end) was written. `block`: the block size. Once the grant holds
        PENDING_EXACT ranges, a range that starts in the block where another ends (or
        right after it) joins it: the bytes between were written by the kernel's merge
        of a partial block (zeros for an unwritten block, its contents otherwise), and
        the commit then zeroes no bytes between them past the end of the file (R6 is
        kept exactly for the first PENDING_EXACT ranges, all an ordinary client has)."""
        w = self.written
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

    def wrote_in(self, start: int, end: int) -> bool:
        """Whether a pending written range meets [start, end)."""
        w = self.written
        i = bisect.bisect_right(w, [start, start])
        if i > 0 and w[i - 1][1] > start:
            return True
        return i < len(w) and w[i][0] < end

    def take_written(self, start: int, end: int) -> list[tuple[int, int]]:
        """The written ranges inside [start, end), clipped; they are no longer pending."""
        out: list[tuple[int, int]] = []
        keep: list[list[int]] = []
        for s, e in self.written:
            if e <= start or s >= end:
                keep.append([s, e])
                continue
            out.append((max(s, start), min(e, end)))
            if s < start:
                keep.append([s, start])
            if e > end:
                keep.append([end, e])
        self.written = keep
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
