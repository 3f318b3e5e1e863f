"""Free-space map: a numpy bitmap of device blocks with goal-directed allocation.

The map is not stored: at mount it is rebuilt from the extents table, so a crash can
never leak a block that was allocated but not committed. Blocks freed in the current
(uncommitted) metadata transaction are held back (`pending`) until that transaction
commits, so a block freed by a change that a crash may still undo is never handed to
another file first.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import NoSpace

#: how far past the goal one numpy scan looks before moving on
_WINDOW = 1 << 16


class Allocator:
    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.used = np.zeros(nblocks, dtype=np.bool_)
        self.free = nblocks
        self._cursor = 0
        # where the last relocation ended (`allocate(relocation=True)`; None: none yet).
        # Its own, not `_cursor`: a relocation from the cursor took the block a file
        # growing at the same time continues into, so that file got one extent per
        # write, interleaved block by block with the relocations (review of direct4, A2).
        # It starts half the device away from the cursor: the relocations lay their
        # blocks one after another in a region of their own.
        self._cow_cursor: int | None = None
        self._pending: list[tuple[int, int]] = []
        #: the pending runs by the file they came from (None: unknown, see `free_later`)
        self._pending_by_file: dict[int | None, list[tuple[int, int]]] = {}

    def mark_used(self, start: int, count: int) -> None:
        """At mount: a committed extent owns these blocks."""
        if self.used[start:start + count].any():
            raise ValueError(f"blocks {start}+{count} are owned twice")
        self.used[start:start + count] = True
        self.free -= count

    def allocate(self, count: int, goal: int | None = None, *,
                 relocation: bool = False) -> list[tuple[int, int]]:
        """`count` blocks as runs (start, length), as few and as close to `goal` as the
        free space allows. All or nothing: NoSpace when fewer than `count` are free.
        `relocation` (copy-on-write blocks, no goal): from where the last relocation
        ended, which the other allocations leave alone (see `_cow_cursor`)."""
        if count <= 0:
            return []
        if count > self.free:
            raise NoSpace(f"no space left on device ({self.free} blocks free, {count} needed)")
        used = self.used
        n = self.nblocks
        if relocation:
            if self._cow_cursor is None:
                self._cow_cursor = (self._cursor + n // 2) % n
            pos = self._cow_cursor
        else:
            pos = self._cursor if goal is None or not 0 <= goal < n else goal
        if pos + count <= n:
            run = used[pos:pos + count]
            if b"\x01" not in run.tobytes():
                # The goal's run is free: a file growing sequentially (a bytes search,
                # not the window scan below: a third of the cost of a 1 MiB write's
                # allocation).
                run[:] = True
                self.free -= count
                if relocation:
                    self._cow_cursor = pos + count
                else:
                    self._cursor = pos + count
                return [(pos, count)]
        runs: list[tuple[int, int]] = []
        need = count
        scanned = 0
        while need:
            if pos >= n:
                pos = 0
            window = used[pos:pos + _WINDOW]
            free_idx = int(np.argmin(window))
            if window[free_idx]:  # nothing free in this window
                scanned += len(window)
                pos += len(window)
                if scanned > 2 * n:
                    raise AssertionError("allocator free count out of sync with its map")
                continue
            start = pos + free_idx
            rest = used[start:start + need]
            taken = int(np.argmax(rest)) if rest.any() else len(rest)
            used[start:start + taken] = True
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + taken)
            else:
                runs.append((start, taken))
            need -= taken
            pos = start + taken
            scanned += free_idx + taken
        self.free -= count
        if relocation:
            self._cow_cursor = pos
        else:
            self._cursor = pos
        return runs

    def free_later(self, runs: list[tuple[int, int]], inodes: Iterable[int] | None = None
                   ) -> None:
        """Blocks freed by the open transaction: reusable once it commits. `inodes`:
        the files they were unmapped from (their grace period waits only for requests
        on those files); None: unknown (it waits for every request in flight)."""
        if runs:
            self._pending.extend(runs)
            files = list(inodes) if inodes is not None else [None]
            # (runs of several files at once: one group, under the first of them,
            # waiting for all — see `take_pending_groups`)
            key = files[0] if len(files) == 1 else None
            self._pending_by_file.setdefault(key, []).extend(runs)

    def release_now(self, runs: list[tuple[int, int]]) -> None:
        """Give blocks back at once (allocated and never committed)."""
        for start, count in runs:
            self.used[start:start + count] = False
            self.free += count

    def take_pending(self) -> list[tuple[int, int]]:
        """The runs freed by the transaction now committing (they stay allocated until
        `release_now`, once that commit is durable)."""
        pending, self._pending = self._pending, []
        return pending

    def take_pending_groups(self) -> list[tuple[list[tuple[int, int]], int | None]]:
        """The runs `take_pending` took, by the file they were freed from (None: not
        known, or several); taken with it."""
        groups, self._pending_by_file = self._pending_by_file, {}
        return [(runs, ino) for ino, runs in groups.items()]

    def committed(self) -> None:
        """The transaction that freed the pending blocks is durable: reuse them."""
        if self._pending:
            self.release_now(self.take_pending())
            self.take_pending_groups()

    @property
    def pending_blocks(self) -> int:
        return sum(c for _, c in self._pending)
