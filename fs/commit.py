# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Transactions and failure: commit (barrier, seal, durable, discard freed blocks),
sync, the batched committer, turning read-only on a failure or a read-only mount, and
the crash cleanup of a read-write mount (`_recover`)."""

from __future__ import annotations

import collections
import json
import logging
import sqlite3
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Callable

import trio

from kernelshim import ExtentMap, PrincipalId, ROOT_PRINCIPAL, Rights, SluiceError
from kernelshim.extents import blocks_to_cover
from kernelshim.kernel import PREFLUSH_ROUNDS

from .errors import Damaged, ReadOnly, WriteFailed
from .metadata import ChangeMarks

if TYPE_CHECKING:
    from .filesystem import FileSystem
    from .inodes import Inode

log = logging.getLogger(__name__)


#: the meta key listing the files a crash may leave partial (see `commit`)
UNFLUSHED_KEY = "unflushed"

#: seconds between two durable commits `wait_durable` makes itself (volume-wide: a
#: principal's storage re-tag waits at most about this long for one it shares with
#: every re-tag waiting then, unless an fsync's durable commit comes first)
FORCED_DURABLE_INTERVAL = 1.0

#: blocks freed by relocations that the reaper keeps host-backed for the next
#: relocations, at most (bytes;
#: `Allocator.keep`): released with their frames dropped but no hole punch, so that a
#: stream of overwrites reuses the blocks the last commits freed with no punch when
#: freed and no host reservation when reused (docs/BENCHMARKS.md, "Stop 16"). What
#: is past it is discarded as before. Host space the volume counts as free, at most
#: this much; an unmount discards what is left (`discard_kept`).
KEEP_FREED_BYTES = 32 << 20


#: freed runs the reaper discards and releases in one step of the loop (probe 11, F2:
#: the 50,000 runs of one file's unlink held every tenant 0.2-0.3 s)
REAP_RUNS_PER_STEP = 256


class _Freed:
    """Blocks one commit freed from one file, on their way to the allocator
    (`_reap_queued`): the runs, the file while it may still have older requests in
    flight (None: not known, any file), and the grace period's mark."""

    __slots__ = ("runs", "busy", "mark")

    def __init__(self, runs: list[tuple[int, int]], ino: int | None, mark: int) -> None:
        self.runs = runs
        self.busy: set[int] | None = None if ino is None else {ino}
        self.mark = mark


class Transactions:
    """Commit, read-only and recovery (a `FileSystem` concern; see filesystem.py).

    State it owns: the commit lock, the extent maps to seal at the next commit, the
    read-only reason, the write-error count, and what recovery and the unflushed list
    have done."""

    _commit_lock: trio.Lock
    #: durable commits (fsyncs) waiting for `_commit_lock`: the periodic commit that
    #: holds it starts no more pre-flush rounds (`Kernel.barrier`, stop_preflush)
    _durable_waiting: int
    #: extent maps that may hold FRESH extents: sealed by the next commit
    _unsealed: set[ExtentMap]
    #: why the volume is read-only (a read-only mount, or a failure), or None
    read_only: str | None
    #: failed barriers/commits so far; each open handle reports a new one once
    write_errors: int
    #: blocks freed by durable commits, waiting for their grace period and discard
    #: before the allocator gets them (`run_reaper`; oldest first), and how many
    _reap: collections.deque[_Freed]
    reaping_blocks: int
    #: kept freed blocks `discard_kept` took from the allocator and is discarding
    #: (free space, as the kept blocks are: statfs)
    discarding_kept: int
    _reap_wakeup: trio.Event
    _reap_lot: trio.lowlevel.ParkingLot
    _reap_lock: trio.Lock
    #: the reaper discards what it releases (False after `settle_reaper` gave up)
    discard_freed: bool
    _reaper_running: bool
    #: whether the crash cleanup of load() is done (a read-only mount skips it)
    _recovered: bool
    #: the file list last saved under UNFLUSHED_KEY
    _unflushed_saved: frozenset[int]
    #: commits that took their changes so far (the n-th holds every change made
    #: before its SQL COMMIT), and the highest n made durable (which makes every
    #: earlier one durable too: the WAL fsync covers them)
    _commit_seq: int
    _durable_seq: int
    #: set (and replaced) at the end of every commit, durable or not, or failed
    _commit_ended: trio.Event
    #: when `wait_durable` last made a durable commit itself (trio clock), and
    #: whether one it makes is running
    _forced_at: float
    _forcing: bool

    @property
    def recovered(self: FileSystem) -> bool:
        """Whether the crash cleanup is done: false while mounted read-only from the
        start (the volume is left as the crash left it)."""
        return self._recovered

    def _listed_files(self: FileSystem, listed: list[int]) -> list[Inode]:
        """The regular files with a name among the inodes of the unflushed list."""
        out = []
        for ino in listed:
            try:
                node = self.inode(ino)
            except SluiceError:
                continue
            if node.is_reg and node.nlink:
                out.append(node)
        return out

    def serve_listed_empty(self: FileSystem) -> None:
        """A read-only mount: the files the last commit listed as unflushed read as the
        crash cleanup would leave them — empty — in memory only (discarded: size 0, no
        data, through the mount and the direct path), since their blocks may hold
        zeros or a kept block's previous owner's bytes (hostile probe 13, F1). A
        remount read-write empties and marks them (`_recover`)."""
        listed = unflushed_list(self.md.meta(UNFLUSHED_KEY)) or []
        self._unflushed_saved = frozenset(listed)
        self.discarded.update(n.id for n in self._listed_files(listed))

    async def _recover(self: FileSystem) -> None:
        """What a crash left: orphans and uncommitted write layouts (at the first
        read-write mount or remount)."""
        fs, md = self, self.md
        fs._recovered = True
        # Inodes unlinked while open when the daemon last stopped: free them now.
        for ino in md.orphans():
            try:
                node = fs.inode(ino)
            except Damaged as exc:  # (its row makes no sense: left for fsck)
                log.error("orphaned inode %d not removed: %s", ino, exc)
                continue
            log.info("removing orphaned inode %d (unlinked while open at last shutdown)", ino)
            await fs._destroy(node)
        # Discardable files a crash may have caught with data not on the device (the
        # last commit recorded them): a cache by contract, they come back empty and
        # marked, never partial (docs/dev/invariants.md, crash rule 4).
        listed = unflushed_list(md.meta(UNFLUSHED_KEY))
        if listed is None:
            # (damaged or crafted: which discardable files a crash caught is unknown, so
            # none is emptied; a file it named may show what survived of its data)
            log.error("%s: the %r list is not a list of inode numbers: ignored (run "
                      "sluice fsck)", md.path, UNFLUSHED_KEY)
            listed = []
        # What is stored: the next commit replaces it (with what is unflushed then).
        fs._unflushed_saved = frozenset(listed)
        # Every one is discarded until emptied and marked (`_empty_locked`), all of them
        # before the first is emptied: a commit meanwhile (a remount read-write runs
        # this with the timer commit going) keeps those not yet done on the list (R7;
        # hostile probe 13, F2), and they read as empty, and are emptied before any
        # write lands in them (`_undiscard_locked`).
        todo = fs._listed_files(listed)
        fs.discarded.update(n.id for n in todo)
        for node in todo:
            log.info("inode %d: emptied (a discardable file whose data was not on the "
                     "device at the crash)", node.id)
            async with fs._lock(node):
                if node.id in fs.discarded:  # (not emptied meanwhile by a write)
                    await fs._empty_locked(node, mark=True)
        # Blocks past EOF: write layouts a direct client never committed before the
        # daemon stopped (its close would have trimmed them), a KEEP_SIZE
        # preallocation of a file open at the crash, or the rest of a truncate of many
        # extents cut short between its parts (R4: the new size was saved first).
        for ino in md.inodes_with_blocks_past_eof(fs.block_size):
            try:
                node = fs.inode(ino)
                emap = fs._extents(node)
            except Damaged as exc:  # damaged row or extents: reads of it fail; fsck repairs
                log.warning("%s", exc)
                continue
            freed = emap.remove_owned(blocks_to_cover(node.size, fs.block_size))
            log.info("inode %d: dropping %d blocks past its end (an uncommitted write layout, "
                     "a preallocation or a truncate cut short)", ino, sum(c for _d, c, _o in freed))
            node.blocks = emap.blocks
            fs._save_extents(node)
            fs._save(node, "blocks")
            await fs._release_unmapped(freed, [], ino=node.id)  # no grants yet: none to revoke
        await fs.commit()

    async def commit(self: FileSystem, *, durable: bool = False,
                     principal: PrincipalId = ROOT_PRINCIPAL, file: int | None = None,
                     preflush_rounds: int = 1) -> None:
        """End the metadata transaction (docs/dev/invariants.md, "Crash rules"):

        1. inside a device barrier (writes held back, everything written made durable),
           commit the transaction and seal the extents it exposes (FRESH -> WRITTEN:
           never written in place again);
        2. if it freed blocks (or `durable`), make the commit durable (fsync the WAL);
        3. wait until no request that could still address the freed blocks is in flight,
           then discard them and hand them to the allocator — in the reaper task
           (`run_reaper`) while it runs, so that a commit (an fsync) never waits for
           others' requests in flight: a tenant's reads held by its own I/O limit
           held every tenant's fsync for minutes (hostile probe 3, F6).

        `principal`: who asked (an fsync's caller; root for the batched committer and
        unmount): the barrier's device flush, and the write-back of `file`'s dirty
        frames it makes (the fsync'd file), are its I/O, charged to it.

        `preflush_rounds`: how many device flushes the barrier may make before it holds
        writes back (`Kernel.barrier`): 1 for every commit a caller waits on; the
        periodic commit asks for PREFLUSH_ROUNDS, and stops them as soon as a durable
        commit waits behind it for the lock."""
        # (file hints a request left to apply, should one not have waited for them)
        await self.kernel.settle_hints()
        async with self._commit_locked(durable):
            if self.write_errors:
                return  # failed: nothing more is committed (fsync reports the failure)
            if durable and file is not None and not self.needs_sync(file):
                # Group commit: the commit this fsync waited for made its file durable
                # (a commit is global). Eight fsyncs at once were eight barriers and
                # WAL fsyncs in a row, and a storm of them made every other tenant's
                # fsync wait for each (probe 20, F1).
                self.grouped_fsyncs += 1
                return
            # The change marks of what this commit holds (Metadata.take_changes), taken
            # in the same step as the SQL commit: cleared only if it becomes durable.
            taken: ChangeMarks | None = None
            pending: list[tuple[int, int]] = []
            groups: list[tuple[list[tuple[int, int]], int | None]] = []
            try:
                async with self.kernel.barrier(
                        principal=principal, file=file, durable=durable,
                        preflush_rounds=preflush_rounds,
                        stop_preflush=lambda: self._durable_waiting > 0):
                    if self.write_errors:
                        # The volume failed while the barrier flushed (a setxattr whose
                        # transaction SQLite lost, the mount flags): `fail` rolled back
                        # what this commit was to hold, and nothing is committed after
                        # a failure — committing the rest and counting it durable let
                        # an fsync succeed for changes no durable state holds (review
                        # of probe5fix, V4).
                        raise WriteFailed(f"the volume failed ({self.read_only}): "
                                          "nothing more is committed")
                    self._save_unflushed()
                    taken = self.md.take_changes()
                    self.md.commit()
                    self.transaction_ended()  # (Xattrs.xattr_room, .metadata_room)
                    self._commit_seq += 1
                    seq = self._commit_seq
                    pending = self.alloc.take_pending()
                    groups = self.alloc.take_pending_groups()
                    # (counted free meanwhile, as they were while pending: statfs)
                    self.reaping_blocks += sum(c for _d, c in pending)
                    for emap in self._unsealed:
                        emap.seal()
                    self._unsealed.clear()
                made_durable = False
                if durable or pending:
                    await trio.to_thread.run_sync(self.md.make_durable)
                    made_durable = True
                    self._durable_seq = max(self._durable_seq, seq)
                if taken is not None:
                    # committed but not durable: still marked (a power loss may lose it)
                    self.md.settle_changes(taken, durable=made_durable)
            except BaseException as exc:
                if taken is not None:
                    self.md.settle_changes(taken, durable=False)
                if pending:
                    # not known durable: they wait for the next commit that is
                    self.reaping_blocks -= sum(c for _d, c in pending)
                    for runs, ino in groups:
                        self.alloc.free_later(runs, None if ino is None else (ino,))
                if isinstance(exc, (OSError, sqlite3.Error, SluiceError)):
                    if not (taken is None and self.write_errors):
                        self.fail(f"committing metadata failed: {exc}")
                    # (else it failed already, before this commit held anything: V4)
                    if isinstance(exc, WriteFailed):
                        raise
                    raise WriteFailed(f"commit failed: {exc}") from exc
                raise
            finally:
                self._commit_ended.set()
                self._commit_ended = trio.Event()
            if pending:
                mark = self.kernel.grace_mark()
                for runs, ino in groups:  # each file's blocks go when it is quiet
                    self._reap.append(_Freed(runs, ino, mark))
                self.kernel.poke()  # (a reaper waiting for other lists: this may be quiet)
                if self._reaper_running:
                    self._reap_wakeup.set()
                else:  # offline, or unmounting: here and now
                    await self._reap_queued()

    @asynccontextmanager
    async def _commit_locked(self: FileSystem, durable: bool) -> AsyncIterator[None]:
        """`_commit_lock`, a durable commit counted in `_durable_waiting` while it
        waits for it."""
        self._durable_waiting += durable
        try:
            await self._commit_lock.acquire()
        finally:
            self._durable_waiting -= durable
        try:
            yield
        finally:
            self._commit_lock.release()

    async def _reap_queued(self: FileSystem) -> None:
        """Give the allocator the queued freed blocks (R3): each list once no request
        that began before it was queued (after its commit, so after the blocks were
        unmapped) is in flight on the files it was freed from — discard them, release
        them. (Only a request on that file could address them: no block belongs to two
        files.) Each list goes on its own, whatever the others wait for: a tenant's
        requests held in flight on its own files hold up only the blocks freed from
        those files. A list leaves the queue only with its release, in one step:
        cancelled before that, it is done again (a discard twice is harmless before the
        release; one caller at a time: the lock). At most REAP_RUNS_PER_STEP runs are
        discarded and released a step; the runs of a longer list go in several, each
        leaving the list with its release."""
        async with self._reap_lock:
            while self._reap:
                ready = [f for f in self._reap
                         if self.kernel.quiet_since(f.busy, f.mark)]
                if not ready:
                    watch: set[int] = set()
                    for f in self._reap:
                        if f.busy is not None:
                            watch |= f.busy
                    await self.kernel.wait_grace_change(watch)
                    continue
                # At most REAP_RUNS_PER_STEP runs a step of the loop, from the lists
                # in queue order (a file of 50,000 extents freed its runs in one step
                # of 0.2-0.3 s, discard and release: probe 11, F2); a list is cut, the
                # rest of it left queued for the next round.
                runs: list[tuple[int, int]] = []
                taken: list[tuple[_Freed, int]] = []
                for f in ready:
                    n = min(len(f.runs), REAP_RUNS_PER_STEP - len(runs))
                    runs += f.runs[:n]
                    taken.append((f, n))
                    if len(runs) >= REAP_RUNS_PER_STEP:
                        break
                blocks = sum(c for _d, c in runs)
                # Blocks relocations freed, up to KEEP_FREED_BYTES, stay host-backed for
                # the next relocations (their frames dropped, no hole punch); the rest
                # are discarded.
                keep, runs = self.alloc.recyclable(runs)
                room = (KEEP_FREED_BYTES // self.block_size - self.alloc.kept_blocks
                        if self.discard_freed else 0)
                k = 0
                while k < len(keep) and room >= keep[k][1]:
                    room -= keep[k][1]
                    k += 1
                keep, runs = keep[:k], keep[k:] + runs
                try:
                    if keep:
                        await self.kernel.forget(keep, principal=ROOT_PRINCIPAL)
                    if self.discard_freed and runs:  # (else see `settle_reaper`)
                        await self.kernel.discard(runs, principal=ROOT_PRINCIPAL)
                except SluiceError as exc:
                    # The blocks keep their old data: reusing them leaks nothing (a new
                    # owner's unwritten blocks read as zeros, its partial writes merge
                    # with zeros), only the host's space is not given back.
                    log.warning("discarding %d freed blocks failed: %s",
                                sum(c for _d, c in runs), exc)
                for f, n in taken:
                    if n < len(f.runs):
                        f.runs = f.runs[n:]
                    else:
                        self._reap.remove(f)
                self.reaping_blocks -= blocks
                if runs:
                    if not self.discard_freed:
                        self.kernel.released_unforgotten(runs)
                    self.alloc.release_now(runs)
                if keep:
                    self.alloc.keep(keep)
                self._reap_lot.unpark_all()
                if self._reap:
                    await trio.lowlevel.checkpoint()

    async def discard_kept(self: FileSystem) -> int:
        """Discard the freed blocks the reaper kept host-backed (`KEEP_FREED_BYTES`)
        that no relocation has reused, and release them into the allocator's map:
        before an unmount or a remount read-only, so that the host gets its space back
        and `sluice fsck` finds no block holding data that no extent owns (after a
        crash the map is rebuilt from the extents, the kept blocks are simply free, and
        the mount scrubs them: `scrub_stale_blocks`); when a host reservation for new
        data finds the host full (`_reserve_host_space`: a punch would have given their
        space back); and when an ordinary allocation needs them (`_ensure_free`: only
        relocations take kept blocks). Released undiscarded when the reaper no longer
        discards (`settle_reaper`) or the discard fails: they are then as after a failed
        discard. Returns the blocks discarded.

        They stay used in the map until the discard is over (`Allocator.take_kept`):
        mounted, another allocation may run while the punch waits for the host, and
        must not take a block the punch then zeroes under its data (review of direct5,
        K1)."""
        runs = self.alloc.take_kept()
        if not runs:
            return 0
        self.discarding_kept += sum(c for _d, c in runs)
        try:
            if not self.discard_freed:
                return 0
            try:
                await self.kernel.discard(runs, principal=ROOT_PRINCIPAL)
            except SluiceError as exc:
                log.warning("discarding %d kept freed blocks failed: %s",
                            sum(c for _d, c in runs), exc)
                return 0
        finally:
            self.alloc.release_now(runs)
            self.discarding_kept -= sum(c for _d, c in runs)
        return sum(c for _d, c in runs)

    async def run_reaper(self: FileSystem, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand the blocks freed by durable commits to the allocator, in the background
        (see `commit`, step 3). Cancelled at unmount: what is left is done by the final
        sync."""
        self._reaper_running = True
        task_status.started()
        try:
            while True:
                while not self._reap:
                    self._reap_wakeup = trio.Event()
                    await self._reap_wakeup.wait()
                await self._reap_queued()
        finally:
            self._reaper_running = False

    async def settle_reaper(self: FileSystem, seconds: float) -> None:
        """Before the volume is left to others (a remount read-only, a failed volume):
        let the reaper finish its discards, for up to `seconds` (a request held in
        flight holds the grace period: probe 3, F6). Past that it releases without
        discarding: nothing is written after this returns, and fsck may count those
        blocks as leaked (its repair discards them; a remount read-write scrubs them)."""
        with trio.move_on_after(seconds):
            await self.wait_reaped()
            await self.discard_kept()
        if self._reap:
            log.warning("%d freed blocks wait for requests in flight: left undiscarded "
                        "(sluice fsck may call them leaked; a remount read-write or fsck "
                        "--repair discards them)", self.reaping_blocks)
            self.discard_freed = False

    async def wait_reaped(self: FileSystem, enough: Callable[[], bool] | None = None) -> None:
        """Wait until the blocks freed by durable commits so far are the allocator's, or
        until `enough()` says there is room (a writer short of space: this may wait for
        others' requests in flight, R3's grace period)."""
        if not self._reaper_running:
            await self._reap_queued()
            return
        while self._reap and not (enough is not None and enough()):
            await self._reap_lot.park()

    def _save_unflushed(self: FileSystem) -> None:
        """Record, in the transaction being committed, the files whose data the
        barrier did not put on the device: discardable files with dirty frames (the
        pager writes those only on their own fsync) and files discarded but not yet
        emptied. A crash that keeps this commit brings them back empty (`_recover`);
        every other file's data is on the device before the commit (R2)."""
        now = frozenset(self.kernel.unflushed_files | self.discarded)
        if now != self._unflushed_saved:
            self.md.set_meta(UNFLUSHED_KEY, json.dumps(sorted(now)))
            self._unflushed_saved = now

    async def sync(self: FileSystem, *, final: bool = False,
                   principal: PrincipalId = ROOT_PRINCIPAL, file: int | None = None) -> None:
        """Make all data and metadata durable (fsync; with `final`, unmount: then the
        discardable files' dirty frames are written back too, so that a clean unmount
        leaves no file whose committed blocks lack their data — the list of such files
        is for crashes, and `sluice fsck` of a cleanly unmounted volume must find every
        committed block's data). `principal` asked for it (`file`: the fsync'd
        file, whose frames it pays for; see `commit`)."""
        if final and self.read_only is None and not self.write_errors:
            for ino in sorted(self.kernel.dirty_discardable_files()):
                try:
                    # (debt-paced frames expedited: the daemon is stopping, and this
                    # is shielded — at their dirtiers' limits it held SIGTERM for
                    # minutes: review of pager7, P5)
                    await self.kernel.writeback_file(ino, pace=False)
                except SluiceError as exc:
                    log.warning("writing back discardable inode %d at unmount failed: %s",
                                ino, exc)
        await self.commit(durable=True, principal=principal, file=file)
        if final:
            await self.wait_reaped()
            await self.discard_kept()

    async def wait_durable(self: FileSystem, *, principal: PrincipalId) -> None:
        """Return once a durable commit holds every change made before the call
        (WriteFailed if the volume fails first). For changes that must be durable
        before something else is saved, but that no one tenant may turn into a
        barrier of everyone's whenever it likes (a principal's storage re-tag, which
        must be durable before principals.json drops the principal: see
        `DirectService.move_storage`). Any durable commit serves (an fsync's, made for
        anyone); if none comes, this makes one itself, at most one every
        FORCED_DURABLE_INTERVAL seconds volume-wide, and that one serves every caller
        waiting then. Its barrier's flush is charged to `principal` (the caller whose
        wait made it)."""
        need = self._commit_seq + 1  # the first commit that takes a change made now
        while self._durable_seq < need:
            if self.write_errors:
                raise WriteFailed(f"the volume failed ({self.read_only}): the change may "
                                  "not be durable")
            due = self._forced_at + FORCED_DURABLE_INTERVAL
            if not self._forcing and trio.current_time() >= due:
                self._forcing = True
                try:
                    await self.commit(durable=True, principal=principal)
                finally:
                    self._forced_at = trio.current_time()
                    self._forcing = False
                    # (the others wait for this one without a deadline: wake them
                    # even if it made no commit — failed volume, cancelled)
                    self._commit_ended.set()
                    self._commit_ended = trio.Event()
                continue
            ended = self._commit_ended
            with trio.move_on_at(float("inf") if self._forcing else due):
                await ended.wait()

    def fail(self: FileSystem, why: str) -> None:
        """A metadata or device write failed: rather than risk damage, the volume turns
        read-only (s3ql's failsafe). Every change then gets EROFS; direct clients' write
        grants are revoked; what was written and not committed is reported to each
        open file once (fsync: EIO)."""
        self.write_errors += 1
        if self.read_only is None or self.write_errors == 1:
            log.error("%s; the volume is now read-only (unmount it and run sluice fsck)", why)
        self.read_only = self.principals.read_only = why
        self.md.failed = True  # (not at unmount either)
        try:  # what the failed commit would have exposed is not committed later either
            self.md.rollback()
        except sqlite3.Error as exc:
            log.error("rolling back the metadata transaction failed: %s", exc)
        for g in list(self._direct):
            if g.rights & Rights.WRITE:
                self.kernel.revoke_nowait(g)
                del self._direct[g]

    def set_read_only(self: FileSystem, why: str) -> None:
        """A read-only mount: every change gets EROFS, nothing is committed; direct
        clients' write grants are revoked (a remount read-only; commit first)."""
        self.read_only = self.principals.read_only = why
        for g in list(self._direct):
            if g.rights & Rights.WRITE:
                self.kernel.revoke_nowait(g)
                del self._direct[g]

    async def set_writable(self: FileSystem) -> int:
        """Back to read-write (a remount), unless the volume failed: then ReadOnly.
        Does the crash cleanup a read-only mount skipped; returns the stale blocks
        discarded."""
        if self.write_errors:
            raise ReadOnly(f"the volume failed ({self.read_only}): unmount it and run "
                           "sluice fsck")
        if self.md.read_only:
            try:
                self.md.reopen_writable()
            except sqlite3.Error as exc:
                raise ReadOnly(f"cannot open the metadata database for writing: {exc}"
                               ) from None
        self.read_only = self.principals.read_only = None
        if self._recovered:
            if self.discard_freed:
                return 0
            self.discard_freed = True  # what the reaper left undiscarded: settle_reaper
            return await self.scrub_stale_blocks()
        await self._recover()
        return await self.scrub_stale_blocks()

    def _writable(self: FileSystem) -> None:
        if self.read_only is not None:
            raise ReadOnly(f"read-only file system ({self.read_only})")

    async def run_committer(self: FileSystem, *, interval: float = 1.0,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit the open transaction every `interval` seconds (batched commits)."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self.write_errors:
                continue  # failed: read-only until unmounted and checked
            if self.md.pending or self.alloc.pending_blocks or self._unsealed:
                try:
                    await self.commit(preflush_rounds=PREFLUSH_ROUNDS)
                except WriteFailed:
                    pass  # logged by fail(); reported to the writers at their fsync

    async def scrub_stale_blocks(self: FileSystem) -> int:
        """Discard device blocks that hold data but belong to no committed extent (written
        by a daemon killed before it committed the extents). Returns how many."""
        written = self.kernel.written_blocks()
        stale = written[~self.alloc.used[written]]
        if not len(stale):
            return 0
        runs: list[tuple[int, int]] = []
        for b in stale.tolist():
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        await self.kernel.discard(runs, principal=ROOT_PRINCIPAL)
        return len(stale)


def unflushed_list(value: object) -> list[int] | None:
    """The `unflushed` list as stored (a JSON list of inode numbers), or None if it is
    not one (a damaged or crafted meta.db)."""
    if value is None:
        return []
    try:
        listed = json.loads(value) if isinstance(value, (str, bytes)) else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(listed, list) or not all(type(i) is int and 0 < i < 1 << 63
                                               for i in listed):
        return None
    return listed
