# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Attributes: setattr (chmod, chown, utimes, truncate), truncate itself, atime on
reads, clearing setuid/setgid on writes, and replacing the grants of open handles when
a file's extent map shrinks (`_regrant`)."""

from __future__ import annotations

import os
import stat
from typing import Callable, TYPE_CHECKING

import trio

from kernelshim import Grant, PrincipalId, ROOT_PRINCIPAL, Rights, UNWRITTEN
from kernelshim.extents import blocks_to_cover

from .errors import FileTooLarge, InvalidArgument, IsADirectory, PermissionDenied
from .inodes import Caller, Handle, Inode, MAX_FILE_SIZE, clamp_time, now_ns

if TYPE_CHECKING:
    from .filesystem import FileSystem


#: relatime: atime is also refreshed when it is older than this
ATIME_REFRESH_NS = 24 * 3600 * 10**9


class Attributes:
    """Attributes and truncate (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: the mount's atime mode (`atime`, `nodiratime`)."""

    #: the mount's atime mode, as the kernel's mount flags say (fs/mount.py follows
    #: them): "relatime", "noatime" or "strictatime"; FUSE leaves atime to us
    atime: str
    #: nodiratime: reading a directory never updates its atime
    nodiratime: bool

    async def setattr(self: FileSystem, ino: int, *, mode: int | None = None,
                      uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None, caller: Caller | None = None) -> Inode:
        node = self.inode(ino)
        self._writable()
        now = now_ns()
        changed: list[str] = []
        access = False  # mode or owner changed: direct clients may have lost access
        if size is not None:
            if node.is_dir:
                raise IsADirectory("cannot truncate a directory")
            if not node.is_reg:
                raise InvalidArgument("cannot truncate a special file")
            before_ctime, before_size = node.ctime_ns, node.size
            await self.truncate(node, size, principal=caller.principal if caller else
                                ROOT_PRINCIPAL)
            if node.ctime_ns != before_ctime:
                now = node.ctime_ns  # one time for the change: ctime == the new mtime
            elif size == before_size and mtime_ns is None:
                # Linux sets mtime (and ctime) on a truncate to the same size too
                # (do_truncate's ATTR_MTIME|ATTR_CTIME; POSIX asks only when the size
                # changes): probe 9, F3
                node.mtime_ns = now
                changed.append("mtime_ns")
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            changed.append("mode")
            access = True
        if uid is not None and uid != 0xFFFFFFFF:
            node.uid = uid
            changed.append("uid")
            access = True
        if gid is not None and gid != 0xFFFFFFFF:
            node.gid = gid
            changed.append("gid")
            access = True
        if atime_ns is not None:
            node.atime_ns = clamp_time(atime_ns)
            changed.append("atime_ns")
        if mtime_ns is not None:
            node.mtime_ns = clamp_time(mtime_ns)
            changed.append("mtime_ns")
        node.ctime_ns = clamp_time(ctime_ns) if ctime_ns is not None else now
        changed.append("ctime_ns")
        self._save(node, *changed)
        if access and self._direct:
            # chmod/chown: direct clients that lost access lose their grants (no
            # direct client holds any: nothing to revoke, nothing to wait for).
            await self._revoke_direct(node, keep=self._still_allowed)
        return node

    def _still_allowed(self: FileSystem, grant: Grant, who: Caller) -> bool:
        mask = (os.R_OK if grant.rights & Rights.READ else 0) | \
               (os.W_OK if grant.rights & Rights.WRITE else 0)
        try:
            self.access(grant.inode, mask, who)
        except PermissionDenied:
            return False
        return True

    async def truncate(self: FileSystem, node: Inode, size: int, *, principal: PrincipalId,
                       keep_grant: Grant | None = None) -> None:
        self._writable()
        if size < 0:
            raise InvalidArgument("negative size")
        if size > MAX_FILE_SIZE:
            raise FileTooLarge(f"size {size} beyond the maximum file size")
        # (its zeroing writes frames: repaid before the lock, as `write` does)
        await self.kernel.repay_limit(principal, self.block_size)
        await self.preload_extents(node)  # (a part a step: probe 11, F5)
        async with self._lock(node):
            await self._undiscard_locked(node)
            await self._truncate_locked(node, size, principal=principal,
                                        keep_grant=keep_grant)

    async def _truncate_locked(self: FileSystem, node: Inode, size: int, *, principal: PrincipalId,
                               keep_grant: Grant | None = None) -> None:
        old = node.size
        now = now_ns()
        if size == old:
            return
        fields = ["size", "mtime_ns", "ctime_ns"]
        if size < old:
            bs = self.block_size
            emap = self._extents(node)
            keep = blocks_to_cover(size, bs)
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
            # The new size first, then the map from its end, EXTENTS_PER_STEP extents
            # a step of the loop (a tenant's truncate of a file of 50,000 extents held
            # every request 0.1-0.2 s in one step). With no checkpoint from the save of
            # the size to that of the first part, a file of fewer extents gets both in
            # one transaction. A commit between two parts holds the new size and
            # blocks past it, unmapped by the next part, or after a crash by the next
            # mount, as a write layout never committed (R4): the bytes the file shows
            # are the new state's either way.
            node.size = size
            node.mtime_ns = node.ctime_ns = now
            self._save(node, *fields)
            if keep_grant is not None:
                # Its pending writes in the freed blocks are gone with them: left, they
                # made its next partial write into a new unwritten block there merge
                # that block's old device contents (`Kernel._fill_block`'s `wrote_in`),
                # which may be another file's (a kept freed block, direct5: review K2).
                keep_grant.take_written(keep * bs, MAX_FILE_SIZE + bs)
            # (shielded: no block past the new size outlives the truncate, whose later
            # growth R6 does not zero, however the request ends)
            with trio.CancelScope(shield=True):
                while True:
                    n = len(emap)
                    step = self.extents_per_step
                    cut = keep if n <= step else max(keep, emap.start_of(n - step))
                    freed = emap.remove_owned(cut)
                    # The direct client truncating through `keep_grant` keeps it (its
                    # connection has no other request in flight); every other is revoked.
                    old_grants = self._regrant(node, keep=lambda g: g is keep_grant)
                    if freed:
                        node.blocks = emap.blocks
                        self._save_extents(node)
                        self._save(node, "blocks")
                    # Freed once no request through the old grants is in flight;
                    # reusable once the commit that saved the shorter map is durable.
                    await self._release_unmapped(freed, old_grants, ino=node.id)
                    if cut <= keep:
                        return
                    await trio.lowlevel.checkpoint()  # (the release may not have)
        await self._zero_past_eof(node, old, size, principal)  # R6
        node.size = size
        node.mtime_ns = node.ctime_ns = now
        self._save(node, *fields)

    def _regrant(self: FileSystem, node: Inode,
                 keep: Callable[[Grant], bool] | None = None) -> list[Grant]:
        """Revoke every grant on `node` (but those `keep` accepts) and give the open
        handles fresh ones (no checkpoint: atomic with the extent change before it).
        Returns the grants to wait for: the revoked ones and the kept ones."""
        old: list[Grant] = []
        for g in self.kernel.grants_for(node.id):
            if keep is not None and keep(g):
                old.append(g)
                continue
            old.extend(self.kernel.revoke_nowait(g))
        for h in node.handles.values():
            if h.grant.revoked:
                h.grant = self._grant_for(node, h.readable, h.writable, h.grant.principal)
        return old

    def _kill_priv(self: FileSystem, h: Handle, *, save: bool = True) -> bool:
        return h.kill_priv and self._drop_setid(h.inode, save=save)

    def _drop_setid(self: FileSystem, node: Inode, *, save: bool = True) -> bool:
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

    def _touch_atime(self: FileSystem, node: Inode) -> None:
        """atime on a read, by the mount's mode (the kernel's meanings; FUSE leaves
        atime to the filesystem): noatime never, nodiratime never for directories,
        strictatime always, relatime when atime is not newer than mtime/ctime or is a
        day old."""
        if self.read_only is not None or self.atime == "noatime" or (
                self.nodiratime and node.is_dir):
            return
        a = node.atime_ns
        now = now_ns()
        if self.atime != "strictatime" and a > node.mtime_ns and a > node.ctime_ns and \
                now - a < ATIME_REFRESH_NS:
            return
        node.atime_ns = now
        self._save(node, "atime_ns")
        self.on_attr_changed(node.id)
