# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Extended attributes, and sluice's own hint xattrs (user.sluice.cache, .priority,
.discardable, .discarded): checking their values and pushing them to the pager."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import trio

from kernelshim import PrincipalId
from kernelshim.kernel import PRIORITY_MAX, PRIORITY_MIN

from .errors import (Exists, InvalidArgument, NoData, NoSpace, NotFound, NotPermitted,
                     NotSupported, OutOfRange, TooBig)
from .inodes import Inode, now_ns

if TYPE_CHECKING:
    from .filesystem import FileSystem


XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
#: bytes of names and values of one inode's xattrs together. ext4 keeps an inode's
#: xattrs in the inode and one block and answers ENOSPC past that; sluice keeps them
#: in meta.db, charged to the inode's principal (xattr_cost), and answers ENOSPC past
#: four values of the largest size. (The discarded mark, the daemon's own, is not
#: counted: see xattr_cost.)
XATTR_INODE_MAX = 256 * 1024
#: bytes of names and values one principal may write into one metadata transaction
#: before its next setxattr waits for the commit (`Xattrs.xattr_room`), and how long
#: that waits at most
XATTR_BYTES_PER_COMMIT = 8 << 20
XATTR_COMMIT_WAIT = 1.5
XATTR_CREATE = 1
XATTR_REPLACE = 2
HINT_PREFIX = b"user.sluice."


#: cache mode: "kernel" (the kernel's page cache, for shared mmap) or "pager" (direct
#: I/O, every read and write reaches the pager; "direct" is its older name)
CACHE_XATTR = b"user.sluice.cache"
#: answered by the daemon at the mount's root (the control socket), kept nowhere
CONTROL_XATTR = b"user.sluice.control"
CACHE_MODES = (b"pager", b"direct", b"kernel")


#: pager hints of unmodified programs (pushed to the pager at open and on change):
#: a signed priority that orders the owner's own pages (0 = normal, higher = kept
#: longer), and whether the file is a cache whose pages may be dropped unwritten
PRIORITY_XATTR = b"user.sluice.priority"
DISCARDABLE_XATTR = b"user.sluice.discardable"


#: set on a discardable file the pager emptied (its dirty pages were dropped, or a
#: crash may have lost them); cleared by the next write or truncate
DISCARDED_XATTR = b"user.sluice.discarded"
#: the hints a file made in a directory inherits from it
INHERITED_HINTS = (PRIORITY_XATTR, DISCARDABLE_XATTR, CACHE_XATTR)
_KEPT_HINTS = frozenset((*INHERITED_HINTS, DISCARDED_XATTR))
#: the longest hint value the daemon keeps in memory (every valid one is a few bytes)
HINT_VALUE_MAX = 64
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


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


def xattr_cost(name: bytes, value: bytes) -> int:
    """Bytes of the inode principal's space bank an xattr takes: its name and value,
    as meta.db holds them (the mount recounts the same: Metadata.usage_by_principal).
    The discarded mark is the daemon's, set and removed by the pager's emptying
    (fs/discard.py) whoever owns the file: free, and only ever "1" (check_hint_xattr)."""
    return 0 if name == DISCARDED_XATTR else len(name) + len(value)


def check_hint_xattr(name: bytes, value: bytes) -> None:
    """Refuse a bad value of one of sluice's own hint xattrs (EINVAL), and the name the
    mount's root answers with its control socket (EPERM: a tenant's directory naming
    a socket of its own would take in clients pointed at it; hostile probe 12, L1)."""
    if name == CONTROL_XATTR:
        raise NotPermitted("user.sluice.control is sluice's own: the mount's root "
                           "answers it with the volume's control socket")
    if name == DISCARDED_XATTR:
        if value != b"1":
            raise InvalidArgument("user.sluice.discarded is a mark: its value is 1")
    elif name == CACHE_XATTR:
        if value.strip() not in CACHE_MODES:
            raise InvalidArgument("user.sluice.cache must be 'pager' (or 'direct') or "
                                  "'kernel'")
    elif name == PRIORITY_XATTR:
        parse_priority(value)
    elif name == DISCARDABLE_XATTR:
        parse_discardable(value)
    elif name.startswith(HINT_PREFIX):
        # Only the hints sluice knows: the daemon keeps a file's hints in memory while
        # its inode is cached and copies a directory's onto every file made in it, so
        # any name under the prefix held 64 KB values, uncharged (probe 18, F6).
        raise InvalidArgument(f"{name.decode(errors='replace')} is not a sluice hint: "
                              "they are user.sluice.priority, .discardable and .cache")


#: what one changed row may cost the metadata's write-ahead log at the next commit
#: (a page of the database), besides its own bytes: `Xattrs.metadata_room`
METADATA_PAGE = 4096


class Xattrs:
    """Extended attributes (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: `_xattr_bytes` (what each principal has written into the metadata
    transaction since the last commit: `xattr_room`); it caches per inode
    (`Inode.hints`, `Inode.xattr_bytes`, `Inode.pushed_hints`)."""

    _xattr_bytes: dict[PrincipalId, int]
    #: bytes of metadata the open transaction may write, as `metadata_room` counts them
    _meta_pending: int

    async def xattr_room(self: FileSystem, principal: PrincipalId, nbytes: int) -> None:
        """Before a setxattr of `nbytes` (its name and value) for `principal`: once the
        principal has written XATTR_BYTES_PER_COMMIT into the open metadata
        transaction, wait for the next commit (at most XATTR_COMMIT_WAIT: the host
        holds the file's lock meanwhile). The transaction's commit writes all of it in
        one step of the loop: one tenant rewriting 63 KiB values on its own files put
        ~100 MB into each second's commit, and every tenant's requests waited 100-230
        ms behind it (probe 18, F1). A principal's rewrites then go at about
        XATTR_BYTES_PER_COMMIT a commit interval, and those that waited out
        XATTR_COMMIT_WAIT."""
        # Checked again after each commit, and counted in the same step as the check
        # passes: many at once each saw room before any counted its bytes (64 in
        # parallel put 12 MiB into one transaction; review of stop 26, 3).
        with trio.move_on_after(XATTR_COMMIT_WAIT):
            while self._xattr_bytes.get(principal, 0) + nbytes > XATTR_BYTES_PER_COMMIT \
                    and self._xattr_bytes.get(principal, 0) > 0:
                await self._commit_ended.wait()
        self.metadata_room(METADATA_PAGE + nbytes)
        self._xattr_bytes[principal] = self._xattr_bytes.get(principal, 0) + nbytes
        # (its rows are counted by `setxattr` once written: a refused one counts nothing)

    def transaction_ended(self: FileSystem) -> None:
        """The metadata transaction was committed: what `xattr_room` and
        `metadata_room` counted in it starts again from nothing."""
        self._xattr_bytes.clear()
        self._meta_pending = 0

    def metadata_room(self: FileSystem, nbytes: int) -> None:
        """NoSpace (ENOSPC) unless the host filesystem under the device has room for
        `nbytes` more of metadata besides what the open transaction holds already
        (`Kernel.host_metadata_room`: the first half of the headroom the device
        keeps). Checked by what adds rows (a new inode, an attribute write) before
        it changes anything, and counted (`metadata_written`) only once it has: a
        tenant that filled the host with data and then made names and attributes
        failed the next commit, and the volume went read-only for every tenant
        (probe 22, F3); and refused requests, which commit nothing, must not fill
        the count (review of stop 27, F1: 25,000 mkdirs refused EDQUOT made every
        tenant's names ENOSPC on a host 99% free). Never blocks (one fstatvfs)."""
        room = self.kernel.host_metadata_room()
        if room is not None and self._meta_pending + nbytes > room:
            raise NoSpace("the host filesystem under the volume is full (what is left "
                          "is kept for committing the volume's metadata)")

    def metadata_written(self: FileSystem, nbytes: int) -> None:
        """`nbytes` of rows went into the open transaction (see `metadata_room`)."""
        self._meta_pending += nbytes

    def _hints(self: FileSystem, node: Inode) -> dict[bytes, bytes]:
        """The file's sluice hints (and the discarded mark), as the daemon keeps them
        while the inode is cached: the known names only, with a value short enough to
        be one (a volume written before names and values were checked may hold
        others: left in meta.db, never loaded; probe 18, F6)."""
        if node.hints is None:
            node.hints = {k: v for k, v in self.md.hint_xattrs(node.id, HINT_PREFIX)
                          if k in _KEPT_HINTS and len(v) <= HINT_VALUE_MAX}
        return node.hints

    def _push_hints(self: FileSystem, node: Inode, *, changed: bool = False) -> None:
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

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > XATTR_NAME_MAX:
            raise OutOfRange(f"xattr name of {len(name)} bytes (limit {XATTR_NAME_MAX})")
        if name in _XATTR_NAMESPACES:
            raise InvalidArgument(f"xattr name {name!r} is only a namespace")  # as ext4
        if not name.startswith(_XATTR_NAMESPACES):
            raise NotSupported(f"xattr namespace of {name!r} is not supported")

    def has_no_xattrs(self: FileSystem, ino: int) -> bool:
        """Whether inode `ino` is known, from the inode cache alone, to have no extended
        attributes at all (False when not known). Never raises, never queries."""
        node = self._inodes.get(ino)
        return node is not None and node.xattr_bytes == 0

    def getxattr(self: FileSystem, ino: int, name: bytes) -> bytes:
        self._check_xattr_name(name)
        node = self.inode(ino)
        if name == DISCARDED_XATTR and ino in self.discarded:
            return b"1"  # (reads as empty already: marked as the emptying will mark it)
        if node.xattr_bytes == 0 or name == CONTROL_XATTR:  # (one kept before: not shown)
            raise NoData(f"no xattr {name!r}")
        v = self.md.get_xattr(ino, name, limit=XATTR_SIZE_MAX)
        if v is None:
            raise NoData(f"no xattr {name!r}")
        return v

    def _check_live(self: FileSystem, node: Inode) -> None:
        """ENOENT for an inode already freed (no name, nothing open through the mount)
        that the kernel still refers to: an O_PATH descriptor reaches it through
        /proc/self/fd. A setxattr stored rows for an inode whose row was gone (fsck
        errors; bytes no bank held after a remount: probe 18, F7)."""
        if node.nlink == 0 and node.opens == 0 and node.id not in self._tmpfiles:
            raise NotFound(f"inode {node.id} was removed")

    def _check_inherited_hint(self: FileSystem, node: Inode, name: bytes,
                              uid: int | None) -> None:
        """A directory's hints are inherited by every file created in it, whoever
        creates it: only the directory's owner (or root) may set or remove them, as
        only its owner may set its default ACL. Another tenant allowed to write a
        shared directory made the files others then created there discardable, and a
        crash emptied them (probe 18, F2). `uid` None: the daemon's own call."""
        if uid is not None and uid != 0 and node.is_dir and node.uid != uid \
                and name.startswith(HINT_PREFIX):
            raise NotPermitted(f"only the owner of a directory may change its hint "
                               f"{name.decode(errors='replace')}: the files created in it "
                               "inherit it")

    def setxattr(self: FileSystem, ino: int, name: bytes, value: bytes, flags: int,
                 uid: int | None = None) -> None:
        self._writable()
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise TooBig(f"xattr value of {len(value)} bytes (limit {XATTR_SIZE_MAX})")
        node = self.inode(ino)
        self._check_live(node)
        self._check_inherited_hint(node, name, uid)
        old = self.md.get_xattr(ino, name)
        exists = old is not None
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
        # Charged to the inode's principal before anything changes (EDQUOT changes
        # nothing); a smaller value refunds the difference once stored.
        grow = xattr_cost(name, value) - (xattr_cost(name, old) if old is not None else 0)
        owner = self.principal(node.principal)
        if grow > 0:
            total = self.md.xattr_total(ino, skip=DISCARDED_XATTR)
            if total + grow > XATTR_INODE_MAX:
                raise NoSpace(f"xattrs of this inode would take {total + grow} bytes "
                              f"(limit {XATTR_INODE_MAX})")
            self.principals.charge(owner, space=grow)
        try:
            self.md.set_xattr(ino, name, value)
        except sqlite3.OperationalError as exc:
            if grow > 0:
                self.principals.refund(owner, space=grow)
            # The host filesystem under meta.db is full: this request gets ENOSPC.
            # SQLite undid the statement (Metadata.set_xattr); had it undone the
            # whole transaction, others' changes went with it: the volume fails.
            if "full" not in str(exc):
                raise
            if not self.md.db.in_transaction:
                self.fail(f"the metadata transaction was lost in setxattr: {exc}")
            raise NoSpace("no room for the xattr in the metadata database (the host "
                          "filesystem is full)") from None
        if grow < 0:
            self.principals.refund(owner, space=-grow)
        self.metadata_written(METADATA_PAGE + len(name) + len(value))
        node.xattr_bytes = listed
        if name.startswith(HINT_PREFIX):
            node.hints = None
            if name in (PRIORITY_XATTR, DISCARDABLE_XATTR):
                self._push_hints(node, changed=True)
        node.ctime_ns = now_ns()
        self._save(node, "ctime_ns")

    def listxattr(self: FileSystem, ino: int) -> list[bytes]:
        self.inode(ino)
        names = [n for n in self.md.list_xattrs(ino) if n != CONTROL_XATTR]
        if ino in self.discarded and DISCARDED_XATTR not in names:
            names.append(DISCARDED_XATTR)  # (as getxattr answers it)
        return names

    def removexattr(self: FileSystem, ino: int, name: bytes, uid: int | None = None) -> None:
        self._writable()
        self._check_xattr_name(name)
        if name == CONTROL_XATTR:
            check_hint_xattr(name, b"")  # (NotPermitted)
        node = self.inode(ino)
        self._check_live(node)
        self._check_inherited_hint(node, name, uid)
        old = self.md.get_xattr(ino, name)
        if old is None or not self.md.remove_xattr(ino, name):
            raise NoData(f"no xattr {name!r}")
        if cost := xattr_cost(name, old):
            self.principals.refund(self.principal(node.principal), space=cost)
        if node.xattr_bytes is not None:
            node.xattr_bytes -= len(name) + 1
        if name.startswith(HINT_PREFIX):
            node.hints = None
            if name in (PRIORITY_XATTR, DISCARDABLE_XATTR):
                self._push_hints(node, changed=True)
        node.ctime_ns = now_ns()
        self._save(node, "ctime_ns")
