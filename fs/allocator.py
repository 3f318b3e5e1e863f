"""Free-space map: a numpy bitmap of device blocks with goal-directed allocation.

The map is not stored: at mount it is rebuilt from the extents table, so a crash can
never leak a block that was allocated but not committed. Blocks freed in the current
(uncommitted) metadata transaction are held back (`pending`) until that transaction
commits, so a block freed by a change that a crash may still undo is never handed to
another file first.
"""

from __future__ import annotations

import collections
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
        #: freed blocks released without a discard (`keep`): free in the map, their
        #: host space still allocated and their old data still there; relocations take
        #: them first (no hole punch when freed, no host reservation when reused).
        #: Oldest first; a run another allocation took meanwhile is skipped.
        self._kept: collections.deque[tuple[int, int]] = collections.deque()
        #: blocks in `_kept` (some may have been taken by other allocations since)
        self.kept_blocks = 0
        #: pending or reaping runs freed by relocations (`free_later(recycle=True)`):
        #: the ones the reaper may keep (`recyclable`)
        self._recycle: set[tuple[int, int]] = set()

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
        `relocation` (copy-on-write blocks, no goal): the kept freed blocks first
        (`keep`), then from where the last relocation ended, which the other
        allocations leave alone (see `_cow_cursor`)."""
        if count <= 0:
            return []
        if count > self.free:
            raise NoSpace(f"no space left on device ({self.free} blocks free, {count} needed)")
        used = self.used
        n = self.nblocks
        if relocation and self._kept:
            got = self._take_kept(count)
            if got:
                taken = sum(c for _s, c in got)
                if taken < count:
                    got.extend(self.allocate(count - taken, relocation=True))
                return got
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

    def _take_kept(self, count: int) -> list[tuple[int, int]]:
        """Up to `count` kept blocks (oldest first), marked used; fewer if the pool
        runs out. Blocks another allocation took since they were kept are skipped."""
        used = self.used
        kept = self._kept
        runs: list[tuple[int, int]] = []
        need = count
        while need and kept:
            start, length = kept.popleft()
            self.kept_blocks -= length
            while length and need:
                if used[start]:  # (taken by another allocation since)
                    start += 1
                    length -= 1
                    continue
                rest = used[start:start + min(length, need)]
                take = int(np.argmax(rest)) if rest.any() else len(rest)
                used[start:start + take] = True
                self.free -= take
                if runs and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + take)
                else:
                    runs.append((start, take))
                start += take
                length -= take
                need -= take
            if length:
                kept.appendleft((start, length))
                self.kept_blocks += length
        return runs

    def recyclable(self, runs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]],
                                                              list[tuple[int, int]]]:
        """`runs` split into those freed by relocations (`free_later(recycle=True)`)
        and the others; the first are no longer marked."""
        if not self._recycle:
            return [], runs
        mine: list[tuple[int, int]] = []
        rest: list[tuple[int, int]] = []
        for r in runs:
            if r in self._recycle:
                self._recycle.discard(r)
                mine.append(r)
            else:
                rest.append(r)
        return mine, rest

    def keep(self, runs: list[tuple[int, int]]) -> None:
        """Release freed blocks whose contents were not discarded (the caller dropped
        every cached copy): free again at once, and the next relocations take them
        first (`allocate(relocation=True)`). Whatever else allocates them finds their
        old data there, as after a failed discard: unwritten blocks read as zeros and
        a partial write merges with zeros, so nothing of it shows."""
        self.release_now(runs)
        self._kept.extend(runs)
        self.kept_blocks += sum(c for _s, c in runs)

    def take_kept(self) -> list[tuple[int, int]]:
        """The kept runs that are still free (to be discarded: an unmount), no longer
        kept; sorted by block."""
        used = self.used
        out: list[tuple[int, int]] = []
        for start, length in sorted(self._kept):
            for b in range(start, start + length):
                if used[b]:
                    continue
                if out and out[-1][0] + out[-1][1] == b:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                elif out and out[-1][0] + out[-1][1] > b:
                    continue  # (kept twice: freed, reused and freed again)
                else:
                    out.append((b, 1))
        self._kept.clear()
        self.kept_blocks = 0
        return out

    def free_later(self, runs: list[tuple[int, int]], inodes: Iterable[int] | None = None,
                   *, recycle: bool = False) -> None:
        """Blocks freed by the open transaction: reusable once it commits. `inodes`:
        the files they were unmapped from (their grace period waits only for requests
        on those files); None: unknown (it waits for every request in flight).
        `recycle`: replaced by new blocks of the same file (a relocation), so the
        reaper may keep them for the next relocations (`recyclable`, `keep`) rather
        than give their host space back: blocks freed by a truncate or an unlink are
        always discarded."""
        if recycle:
            self._recycle.update(runs)
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
