"""Free-space map: a numpy bitmap of device blocks with goal-directed allocation.

The map is not stored: at mount it is rebuilt from the extents table, so a crash can
never leak a block that was allocated but not committed. Blocks freed in the current
(uncommitted) metadata transaction are held back (`pending`) until that transaction
commits, so a block freed by a change that a crash may still undo is never handed to
another file first.

Blocks freed by relocations may be *kept* (`keep`): not discarded, their old data still
on the device. While kept they stay used in the map and are counted apart
(`kept_blocks`), so only a relocation (`allocate(relocation=True)`, which writes every
byte of a block before the map names it) can take one: no other allocation ever finds
another tenant's old data (docs/dev/invariants.md, R3). They are free space all the
same (statfs, the free-space checks): `available`.
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from .errors import NoSpace

#: how far past the goal one numpy scan looks before moving on
_WINDOW = 1 << 16
#: allocations of at most this many blocks take free runs one at a time (each slice
#: bounded by the request); larger ones find a window's runs at once
_SMALL = 4



def _append_run(runs: list[tuple[int, int]], start: int, count: int) -> None:
    """Append [start, start + count) to `runs`, joined to the last run if it continues it."""
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((start, count))

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
        #: freed blocks kept without a discard (`keep`): used in the map (no ordinary
        #: allocation sees them), their host space still allocated and their old data
        #: still there; only relocations take them (`allocate(relocation=True)`: no
        #: hole punch when freed, no host reservation when reused). Oldest first;
        #: disjoint, and each block in it is used by no file.
        self._kept: collections.deque[tuple[int, int]] = collections.deque()
        #: blocks in `_kept`, exactly (free space all the same: `available`)
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

    @property
    def available(self) -> int:
        """Blocks free for new data: free in the map, or kept (`discard_kept` in
        fs/commit.py gives those back to the map when an allocation needs them)."""
        return self.free + self.kept_blocks

    def allocate(self, count: int, goal: int | None = None, *,
                 relocation: bool = False) -> list[tuple[int, int]]:
        """`count` blocks as runs (start, length), as few and as close to `goal` as the
        free space allows. All or nothing: NoSpace when fewer than `count` are free.
        Never a kept block (`keep`) unless `relocation` (copy-on-write blocks, no
        goal): then the kept blocks first, then from where the last relocation ended,
        which the other allocations leave alone (see `_cow_cursor`)."""
        if count <= 0:
            return []
        have = self.free + self.kept_blocks if relocation else self.free
        if count > have:
            raise NoSpace(f"no space left on device ({have} blocks free, {count} needed)")
        used = self.used
        n = self.nblocks
        if relocation and self._kept:
            got = self._take_kept(count)
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
        if count <= _SMALL:
            pos = self._take_runs(pos, count, runs)
        else:
            pos = self._take_windows(pos, count, runs)
        self.free -= count
        if relocation:
            self._cow_cursor = pos
        else:
            self._cursor = pos
        return runs

    def _take_runs(self, pos: int, need: int, runs: list[tuple[int, int]]) -> int:
        """`allocate`'s scan for a few blocks: the first free block of a window from
        `pos`, then its run (bounded by the few blocks asked for), as many times as it
        takes; the runs are appended to `runs`; returns where the scan ended."""
        used = self.used
        n = self.nblocks
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
            _append_run(runs, start, taken)
            need -= taken
            pos = start + taken
            scanned += free_idx + taken
        return pos

    def _take_windows(self, pos: int, need: int, runs: list[tuple[int, int]]) -> int:
        """`allocate`'s scan for more blocks: a window's free runs at once, in numpy
        (one Python iteration per free run, each slicing up to `need` blocks, was
        O(runs x need): 20,000 one-block free runs held the loop ~0.2 s: probe 11, F3).
        The window starts a few times the request's size and doubles up to _WINDOW
        while it does not hold enough. As `_take_runs` otherwise."""
        used = self.used
        n = self.nblocks
        scanned = 0
        span = min(_WINDOW, max(1024, 4 * need))
        while need:
            if pos >= n:
                pos = 0
            window = used[pos:pos + span]
            edges = np.flatnonzero(np.diff(window, prepend=True, append=True))
            if not len(edges):  # nothing free in this window
                span = min(_WINDOW, 2 * span)
                scanned += len(window)
                pos += len(window)
                if scanned > 2 * n:
                    raise AssertionError("allocator free count out of sync with its map")
                continue
            starts, ends = edges[0::2], edges[1::2]  # free runs [start, end) in the window
            total = np.cumsum(ends - starts)
            k = int(np.searchsorted(total, need))  # runs wholly taken: k, then a part of run k
            if k < len(starts):
                cut = int(ends[k]) - (int(total[k]) - need)  # the window's blocks taken end here
                taken = need
            else:
                k = len(starts) - 1
                cut = len(window)
                taken = int(total[-1])
                span = min(_WINDOW, 2 * span)
            window[:cut] = True  # (the used blocks before `cut` stay used)
            for a, b in zip(starts[:k + 1].tolist(), ends[:k + 1].tolist()):
                _append_run(runs, pos + a, min(b, cut) - a)
            need -= taken
            scanned += cut
            pos += cut
        return pos

    def _take_kept(self, count: int) -> list[tuple[int, int]]:
        """Up to `count` kept blocks (oldest first), no longer kept (they stay used:
        now the relocation's); fewer if the pool runs out."""
        kept = self._kept
        runs: list[tuple[int, int]] = []
        need = count
        while need and kept:
            start, length = kept.popleft()
            take = min(length, need)
            if take < length:
                kept.appendleft((start + take, length - take))
            runs.append((start, take))
            need -= take
        self.kept_blocks -= count - need
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
        """Keep freed blocks whose contents were not discarded (the caller dropped every
        cached copy) for the next relocations (`allocate(relocation=True)`), which
        alone may take them: they stay used in the map, counted in `kept_blocks`.
        `runs`: blocks no file uses (freed by a durable commit, or a relocation's
        that were never exposed: `give_back`)."""
        self._kept.extend(runs)
        self.kept_blocks += sum(c for _s, c in runs)

    def give_back(self, runs: list[tuple[int, int]]) -> None:
        """A relocation's blocks it did not use (`allocate(relocation=True)`; its write
        failed or must be done again): kept for the next relocations rather than freed,
        as some may be kept blocks still holding another file's data, and others may
        hold part of this write."""
        self.keep(runs)

    def take_kept(self) -> list[tuple[int, int]]:
        """The kept runs (to be discarded: an unmount, or space for new data), no
        longer kept but still used in the map (the caller releases them: `release_now`,
        once nothing can read their old data); sorted by block."""
        out = sorted(self._kept)
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
