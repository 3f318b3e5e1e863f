"""What the shim needs from the metadata server, as an interface passed in.

kernelshim sits below fs and may not import it; the metadata server hands the shim's
socket server an object with these methods (layout get / commit / revoke are the
control path of DESIGN.md). Data requests never reach it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Iterator, Protocol

from .grants import Grant
from .principals import Principal


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """A peer's identity as the kernel reported it (SO_PEERCRED), never as claimed."""

    pid: int
    uid: int
    gid: int
    #: the peer's supplementary groups when it connected (SO_PEERGROUPS; None: not
    #: known, e.g. a test's hand-made Credentials)
    groups: frozenset[int] | None = None
    #: the connecting process's start time (/proc/PID/stat, clock ticks; -1: it had
    #: exited before the daemon looked): a later process with the same pid is not it
    start_time: int = -1


class MetadataService(Protocol):
    async def open_path(self, path: str, flags: int, mode: int, creds: Credentials,
                        principal: Principal) -> Grant:
        """Resolve `path` (relative to the volume root), check permissions for `creds`
        as the kernel would, create it for O_CREAT (EEXIST for O_EXCL), truncate it for
        O_TRUNC, and grant access."""

    async def layout_get(self, grant: Grant, offset: int, length: int) -> int:
        """Allocate unwritten extents for the holes in the range, charged to the grant's
        principal; returns the number of blocks allocated."""

    async def write_relocating(self, grant: Grant, offset: int, data: memoryview) -> int:
        """Write `data` at `offset` where the range covers committed (sealed) blocks:
        they are relocated to fresh ones holding the new data (copy-on-write), not
        committed. NotAllocated for holes in the range. Returns len(data)."""

    async def write_relocating_many(self, grant: Grant,
                                    writes: list[tuple[int, memoryview]]) -> bool:
        """A burst of whole-block writes (offset, data) over committed blocks, on
        distinct blocks, relocated together (one allocation, one kernel write): each
        as `write_relocating` would have made it. False, with nothing done, if one of
        them is not whole blocks over committed ones; on an error nothing is done
        either, so the caller may serve them one by one for their own results."""

    async def layout_commit(self, grant: Grant, offset: int, length: int) -> int:
        """The range was written: its extents become written, size and mtime update.
        Returns the new size."""

    async def append(self, grant: Grant, data: memoryview) -> tuple[int, int]:
        """O_APPEND: write `data` at the end of the file and commit it, atomically with
        respect to every other append and write of the file. Returns (offset, new size)."""

    async def truncate(self, grant: Grant, size: int) -> None: ...

    async def before_direct_change(self, grant: Grant) -> None:
        """Called before a direct client's write, append or truncate of the file lands:
        what the host kernel caches of the file that is newer than the store (dirty
        pages of a mapping through the mount) is written back first."""

    def size_of(self, grant: Grant) -> int: ...

    def stat_of(self, grant: Grant) -> dict[str, Any]: ...

    async def fsync(self, grant: Grant) -> None: ...

    async def close(self, grant: Grant) -> None:
        """The client is done with the grant (trims unused preallocation)."""

    def statistics(self, *, names: Collection[str] | None = None) -> dict[str, Any]:
        """What `sluice stats` shows: device-wide totals, and per-principal rows for the
        principals in `names` only (None: all)."""

    def statistics_parts(self, *, names: Collection[str] | None = None,
                         context: Collection[str] = (), by_kind: bool = True
                         ) -> Iterator[tuple[str, Any]]:
        """`statistics`' items, one part of the work at a time, building only the rows
        of `names`: the shim server lets other principals run between two parts. The
        principals named in `context` (listed to a tenant only as ancestors of its own,
        PrincipalTable.context_only) get their `principals` row with usage only
        against the banks they limit, and no rows of activity (I/O, cache). Without
        `by_kind` (a caller other than root) the volume's FUSE requests are a total."""

    async def move_storage(self, src: Principal, dst: Principal, *,
                           by: Principal) -> None:
        """Re-tag everything charged to `src` as charged to `dst`, durably before it
        returns; the I/O it makes is `by`'s (the caller's principal)."""
