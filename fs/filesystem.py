"""The metadata server's domain logic: names, inodes, permissions, extents.

`FileSystem` knows nothing of FUSE (operations.py translates) and nothing of SQL
(metadata.py holds every statement). It never moves file data itself: reads and
writes go through kernelshim grants, one per open handle, exactly as a direct client's
would. What it does on the data path is metadata: allocating extents for a write
layout, committing them, updating size and times.

Concurrency (one trio loop; code between two awaits runs atomically):
- Every metadata operation without an await is atomic by construction.
- `Inode.lock` serialises the operations that change a file's extents and size
  (write, truncate, destroy); reads take no lock.
- Truncate changes the extent map and replaces the grants of open handles in one
  atomic step, then waits for requests still in flight through the old grants, and
  only then releases the freed blocks: a freed block is never read or written through
  a stale grant.
- Freed blocks become reusable, and are discarded on the device, only after the
  transaction that freed them has committed (see allocator.py).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sqlite3
import stat
import time
from typing import Callable

import trio

from kernelshim import (FRESH, BankNode, HOLE, UNWRITTEN, ExtentMap, Grant, Kernel, PrincipalId, Rights,
                        ROOT_PRINCIPAL, Sealed, SluiceError)
from kernelshim.kernel import PRIORITY_MAX, PRIORITY_MIN
from kernelshim.principals import ENTRY_COST, Principal, PrincipalTable, QuotaExceeded

from .allocator import Allocator
from .errors import (ReadOnly, WriteFailed, BadHandle, Exists, FileTooLarge, InvalidArgument, IsADirectory, NameTooLong,
                     NoData, NoSpace, NotADirectory, NotEmpty, NotFound, NotPermitted,
                     NotSupported, OutOfRange, PermissionDenied, TooBig, TooManyLinks,
                     NoSuchOffset)
from .metadata import INODE_COLUMNS, Metadata

log = logging.getLogger(__name__)

ROOT_INODE = 1
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
LINK_MAX = 65000
MAX_FILE_SIZE = 1 << 50
#: fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: blocks copied per request when a write layout relocates sealed blocks
COPY_BLOCKS = 256
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
HINT_PREFIX = b"user.sluice."
#: cache mode: "kernel" (the kernel's page cache, for shared mmap) or "pager" (direct
#: I/O, every read and write reaches the pager; "direct" is its older name)
CACHE_XATTR = b"user.sluice.cache"
CACHE_MODES = (b"pager", b"direct", b"kernel")
#: pager hints of unmodified programs (pushed to the pager at open and on change):
#: a signed priority that orders the owner's own pages (0 = normal, higher = kept
#: longer), and whether the file is a cache whose pages may be dropped unwritten
PRIORITY_XATTR = b"user.sluice.priority"
DISCARDABLE_XATTR = b"user.sluice.discardable"
#: set on a discardable file the pager emptied (its dirty pages were dropped, or a
#: crash may have lost them); cleared by the next write or truncate
DISCARDED_XATTR = b"user.sluice.discarded"
#: the meta key listing the files a crash may leave partial (see `commit`)
UNFLUSHED_KEY = "unflushed"
#: per principal in `sluice stats --json`'s "cache" (pager.PrincipalCacheStats)
CACHE_FIELDS = ("frames", "min", "max", "hits", "misses", "evictions", "discarded", "dirty",
                "writeback_bytes", "reclaim_sent", "reclaim_answered", "reclaim_missed")
#: relatime: atime is also refreshed when it is older than this
ATIME_REFRESH_NS = 24 * 3600 * 10**9
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the requesting process's credentials."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022
    principal: PrincipalId = ROOT_PRINCIPAL


class Inode:
    """A cached inode: the row's columns plus runtime state."""

    __slots__ = (*INODE_COLUMNS, "lookups", "opens", "extents", "lock", "hints",
                 "xattr_bytes", "pushed_hints")

    id: int
    generation: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    blocks: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int
    target: bytes | None
    principal: int

    def __init__(self, row: tuple) -> None:
        for k, v in zip(INODE_COLUMNS, row):
            setattr(self, k, v)
        self.lookups = 0
        self.opens = 0
        self.extents: ExtentMap | None = None
        self.lock: trio.Lock | None = None
        #: its user.sluice.* xattrs (cache mode, pager hints), loaded on first use
        self.hints: dict[bytes, bytes] | None = None
        #: the size of its xattr name list (as listxattr returns it), once known
        self.xattr_bytes: int | None = None
        #: the (priority, discardable) last told to the pager through this object
        self.pushed_hints: tuple[int, bool] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclasses.dataclass(eq=False, slots=True)
class Handle:
    fh: int
    inode: Inode
    grant: Grant
    readable: bool
    writable: bool
    append: bool
    #: the opener lacks CAP_FSETID: writes clear setuid/setgid (as the kernel would)
    kill_priv: bool
    direct_io: bool
    #: the volume's write-error count this handle has reported (errseq, as Linux)
    errors_seen: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class FsStatistics:
    block_size: int
    blocks: int
    #: free blocks (blocks awaiting the commit that freed them included)
    blocks_free: int
    #: of those, what new data may take (the copy-on-write reserve left out), as ext4's
    #: f_bavail leaves out the blocks reserved for root
    blocks_avail: int
    inodes: int
    max_inodes: int
    open_handles: int
    cached_inodes: int
    live_grants: int


def parse_priority(value: bytes) -> int:
    """The value of user.sluice.priority: a signed decimal integer within
    [PRIORITY_MIN, PRIORITY_MAX]; InvalidArgument otherwise."""
    text = value.strip()
    try:
        n = int(text.decode("ascii"), 10) if text else None
    except (UnicodeDecodeError, ValueError):
        n = None
    if n is None or not PRIORITY_MIN <= n <= PRIORITY_MAX:
        raise InvalidArgument(f"user.sluice.priority must be an integer from {PRIORITY_MIN} "
                              f"to {PRIORITY_MAX}, not {value[:32]!r}")
    return n


def parse_discardable(value: bytes) -> bool:
    """The value of user.sluice.discardable: 0 or 1; InvalidArgument otherwise."""
    v = value.strip()
    if v not in (b"0", b"1"):
        raise InvalidArgument(f"user.sluice.discardable must be 0 or 1, not {value[:32]!r}")
    return v == b"1"


def check_hint_xattr(name: bytes, value: bytes) -> None:
    """Refuse a bad value of one of sluice's own hint xattrs (EINVAL)."""
    if name == CACHE_XATTR:
        if value.strip() not in CACHE_MODES:
            raise InvalidArgument("user.sluice.cache must be 'pager' (or 'direct') or "
                                  "'kernel'")
    elif name == PRIORITY_XATTR:
        parse_priority(value)
    elif name == DISCARDABLE_XATTR:
        parse_discardable(value)


def _now() -> int:
    return time.time_ns()


#: timestamps are stored as signed 64-bit nanoseconds (1677-09-21 .. 2262-04-11)
_TIME_MIN, _TIME_MAX = -(1 << 63), (1 << 63) - 1


def _clamp_time(ns: int) -> int:
    """A timestamp the volume can store: out-of-range times are clamped to the nearest
    representable one, as ext4 clamps to its own range (never an error)."""
    return min(max(ns, _TIME_MIN), _TIME_MAX)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid name {name!r}")


def _in_group(pid: int, gid: int) -> bool:
    """Whether process `pid` has `gid` among its groups (for setgid inheritance)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
                if line.startswith(b"Gid:") and str(gid).encode() in line.split()[1:]:
                    return True
    except OSError:
        pass
    return False


class FileSystem:
    """The metadata server. Create with `FileSystem.load(md, kernel, ...)`."""

    def __init__(self, md: Metadata, kernel: Kernel, *, max_inodes: int,
                 default_cache_mode: str = "direct",
                 principals: PrincipalTable | None = None) -> None:
        self.md = md
        self.kernel = kernel
        #: who is charged for what (kernelshim's table; storage usage recounted at load)
        self.principals = principals if principals is not None else PrincipalTable(None)
        kernel.attach_principals(self.principals)
        #: grants held by direct clients: grant -> the caller it was issued to
        self._direct: dict[Grant, Caller] = {}
        self.block_size = kernel.block_size
        self.max_inodes = max_inodes
        self.default_cache_mode = default_cache_mode
        self.alloc = Allocator(kernel.nblocks)
        #: blocks new allocations leave free, so that overwriting committed data (which
        #: is relocated, see docs/dev/invariants.md R1) still works on a full volume
        self.cow_reserve = max(min(kernel.nblocks // 64, 16384), min(16, kernel.nblocks // 8))
        self._inodes: dict[int, Inode] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._inode_count = 0
        #: called with an inode number when its attributes changed behind the kernel's
        #: back (atime on read, setuid cleared on write); operations.py invalidates
        self.on_attr_changed: Callable[[int], None] = lambda ino: None
        #: called when a file's data changed behind the kernel's back (a direct client's
        #: commit or truncate) and the kernel may cache its pages (cache mode kernel)
        self.on_data_changed: Callable[[int], None] = lambda ino: None
        #: called with (directory, name) when a name appeared that the kernel may have
        #: cached as missing (a direct client's create); operations.py invalidates
        self.on_entry_created: Callable[[int, bytes], None] = lambda parent, name: None
        self._commit_lock = trio.Lock()
        #: extent maps that may hold FRESH extents: sealed by the next commit
        self._unsealed: set[ExtentMap] = set()
        #: why the volume is read-only (a read-only mount, or a failure), or None
        self.read_only: str | None = None
        #: failed barriers/commits so far; each open handle reports a new one once
        self.write_errors = 0
        #: O_TMPFILE inodes not linked yet (linkat may give them a name; see `tmpfile`)
        self._tmpfiles: set[int] = set()
        #: FUSE requests answered, by handler name (operations.py counts; `sluice stats`)
        self.fuse_requests: collections.Counter[str] = collections.Counter()
        #: the mount's atime mode, as the kernel's mount flags say (fs/mount.py follows
        #: them): "relatime", "noatime" or "strictatime"; FUSE leaves atime to us
        self.atime = "relatime"
        #: nodiratime: reading a directory never updates its atime
        self.nodiratime = False
        #: whether the crash cleanup of load() is still to do (a read-only mount)
        self._recovered = False
        #: discardable files whose dirty pages the pager dropped, not yet emptied on
        #: the volume (`run_discarder` does it): they read as empty, size 0, meanwhile
        self.discarded: set[int] = set()
        self._discard_wakeup = trio.Event()
        #: the file list last saved under UNFLUSHED_KEY
        self._unflushed_saved: frozenset[int] = frozenset()
        kernel.pager.on_discarded = self._on_discarded

    @classmethod
    async def load(cls, md: Metadata, kernel: Kernel, *, default_cache_mode: str = "direct",
                   principals: PrincipalTable | None = None,
                   read_only: bool = False) -> FileSystem:
        """The metadata server of a volume. Cleans what a crash left (orphans, write
        layouts never committed) unless `read_only`: then nothing is written at all."""
        max_inodes = int(md.meta("max_inodes") or kernel.nblocks)  # type: ignore[call-overload]
        fs = cls(md, kernel, max_inodes=max_inodes, default_cache_mode=default_cache_mode,
                 principals=principals)
        for _ino, _fb, dev, count, _st in md.all_extents():
            fs.alloc.mark_used(dev, count)
        fs._inode_count = md.inode_count()
        fs._recount_usage()
        if read_only:
            fs.set_read_only("mounted read-only")
            return fs
        await fs._recover()
        return fs

    async def _recover(self) -> None:
        """What a crash left: orphans and uncommitted write layouts (at the first
        read-write mount or remount)."""
        fs, md = self, self.md
        fs._recovered = True
        # Inodes unlinked while open when the daemon last stopped: free them now.
        for ino in md.orphans():
            log.info("removing orphaned inode %d (unlinked while open at last shutdown)", ino)
            await fs._destroy(fs.inode(ino))
        # Discardable files a crash may have caught with data not on the device (the
        # last commit recorded them): a cache by contract, they come back empty and
        # marked, never partial (docs/dev/invariants.md, crash rule 4).
        listed = json.loads(str(md.meta(UNFLUSHED_KEY) or "[]"))
        # What is stored: the next commit replaces it (with what is unflushed then).
        fs._unflushed_saved = frozenset(int(i) for i in listed)
        for ino in listed:
            try:
                node = fs.inode(int(ino))
            except SluiceError:
                continue
            if node.is_reg and node.nlink:
                log.info("inode %d: emptied (a discardable file whose data was not on the "
                         "device at the crash)", node.id)
                async with fs._lock(node):
                    await fs._empty_locked(node, mark=True)
        # Blocks past EOF: write layouts a direct client never committed before the
        # daemon stopped (its close would have trimmed them). Nothing else leaves
        # blocks there (fallocate's KEEP_SIZE, when it comes, must be told apart).
        for ino in md.inodes_with_blocks_past_eof(fs.block_size):
            node = fs.inode(ino)
            try:
                emap = fs._extents(node)
            except ValueError as exc:  # damaged extents: reads of it fail; fsck repairs
                log.warning("inode %d: %s (run sluice fsck)", ino, exc)
                continue
            freed = emap.remove_owned(-(-node.size // fs.block_size))
            log.info("inode %d: dropping %d blocks past its end (an uncommitted write layout)",
                     ino, sum(c for _d, c, _o in freed))
            node.blocks = emap.blocks
            fs._refund_runs(freed)
            fs._save_extents(node)
            fs._save(node, "blocks")
            fs.alloc.free_later([(d, c) for d, c, _o in freed])
        await fs.commit()

    def _recount_usage(self) -> None:
        """Storage usage of every principal, from what the volume holds (exact after a
        crash: usage is never stored on its own)."""
        t = self.principals
        t.reset_storage_usage()
        for pid, (blocks, inodes, entries, name_bytes) in self.md.usage_by_principal().items():
            p = t.by_id(pid)
            space = blocks * self.block_size + entries * ENTRY_COST + (name_bytes or 0)
            for q in p.chain():
                q.usage.space += space
                q.usage.inodes += inodes

    def principal(self, pid: PrincipalId | int) -> Principal:
        return self.principals.by_id(pid)

    def _refund_runs(self, runs: list[tuple[int, int, int]]) -> None:
        bs = self.block_size
        for _dev, count, owner in runs:
            self.principals.refund(self.principal(owner), space=count * bs)

    # -- transactions -----------------------------------------------------------------

    async def commit(self, *, durable: bool = False) -> None:
        """End the metadata transaction (docs/dev/invariants.md, "Crash rules"):

        1. inside a device barrier (writes held back, everything written made durable),
           commit the transaction and seal the extents it exposes (FRESH -> WRITTEN:
           never written in place again);
        2. if it freed blocks (or `durable`), make the commit durable (fsync the WAL);
        3. wait until no request that could still address the freed blocks is in flight,
           then discard them and hand them to the allocator."""
        async with self._commit_lock:
            if self.write_errors:
                return  # failed: nothing more is committed (fsync reports the failure)
            try:
                async with self.kernel.barrier():
                    self._save_unflushed()
                    self.md.commit()
                    pending = self.alloc.take_pending()
                    for emap in self._unsealed:
                        emap.seal()
                    self._unsealed.clear()
                if durable or pending:
                    await trio.to_thread.run_sync(self.md.make_durable)
            except (OSError, sqlite3.Error, SluiceError) as exc:
                self.fail(f"committing metadata failed: {exc}")
                raise WriteFailed(f"commit failed: {exc}") from exc
            if pending:
                await self.kernel.wait_quiescent()
                try:
                    await self.kernel.discard(pending, principal=ROOT_PRINCIPAL)
                except SluiceError as exc:
                    # The blocks keep their old data: reusing them leaks nothing (a new
                    # owner's unwritten blocks read as zeros, its partial writes merge
                    # with zeros), only the host's space is not given back.
                    log.warning("discarding %d freed blocks failed: %s",
                                sum(c for _d, c in pending), exc)
                self.alloc.release_now(pending)

    def _save_unflushed(self) -> None:
        """Record, in the transaction being committed, the files whose data the
        barrier did not put on the device: discardable files with dirty frames (the
        pager writes those only on their own fsync) and files discarded but not yet
        emptied. A crash that keeps this commit brings them back empty (`_recover`);
        every other file's data is on the device before the commit (R2)."""
        now = frozenset(self.kernel.unflushed_files | self.discarded)
        if now != self._unflushed_saved:
            self.md.set_meta(UNFLUSHED_KEY, json.dumps(sorted(now)))
            self._unflushed_saved = now

    async def sync(self, *, final: bool = False) -> None:
        """Make all data and metadata durable (fsync; with `final`, unmount: then the
        discardable files' dirty frames are written back too, so that a clean unmount
        leaves no file whose committed blocks lack their data — the list of such files
        is for crashes, and `sluice fsck` of a cleanly unmounted volume must find every
        committed block's data)."""
        if final and self.read_only is None and not self.write_errors:
            for ino in sorted(self.kernel.pager.dirty_discardable_files()):
                try:
                    await self.kernel.writeback_file(ino)
                except SluiceError as exc:
                    log.warning("writing back discardable inode %d at unmount failed: %s",
                                ino, exc)
        await self.commit(durable=True)

    # -- discardable files ------------------------------------------------------------

    def _on_discarded(self, ino: int) -> None:
        """The pager dropped the dirty pages of discardable file `ino` (synchronous,
        from inside reclaim): from now on it reads as empty, size 0, and the kernel
        forgets what it cached; `run_discarder` empties it on the volume and marks it."""
        self.discarded.add(ino)
        self.on_data_changed(ino)
        self._discard_wakeup.set()

    async def run_discarder(self, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Empty and mark the files the pager discarded (a service of the mount)."""
        task_status.started()
        while True:
            await self._discard_wakeup.wait()
            self._discard_wakeup = trio.Event()
            for ino in sorted(self.discarded):
                try:
                    node = self.inode(ino)
                except SluiceError:  # gone: nothing to empty
                    self.discarded.discard(ino)
                    continue
                if self.read_only is not None:
                    continue  # stays empty to readers; the next mount empties it
                try:
                    async with self._lock(node):
                        if ino in self.discarded:
                            await self._empty_locked(node, mark=True)
                except SluiceError as exc:
                    log.warning("emptying discarded inode %d failed: %s", ino, exc)

    async def _empty_locked(self, node: Inode, *, mark: bool) -> None:
        """Empty the file (size 0, blocks freed as truncate frees them) and set or
        clear its user.sluice.discarded mark (under the inode lock)."""
        self.discarded.discard(node.id)
        if node.size or node.blocks:
            await self._truncate_locked(node, 0, principal=PrincipalId(node.principal))
        self._set_discarded_mark(node, mark)
        self.on_data_changed(node.id)

    def _set_discarded_mark(self, node: Inode, mark: bool) -> None:
        has = DISCARDED_XATTR in self._hints(node)
        if has == mark:
            return
        if mark:
            self.md.set_xattr(node.id, DISCARDED_XATTR, b"1")
        else:
            self.md.remove_xattr(node.id, DISCARDED_XATTR)
        node.hints = None
        node.xattr_bytes = None
        node.ctime_ns = _now()
        self._save(node, "ctime_ns")
        self.on_attr_changed(node.id)

    async def _undiscard_locked(self, node: Inode) -> None:
        """A write or truncate of a discarded file: empty it first if the pager
        dropped its pages since (the write then lands in an empty file, never beside
        what is left of the old contents), and clear the mark."""
        if node.id in self.discarded:
            await self._empty_locked(node, mark=False)
        elif node.hints is None or DISCARDED_XATTR in node.hints:
            self._set_discarded_mark(node, False)

    def fail(self, why: str) -> None:
        """A metadata or device write failed: rather than risk damage, the volume turns
        read-only (s3ql's failsafe). Every change then gets EROFS; direct clients' write
        grants are revoked; what was written and not committed is reported to each
        open file once (fsync: EIO)."""
        self.write_errors += 1
        if self.read_only is None or self.write_errors == 1:
            log.error("%s; the volume is now read-only (unmount it and run sluice fsck)", why)
        self.read_only = why
        try:  # what the failed commit would have exposed is not committed later either
            self.md.rollback()
        except sqlite3.Error as exc:
            log.error("rolling back the metadata transaction failed: %s", exc)
        for g in list(self._direct):
            if g.rights & Rights.WRITE:
                self.kernel.revoke_nowait(g)
                del self._direct[g]

    def set_read_only(self, why: str) -> None:
        """A read-only mount: every change gets EROFS, nothing is committed; direct
        clients' write grants are revoked (a remount read-only; commit first)."""
        self.read_only = why
        for g in list(self._direct):
            if g.rights & Rights.WRITE:
                self.kernel.revoke_nowait(g)
                del self._direct[g]

    async def set_writable(self) -> int:
        """Back to read-write (a remount), unless the volume failed: then ReadOnly.
        Does the crash cleanup a read-only mount skipped; returns the stale blocks
        discarded."""
        if self.write_errors:
            raise ReadOnly(f"the volume failed ({self.read_only}): unmount it and run "
                           "sluice fsck")
        self.read_only = None
        if self._recovered:
            return 0
        await self._recover()
        return await self.scrub_stale_blocks()

    def _writable(self) -> None:
        if self.read_only is not None:
            raise ReadOnly(f"read-only file system ({self.read_only})")

    async def run_committer(self, *, interval: float = 1.0,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit the open transaction every `interval` seconds (batched commits)."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self.write_errors:
                continue  # failed: read-only until unmounted and checked
            if self.md.pending or self.alloc.pending_blocks or self._unsealed:
                try:
                    await self.commit()
                except WriteFailed:
                    pass  # logged by fail(); reported to the writers at their fsync

    async def scrub_stale_blocks(self) -> int:
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

    # -- inode cache ----------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is None:
            row = self.md.get_inode(ino)
            if row is None:
                raise NotFound(f"inode {ino} does not exist")
            node = self._inodes[ino] = Inode(row)
        return node

    def _cache_row(self, row: tuple) -> Inode:
        node = self._inodes.get(row[0])
        if node is None:
            node = self._inodes[row[0]] = Inode(row)
        return node

    def _extents(self, node: Inode) -> ExtentMap:
        if node.extents is None:
            node.extents = ExtentMap(self.md.load_extents(node.id))
        return node.extents

    def _lock(self, node: Inode) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock

    def _maybe_evict(self, node: Inode) -> None:
        # An unlinked inode stays pinned until _destroy has deleted its row; after that
        # the kernel's last forget must drop it (else every unlinked inode leaks here).
        if node.lookups <= 0 and node.opens <= 0 and node.id != ROOT_INODE and (
                node.nlink > 0 or self.md.get_inode(node.id) is None):
            # Direct clients' grants share node.extents: a reloaded inode would get a
            # new map they never see (their writes: NotAllocated; reads: stale holes).
            if (node.lock is None or not node.lock.locked()) and \
                    not self.kernel.grants_for(node.id):
                self._inodes.pop(node.id, None)

    def _save(self, node: Inode, *fields: str) -> None:
        self.md.update_inode(node.id, **{f: getattr(node, f) for f in fields})

    def _save_extents(self, node: Inode) -> None:
        assert node.extents is not None
        deleted, upserts = node.extents.take_changes(with_owner=True)
        if deleted or upserts:
            self.md.save_extent_changes(node.id, deleted, upserts)

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Inode:
        """The inode `name` names in directory `parent` (counts a kernel lookup).

        The kernel also looks up "." of any inode (a directory or not) and ".." of a
        directory to turn a file handle (name_to_handle_at, an NFS export) back into
        an inode it has forgotten: handles are (inode, generation), valid across
        forgets and remounts, stale once the inode is gone (NotFound here)."""
        node = self.inode(parent) if name == b"." else self._child(parent, name)
        node.lookups += 1
        return node

    def _child(self, parent: int, name: bytes) -> Inode:
        d = self.inode(parent)
        if not d.is_dir:
            raise NotADirectory(f"inode {parent} is not a directory")
        if name == b".":
            return d
        if name == b"..":
            return self.inode(d.parent)
        if len(name) > NAME_MAX:
            raise NameTooLong(f"name of {len(name)} bytes (limit {NAME_MAX})")
        ino = self.md.lookup(parent, name)
        if ino is None:
            raise NotFound(f"no entry {name!r} in directory {parent}")
        return self.inode(ino)

    def forget(self, ino: int, n: int) -> None:
        node = self._inodes.get(ino)
        if node is None:
            return
        node.lookups -= n
        self._maybe_evict(node)

    def count_lookup(self, node: Inode) -> None:
        node.lookups += 1

    # -- creating names ---------------------------------------------------------------------

    def _new_inode(self, parent: Inode, name: bytes, mode: int, caller: Caller, *,
                   rdev: int = 0, target: bytes | None = None) -> Inode:
        self._writable()
        _check_name(name)
        if not parent.is_dir:
            raise NotADirectory(f"inode {parent.id} is not a directory")
        if parent.nlink == 0:
            raise NotFound("directory was removed")
        if self.md.lookup(parent.id, name) is not None:
            raise Exists(f"{name!r} exists")
        hints = self._hints(parent)
        if self._inode_count >= self.max_inodes:
            raise NoSpace(f"no free inodes (limit {self.max_inodes})")
        # Charge first: over quota changes nothing.
        self.principals.charge(self.principal(caller.principal), inodes=1,
                               space=ENTRY_COST + len(name))
        is_dir = stat.S_ISDIR(mode)
        gid = caller.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if is_dir:
                mode |= stat.S_ISGID
            elif (mode & (stat.S_ISGID | stat.S_IXGRP)) == (stat.S_ISGID | stat.S_IXGRP) \
                    and caller.uid != 0 and not _in_group(caller.pid, gid):
                mode &= ~stat.S_ISGID
        now = _now()
        nlink = 2 if is_dir else 1
        dir_parent = parent.id if is_dir else 0
        ino = self.md.insert_inode(mode=mode, uid=caller.uid, gid=gid, nlink=nlink,
                                   rdev=rdev, now_ns=now, parent=dir_parent, target=target,
                                   principal=caller.principal)
        self.md.add_dentry(parent.id, name, ino, caller.principal)
        self._inode_count += 1
        # Hints (user.sluice.*) are inherited from the directory at create time.
        for hname, hval in hints.items():
            self.md.set_xattr(ino, hname, hval)
        if is_dir:
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = now
        self._save(parent, "nlink", "mtime_ns", "ctime_ns")
        # The new inode's row is known: cache it without reading it back.
        node = self._inodes[ino] = Inode(
            (ino, 1, mode, caller.uid, gid, nlink, len(target) if target is not None else 0,
             0, rdev, now, now, now, dir_parent, target, caller.principal))
        node.hints = dict(hints)
        if node.is_reg:
            node.extents = ExtentMap()
        node.lookups += 1
        return node

    def _hints(self, node: Inode) -> dict[bytes, bytes]:
        if node.hints is None:
            node.hints = dict(self.md.hint_xattrs(node.id, HINT_PREFIX))
        return node.hints

    def _push_hints(self, node: Inode, *, changed: bool = False) -> None:
        """Tell the pager the file's hints (its user.sluice.priority and .discardable;
        absent: normal priority, not discardable). A value that does not parse (set
        before values were checked) counts as absent."""
        if not node.is_reg:
            return
        h = self._hints(node)
        try:
            priority = parse_priority(h[PRIORITY_XATTR]) if PRIORITY_XATTR in h else 0
        except InvalidArgument:
            priority = 0
        try:
            discardable = parse_discardable(h[DISCARDABLE_XATTR]) \
                if DISCARDABLE_XATTR in h else False
        except InvalidArgument:
            discardable = False
        # At open, pushed only when it changes what the pager holds (opens are frequent;
        # telling the pager is not free): the pager learns a file's hints only from
        # here, so an inode object that never pushed finds the defaults there, or what
        # an evicted object for the same file pushed, which were the same xattrs.
        # When an xattr changed (`changed`), always.
        now = (priority, discardable)
        if not changed and now == (node.pushed_hints or (0, False)):
            return
        self.kernel.set_file_hints(node.id, priority=priority, discardable=discardable)
        node.pushed_hints = now

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Inode:
        fmt = stat.S_IFMT(mode)
        if fmt == 0:
            mode |= stat.S_IFREG
        elif fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise InvalidArgument(f"mknod of file type {oct(fmt)}")
        return self._new_inode(self.inode(parent), name, mode, caller, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Inode:
        return self._new_inode(self.inode(parent), name,
                               stat.S_IFDIR | (mode & 0o7777), caller)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Inode:
        if len(target) > 4095:
            raise NameTooLong("symlink target longer than 4095 bytes")
        return self._new_inode(self.inode(parent), name, stat.S_IFLNK | 0o777, caller,
                               target=target)

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode) or node.target is None:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return bytes(node.target)

    def link(self, ino: int, new_parent: int, new_name: bytes,
             caller: Caller | None = None) -> Inode:
        self._writable()
        node = self.inode(ino)
        if node.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        if node.nlink == 0 and node.id not in self._tmpfiles:
            raise NotFound("cannot link a file that has been unlinked")
        if node.nlink >= LINK_MAX:
            raise TooManyLinks(f"inode {ino} has {node.nlink} links")
        _check_name(new_name)
        d = self.inode(new_parent)
        if not d.is_dir:
            raise NotADirectory(f"inode {new_parent} is not a directory")
        if self.md.lookup(new_parent, new_name) is not None:
            raise Exists(f"{new_name!r} exists")
        who = caller.principal if caller else ROOT_PRINCIPAL
        self.principals.charge(self.principal(who), space=ENTRY_COST + len(new_name))
        now = _now()
        if node.nlink == 0:  # an O_TMPFILE file gets its first name: an inode again
            self._link_tmpfile(node, who)
        self.md.add_dentry(new_parent, new_name, ino, who)
        node.nlink += 1
        node.ctime_ns = now
        self._save(node, "nlink", "ctime_ns")
        d.mtime_ns = d.ctime_ns = now
        self._save(d, "mtime_ns", "ctime_ns")
        node.lookups += 1
        return node

    # -- removing names ---------------------------------------------------------------------

    async def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        node = self._child(parent, name)
        if node.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        d = self.inode(parent)
        self._remove_name(parent, name)
        now = _now()
        d.mtime_ns = d.ctime_ns = now
        self._save(d, "mtime_ns", "ctime_ns")
        await self._drop_link(node, now)

    def _remove_name(self, parent: int, name: bytes) -> None:
        owner = self.md.remove_dentry(parent, name)
        self.principals.refund(self.principal(owner), space=ENTRY_COST + len(name))

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        if name == b".":
            raise InvalidArgument("cannot remove '.'")
        if name == b"..":
            raise NotEmpty("cannot remove '..'")
        node = self._child(parent, name)
        if not node.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if self.md.has_entries(node.id):
            raise NotEmpty(f"directory {name!r} is not empty")
        d = self.inode(parent)
        self._remove_name(parent, name)
        now = _now()
        d.nlink -= 1
        d.mtime_ns = d.ctime_ns = now
        self._save(d, "nlink", "mtime_ns", "ctime_ns")
        await self._drop_link(node, now)

    async def _drop_link(self, node: Inode, now: int) -> None:
        """One name of `node` is gone."""
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime_ns = now
        self._save(node, "nlink", "ctime_ns")
        if node.nlink == 0:
            self._inode_count -= 1
            self.principals.refund(self.principal(node.principal), inodes=1)
            # Direct clients lose access with the last name (DESIGN: fencing); the
            # kernel's open files keep the inode until they close.
            await self._revoke_direct(node)
            if node.opens == 0:
                await self._destroy(node)

    async def _destroy(self, node: Inode) -> None:
        """Free an inode no name and no open handle refers to."""
        self.kernel.forget_file(node.id)
        if self.read_only is not None:
            return  # an orphan now: freed at the next read-write mount
        async with self._lock(node):
            revoked = [g for g in self.kernel.grants_for(node.id)]
            for g in revoked:
                self.kernel.revoke_nowait(g)
            await self.kernel.wait_drained(revoked)
            if node.is_reg and node.blocks:
                freed = self._extents(node).remove_owned(0)
                self._refund_runs(freed)
                self.alloc.free_later([(d, c) for d, c, _o in freed])
            self.md.delete_inode(node.id)
            node.blocks = 0
        if node.lookups <= 0:
            self._inodes.pop(node.id, None)

    # -- rename -------------------------------------------------------------------------------

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """Whether directory `anc` is `ino` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INODE or seen > 10_000:
                return False
            ino = self.inode(ino).parent
            seen += 1

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument(f"unsupported rename flags {flags:#x}")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_NOREPLACE and RENAME_EXCHANGE together")
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise InvalidArgument("cannot rename '.' or '..'")
        _check_name(new_name)
        src = self._child(old_parent, old_name)
        op = self.inode(old_parent)
        np_ = self.inode(new_parent)
        if not np_.is_dir:
            raise NotADirectory(f"inode {new_parent} is not a directory")
        dst_ino = self.md.lookup(new_parent, new_name)
        dst = self.inode(dst_ino) if dst_ino is not None else None
        now = _now()

        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise NotFound(f"{new_name!r} does not exist")
            if src.is_dir and self._is_ancestor(src.id, new_parent):
                raise InvalidArgument("cannot move a directory into itself")
            if dst.is_dir and self._is_ancestor(dst.id, old_parent):
                raise InvalidArgument("cannot move a directory into itself")
            self.md.retarget_dentry(old_parent, old_name, dst.id)
            self.md.retarget_dentry(new_parent, new_name, src.id)
            if old_parent != new_parent:
                if src.is_dir:
                    src.parent = new_parent
                    self._save(src, "parent")
                if dst.is_dir:
                    dst.parent = old_parent
                    self._save(dst, "parent")
                if src.is_dir != dst.is_dir:
                    delta = 1 if dst.is_dir else -1  # old_parent gains dst, loses src
                    op.nlink += delta
                    np_.nlink -= delta
            for n in (src, dst):
                n.ctime_ns = now
                self._save(n, "ctime_ns")
            for d in {op.id: op, np_.id: np_}.values():
                d.mtime_ns = d.ctime_ns = now
                self._save(d, "nlink", "mtime_ns", "ctime_ns")
            return

        if dst is not None and dst.id == src.id:
            return  # both names are links to the same file: POSIX says do nothing
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Exists(f"{new_name!r} exists")
        if src.is_dir and self._is_ancestor(src.id, new_parent):
            raise InvalidArgument("cannot move a directory into its own subtree")
        if dst is not None:
            if dst.is_dir and not src.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
            if src.is_dir and not dst.is_dir:
                raise NotADirectory(f"{new_name!r} is not a directory")
            if dst.is_dir and self.md.has_entries(dst.id):
                raise NotEmpty(f"directory {new_name!r} is not empty")
        # The entry keeps the principal charged for it; its charge follows the name's
        # length (ENTRY_COST + len(name)), before anything changes (EDQUOT changes nothing).
        grow = len(new_name) - len(old_name)
        if grow:
            owner = self.principal(self.md.dentry_principal(old_parent, old_name))
            if grow > 0:
                self.principals.charge(owner, space=grow)
            else:
                self.principals.refund(owner, space=-grow)
        if dst is not None:
            if dst.is_dir and not src.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
            if src.is_dir and not dst.is_dir:
                raise NotADirectory(f"{new_name!r} is not a directory")
            if dst.is_dir and self.md.has_entries(dst.id):
                raise NotEmpty(f"directory {new_name!r} is not empty")
            self._remove_name(new_parent, new_name)
            if dst.is_dir:
                np_.nlink -= 1
        self.md.move_dentry(old_parent, old_name, new_parent, new_name)
        if src.is_dir and old_parent != new_parent:
            src.parent = new_parent
            op.nlink -= 1
            np_.nlink += 1
            self._save(src, "parent")
        src.ctime_ns = now
        self._save(src, "ctime_ns")
        for d in {op.id: op, np_.id: np_}.values():
            d.mtime_ns = d.ctime_ns = now
            self._save(d, "nlink", "mtime_ns", "ctime_ns")
        if dst is not None:
            await self._drop_link(dst, now)

    # -- attributes ------------------------------------------------------------------------

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None, caller: Caller | None = None) -> Inode:
        node = self.inode(ino)
        self._writable()
        now = _now()
        changed: list[str] = []
        if size is not None:
            if node.is_dir:
                raise IsADirectory("cannot truncate a directory")
            if not node.is_reg:
                raise InvalidArgument("cannot truncate a special file")
            before_ctime = node.ctime_ns
            await self.truncate(node, size, principal=caller.principal if caller else
                                ROOT_PRINCIPAL)
            if node.ctime_ns != before_ctime:
                now = node.ctime_ns  # one time for the change: ctime == the new mtime
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            changed.append("mode")
        if uid is not None and uid != 0xFFFFFFFF:
            node.uid = uid
            changed.append("uid")
        if gid is not None and gid != 0xFFFFFFFF:
            node.gid = gid
            changed.append("gid")
        if atime_ns is not None:
            node.atime_ns = _clamp_time(atime_ns)
            changed.append("atime_ns")
        if mtime_ns is not None:
            node.mtime_ns = _clamp_time(mtime_ns)
            changed.append("mtime_ns")
        node.ctime_ns = _clamp_time(ctime_ns) if ctime_ns is not None else now
        changed.append("ctime_ns")
        self._save(node, *changed)
        if {"mode", "uid", "gid"} & set(changed):
            # chmod/chown: direct clients that lost access lose their grants.
            await self._revoke_direct(node, keep=self._still_allowed)
        return node

    def _still_allowed(self, grant: Grant, who: Caller) -> bool:
        mask = (os.R_OK if grant.rights & Rights.READ else 0) | \
               (os.W_OK if grant.rights & Rights.WRITE else 0)
        try:
            self.access(grant.inode, mask, who)
        except PermissionDenied:
            return False
        return True

    async def truncate(self, node: Inode, size: int, *, principal: PrincipalId,
                       keep_grant: Grant | None = None) -> None:
        self._writable()
        if size < 0:
            raise InvalidArgument("negative size")
        if size > MAX_FILE_SIZE:
            raise FileTooLarge(f"size {size} beyond the maximum file size")
        async with self._lock(node):
            await self._undiscard_locked(node)
            await self._truncate_locked(node, size, principal=principal,
                                        keep_grant=keep_grant)

    async def _truncate_locked(self, node: Inode, size: int, *, principal: PrincipalId,
                               keep_grant: Grant | None = None) -> None:
        old = node.size
        now = _now()
        if size == old:
            return
        fields = ["size", "mtime_ns", "ctime_ns"]
        if size < old:
            bs = self.block_size
            emap = self._extents(node)
            keep = -(-size // bs)
            last = emap.segments(keep - 1, 1)[0] if size % bs else None
            if last is not None and last.state != UNWRITTEN:
                # Bytes past the new end in the last block must read as zeros if the
                # file grows again. A sealed block is not zeroed in place but
                # relocated: a crash before the commit finds the old size and the
                # old block whole.
                g = self.kernel.grant(inode=node.id, generation=node.generation,
                                      extents=emap, rights=Rights.WRITE,
                                      principal=principal, charge=False)
                try:
                    await self._write_data(node, g, size, bytes(keep * bs - size))
                finally:
                    self.kernel.release(g)
            # From here to the save of the size: no checkpoint, so the shorter map
            # and the new size reach the same transaction.
            freed = emap.remove_owned(keep)
            # The direct client truncating through `keep_grant` keeps it (its
            # connection has no other request in flight); every other is revoked.
            old_grants = self._regrant(node, keep=lambda g: g is keep_grant)
            if freed:
                node.blocks = emap.blocks
                self._refund_runs(freed)
                self._save_extents(node)
                fields.append("blocks")
        else:
            await self._zero_past_eof(node, old, size, principal)  # R6
            freed, old_grants = [], []
        node.size = size
        node.mtime_ns = node.ctime_ns = now
        self._save(node, *fields)
        if old_grants:
            await self.kernel.wait_drained(old_grants)
        if freed:
            # Freed once no request through the old grants is in flight; reusable
            # once the commit that saved the shorter map is durable.
            self.alloc.free_later([(d, c) for d, c, _o in freed])

    def _regrant(self, node: Inode, keep: Callable[[Grant], bool] | None = None) -> list[Grant]:
        """Revoke every grant on `node` (but those `keep` accepts) and give the open
        handles fresh ones (no checkpoint: atomic with the extent change before it).
        Returns the grants to wait for: the revoked ones and the kept ones."""
        old: list[Grant] = []
        for g in self.kernel.grants_for(node.id):
            if keep is not None and keep(g):
                old.append(g)
                continue
            old.extend(self.kernel.revoke_nowait(g))
        for h in self._handles.values():
            if h.inode is node and h.grant.revoked:
                h.grant = self._grant_for(node, h.readable, h.writable, h.grant.principal)
        return old

    def _grant_for(self, node: Inode, readable: bool, writable: bool,
                   principal: PrincipalId) -> Grant:
        rights = (Rights.READ if readable else Rights.NONE) | \
                 (Rights.WRITE if writable else Rights.NONE)
        return self.kernel.grant(inode=node.id, generation=node.generation,
                                 extents=self._extents(node), rights=rights,
                                 principal=principal)

    # -- open files --------------------------------------------------------------------------

    def open(self, ino: int, flags: int, caller: Caller) -> Handle:
        node = self.inode(ino)
        if node.is_dir:
            raise IsADirectory("cannot open a directory for I/O")
        acc = flags & os.O_ACCMODE
        readable = acc in (os.O_RDONLY, os.O_RDWR)
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        if writable or flags & os.O_TRUNC:
            self._writable()
        fh = self._next_fh
        self._next_fh += 1
        h = Handle(fh, node, self._grant_for(node, readable, writable, caller.principal),
                   readable, writable, bool(flags & os.O_APPEND), caller.uid != 0,
                   self._cache_mode(node) != "kernel", self.write_errors)
        self._handles[fh] = h
        node.opens += 1
        self._push_hints(node)
        return h

    async def open_truncate(self, node: Inode, caller: Caller) -> None:
        """O_TRUNC at open, through the mount (the kernel sends it with the open) or a
        direct client; whatever the access mode, as Linux truncates on O_RDONLY|O_TRUNC
        too (the caller checked write permission). POSIX (and Linux) update mtime/ctime
        and drop setuid/setgid (unless root opens) even when the file was empty."""
        if node.size:
            await self.truncate(node, 0, principal=caller.principal)
        else:
            self._writable()
            node.mtime_ns = node.ctime_ns = _now()
            self._save(node, "mtime_ns", "ctime_ns")
        if caller.uid != 0:
            self._drop_setid(node)

    def _cache_mode(self, node: Inode) -> str:
        v = self._hints(node).get(CACHE_XATTR)
        if v is not None:
            return v.decode(errors="replace").strip()
        return self.default_cache_mode

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Handle, Inode]:
        node = self._new_inode(self.inode(parent), name, stat.S_IFREG | (mode & 0o7777), caller)
        return self.open(node.id, flags, caller), node

    def handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise BadHandle(f"no open file handle {fh}")
        return h

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        self.kernel.release(h.grant)
        node = h.inode
        node.opens -= 1
        if node.opens == 0 and node.nlink == 0:
            self._tmpfiles.discard(node.id)
            await self._destroy(node)
        else:
            if node.opens == 0:
                await self._trim_preallocation(node)
            self._maybe_evict(node)

    async def read(self, fh: int, offset: int, size: int) -> memoryview | bytes:
        h = self.handle(fh)
        if not h.readable:
            raise BadHandle("file not open for reading")
        node = h.inode
        if offset < 0:
            raise InvalidArgument("negative offset")
        if offset >= node.size or size <= 0 or node.id in self.discarded:
            data: memoryview | bytes = b""
        else:
            data = await self.kernel.read(h.grant, offset, min(size, node.size - offset))
        self._touch_atime(node)
        return data

    def _touch_atime(self, node: Inode) -> None:
        """atime on a read, by the mount's mode (the kernel's meanings; FUSE leaves
        atime to the filesystem): noatime never, nodiratime never for directories,
        strictatime always, relatime when atime is not newer than mtime/ctime or is a
        day old."""
        if self.read_only is not None or self.atime == "noatime" or (
                self.nodiratime and node.is_dir):
            return
        a = node.atime_ns
        now = _now()
        if self.atime != "strictatime" and a > node.mtime_ns and a > node.ctime_ns and \
                now - a < ATIME_REFRESH_NS:
            return
        node.atime_ns = now
        self._save(node, "atime_ns")
        self.on_attr_changed(node.id)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        h = self.handle(fh)
        if not h.writable:
            raise BadHandle("file not open for writing")
        if offset < 0:
            raise InvalidArgument("negative offset")
        node = h.inode
        async with self._lock(node):
            if node.hints is None or DISCARDED_XATTR in node.hints or node.id in self.discarded:
                await self._undiscard_locked(node)
            if h.append:
                offset = node.size
            n = await self._write_locked(node, h.grant, offset, data, short_ok=True)
            if n and h.kill_priv and self._kill_priv(h, save=False):
                self._save(node, "mode")
        return n

    async def _write_locked(self, node: Inode, grant: Grant, offset: int,
                            data: bytes | memoryview, *, short_ok: bool) -> int:
        """Write `data` at `offset` through `grant` and make it part of the file (extents
        FRESH, size, mtime), under the inode lock. With `short_ok`, a write the space or
        the principal's banks cannot hold whole writes what fits, as POSIX and every
        kernel filesystem do (an error only when not one byte fits); without, it is all
        or nothing. Returns the bytes written."""
        n = len(data)
        if not n:
            return 0
        end = offset + n
        if end > MAX_FILE_SIZE:
            raise FileTooLarge("write past the maximum file size")
        if offset > node.size:  # the gap left behind reads as zeros (R6)
            await self._zero_past_eof(node, node.size, offset, grant.principal)
        bs = self.block_size
        b0 = offset // bs
        b1 = -(-end // bs)
        emap = self._extents(node)
        try:
            await self._allocate(node, emap, b0, b1 - b0, grant.principal)
        except (NoSpace, QuotaExceeded):
            if not short_ok:
                raise
            # The blocks the space (or the bank) still has, in file order.
            fit = await self._blocks_that_fit(emap, b0, b1 - b0, grant.principal)
            n = min(n, (b0 + fit) * bs - offset)
            if n <= 0:
                raise
            data = data[:n]
            end = offset + n
            b1 = -(-end // bs)
            await self._allocate(node, emap, b0, b1 - b0, grant.principal)
        try:
            await self._write_data(node, grant, offset, data)
            for start, stop in grant.take_written(offset, end):
                emap.mark_written(start // bs, -(-stop // bs) - start // bs)
            self._unsealed.add(emap)
        finally:
            self._save_extents(node)
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = _now()
        self._save(node, "size", "blocks", "mtime_ns", "ctime_ns")
        return n

    def _kill_priv(self, h: Handle, *, save: bool = True) -> bool:
        return h.kill_priv and self._drop_setid(h.inode, save=save)

    def _drop_setid(self, node: Inode, *, save: bool = True) -> bool:
        """Clear setuid, and setgid if group-executable (a write or truncate by someone
        without CAP_FSETID, as the kernel does); whether the mode changed."""
        mode = node.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        if mode == node.mode:
            return False
        node.mode = mode
        if save:
            self._save(node, "mode")
        self.on_attr_changed(node.id)
        return True

    async def _write_data(self, node: Inode, grant: Grant, offset: int,
                          data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` through `grant` (under the inode lock; every block
        allocated). Sealed blocks are relocated (copy-on-write): written to fresh blocks,
        the extents remapped and the old blocks freed by the same transaction, with the
        change saved before any checkpoint."""
        bs = self.block_size
        b0 = offset // bs
        b1 = -(-(offset + len(data)) // bs)
        emap = self._extents(node)
        while True:
            cow = await self._cow_blocks(emap, b0, b1 - b0)
            try:
                await self.kernel.write(grant, offset, data, cow=cow)
            except Sealed:
                # A commit sealed fresh blocks of the range while this write waited for
                # its barrier: relocate those too.
                if cow is not None:
                    self.alloc.release_now([(e[1], e[2]) for e in cow.owned_extents()])
                continue
            except BaseException:
                if cow is not None:  # never exposed: reusable at once
                    self.alloc.release_now([(e[1], e[2]) for e in cow.owned_extents()])
                raise
            break
        if cow is not None:
            for fb, dev, count, _st, _owner in cow.owned_extents():
                old = emap.relocate(fb, dev, count)
                self.alloc.free_later([(d, c) for d, c, _o in old])
            self._unsealed.add(emap)
            self._save_extents(node)

    async def _zero_past_eof(self, node: Inode, lo: int, hi: int,
                             principal: PrincipalId) -> None:
        """The file grows from `lo` (its size) past `hi`: zero [lo, hi) inside the block
        that holds its last byte, if that block holds data. Bytes there past the end
        may be a direct client's writes it never committed (docs/dev/invariants.md,
        R6); blocks after it are holes, unwritten, or written by the growth itself."""
        bs = self.block_size
        hi = min(hi, -(-lo // bs) * bs)
        if hi <= lo:
            return
        emap = self._extents(node)
        seg = emap.segments(lo // bs, 1)[0]
        if seg.state == UNWRITTEN:  # holes and unwritten blocks read as zeros
            return
        g = self.kernel.grant(inode=node.id, generation=node.generation, extents=emap,
                              rights=Rights.WRITE, principal=principal, charge=False)
        try:
            await self._write_data(node, g, lo, bytes(hi - lo))
        finally:
            self.kernel.release(g)

    async def _cow_blocks(self, emap: ExtentMap, b0: int, count: int) -> ExtentMap | None:
        """Fresh device blocks for the sealed blocks of [b0, b0+count), as a map of the
        same file blocks (None when nothing there is sealed). Not charged: each replaces
        a block of the same owner, freed by the same transaction."""
        runs = emap.sealed_runs(b0, count)
        if not runs:
            return None
        await self._ensure_free(sum(c for _, c in runs), reserve=False)
        cow = ExtentMap()
        got: list[tuple[int, int]] = []
        for fb, cnt in runs:
            for start, length in self.alloc.allocate(cnt, emap.goal(fb)):
                cow.add(fb, start, length, FRESH)
                got.append((start, length))
                fb += length
        await self._reserve_host_space(got)
        return cow

    async def _reserve_host_space(self, runs: list[tuple[int, int]]) -> None:
        """With write-back, host space under newly allocated blocks is reserved before
        the write into them is acknowledged (the data reaches the host later, in a
        write-back that must not fail for lack of space). On failure (ENOSPC) the
        blocks go back to the free list unused."""
        if not runs or not self.kernel.pager.writeback:
            return
        try:
            await self.kernel.reserve(runs)
        except BaseException:
            self.alloc.release_now(runs)
            raise

    async def _ensure_free(self, need: int, *, reserve: bool = True) -> None:
        """Make sure `need` blocks can be allocated (NoSpace otherwise): a new allocation
        leaves the copy-on-write reserve alone, a relocation (`reserve=False`) may use it."""
        keep = self.cow_reserve if reserve else 0
        if need > self.alloc.free - keep and self.alloc.pending_blocks:
            await self.commit()  # blocks freed by the open transaction become usable
        if need > self.alloc.free - keep:
            raise NoSpace(f"no space left on device ({max(0, self.alloc.free - keep)} "
                          f"blocks free, {need} needed)")

    async def _blocks_that_fit(self, emap: ExtentMap, b0: int, count: int,
                               principal: PrincipalId) -> int:
        """How many blocks of [b0, b0+count), from b0 on, a write could allocate now: the
        holes among them fit in the free space and in the principal's space banks."""
        if self.alloc.pending_blocks:
            await self.commit()
        budget = self.alloc.free - self.cow_reserve
        for q in self.principal(principal).chain():
            if q.banks.space is not None:
                budget = min(budget, (q.banks.space - q.usage.space) // self.block_size)
        for fb, cnt in emap.holes(b0, count):
            if cnt > budget:
                return fb - b0 + max(budget, 0)
            budget -= cnt
        return count

    async def _allocate(self, node: Inode, emap: ExtentMap, b0: int, count: int,
                        principal: PrincipalId) -> int:
        """Map the holes in [b0, b0+count) to newly allocated unwritten extents charged
        to `principal`; returns the number of blocks allocated."""
        holes = emap.holes(b0, count)
        if not holes:
            return 0
        need = sum(c for _, c in holes)
        who = self.principal(principal)
        self.principals.charge(who, space=need * self.block_size)
        try:
            await self._allocate_blocks(node, emap, holes, need, principal)
        except BaseException:
            self.principals.refund(who, space=need * self.block_size)
            raise
        return need

    async def _allocate_blocks(self, node: Inode, emap: ExtentMap,
                               holes: list[tuple[int, int]], need: int,
                               principal: PrincipalId) -> None:
        await self._ensure_free(need)
        got: list[tuple[int, int, int]] = []
        for fb, cnt in holes:
            goal = emap.goal(fb)
            for start, length in self.alloc.allocate(cnt, goal):
                got.append((fb, start, length))
                fb += length
        await self._reserve_host_space([(start, length) for _fb, start, length in got])
        for fb, start, length in got:
            emap.add(fb, start, length, UNWRITTEN, principal)
        node.blocks = emap.blocks

    async def fsync(self, fh: int | None, datasync: bool) -> None:
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.errors_seen < self.write_errors:
            h.errors_seen = self.write_errors  # reported once per open file, as Linux
            raise WriteFailed(f"data written to inode {h.inode.id} may be lost: "
                              f"{self.read_only}")
        try:
            if h is not None:
                # Its discardable dirty frames too (a barrier leaves those out): an
                # fsync'd discardable file survives a crash whole unless written again.
                await self.kernel.writeback_file(h.inode.id)
            await self.sync()
        except WriteFailed:
            if h is not None:
                h.errors_seen = self.write_errors
            raise

    # -- O_TMPFILE ------------------------------------------------------------------------------

    async def tmpfile(self, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[Handle, Inode]:
        """open(O_TMPFILE): a regular file in `parent` with no name, open. It is made as
        create makes a file (same checks, charges and inherited hints) under a name
        nobody can have looked up, which is then removed at once (no checkpoint in
        between): from then on it is exactly a file unlinked while open — its inode is
        not charged, its blocks are, it is freed at its last release or, after a
        crash, as an orphan at the next mount. `link` may give it a name (linkat with
        AT_EMPTY_PATH; the kernel refuses that for O_EXCL)."""
        d = self.inode(parent)
        n = self._next_fh
        while self.md.lookup(parent, name := b".sluice-tmpfile-%d" % n) is not None:
            n += 1  # someone made that name: not a name nobody knows, try the next
        node = self._new_inode(d, name, stat.S_IFREG | (mode & 0o7777), caller)
        try:
            h = self.open(node.id, flags, caller)
        finally:
            self._remove_name(parent, name)
            node.nlink = 0
            self._save(node, "nlink")
            self._inode_count -= 1
            self.principals.refund(self.principal(node.principal), inodes=1)
        self._tmpfiles.add(node.id)
        return h, node

    def _link_tmpfile(self, node: Inode, who: PrincipalId) -> None:
        """An O_TMPFILE inode gets its first name: charged as an inode again."""
        if self._inode_count >= self.max_inodes:
            raise NoSpace(f"no free inodes (limit {self.max_inodes})")
        self.principals.charge(self.principal(node.principal), inodes=1)
        self._inode_count += 1
        self._tmpfiles.discard(node.id)

    # -- fallocate and SEEK_DATA/SEEK_HOLE (docs/dev/invariants.md, "fallocate") -------------

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file, for the principal it was opened for.

        - mode 0 / KEEP_SIZE: the holes of the range become UNWRITTEN extents charged to
          the principal (EDQUOT or ENOSPC now, all or nothing, never at a later write);
          mode 0 grows the size to the end of the range (R6 first).
        - PUNCH_HOLE|KEEP_SIZE: whole blocks of the range are unmapped and freed as
          truncate frees them (revoke, drain, free after the durable commit: R3); the
          partial blocks at its ends get zeros written (relocated if sealed: R1).
        - ZERO_RANGE [|KEEP_SIZE]: as PUNCH_HOLE, but the range stays allocated: whole
          data blocks are replaced by fresh UNWRITTEN blocks of the same owner, holes are
          allocated and charged as by mode 0; without KEEP_SIZE the size grows.
        Every other mode: EOPNOTSUPP."""
        self._writable()
        h = self.handle(fh)
        if not h.writable:
            raise BadHandle("file not open for writing")
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        op = mode & ~FALLOC_FL_KEEP_SIZE
        if op not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) or \
                op == FALLOC_FL_PUNCH_HOLE and not keep_size:
            raise NotSupported(f"fallocate mode {mode:#x} is not supported")
        if offset < 0 or length <= 0:
            raise InvalidArgument("fallocate needs offset >= 0 and length > 0")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FileTooLarge("fallocate past the maximum file size")
        node = h.inode
        principal = h.grant.principal
        bs = self.block_size
        async with self._lock(node):
            emap = self._extents(node)
            grows = not keep_size and end > node.size
            fields = ["blocks"]
            if op == 0:
                b0, b1 = offset // bs, -(-end // bs)
                if grows:
                    # Charge first: a refusal changes nothing, not even the last block.
                    await self._allocate(node, emap, b0, b1 - b0, principal)
                    await self._zero_past_eof(node, node.size, end, principal)  # R6
                else:
                    await self._allocate(node, emap, b0, b1 - b0, principal)
                self._save_extents(node)
            else:
                if op == FALLOC_FL_ZERO_RANGE:
                    await self._reserve_zero_range(node, emap, offset, end, principal)
                    if grows:
                        await self._zero_past_eof(node, node.size, end, principal)  # R6
                await self._zero_partial_blocks(node, emap, offset, end, principal)
                await self._unmap_whole_blocks(node, emap, offset, end,
                                               replace=op == FALLOC_FL_ZERO_RANGE)
                node.mtime_ns = node.ctime_ns = _now()
                fields += ["mtime_ns", "ctime_ns"]
                if self._kill_priv(h, save=False):
                    fields.append("mode")
            if grows:
                node.size = end
                node.mtime_ns = node.ctime_ns = _now()
                fields += ["size", "mtime_ns", "ctime_ns"]
            node.blocks = emap.blocks
            self._save(node, *dict.fromkeys(fields))

    async def _reserve_zero_range(self, node: Inode, emap: ExtentMap, lo: int, hi: int,
                                  principal: PrincipalId) -> None:
        """ZERO_RANGE's checks, before anything changes: the whole data blocks it will
        replace fit in the free space (the old ones are free only after the commit),
        then the holes of the range are allocated (charged to `principal`)."""
        bs = self.block_size
        f0, f1 = -(-lo // bs), hi // bs
        replace = sum(s.count for s in emap.segments(f0, f1 - f0)
                      if s.dev_block != HOLE and s.state != UNWRITTEN) if f1 > f0 else 0
        holes = sum(c for _fb, c in emap.holes(lo // bs, -(-hi // bs) - lo // bs))
        # Replacing data blocks may use the copy-on-write reserve, as an overwrite may;
        # the holes are new allocations and leave it alone.
        await self._ensure_free(replace + holes, reserve=False)
        await self._allocate(node, emap, lo // bs, -(-hi // bs) - lo // bs, principal)

    async def _zero_partial_blocks(self, node: Inode, emap: ExtentMap, lo: int, hi: int,
                                   principal: PrincipalId) -> None:
        """Write zeros over [lo, hi) inside the blocks the range covers only partly, where
        they hold data (holes and unwritten blocks read as zeros already). A sealed block
        is relocated, not zeroed in place (R1)."""
        bs = self.block_size
        pieces: list[tuple[int, int]] = []
        if lo // bs == (hi - 1) // bs:
            if lo % bs or hi % bs:
                pieces.append((lo, hi))
        else:
            if lo % bs:
                pieces.append((lo, -(-lo // bs) * bs))
            if hi % bs:
                pieces.append(((hi // bs) * bs, hi))
        for a, b in pieces:
            seg = emap.segments(a // bs, 1)[0]
            if seg.dev_block == HOLE or seg.state == UNWRITTEN:
                continue
            g = self.kernel.grant(inode=node.id, generation=node.generation, extents=emap,
                                  rights=Rights.WRITE, principal=principal, charge=False)
            try:
                await self._write_data(node, g, a, bytes(b - a))
            finally:
                self.kernel.release(g)

    async def _unmap_whole_blocks(self, node: Inode, emap: ExtentMap, lo: int, hi: int, *,
                                  replace: bool) -> None:
        """Free the data blocks wholly inside [lo, hi) as truncate does: unmap them and
        revoke every grant on the file with no checkpoint in between, wait until no
        request through the old grants is in flight, then free them for reuse after
        the commit (R3). With `replace`, each freed run is mapped again at once to fresh
        UNWRITTEN blocks of the same owner (ZERO_RANGE keeps the range allocated)."""
        bs = self.block_size
        f0, f1 = -(-lo // bs), min(hi // bs, emap.end_block())
        if f1 <= f0:
            return
        runs = [(s.file_block, s.count) for s in emap.segments(f0, f1 - f0)
                if s.dev_block != HOLE and s.state != UNWRITTEN]
        if not runs:
            return
        if replace:
            await self._ensure_free(sum(c for _fb, c in runs), reserve=False)
        freed: list[tuple[int, int, int]] = []
        # From here to the regrant: no checkpoint (the map and the grants change as one).
        for fb, count in runs:
            gone = emap.remove_owned(fb, count)
            freed.extend(gone)
            if replace:
                at = fb
                for _dev, n, owner in gone:
                    for start, got in self.alloc.allocate(n, emap.goal(at)):
                        emap.add(at, start, got, UNWRITTEN, owner)
                        at += got
        old_grants = self._regrant(node)
        if not replace:
            self._refund_runs(freed)
        self._save_extents(node)
        node.blocks = emap.blocks
        self._save(node, "blocks")
        await self.kernel.wait_drained(old_grants)
        self.alloc.free_later([(d, c) for d, c, _o in freed])

    async def _trim_preallocation(self, node: Inode) -> None:
        """The file's last open handle closed: give back the UNWRITTEN blocks a
        KEEP_SIZE fallocate reserved past its end. (The volume cannot tell them from a
        crashed direct client's write layout, which the next mount drops: see
        FileSystem.load. So the reservation lasts while the file is open.)"""
        if node.nlink == 0 or not node.is_reg or self.read_only is not None or \
                self.kernel.grants_for(node.id):
            return
        bs = self.block_size
        emap = self._extents(node)
        keep = -(-node.size // bs)
        if emap.end_block() <= keep:
            return
        async with self._lock(node):
            if node.opens or self.kernel.grants_for(node.id):
                return
            if any(s.dev_block != HOLE and s.state != UNWRITTEN
                   for s in emap.segments(keep, emap.end_block() - keep)):
                return  # not only preallocation (fsck reports it)
            freed = emap.remove_owned(keep)
            node.blocks = emap.blocks
            self._refund_runs(freed)
            self._save_extents(node)
            self._save(node, "blocks")
            self.alloc.free_later([(d, c) for d, c, _o in freed])
        self.on_attr_changed(node.id)  # st_blocks changed behind the kernel's back

    def seek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the extent map: holes and UNWRITTEN blocks are
        holes (they read as zeros), FRESH and WRITTEN blocks are data; the end of the
        file is a hole. ENXIO at or past the end, or when no data follows."""
        h = self.handle(fh)
        node = h.inode
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise InvalidArgument(f"lseek whence {whence} is not SEEK_DATA or SEEK_HOLE")
        if offset < 0 or offset >= node.size:
            raise NoSuchOffset(f"offset {offset} is not inside the file ({node.size} bytes)")
        bs = self.block_size
        emap = self._extents(node)
        b0 = offset // bs
        b1 = -(-node.size // bs)
        for s in emap.segments(b0, b1 - b0):
            data = s.dev_block != HOLE and s.state != UNWRITTEN
            if data == (whence == os.SEEK_DATA):
                return max(offset, s.file_block * bs)
        if whence == os.SEEK_HOLE:
            return node.size
        raise NoSuchOffset(f"no data after offset {offset}")

    # -- direct clients (the shim's socket server calls these through fs/service.py) -----

    def grant_direct(self, node: Inode, readable: bool, writable: bool, caller: Caller) -> Grant:
        if writable:
            self._writable()
        g = self._grant_for(node, readable, writable, caller.principal)
        self._direct[g] = caller
        self._push_hints(node)
        return g

    def _direct_node(self, grant: Grant) -> Inode:
        if grant.revoked or grant not in self._direct and grant.parent is None:
            from kernelshim import GrantRevoked
            raise GrantRevoked(f"grant {grant.id} on inode {grant.inode} was revoked")
        return self.inode(grant.inode)

    async def _revoke_direct(self, node: Inode,
                             keep: Callable[[Grant, Caller], bool] | None = None) -> None:
        """Revoke direct clients' grants on `node` (those `keep` rejects, or all) and wait
        until no request through them is in flight."""
        gone: list[Grant] = []
        for g, who in list(self._direct.items()):
            if g.inode == node.id and (keep is None or not keep(g, who)):
                gone.extend(self.kernel.revoke_nowait(g))
                del self._direct[g]
        if gone:
            await self.kernel.wait_drained(gone)

    async def layout_get(self, grant: Grant, offset: int, length: int) -> int:
        """Write layout: allocate unwritten extents for the holes in the range."""
        self._writable()
        node = self._direct_node(grant)
        if offset < 0 or length < 0 or offset + length > MAX_FILE_SIZE:
            raise InvalidArgument(f"layout range {offset}+{length}")
        if not length:
            return 0
        bs = self.block_size
        b0, b1 = offset // bs, -(-(offset + length) // bs)
        async with self._lock(node):
            self._direct_node(grant)
            emap = self._extents(node)
            n = await self._allocate(node, emap, b0, b1 - b0, grant.principal)
            if n:
                self._save_extents(node)
                self._save(node, "blocks")
            # Sealed blocks in the range are copied to fresh ones the client may write
            # in place (a pNFS copy-on-write layout).
            for fb, cnt in emap.sealed_runs(b0, b1 - b0):
                g = self.kernel.grant(inode=node.id, generation=node.generation,
                                      extents=emap, rights=Rights.RW,
                                      principal=grant.principal, charge=False)
                try:
                    for at in range(fb, fb + cnt, COPY_BLOCKS):
                        k = min(COPY_BLOCKS, fb + cnt - at)
                        old = bytes(await self.kernel.read(g, at * bs, k * bs))
                        await self._write_data(node, g, at * bs, old)
                finally:
                    self.kernel.release(g)
        return n

    async def layout_commit(self, grant: Grant, offset: int, length: int) -> int:
        """The range was written: extents become written, size and mtime update."""
        self._writable()
        node = self._direct_node(grant)
        if offset < 0 or length < 0 or offset + length > MAX_FILE_SIZE:
            raise InvalidArgument(f"commit range {offset}+{length}")
        bs = self.block_size
        async with self._lock(node):
            self._direct_node(grant)
            # Exactly what was written through this grant becomes part of the file:
            # laid-out blocks never written stay unwritten (they read as zeros, and on a
            # real device they may still hold a deleted file's data).
            ranges = grant.take_written(offset, offset + length)
            if ranges:
                emap = self._extents(node)
                end = max(stop for _start, stop in ranges)
                if end > node.size:
                    # Growing: what this commit did not write between the old end and
                    # the new one must read as zeros (R6).
                    lo = node.size
                    for start, stop in ranges:
                        await self._zero_past_eof(node, lo, min(start, end), grant.principal)
                        lo = max(lo, stop)
                for start, stop in ranges:
                    b0, b1 = start // bs, -(-stop // bs)
                    emap.mark_written(b0, b1 - b0)
                self._unsealed.add(emap)
                self._save_extents(node)
                now = _now()
                if end > node.size:
                    node.size = end
                node.mtime_ns = node.ctime_ns = now
                self._save(node, "size", "blocks", "mtime_ns", "ctime_ns")
                self.changed_behind_kernel(node)
            return node.size

    async def append_direct(self, grant: Grant, data: memoryview) -> tuple[int, int]:
        """O_APPEND for a direct client: find EOF, allocate, write and commit under the
        inode lock, as `write` does for the kernel's O_APPEND handles, so appends through
        the mount and through the socket never overlap or interleave. Must keep the same
        crash rules as `write` (sealed blocks are written copy-on-write through
        `_write_data`). All or nothing: a bank or the device too full for the whole
        piece is an error. Returns (the offset written at, the new size)."""
        self._writable()
        node = self._direct_node(grant)
        n = len(data)
        async with self._lock(node):
            self._direct_node(grant)  # revoked while waiting for the lock?
            offset = node.size
            if n:
                await self._write_locked(node, grant, offset, data, short_ok=False)
                self.changed_behind_kernel(node)
            return offset, node.size

    def changed_behind_kernel(self, node: Inode) -> None:
        """A direct client changed `node`: drop what the kernel caches of it."""
        if self._cache_mode(node) == "kernel":
            self.on_data_changed(node.id)
        else:
            self.on_attr_changed(node.id)

    async def close_direct(self, grant: Grant) -> None:
        """A direct client closed its file: drop unused preallocation past the end."""
        self._direct.pop(grant, None)
        node = self._inodes.get(grant.inode)
        if node is None or not node.is_reg or node.nlink == 0 and node.opens == 0:
            return
        bs = self.block_size
        async with self._lock(node):
            emap = self._extents(node)
            keep = -(-node.size // bs)
            if emap.end_block() > keep:
                tail = [s for s in emap.segments(keep, emap.end_block() - keep)
                        if s.dev_block != HOLE and s.state != UNWRITTEN]
                if not tail:  # only unwritten preallocation past EOF
                    # Readers never touch unwritten blocks past EOF: they keep their
                    # grants. Writers may have written (uncommitted) into the range.
                    old = self._regrant(node, keep=lambda g: not g.rights & Rights.WRITE)
                    freed = emap.remove_owned(keep)
                    await self.kernel.wait_drained(old)
                    node.blocks = emap.blocks
                    self._refund_runs(freed)
                    self.alloc.free_later([(d, c) for d, c, _o in freed])
                    self._save_extents(node)
                    self._save(node, "blocks")
        self._maybe_evict(node)  # the kernel may never have looked this inode up

    def retag_cached(self, src: int, dst: int) -> None:
        for node in self._inodes.values():
            if node.principal == src:
                node.principal = dst
            if node.extents is not None:
                for e in node.extents._ext:
                    if e[4] == src:
                        e[4] = dst

    def statistics_dict(self) -> dict:
        """Everything `sluice stats` shows, as plain data."""
        fs = self.statistics()
        dev = self.kernel.device.statistics()
        pg = self.kernel.pager.statistics()
        names = {p.id: p.name for p in self.principals.walk()}
        return {
            "fs": dataclasses.asdict(fs),
            "device": {"block_size": dev.block_size, "nblocks": dev.nblocks,
                       "profile": dev.profile, "scheduler": dev.scheduler,
                       "checksum_errors": dev.checksum_errors,
                       # what the profile can serve (None: unlimited, profile none)
                       "capacity": {"iops": dev.capacity_iops, "bps": dev.capacity_bps},
                       "timeline_ahead_max_s": dev.timeline_ahead_max_s,
                       "per_principal": {names.get(s.principal, str(s.principal)):
                                         dataclasses.asdict(s) for s in dev.per_principal}},
            # The scheduler's view per principal name (blockdev/scheduler.py): bytes and
            # requests, latency from arrival to completion (queue + service), throughput
            # in the last complete second, requests waiting, reservation met/missed.
            "io": {names.get(s.principal, str(s.principal)): {
                "read_bytes": s.bytes_read, "write_bytes": s.bytes_written, "ops": s.ops,
                "reads": s.reads, "writes": s.writes, "discards": s.discards,
                "flushes": s.flushes,
                "latency_us": {"p50": s.p50_s * 1e6, "p95": s.p95_s * 1e6,
                               "p99": s.p99_s * 1e6, "max": s.max_s * 1e6,
                               "mean": s.mean_s * 1e6},
                "iops": s.iops, "bps": s.bps, "waiting": s.waiting,
                "reserved_ops": s.reserved_ops,
                "reservation": {"met": s.reservation_met, "missed": s.reservation_missed},
                "throttled": s.throttled} for s in dev.per_principal},
            "pager": {"policy": pg.policy, "frames": pg.frames,
                      "frames_used": pg.frames_used, "hits": pg.hits,
                      "misses": pg.misses, "bypassed_blocks": pg.bypassed_blocks,
                      "evictions": pg.evictions, "writeback": pg.writeback,
                      "dirty": pg.dirty, "writeback_bytes": pg.writeback_bytes,
                      "discarded": pg.discarded, "discarded_files": len(self.discarded),
                      "resident": {names.get(p, str(p)): n for p, n in pg.resident.items()}},
            "principals": [dataclasses.asdict(i) for i in self.principals.info()],
            # The pager's account per principal: what it holds, and how it fared.
            "cache": {names.get(pid, str(pid)): {k: getattr(c, k) for k in CACHE_FIELDS}
                      for pid, c in sorted(pg.per_principal.items())},
            # What the layers below enforce, as they were last told (banks pushed down).
            "enforced_banks": {
                names.get(pid, str(pid)): {
                    "pager": {"cache_min": n.cache_min, "cache_max": n.cache_max},
                    "scheduler": {k: getattr(n, k) for k in (
                        "io_reserve_iops", "io_reserve_bps", "io_weight",
                        "io_limit_iops", "io_limit_bps")}}
                for pid, n in self._enforced_banks()},
            "fuse_requests": dict(self.fuse_requests),
        }

    def _enforced_banks(self) -> list[tuple[PrincipalId, BankNode]]:
        pager_banks, sched_banks = self.kernel.enforced_banks()
        # Both are told the same snapshot; report the pager's, checked against the
        # scheduler's (a difference would be a push-down bug worth seeing).
        if pager_banks is not sched_banks and dict(pager_banks) != dict(sched_banks):
            log.error("pager and scheduler hold different bank snapshots")
        return sorted(pager_banks.items())

    # -- directories ---------------------------------------------------------------------------

    def opendir(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not node.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return node

    def readdir(self, ino: int, after: int, limit: int) -> list[tuple[int, bytes, Inode]]:
        """Entries past cookie `after` (0 = from the start): (cookie, name, inode).
        Cookies 1 and 2 are '.' and '..'; entry cookies are dentry ids + 2 (stable)."""
        node = self.inode(ino)
        out: list[tuple[int, bytes, Inode]] = []
        if after < 1:
            out.append((1, b".", node))
        if after < 2:
            out.append((2, b"..", self.inode(node.parent)))
        for row in self.md.readdir(ino, max(0, after - 2), limit):
            out.append((row[0] + 2, bytes(row[1]), self._cache_row(row[2:])))
        if after == 0:
            self._touch_atime(node)
        return out

    # -- extended attributes -------------------------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > XATTR_NAME_MAX:
            raise OutOfRange(f"xattr name of {len(name)} bytes (limit {XATTR_NAME_MAX})")
        if name in _XATTR_NAMESPACES:
            raise InvalidArgument(f"xattr name {name!r} is only a namespace")  # as ext4
        if not name.startswith(_XATTR_NAMESPACES):
            raise NotSupported(f"xattr namespace of {name!r} is not supported")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check_xattr_name(name)
        self.inode(ino)
        v = self.md.get_xattr(ino, name)
        if v is None:
            raise NoData(f"no xattr {name!r}")
        return v

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        self._writable()
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise TooBig(f"xattr value of {len(value)} bytes (limit {XATTR_SIZE_MAX})")
        node = self.inode(ino)
        exists = self.md.get_xattr(ino, name) is not None
        if flags & XATTR_CREATE and exists:
            raise Exists(f"xattr {name!r} exists")
        if flags & XATTR_REPLACE and not exists:
            raise NoData(f"no xattr {name!r}")
        check_hint_xattr(name, value)
        listed = node.xattr_bytes
        if not exists:
            # Kept per inode, so that setting the n-th xattr costs O(1), not O(n).
            if listed is None:
                listed = self.md.xattr_list_size(ino)
            listed += len(name) + 1
            if listed > XATTR_LIST_MAX:
                raise NoSpace("too many xattrs on this inode")
        self.md.set_xattr(ino, name, value)
        node.xattr_bytes = listed
        if name.startswith(HINT_PREFIX):
            node.hints = None
            if name in (PRIORITY_XATTR, DISCARDABLE_XATTR):
                self._push_hints(node, changed=True)
        node.ctime_ns = _now()
        self._save(node, "ctime_ns")

    def listxattr(self, ino: int) -> list[bytes]:
        self.inode(ino)
        return self.md.list_xattrs(ino)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        self._check_xattr_name(name)
        node = self.inode(ino)
        if not self.md.remove_xattr(ino, name):
            raise NoData(f"no xattr {name!r}")
        if node.xattr_bytes is not None:
            node.xattr_bytes -= len(name) + 1
        if name.startswith(HINT_PREFIX):
            node.hints = None
            if name in (PRIORITY_XATTR, DISCARDABLE_XATTR):
                self._push_hints(node, changed=True)
        node.ctime_ns = _now()
        self._save(node, "ctime_ns")

    # -- volume ------------------------------------------------------------------------------

    def statistics(self) -> FsStatistics:
        # Blocks waiting for the commit that freed them are in use by no file: free (a
        # writer short of space makes that commit durable and gets them).
        free = self.alloc.free + self.alloc.pending_blocks
        return FsStatistics(self.block_size, self.alloc.nblocks, free,
                            max(0, free - self.cow_reserve),
                            self._inode_count, self.max_inodes, len(self._handles),
                            len(self._inodes), self.kernel.live_grants)

    def access(self, ino: int, mask: int, caller: Caller) -> None:
        """Permission check as the kernel does it (used when default_permissions is off
        and by direct clients)."""
        node = self.inode(ino)
        if mask == os.F_OK:
            return
        if caller.uid == 0:
            if mask & os.X_OK and not node.is_dir and not node.mode & 0o111:
                raise PermissionDenied(f"access {mask:#o} to inode {ino} denied")
            return
        if caller.uid == node.uid:
            bits = (node.mode >> 6) & 7
        elif caller.gid == node.gid or _in_group(caller.pid, node.gid):
            bits = (node.mode >> 3) & 7
        else:
            bits = node.mode & 7
        if mask & ~bits & 7:
            raise PermissionDenied(f"access {mask:#o} to inode {ino} denied")

