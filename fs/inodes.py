# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""The inode cache: the `Inode` objects the metadata server keeps while the kernel or
an open file refers to them, their extent maps and locks, and saving their rows.

Also the value types every concern shares: `Caller` (who asks), `Inode`, `Handle` (an
open file), and the small helpers for names and times."""

from __future__ import annotations

import dataclasses
import stat
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from kernelshim import ExtentMap, Grant, PrincipalId, ROOT_PRINCIPAL
from kernelshim.principals import Principal

from .errors import Damaged, InvalidArgument, NameTooLong, NotFound
from .metadata import INODE_COLUMNS

if TYPE_CHECKING:
    from .filesystem import FileSystem


ROOT_INODE = 1
NAME_MAX = 255
LINK_MAX = 65000
MAX_FILE_SIZE = 1 << 50
#: the longest symlink target (PATH_MAX - 1, as `symlink` enforces)
SYMLINK_MAX = 4095
FILE_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                        stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})
_U32 = 1 << 32
_I64 = 1 << 63


def row_problems(row: tuple) -> dict[str, str]:
    """What is wrong with an inode row (INODE_COLUMNS) read from meta.db: column ->
    why, empty if nothing. SQLite keeps whatever a writer put in a column ('7', 1.5, a
    blob), so a damaged or crafted volume is checked column by column: every number
    an integer in the range the kernel and the daemon's arithmetic take."""
    bad: dict[str, str] = {}
    v = dict(zip(INODE_COLUMNS, row))
    for col, value in v.items():
        if col != "target" and type(value) is not int:
            bad[col] = f"{value!r} is not an integer"

    def out_of(col: str, lo: int, hi: int, why: str = "is out of range") -> None:
        if col not in bad and not lo <= v[col] <= hi:
            bad[col] = f"{v[col]} {why}"

    out_of("id", 1, _I64 - 1, "is not a positive inode number")
    mode = v["mode"]
    if "mode" not in bad and (mode >> 16 or stat.S_IFMT(mode) not in FILE_TYPES):
        # (checked in this order: S_IFMT overflows past 64 bits)
        bad["mode"] = f"{mode} (0o{mode:o}) has no file type"
    out_of("generation", 0, _U32 - 1)
    for col in ("uid", "gid"):  # ((uid_t)-1 means "no change" to the kernel)
        out_of(col, 0, _U32 - 2, "is not a valid id")
    # (links are refused past LINK_MAX, but a directory's count of subdirectories was
    # not bounded before; any count fits the kernel's 32 bits)
    out_of("nlink", 0, _U32 - 1)
    out_of("size", 0, MAX_FILE_SIZE, f"is out of range (0..{MAX_FILE_SIZE})")
    out_of("blocks", 0, MAX_FILE_SIZE // 512)
    out_of("rdev", 0, _U32 - 1)
    target = v["target"]
    if "mode" not in bad and stat.S_ISLNK(mode) and (
            not isinstance(target, bytes) or not 0 < len(target) <= SYMLINK_MAX
            or b"\0" in target):
        bad["target"] = f"a symlink target must be 1..{SYMLINK_MAX} bytes without NUL"
    return bad


def check_row(row: tuple) -> tuple:
    """`row` if it makes sense, else Damaged naming the inode and what is wrong."""
    bad = row_problems(row)
    if bad:
        raise Damaged(f"inode {row[0]!r} is damaged in meta.db ("
                      + ", ".join(f"{k} {v}" for k, v in bad.items())
                      + "): run sluice fsck")
    return row


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the requesting process's credentials."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022
    principal: PrincipalId = ROOT_PRINCIPAL
    #: supplementary groups fixed when a direct client connected (None: read them
    #: from /proc/PID at the request, as for FUSE requests)
    groups: frozenset[int] | None = None


class Inode:
    """A cached inode: the row's columns plus runtime state."""

    __slots__ = (*INODE_COLUMNS, "lookups", "opens", "handles", "kernel_writers", "extents",
                 "lock", "hints", "xattr_bytes", "pushed_hints")

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
        #: its open handles by file handle number (what `_regrant` gives fresh grants:
        #: a scan of every open handle of the volume, once per part of a truncate of
        #: many extents, cost another tenant's handles' count each part)
        self.handles: dict[int, Handle] = {}
        #: of `opens`, the handles open for writing through the mount: while there is
        #: one, the kernel may hold dirty pages of the file (a shared writable mapping)
        self.kernel_writers = 0
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


def now_ns() -> int:
    return time.time_ns()


#: timestamps are stored as signed 64-bit nanoseconds (1677-09-21 .. 2262-04-11)
_TIME_MIN, _TIME_MAX = -(1 << 63), (1 << 63) - 1


def clamp_time(ns: int) -> int:
    """A timestamp the volume can store: out-of-range times are clamped to the nearest
    representable one, as ext4 clamps to its own range (never an error)."""
    return min(max(ns, _TIME_MIN), _TIME_MAX)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid name {name!r}")


#: rows of a file's extent map loaded in one step of the loop (`preload_extents`)
LOAD_EXTENTS_PAGE = 2048
#: extents of the largest map a file's last close drops from the cache
DROP_EXTENTS_MAX = 64
#: cached inodes past which a file's last close drops its map (`_drop_clean_extents`)
DROP_EXTENTS_CACHED = 10_000


class InodeCache:
    """The inode cache (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: `_inodes` (number -> cached `Inode`). Every other concern reaches an
    inode through `inode()`, and saves it through `_save` / `_save_extents`."""

    #: inode number -> the cached inode (pinned while looked up, open, locked or granted)
    _inodes: dict[int, Inode]
    #: principals' storage handed to others so far (`retag_cached`)
    retags: int = 0

    def inode(self: FileSystem, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is None:
            row = self.md.get_inode(ino)
            if row is None:
                raise NotFound(f"inode {ino} does not exist")
            node = self._inodes[ino] = Inode(check_row(row))
        return node

    def _cache_row(self: FileSystem, row: tuple) -> Inode:
        node = self._inodes.get(row[0])
        if node is None:
            node = self._inodes[row[0]] = Inode(check_row(row))
        return node

    def _extents(self: FileSystem, node: Inode) -> ExtentMap:
        if node.extents is None:
            try:
                node.extents = ExtentMap.load(self.md.load_extents(node.id))
            except ValueError as exc:  # two extents map a file block (the mount checked
                # each extent, not how they fit together): fsck repairs it
                raise Damaged(f"inode {node.id}: {exc} in meta.db: run sluice fsck") from None
        return node.extents

    async def preload_extents(self: FileSystem, node: Inode) -> None:
        """Load the file's extent map, if not cached, LOAD_EXTENTS_PAGE rows a step of
        the loop (`_extents` loads it whole, in one step: 0.07 s at 50,000 extents,
        0.2 s at 100,000: probe 11, F5). Called before the requests that may need the
        map of a file of many extents: an open (the mount's or a direct client's), a
        truncate, the freeing of a file. Another request that needs the map meanwhile
        loads it whole itself; this load is then dropped."""
        if node.extents is not None or not node.is_reg:
            return
        retags = self.retags
        rows = self.md.load_extents_after(node.id, -1, LOAD_EXTENTS_PAGE)
        emap = ExtentMap()
        try:
            while True:
                emap.extend_loaded(rows)
                if len(rows) < LOAD_EXTENTS_PAGE:
                    break
                await trio.lowlevel.checkpoint()
                if node.extents is not None or self.retags != retags:
                    # (loaded whole meanwhile; or a principal's storage was handed to
                    # another, rows this load read retagged behind it: the next use
                    # loads the map whole: review of stop 23, 2)
                    return
                rows = self.md.load_extents_after(node.id, rows[-1][0], LOAD_EXTENTS_PAGE)
        except ValueError as exc:
            raise Damaged(f"inode {node.id}: {exc} in meta.db: run sluice fsck") from None
        if node.extents is None:
            node.extents = emap

    def _drop_clean_extents(self: FileSystem, node: Inode) -> None:
        """The file's last handle closed: drop its extent map from the cache (loaded
        again when next needed) unless something else still uses it — a direct
        client's grant (which shares it), a change not yet saved, FRESH extents the
        next commit seals, a holder of the file's lock. A map is five containers the
        garbage collector walks at every full collection, whatever they hold: a tenant
        that keeps 300,000 files looked up made each full collection hold every
        tenant 0.1-0.7 s (probe 11, F1); a cached inode not open is now one object.
        Only a map of at most DROP_EXTENTS_MAX extents, and only while more than
        DROP_EXTENTS_CACHED inodes are cached: a larger map, or any while the cache is
        small, is kept, as loading it again costs more than its objects do."""
        emap = node.extents
        # (a map of many extents stays: loading it again costs more than it holds;
        # so do all while the cache is small: an open after it costs a query, 25-45%
        # of a small file's open, read and close: review of stop 23, 3)
        if emap is None or len(self._inodes) <= DROP_EXTENTS_CACHED or \
                len(emap) > DROP_EXTENTS_MAX or node.opens or \
                emap in self._unsealed or emap.fresh or \
                emap.has_changes() or (node.lock is not None and node.lock.locked()) or \
                self.kernel.grants_for(node.id):
            return
        node.extents = None

    def _lock(self: FileSystem, node: Inode) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock

    @asynccontextmanager
    async def _limited_lock(self: FileSystem, node: Inode,
                            most_ios: int) -> AsyncIterator[None]:
        """The inode lock for a write whose place at its writer's I/O limits has gone
        (inside `Kernel.limit_scope`): when another holds the lock, the place is priced
        at `most_ios`, the most requests the write can make, until the write ends
        (`Kernel.limit_hold`), so that the writes waiting behind a held lock do not all
        go down at once after it (second review of F1, A)."""
        lock = self._lock(node)
        if lock.locked():
            self.kernel.limit_hold(most_ios)
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _maybe_evict(self: FileSystem, node: Inode) -> None:
        # An unlinked inode stays pinned until _destroy has deleted its row; after that
        # the kernel's last forget must drop it (else every unlinked inode leaks here).
        if node.lookups <= 0 and node.opens <= 0 and node.id != ROOT_INODE and (
                node.nlink > 0 or self.md.get_inode(node.id) is None):
            # Direct clients' grants share node.extents: a reloaded inode would get a
            # new map they never see (their writes: NotAllocated; reads: stale holes).
            if (node.lock is None or not node.lock.locked()) and \
                    not self.kernel.grants_for(node.id):
                self._inodes.pop(node.id, None)

    def _save(self: FileSystem, node: Inode, *fields: str) -> None:
        # Gathered per inode and run before the next read of the table or commit
        # (Metadata.update_inode_later): in the same transaction as at once.
        self.md.update_inode_later(node.id, {f: getattr(node, f) for f in fields})

    def _save_extents(self: FileSystem, node: Inode) -> None:
        assert node.extents is not None
        deleted, upserts = node.extents.take_changes(with_owner=True)
        if deleted or upserts:
            self.md.save_extent_changes(node.id, deleted, upserts)

    def forget(self: FileSystem, ino: int, n: int) -> None:
        node = self._inodes.get(ino)
        if node is None:
            return
        node.lookups -= n
        self._maybe_evict(node)

    def count_lookup(self: FileSystem, node: Inode) -> None:
        node.lookups += 1

    def principal(self: FileSystem, pid: PrincipalId | int) -> Principal:
        return self.principals.by_id(pid)

    def retag_cached(self: FileSystem, src: int, dst: int) -> None:
        """Principal `src`'s storage now belongs to `dst` (the rows are retagged by the
        caller): the cached inodes and extent maps follow (a map being loaded in
        parts, `preload_extents`, is dropped: `retags`)."""
        self.retags += 1
        for node in self._inodes.values():
            if node.principal == src:
                node.principal = dst
            if node.extents is not None:
                node.extents.retag_owner(src, dst)
