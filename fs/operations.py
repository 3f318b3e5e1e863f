"""The FUSE boundary: one `Operations` class that translates between pyfuse3 requests
and `FileSystem` calls, and nothing else.

Two rules hold for every handler:
- Only `pyfuse3.FUSEError` may leave a handler (anything else kills the mount): domain
  errors become their errno, unexpected exceptions are logged with the operation and
  inode and answered with EIO (`_guard`).
- Answer what the kernel can cache, so it asks less: long entry and attribute timeouts
  (every change goes through this daemon, which invalidates what it changes behind
  the kernel's back), negative lookups cached, attributes returned with readdirplus.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
import trio


from kernelshim import SluiceError

from .errors import NotFound

CONTROL_XATTR = b"user.sluice.control"
from .filesystem import Caller, FileSystem, Inode

log = logging.getLogger(__name__)

#: seconds the kernel may cache names and attributes (changes made behind its back are
#: invalidated explicitly)
TIMEOUT = 300.0
_INVALIDATE_LIMITER = trio.CapacityLimiter(1)
#: directory entries fetched per readdir query
READDIR_BATCH = 256

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guard(fn: F) -> F:
    """Let only FUSEError out of a handler: domain errors become their errno; anything
    else is a bug, logged with the operation and its arguments and answered with EIO."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SluiceError as exc:
            if exc.errno == errno.EIO:  # a bad block, a device failure: worth a line
                log.error("%s%r: %s", name, _brief(args), exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s%r: %s", name, _brief(args), exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing else may escape
            log.exception("unexpected error in %s%r: %s: %s", name, _brief(args),
                          type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _brief(args: tuple) -> tuple:
    return tuple(a if isinstance(a, int) or isinstance(a, bytes) and len(a) <= 64
                 else f"<{type(a).__name__}>" for a in args
                 if not isinstance(a, pyfuse3.RequestContext))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, *, control_socket: str | None = None) -> None:
        super().__init__()
        self.fs = fs
        #: answered for the root's `user.sluice.control` xattr: how direct clients find
        #: the shim's socket from the mount point
        self.control_socket = control_socket.encode() if control_socket else None
        fs.on_attr_changed = self._invalidate_attr
        fs.on_data_changed = self._invalidate_data
        fs.on_entry_created = self._invalidate_entry

    # -- helpers ----------------------------------------------------------------------

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask,
                      self.fs.principals.resolve(ctx.pid, ctx.uid).id)

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.id
        e.generation = node.generation
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = node.mode
        e.st_nlink = node.nlink
        e.st_uid = node.uid
        e.st_gid = node.gid
        e.st_rdev = node.rdev
        e.st_size = node.size
        e.st_blksize = self.fs.block_size
        e.st_blocks = node.blocks * (self.fs.block_size // 512)
        e.st_atime_ns = node.atime_ns
        e.st_mtime_ns = node.mtime_ns
        e.st_ctime_ns = node.ctime_ns
        return e

    def _invalidate_attr(self, ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except Exception as exc:  # noqa: BLE001 - the kernel may not know the inode
            log.debug("invalidate_inode(%d) failed: %s", ino, exc)

    def _invalidate_data(self, ino: int) -> None:
        # Dropping cached pages may wait for a page the kernel is reading through this
        # very daemon: do it from a worker thread so the loop can answer that read.
        trio.lowlevel.spawn_system_task(
            functools.partial(trio.to_thread.run_sync, self._invalidate_data_sync, ino,
                              limiter=_INVALIDATE_LIMITER), name="invalidate-data")

    @staticmethod
    def _invalidate_data_sync(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except Exception as exc:  # noqa: BLE001 - the kernel may not know the inode
            log.debug("invalidate_inode(%d) failed: %s", ino, exc)

    def _invalidate_entry(self, parent: int, name: bytes) -> None:
        # From a worker thread: the kernel may hold the directory's lock for a request
        # this daemon has yet to answer. (Not pyfuse3's invalidate_entry_async: its queue
        # may still hold the request when the session closes at unmount, and then logs
        # the failure as an error with a traceback.)
        trio.lowlevel.spawn_system_task(
            functools.partial(trio.to_thread.run_sync, self._invalidate_entry_sync, parent,
                              name, limiter=_INVALIDATE_LIMITER), name="invalidate-entry")

    @staticmethod
    def _invalidate_entry_sync(parent: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except Exception as exc:  # noqa: BLE001 - gone already, or the session closed
            log.debug("invalidate_entry(%d, %r) failed: %s", parent, name, exc)

    def _file_info(self, h: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=h.fh, direct_io=h.direct_io, keep_cache=False)

    # -- names ----------------------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        try:
            node = self.fs.lookup(parent_inode, name)
        except NotFound:
            # A negative entry the kernel may cache: st_ino 0 with a timeout. Names
            # created later come through this daemon, which the kernel then knows.
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = TIMEOUT
            return e
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:  # noqa: BLE001 - forget has no reply; never kill the loop
                log.exception("forget(%d, %d) failed", ino, n)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.inode(inode))

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            caller=self._caller(ctx))
        return self._attr(node)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.mknod(parent_inode, name, mode, rdev, self._caller(ctx)))

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.mkdir(parent_inode, name, mode, self._caller(ctx)))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.symlink(parent_inode, name, target, self._caller(ctx)))

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.link(inode, new_parent_inode, new_name, self._caller(ctx)))

    # -- files ------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        caller = self._caller(ctx)
        h = self.fs.open(inode, flags, caller)
        if flags & os.O_TRUNC and h.writable:
            try:
                await self.fs.open_truncate(h, caller)
            except BaseException:
                await self.fs.release(h.fh)
                raise
        return self._file_info(h)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node = self.fs.create(parent_inode, name, mode, flags, self._caller(ctx))
        return self._file_info(h), self._attr(node)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> Any:
        return await self.fs.read(fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        self.fs.handle(fh)

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    # -- directories --------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.fs.opendir(inode)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        after = start_id
        while True:
            entries = self.fs.readdir(fh, after, READDIR_BATCH)
            if not entries:
                return
            for cookie, name, node in entries:
                if not pyfuse3.readdir_reply(token, name, self._attr(node), cookie):
                    return
                if name not in (b".", b".."):
                    self.fs.count_lookup(node)  # readdirplus instantiates the entry
                after = cookie

    @_guard
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.sync()

    # -- volume and xattrs ------------------------------------------------------------------------

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statistics()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.block_size
        s.f_frsize = st.block_size
        s.f_blocks = st.blocks
        s.f_bfree = st.blocks_free
        s.f_bavail = st.blocks_avail
        s.f_files = st.max_inodes
        s.f_ffree = max(0, st.max_inodes - st.inodes)
        s.f_favail = s.f_ffree
        s.f_namemax = 255
        return s

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
                       ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (through getxattr) before this.
        self.fs.setxattr(inode, name, value, 0)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == CONTROL_XATTR and self.control_socket:
            return self.control_socket
        return self.fs.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(inode, name)

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.fs.access(inode, mode, self._caller(ctx))
        return True
