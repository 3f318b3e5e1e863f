"""The metadata server's domain logic: names, inodes, permissions, extents.

`FileSystem` knows nothing of FUSE (operations.py translates) and nothing of SQL
(metadata.py holds every statement). It never moves file data itself: reads and
writes go through kernelshim grants, one per open handle, exactly as a direct client's
would. What it does on the data path is metadata: allocating extents for a write
layout, committing them, updating size and times.

`FileSystem` is a façade over one module per concern; each concern is a class whose
methods it inherits, and each names, in its docstring, the state it owns (created here,
in `__init__`, grouped by owner). The map:

- inodes.py      InodeCache    the inode cache, Inode/Handle/Caller, saving rows
- namespace.py   Namespace     lookup, create, link, unlink, rename, directories
- attributes.py  Attributes    setattr, truncate, atime, setuid dropping, regrants
- dataio.py      OpenFiles     open handles, read, write, fsync, O_TMPFILE, SEEK_DATA
- space.py       Space         allocation, copy-on-write, fallocate, preallocation
- layouts.py     Layouts       the layout server for direct clients
- xattrs.py      Xattrs        extended attributes and sluice's hint xattrs
- discard.py     Discards      discardable files the pager emptied
- commit.py      Transactions  commit, sync, failure and read-only, crash recovery
- fsstats.py     Statistics    `sluice stats` and statfs
- permissions.py (functions)   access checks

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
import logging
from typing import Awaitable, Callable

import trio

from kernelshim import UNWRITTEN, WRITTEN, Kernel
from kernelshim.principals import ENTRY_COST, PrincipalTable

from .allocator import Allocator
from .attributes import Attributes
from .commit import Transactions
from .dataio import OpenFiles
from .discard import Discards
from .errors import Damaged, NotFound, VolumeError
from .fsstats import FsStatistics, Statistics
from .inodes import MAX_FILE_SIZE, NAME_MAX, ROOT_INODE, Caller, Handle, Inode, InodeCache
from .layouts import Layouts
from .metadata import Metadata
from .namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from .permissions import check_access
from .space import Space
from .xattrs import XATTR_CREATE, XATTR_REPLACE, Xattrs

__all__ = ["FileSystem", "Caller", "Handle", "Inode", "FsStatistics", "ROOT_INODE", "NAME_MAX",
           "MAX_FILE_SIZE", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "XATTR_CREATE",
           "XATTR_REPLACE"]

log = logging.getLogger(__name__)


class FileSystem(Namespace, Attributes, OpenFiles, Space, Layouts, Xattrs, Discards,
                 Transactions, Statistics, InodeCache):
    """The metadata server. Create with `FileSystem.load(md, kernel, ...)`."""

    def __init__(self, md: Metadata, kernel: Kernel, *, max_inodes: int,
                 default_cache_mode: str = "direct",
                 principals: PrincipalTable | None = None) -> None:
        # -- shared by every concern ------------------------------------------------------
        self.md = md
        self.kernel = kernel
        #: who is charged for what (kernelshim's table; storage usage recounted at load)
        self.principals = principals if principals is not None else PrincipalTable(None)
        kernel.attach_principals(self.principals)
        self.block_size = kernel.block_size
        #: called with an inode number when its attributes changed behind the kernel's
        #: back (atime on read, setuid cleared on write); operations.py invalidates
        self.on_attr_changed: Callable[[int], None] = lambda ino: None
        #: called with (inode, principal that changed it) when a file's data changed
        #: behind the kernel's back (a direct client's commit or truncate, the pager's
        #: emptying of a discardable file) and the kernel may cache its pages
        self.on_data_changed: Callable[[int, int], None] = lambda ino, principal: None
        #: awaited with an inode before a direct client changes its data while a handle
        #: through the mount may have written pages in the kernel's cache (a shared
        #: writable mapping): the kernel writes them back and drops them
        #: (operations.py; None: no kernel cache to mind)
        self.write_back_pages: Callable[[int], Awaitable[None]] | None = None
        #: called with (directory, name, principal that made it) when a name appeared
        #: that the kernel may have cached as missing (a direct client's create);
        #: operations.py invalidates (queued per tenant: fs/invalidator.py)
        self.on_entry_created: Callable[[int, bytes, int], None] = \
            lambda parent, name, principal: None
        # The state each concern owns (declared, with what it means, in its class).
        # -- InodeCache (inodes.py) and Namespace (namespace.py) --------------------------
        self._inodes = {}
        self.max_inodes = max_inodes
        self._inode_count = 0
        self._rename_lock = trio.Lock()
        # -- OpenFiles (dataio.py) ---------------------------------------------------------
        self._handles = {}
        self._next_fh = 1
        self.default_cache_mode = default_cache_mode
        self._tmpfiles = set()
        self.empty_fsyncs = 0
        self.grouped_fsyncs = 0
        # -- Xattrs (xattrs.py) ------------------------------------------------------------
        self._xattr_bytes = {}
        self._meta_pending = 0
        # -- Attributes (attributes.py) ----------------------------------------------------
        self.atime = "relatime"
        self.nodiratime = False
        # -- Space (space.py) --------------------------------------------------------------
        self.alloc = Allocator(kernel.nblocks)
        self.cow_reserve = max(min(kernel.nblocks // 64, 16384), min(16, kernel.nblocks // 8))
        # -- Layouts (layouts.py) ----------------------------------------------------------
        self._direct = {}
        # -- Transactions (commit.py) ------------------------------------------------------
        self._commit_lock = trio.Lock()
        self._durable_waiting = 0
        self._commit_seq = self._durable_seq = 0
        self._commit_ended = trio.Event()
        self._forced_at = float("-inf")
        self._forcing = False
        self._unsealed = set()
        self._reap = collections.deque()
        self.reaping_blocks = 0
        self.discarding_kept = 0
        self._reap_wakeup = trio.Event()
        self._reap_lot = trio.lowlevel.ParkingLot()
        self._reap_lock = trio.Lock()
        self.discard_freed = True
        self._reaper_running = False
        self.read_only = None
        self.write_errors = 0
        self._recovered = False
        self._unflushed_saved = frozenset()
        # -- Discards (discard.py) ---------------------------------------------------------
        self.discarded = set()
        self._discard_wakeup = trio.Event()
        kernel.on_discarded(self._on_discarded)
        # -- Statistics (fsstats.py) -------------------------------------------------------
        self.fuse_requests = collections.Counter()

    @classmethod
    async def load(cls, md: Metadata, kernel: Kernel, *, default_cache_mode: str = "direct",
                   principals: PrincipalTable | None = None,
                   read_only: bool = False) -> FileSystem:
        """The metadata server of a volume. Cleans what a crash left (orphans, write
        layouts never committed) unless `read_only`: then nothing is written at all."""
        max_inodes = md.meta("max_inodes") or kernel.nblocks
        if type(max_inodes) is not int or max_inodes < 1:
            raise VolumeError(f"{md.path}: max_inodes {max_inodes!r} is not a positive "
                              "integer (the metadata is damaged: run sluice fsck --repair)")
        fs = cls(md, kernel, max_inodes=max_inodes, default_cache_mode=default_cache_mode,
                 principals=principals)
        # Every extent is checked before anything is served: one past the device or
        # sharing blocks with another would serve another file's data (or write over
        # it). A damaged or crafted meta.db is refused as a whole; fsck repairs it.
        nblocks, max_fb = kernel.nblocks, MAX_FILE_SIZE // fs.block_size
        for ino, fb, dev, count, st in md.all_extents():
            where = f"{md.path}: inode {ino!r}: extent at file block {fb!r}"
            if not (type(fb) is type(dev) is type(count) is int and st in (WRITTEN, UNWRITTEN)
                    and type(st) is int and 0 <= fb and 0 < count and fb + count <= max_fb
                    and 0 <= dev and dev + count <= nblocks):
                raise VolumeError(f"{where} maps device blocks {dev!r}+{count!r} (state "
                                  f"{st!r}), outside the device ({nblocks} blocks) or not "
                                  "an extent: the metadata is damaged; run sluice fsck "
                                  "--repair")
            try:
                fs.alloc.mark_used(dev, count)
            except ValueError:
                raise VolumeError(f"{where} maps device blocks {dev}+{count}, which "
                                  "another extent maps too: the metadata is damaged; run "
                                  "sluice fsck --repair") from None
        try:
            root = fs.inode(ROOT_INODE)
        except (NotFound, Damaged) as exc:
            root = None
            why = str(exc)
        if root is None or not root.is_dir:
            raise VolumeError(f"{md.path}: the root directory (inode 1) is "
                              + (f"missing or damaged ({why})" if root is None
                                 else "not a directory")
                              + ": the metadata is damaged; run sluice fsck")
        fs._inode_count = md.inode_count()
        fs._recount_usage()
        if read_only:
            fs.set_read_only("mounted read-only")
            fs.serve_listed_empty()
            return fs
        await fs._recover()
        return fs

    def _recount_usage(self) -> None:
        """Storage usage of every principal, from what the volume holds (exact after a
        crash: usage is never stored on its own)."""
        self.principals.recount_storage(
            (pid, blocks * self.block_size + entries * ENTRY_COST + (name_bytes or 0), inodes)
            for pid, (blocks, inodes, entries, name_bytes)
            in self.md.usage_by_principal().items())

    def access(self, ino: int, mask: int, caller: Caller) -> None:
        """Permission check as the kernel does it (used when default_permissions is off
        and by direct clients)."""
        check_access(self.inode(ino), mask, caller)
