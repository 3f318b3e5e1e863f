# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Open files and their data: open, create, release, read, write (extents allocated,
sealed blocks relocated, size and times updated), fsync, O_TMPFILE and
SEEK_DATA/SEEK_HOLE. Data moves through kernelshim grants, one per open handle."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import trio

from kernelshim import Grant, HOLE, PrincipalId, Rights, Sealed, UNWRITTEN
from kernelshim.principals import QuotaExceeded
from kernelshim.extents import block_span, blocks_to_cover

from .errors import (BadHandle, FileTooLarge, InvalidArgument, IsADirectory, NoSpace,
                     NoSuchOffset, NotFound, WriteFailed)
from .inodes import Caller, Handle, Inode, MAX_FILE_SIZE, now_ns
from .xattrs import CACHE_XATTR, DISCARDED_XATTR

if TYPE_CHECKING:
    from .filesystem import FileSystem

#: extents SEEK_DATA/SEEK_HOLE looks at in one step of the loop (~0.1 ms)
SEEK_EXTENTS_PER_STEP = 256


class OpenFiles:
    """Open files, read and write (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: the open handles (`_handles`, `_next_fh`), the default cache mode, and
    the O_TMPFILE inodes not linked yet (`_tmpfiles`)."""

    #: open file handles by number, and the next number to hand out
    _handles: dict[int, Handle]
    _next_fh: int
    #: the cache mode of files without user.sluice.cache ("pager"/"direct" or "kernel")
    default_cache_mode: str
    #: O_TMPFILE inodes not linked yet (linkat may give them a name; see `tmpfile`)
    _tmpfiles: set[int]
    #: fsyncs that found nothing to make durable and returned at once (`needs_sync`)
    empty_fsyncs: int
    #: fsyncs served by the commit they waited for (`Transactions.commit`)
    grouped_fsyncs: int

    def _grant_for(self: FileSystem, node: Inode, readable: bool, writable: bool,
                   principal: PrincipalId) -> Grant:
        rights = (Rights.READ if readable else Rights.NONE) | \
                 (Rights.WRITE if writable else Rights.NONE)
        return self.kernel.grant(inode=node.id, generation=node.generation,
                                 extents=self._extents(node), rights=rights,
                                 principal=principal)

    def open(self: FileSystem, ino: int, flags: int, caller: Caller) -> Handle:
        node = self.inode(ino)
        if node.is_dir:
            raise IsADirectory("cannot open a directory for I/O")
        if node.nlink == 0 and node.opens == 0:
            # Its last name and handle are gone, so it is being freed (`_destroy`, in
            # parts for a file of many extents): the kernel may still hold the inode
            # (an O_PATH descriptor reopened through /proc, a file handle), but a new
            # handle would write into a file whose row is going.
            raise NotFound(f"inode {ino} was removed")
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
        node.handles[fh] = h
        node.opens += 1
        if writable:
            node.kernel_writers += 1
        self._push_hints(node)
        return h

    async def open_truncate(self: FileSystem, node: Inode, caller: Caller) -> None:
        """O_TRUNC at open, through the mount (the kernel sends it with the open) or a
        direct client; whatever the access mode, as Linux truncates on O_RDONLY|O_TRUNC
        too (the caller checked write permission). POSIX (and Linux) update mtime/ctime
        and drop setuid/setgid (unless root opens) even when the file was empty."""
        if node.size:
            await self.truncate(node, 0, principal=caller.principal)
        else:
            self._writable()
            node.mtime_ns = node.ctime_ns = now_ns()
            self._save(node, "mtime_ns", "ctime_ns")
        if caller.uid != 0:
            self._drop_setid(node)

    def _cache_mode(self: FileSystem, node: Inode) -> str:
        v = self._hints(node).get(CACHE_XATTR)
        if v is not None:
            return v.decode(errors="replace").strip()
        return self.default_cache_mode

    def create(self: FileSystem, parent: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Handle, Inode]:
        # The handle's grant is checked against the caller's bank before the file is
        # made: an EMFILE after it left a file the caller was told was not created
        # (its retry with O_EXCL got EEXIST; probe 21, F4). Nothing between the check
        # and the charge yields.
        self.principals.check_object(self.principals.by_id(caller.principal), "grants")
        node = self._new_inode(self.inode(parent), name, stat.S_IFREG | (mode & 0o7777), caller)
        return self.open(node.id, flags, caller), node

    def open_handle_count(self: FileSystem) -> int:
        """Files open through the mount (kernel handles)."""
        return len(self._handles)

    def handle(self: FileSystem, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise BadHandle(f"no open file handle {fh}")
        return h

    async def release(self: FileSystem, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        self.kernel.release(h.grant)
        node = h.inode
        node.handles.pop(fh, None)
        node.opens -= 1
        if h.writable:
            node.kernel_writers -= 1
        if node.opens == 0 and node.nlink == 0:
            self._tmpfiles.discard(node.id)
            await self._destroy(node)
        else:
            if node.opens == 0:
                await self._trim_preallocation(node)
                self._drop_clean_extents(node)
            self._maybe_evict(node)

    async def read(self: FileSystem, fh: int, offset: int, size: int) -> memoryview | bytes:
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

    async def write(self: FileSystem, fh: int, offset: int, data: bytes | memoryview, *,
                    append: bool | None = None, write_back: bool = False) -> int:
        """A FUSE write: `data` is immutable (`bytes`, or for a large write a read-only
        view of the `bytes` the binding read the request into), so a stream write may
        be written behind after the reply (pager/writeback.py). `append`: whether
        this write goes to the file's end (the write's own flags, which the kernel
        sends: O_APPEND as the file has it now, never for a write-back of cached
        pages); None: as the handle was opened (a binding that does not send them).
        `write_back`: the kernel writes back cached pages (mmap stores), no write(2)
        of a process: the set-ID bits stay, as on ext4 (probe 21, F3)."""
        self._writable()
        h = self.handle(fh)
        if not h.writable:
            raise BadHandle("file not open for writing")
        if offset < 0:
            raise InvalidArgument("negative offset")
        node = h.inode
        # The writer's expedited write-back is repaid here, before the inode lock: a
        # wait under it held other tenants' writes of a shared file, its unlink and
        # the discard task (review of probe 5, P4).
        with self.kernel.limit_scope(h.grant.principal):  # (grows with the requests made)
            await self.kernel.repay_limit(h.grant.principal, len(data), offset)
            # (at most a request a block, and the reads of its two partial blocks)
            async with self._limited_lock(node, -(-len(data) // self.block_size) + 3):
                if node.hints is None or DISCARDED_XATTR in node.hints or node.id in self.discarded:
                    await self._undiscard_locked(node)
                if h.append if append is None else append:
                    offset = node.size
                n = await self._write_locked(node, h.grant, offset, data, short_ok=True)
                if n and not write_back and h.kill_priv and self._kill_priv(h, save=False):
                    self._save(node, "mode")
        return n

    async def _write_locked(self: FileSystem, node: Inode, grant: Grant, offset: int,
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
            # As Linux (generic_write_check_limits): EFBIG at the limit, a short write
            # across it (probe 9, F5). All or nothing is EFBIG either way.
            if offset >= MAX_FILE_SIZE or not short_ok:
                raise FileTooLarge("write past the maximum file size")
            n = MAX_FILE_SIZE - offset
            data = data[:n]
            end = MAX_FILE_SIZE
        if offset > node.size:  # the gap left behind reads as zeros (R6)
            await self._zero_past_eof(node, node.size, offset, grant.principal)
        bs = self.block_size
        b0, b1 = block_span(offset, n, bs)
        emap = self._extents(node)
        # Inside one FRESH extent (data written since the last commit: fio's 16-byte
        # requests into the block the request before wrote) there is nothing to
        # allocate or relocate, and nothing to mark (no extent row to save).
        fresh = emap.fresh_covers(b0, b1 - b0)
        try:
            if not fresh:
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
            b1 = blocks_to_cover(end, bs)
            await self._allocate(node, emap, b0, b1 - b0, grant.principal)
        try:
            await self._write_data(node, grant, offset, data, sealed=not fresh)
            for start, stop in grant.take_written(offset, end):
                f0, f1 = block_span(start, stop - start, bs)
                emap.mark_written(f0, f1 - f0)
            self._unsealed.add(emap)
        finally:
            self._save_extents(node)
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = now_ns()
        self._save(node, "size", "blocks", "mtime_ns", "ctime_ns")
        return n

    async def _write_data(self: FileSystem, node: Inode, grant: Grant, offset: int,
                          data: bytes | bytearray | memoryview, *,
                          sealed: bool = True, keep_pending: bool = False) -> None:
        """Write `data` at `offset` through `grant` (under the inode lock; every block
        allocated). Sealed blocks are relocated (copy-on-write): written to fresh blocks,
        the extents remapped and the old blocks freed by the same transaction, with the
        change saved before any checkpoint. `sealed=False`: the caller found none in
        the range just before (no checkpoint since); a commit that seals some while
        the write waits for its barrier still makes it relocate them (`Sealed`).
        `keep_pending`: see `Kernel.write` (R6's zeroing)."""
        bs = self.block_size
        b0, b1 = block_span(offset, len(data), bs)
        emap = self._extents(node)
        while True:
            cow = (await self._cow_blocks(emap, b0, b1 - b0, principal=grant.principal)
                   if sealed else None)
            sealed = True
            try:
                await self.kernel.write(grant, offset, data, cow=cow,
                                        keep_pending=keep_pending)
            except Sealed:
                # A commit sealed fresh blocks of the range while this write waited for
                # its barrier: relocate those too.
                if cow is not None:
                    self.alloc.give_back([(e[1], e[2]) for e in cow.owned_extents()])
                continue
            except BaseException:
                if cow is not None:  # never exposed: back to the relocations' pool
                    self.alloc.give_back([(e[1], e[2]) for e in cow.owned_extents()])
                raise
            break
        if cow is not None:
            for fb, dev, count, _st, _owner in cow.owned_extents():
                old = emap.relocate(fb, dev, count)
                self.alloc.free_later([(d, c) for d, c, _o in old], (node.id,),
                                      recycle=True)
            self._unsealed.add(emap)
            self._save_extents(node)

    async def _zero_past_eof(self: FileSystem, node: Inode, lo: int, hi: int,
                             principal: PrincipalId) -> None:
        """The file grows from `lo` (its size) past `hi`: zero [lo, hi) inside the block
        that holds its last byte, if that block holds data. Bytes there past the end
        may be the writes of a direct client that never committed them — it closed,
        was killed, or its grant was revoked (docs/dev/invariants.md, R6): those are
        zeroed. The bytes a *live* grant on the file wrote there and has not committed
        yet are kept (the writer's own commit makes them part of the file; zeroed,
        that commit exposed zeros in place of acknowledged bytes: probe 6, W3). Blocks
        after it are holes, unwritten, or written by the growth itself."""
        bs = self.block_size
        hi = min(hi, blocks_to_cover(lo, bs) * bs)
        if hi <= lo:
            return
        await self._zero_within_block(node, self._extents(node), lo, hi, principal,
                                      keep_pending=True)

    async def fsync(self: FileSystem, fh: int | None, datasync: bool) -> None:
        """fsync of an open file (`fh`; None: of everything): a write error since the
        handle last heard of one is reported (once per open file, as Linux); then,
        unless the file has nothing that is not durable yet (`needs_sync`), its
        discardable frames are written back and everything is committed durably.
        The I/O is charged to the principal the file was opened for."""
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.errors_seen < self.write_errors:
            h.errors_seen = self.write_errors  # reported once per open file, as Linux
            raise WriteFailed(f"data written to inode {h.inode.id} may be lost: "
                              f"{self.read_only}")
        if h is not None and not self.needs_sync(h.inode.id):
            self.empty_fsyncs += 1
            return
        try:
            if h is not None:
                # Its discardable dirty frames too (a barrier leaves those out): an
                # fsync'd discardable file survives a crash whole unless written again.
                await self._repay_commit(h.inode.id, h.grant.principal)
                await self.kernel.writeback_file(h.inode.id, principal=h.grant.principal)
                await self.sync(principal=h.grant.principal, file=h.inode.id)
            else:
                await self.sync()
        except WriteFailed:
            if h is not None:
                h.errors_seen = self.write_errors
            raise

    async def fsync_inode(self: FileSystem, ino: int, principal: PrincipalId) -> None:
        """fsync of an inode with no FUSE handle: a directory (fsyncdir) or a direct
        client's grant (whose writes it committed first). WriteFailed once the volume
        has failed (nothing is made durable any more). Skipped when the inode has
        nothing to make durable (`needs_sync`); else the file's discardable frames are
        written back (as `fsync` does: a barrier leaves them out, R7) and everything is
        committed durably, on `principal`'s bank."""
        if self.write_errors:
            raise WriteFailed(f"inode {ino} may not be durable: {self.read_only}")
        if not self.needs_sync(ino):
            self.empty_fsyncs += 1
            return
        await self._repay_commit(ino, principal)
        await self.kernel.writeback_file(ino, principal=principal)
        await self.sync(principal=principal, file=ino)

    async def _repay_commit(self: FileSystem, ino: int, principal: PrincipalId) -> None:
        """An fsync of a change of `ino`'s metadata only (no data of it unflushed, so no
        device flush charged to the asker) pays for the commit's WAL fsync at the
        asker's I/O limits first (`Kernel.repay_commit`; probe 20, F1)."""
        if not self.kernel.may_be_unflushed(ino) and ino not in self._unflushed_saved:
            await self.kernel.repay_commit(principal)

    def needs_sync(self: FileSystem, ino: int) -> bool:
        """Whether an fsync of inode `ino` has anything to make durable: a change of
        its metadata (or of something no single inode owns) not yet in a durable
        commit (the metadata layer's change marks), data of it not yet flushed on the
        device (the kernel's record), or it is a discardable file the last commit
        listed or the pager dropped (docs/dev/invariants.md, "Empty fsyncs"). When
        False, a barrier and a durable commit would change nothing a power loss
        could take from this file, so an fsync may skip them."""
        return (self.md.changed_since_durable(ino) or self.kernel.may_be_unflushed(ino)
                or ino in self.discarded or ino in self._unflushed_saved)

    async def tmpfile(self: FileSystem, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[Handle, Inode]:
        """open(O_TMPFILE): a regular file in `parent` with no name, open. It is made as
        create makes a file (same checks, charges and inherited hints) under a name
        nobody can have looked up, which is then removed at once (no checkpoint in
        between): from then on it is exactly a file unlinked while open — its inode
        and its blocks stay charged and in use, it is freed at its last release or,
        after a crash, as an orphan at the next mount. `link` may give it a name (linkat with
        AT_EMPTY_PATH; the kernel refuses that for O_EXCL)."""
        d = self.inode(parent)
        # (as create: an EMFILE after the inode was made left an inode nobody holds)
        self.principals.check_object(self.principals.by_id(caller.principal), "grants")
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
        self._tmpfiles.add(node.id)
        return h, node

    def _link_tmpfile(self: FileSystem, node: Inode, who: PrincipalId) -> None:
        """An O_TMPFILE inode gets its first name (charged and in use all along)."""
        self._tmpfiles.discard(node.id)

    async def seek(self: FileSystem, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the extent map: holes and UNWRITTEN blocks are
        holes (they read as zeros), FRESH and WRITTEN blocks are data; the end of the
        file is a hole. ENXIO at or past the end, or when no data follows. At most
        SEEK_EXTENTS_PER_STEP extents are looked at in one step of the loop: a tenant's
        lseek over a file of 50,000 extents held everyone's requests 0.2 s."""
        h = self.handle(fh)
        node = h.inode
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise InvalidArgument(f"lseek whence {whence} is not SEEK_DATA or SEEK_HOLE")
        want_data = whence == os.SEEK_DATA
        bs = self.block_size
        pos = offset // bs
        while True:
            # (again after each step: the file may have changed meanwhile)
            if offset < 0 or offset >= node.size:
                raise NoSuchOffset(f"offset {offset} is not inside the file ({node.size} bytes)")
            end = blocks_to_cover(node.size, bs)
            found, pos = self._extents(node).seek(pos, end, want_data, SEEK_EXTENTS_PER_STEP)
            if found is not None:
                return min(max(offset, found * bs), node.size)
            if pos >= end:
                break
            await trio.lowlevel.checkpoint()
        if whence == os.SEEK_HOLE:
            return node.size
        raise NoSuchOffset(f"no data after offset {offset}")
