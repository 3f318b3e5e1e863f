# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""The namespace: lookup, creating names (mknod, mkdir, symlink, link), removing them
(unlink, rmdir, and freeing the inode with its last name and open handle), rename,
and reading directories."""

from __future__ import annotations

import logging
import stat
import time
from typing import TYPE_CHECKING

import trio

from kernelshim import ExtentMap, Grant, PrincipalId, ROOT_PRINCIPAL
from kernelshim.principals import ENTRY_COST

from .errors import (Damaged, Exists, InvalidArgument, IsADirectory, NameTooLong, NoSpace,
                     NotADirectory, NotEmpty, NotFound, NotPermitted, TooManyLinks)
from .inodes import Caller, Inode, LINK_MAX, NAME_MAX, ROOT_INODE, check_name, now_ns
from .permissions import in_group
from .xattrs import DISCARDED_XATTR, INHERITED_HINTS, METADATA_PAGE, xattr_cost

if TYPE_CHECKING:
    from .filesystem import FileSystem

log = logging.getLogger(__name__)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

#: a rename's walk up the tree gives the loop back once it has taken this long (checked
#: every ANCESTORS_PER_CHECK parents: ~2 us when their inodes are cached, ~0.1 ms not)
WALK_STEP_SECONDS = 0.0001
ANCESTORS_PER_CHECK = 16


class _Rewalk(Exception):
    """A rename's names changed while it walked up the tree: walk again."""


def _named(node: Inode) -> Inode:
    """`node`, which a name points to: Damaged if its link count says no name does (a
    damaged meta.db). Served as it is, its last close or forget would free it and leave
    its names dangling; fsck sets the count from the names."""
    if node.nlink == 0:
        raise Damaged(f"inode {node.id} is named but has link count 0 in meta.db: run "
                      "sluice fsck")
    return node


class Namespace:
    """Names and directories (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: `_inode_count` (inodes in use), `max_inodes` (the volume's limit) and
    `_rename_lock`."""

    #: the volume's inode limit, and the inodes in use (every inode until it is freed,
    #: open O_TMPFILE and unlinked files too)
    max_inodes: int
    _inode_count: int
    #: held by a rename between two directories while it walks up from them and moves
    #: the names (the kernel's s_vfs_rename_mutex): only such a rename changes a
    #: directory's parent, so the walk's answer holds though it gives the loop back
    _rename_lock: trio.Lock

    def lookup(self: FileSystem, parent: int, name: bytes) -> Inode:
        """The inode `name` names in directory `parent` (counts a kernel lookup).

        The kernel also looks up "." of any inode (a directory or not) and ".." of a
        directory to turn a file handle (name_to_handle_at, an NFS export) back into
        an inode it has forgotten: handles are (inode, generation), valid across
        forgets and remounts, stale once the inode is gone (NotFound here)."""
        node = self.inode(parent) if name == b"." else self._child(parent, name)
        node.lookups += 1
        return node

    def _child(self: FileSystem, parent: int, name: bytes) -> Inode:
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
        return _named(self.inode(ino))

    def _new_inode(self: FileSystem, parent: Inode, name: bytes, mode: int, caller: Caller, *,
                   rdev: int = 0, target: bytes | None = None) -> Inode:
        self._writable()
        check_name(name)
        if not parent.is_dir:
            raise NotADirectory(f"inode {parent.id} is not a directory")
        if parent.nlink == 0:
            raise NotFound("directory was removed")
        if self.md.lookup(parent.id, name) is not None:
            raise Exists(f"{name!r} exists")
        hints = {k: v for k, v in self._hints(parent).items() if k in INHERITED_HINTS}
        if self._inode_count >= self.max_inodes:
            raise NoSpace(f"no free inodes (limit {self.max_inodes})")
        if stat.S_ISDIR(mode) and parent.nlink >= LINK_MAX:  # its '..' is a link
            raise TooManyLinks(f"directory {parent.id} has {parent.nlink} links")
        # (the host's room for the rows, after every other check: counted once made)
        rows = METADATA_PAGE + len(name) + len(target or b"")
        self.metadata_room(rows)
        # Charge first: over quota changes nothing. The name, and what the inode row
        # holds besides (a symlink's target, the inherited hint xattrs): refunded with
        # the name (_remove_name) and with the row (_destroy).
        self.principals.charge(self.principal(caller.principal), inodes=1,
                               space=ENTRY_COST + len(name) + len(target or b"")
                               + sum(xattr_cost(h, v) for h, v in hints.items()))
        is_dir = stat.S_ISDIR(mode)
        gid = caller.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if is_dir:
                mode |= stat.S_ISGID
            elif (mode & (stat.S_ISGID | stat.S_IXGRP)) == (stat.S_ISGID | stat.S_IXGRP) \
                    and caller.uid != 0 and not in_group(caller, gid):
                mode &= ~stat.S_ISGID
        now = now_ns()
        nlink = 2 if is_dir else 1
        dir_parent = parent.id if is_dir else 0
        ino = self.md.insert_inode(mode=mode, uid=caller.uid, gid=gid, nlink=nlink,
                                   rdev=rdev, now_ns=now, parent=dir_parent, target=target,
                                   principal=caller.principal)
        self.md.add_dentry(parent.id, name, ino, caller.principal)
        self.metadata_written(rows)
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
        # Its xattrs are the inherited hints and nothing else: known without a query
        # (getxattr of an inode without any answers from here: Xattrs.has_no_xattrs).
        node.xattr_bytes = sum(len(hname) + 1 for hname in hints)
        if node.is_reg:
            node.extents = ExtentMap()
        node.lookups += 1
        return node

    def mknod(self: FileSystem, parent: int, name: bytes, mode: int, rdev: int,
              caller: Caller) -> Inode:
        fmt = stat.S_IFMT(mode)
        if fmt == 0:
            mode |= stat.S_IFREG
        elif fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise InvalidArgument(f"mknod of file type {oct(fmt)}")
        return self._new_inode(self.inode(parent), name, mode, caller, rdev=rdev)

    def mkdir(self: FileSystem, parent: int, name: bytes, mode: int, caller: Caller) -> Inode:
        return self._new_inode(self.inode(parent), name,
                               stat.S_IFDIR | (mode & 0o7777), caller)

    def symlink(self: FileSystem, parent: int, name: bytes, target: bytes, caller: Caller) -> Inode:
        if len(target) > 4095:
            raise NameTooLong("symlink target longer than 4095 bytes")
        return self._new_inode(self.inode(parent), name, stat.S_IFLNK | 0o777, caller,
                               target=target)

    def readlink(self: FileSystem, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode) or node.target is None:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return bytes(node.target)

    def link(self: FileSystem, ino: int, new_parent: int, new_name: bytes,
             caller: Caller | None = None) -> Inode:
        self._writable()
        node = self.inode(ino)
        if node.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        if node.nlink == 0 and node.id not in self._tmpfiles:
            raise NotFound("cannot link a file that has been unlinked")
        if node.nlink >= LINK_MAX:
            raise TooManyLinks(f"inode {ino} has {node.nlink} links")
        check_name(new_name)
        d = self.inode(new_parent)
        if not d.is_dir:
            raise NotADirectory(f"inode {new_parent} is not a directory")
        if self.md.lookup(new_parent, new_name) is not None:
            raise Exists(f"{new_name!r} exists")
        who = caller.principal if caller else ROOT_PRINCIPAL
        self.principals.charge(self.principal(who), space=ENTRY_COST + len(new_name))
        now = now_ns()
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

    async def unlink(self: FileSystem, parent: int, name: bytes) -> None:
        self._writable()
        node = self._child(parent, name)
        if node.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        d = self.inode(parent)
        self._remove_name(parent, name)
        now = now_ns()
        d.mtime_ns = d.ctime_ns = now
        self._save(d, "mtime_ns", "ctime_ns")
        await self._drop_link(node, now)

    def _remove_name(self: FileSystem, parent: int, name: bytes) -> None:
        owner = self.md.remove_dentry(parent, name)
        self.principals.refund(self.principal(owner), space=ENTRY_COST + len(name))

    async def rmdir(self: FileSystem, parent: int, name: bytes) -> None:
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
        now = now_ns()
        d.nlink -= 1
        d.mtime_ns = d.ctime_ns = now
        self._save(d, "nlink", "mtime_ns", "ctime_ns")
        await self._drop_link(node, now)

    async def _drop_link(self: FileSystem, node: Inode, now: int) -> None:
        """One name of `node` is gone."""
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime_ns = now
        self._save(node, "nlink", "ctime_ns")
        if node.nlink == 0:
            # Direct clients lose access with the last name (DESIGN: fencing); the
            # kernel's open files keep the inode until they close, and it stays in use
            # and charged until then (`_destroy`), as Linux's quotas and `df -i` count
            # it (probe 15, F5).
            await self._revoke_direct(node)
            if node.opens == 0:
                await self._destroy(node)

    async def _destroy(self: FileSystem, node: Inode) -> None:
        """Free an inode no name and no open handle refers to."""
        self.kernel.forget_file(node.id)
        await self.kernel.settle_hints()
        if node.is_reg:
            await self.preload_extents(node)
        if self.read_only is not None:
            return  # an orphan now: freed at the next read-write mount
        async with self._lock(node):
            if self.md.get_inode(node.id) is None:
                # Freed already: a last release and an unlink's free raced for the lock
                # (a direct write finishing meanwhile). Refunded and counted once only:
                # the inode's charge now goes with its row (review of stop 26, 2).
                return
            revoked: list[Grant] = []
            for g in self.kernel.grants_for(node.id):
                revoked.extend(self.kernel.revoke_nowait(g))
            if node.is_reg and node.blocks:
                # A file of many extents is unmapped from its end, EXTENTS_PER_STEP
                # extents a step of the loop, each part saved, before the rest goes with
                # the inode (an unlink of a file of 50,000 extents held every request
                # 0.1-0.2 s in one step). Meanwhile the inode, its link count saved as 0,
                # is an orphan: after a crash the next mount frees the rest. (Shielded:
                # the inode goes whole however the request ends.)
                emap = self._extents(node)
                with trio.CancelScope(shield=True):
                    step = self.extents_per_step
                    while len(emap) > step:
                        part = emap.remove_owned(emap.start_of(len(emap) - step))
                        node.blocks = emap.blocks
                        self._save_extents(node)
                        self._save(node, "blocks")
                        await self._release_unmapped(part, revoked, ino=node.id)
                        revoked = []
                        await trio.lowlevel.checkpoint()  # (the release may not have)
            freed = self._extents(node).remove_owned(0) if node.is_reg and node.blocks else []
            # The delete is the saved change that frees the blocks: in the open
            # transaction before the refund and the drain's checkpoint (R3).
            held = len(node.target or b"")
            if node.xattr_bytes != 0:  # (0: known to have none, no query)
                held += self.md.xattr_total(node.id, skip=DISCARDED_XATTR)
            self.md.delete_inode(node.id)
            # The inode is charged, and counted in use, until its row goes: an
            # unlinked file still open and an O_TMPFILE file are inodes like any other
            # (Metadata.usage_by_principal counts every row; probe 15, F5).
            self._inode_count -= 1
            self.principals.refund(self.principal(node.principal), space=held, inodes=1)
            node.blocks = 0
            await self._release_unmapped(freed, revoked, ino=node.id)
        if node.lookups <= 0:
            self._inodes.pop(node.id, None)

    async def _is_ancestor(self: FileSystem, anc: int, ino: int) -> bool:
        """Whether directory `anc` is `ino` or one of its ancestors: a walk up from `ino`
        to the root, WALK_STEP_SECONDS a step of the loop (a tenant's chain of
        10,000 directories, their inodes not cached, held every request 84 ms in one
        step; and the walk used to stop at 10,000 and answer no, so a deeper directory
        could be moved into its own subtree). The caller holds `_rename_lock`. A walk
        longer than the volume has inodes is a loop in a damaged volume: EIO."""
        seen = 0
        t0 = time.perf_counter()
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INODE:
                return False
            if seen > self._inode_count + 1:
                raise Damaged(f"the parents of directory {ino} make a loop: run sluice fsck")
            ino = self.inode(ino).parent
            seen += 1
            if seen % ANCESTORS_PER_CHECK == 0 and time.perf_counter() - t0 >= WALK_STEP_SECONDS:
                await trio.lowlevel.checkpoint()
                t0 = time.perf_counter()

    async def rename(self: FileSystem, old_parent: int, old_name: bytes, new_parent: int,
                     new_name: bytes, flags: int) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument(f"unsupported rename flags {flags:#x}")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_NOREPLACE and RENAME_EXCHANGE together")
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise InvalidArgument("cannot rename '.' or '..'")
        check_name(new_name)
        if old_parent == new_parent:
            # No directory changes parent: nothing to walk (a name in a directory
            # cannot be that directory or one of its ancestors).
            await self._rename_walked(old_parent, old_name, new_parent, new_name, flags, {})
            return
        async with self._rename_lock:
            while True:
                # The walks (which may give the loop back) first, for the inodes the
                # names hold now; then the rename itself, with no checkpoint before its
                # change, which starts again if a name changed meanwhile (_Rewalk).
                walked: dict[int, bool] = {}
                src = self._child(old_parent, old_name)
                if src.is_dir:
                    walked[src.id] = await self._is_ancestor(src.id, new_parent)
                dst_ino = self.md.lookup(new_parent, new_name)
                if flags & RENAME_EXCHANGE and dst_ino is not None and \
                        self.inode(dst_ino).is_dir:
                    walked[-dst_ino] = await self._is_ancestor(dst_ino, old_parent)
                try:
                    await self._rename_walked(old_parent, old_name, new_parent, new_name,
                                              flags, walked)
                    return
                except _Rewalk:
                    continue

    async def _rename_walked(self: FileSystem, old_parent: int, old_name: bytes,
                             new_parent: int, new_name: bytes, flags: int,
                             walked: dict[int, bool]) -> None:
        """The rename, given whether the source directory is an ancestor of the new
        parent (`walked[src]`) and, for an exchange, the target directory one of the
        old parent (`walked[-dst]`); _Rewalk if those inodes are no longer the names'."""

        def inside(key: int) -> bool:
            if old_parent == new_parent:
                return False
            if key not in walked:
                raise _Rewalk()
            return walked[key]

        src = self._child(old_parent, old_name)
        op = self.inode(old_parent)
        np_ = self.inode(new_parent)
        if not np_.is_dir:
            raise NotADirectory(f"inode {new_parent} is not a directory")
        if np_.nlink == 0:  # (removed while the walk gave the loop back)
            raise NotFound(f"directory {new_parent} was removed")
        dst_ino = self.md.lookup(new_parent, new_name)
        dst = self.inode(dst_ino) if dst_ino is not None else None
        now = now_ns()

        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise NotFound(f"{new_name!r} does not exist")
            if src.is_dir and inside(src.id):
                raise InvalidArgument("cannot move a directory into itself")
            if dst.is_dir and inside(-dst.id):
                raise InvalidArgument("cannot move a directory into itself")
            if old_parent != new_parent and src.is_dir != dst.is_dir:
                gains = op if dst.is_dir else np_  # the parent that gets the directory
                if gains.nlink >= LINK_MAX:
                    raise TooManyLinks(f"directory {gains.id} has {gains.nlink} links")
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
        if src.is_dir and inside(src.id):
            raise InvalidArgument("cannot move a directory into its own subtree")
        if src.is_dir and old_parent != new_parent and not (dst is not None and dst.is_dir) \
                and np_.nlink >= LINK_MAX:
            raise TooManyLinks(f"directory {np_.id} has {np_.nlink} links")
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
        if dst is not None:  # checked above, before the charge
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

    def opendir(self: FileSystem, ino: int, principal: PrincipalId) -> Inode:
        """Open directory `ino` for `principal`: the handle is charged to its `grants`
        bank (TooManyObjects, EMFILE, at its limit) until `releasedir`. The daemon
        keeps each handle until the kernel releases it; uncharged, one tenant's
        processes held 380,000 of them (+72 MiB of the daemon) and nothing said no."""
        node = self.inode(ino)
        if not node.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        self.principals.charge_object(self.principal(principal), "grants")
        return node

    def releasedir(self: FileSystem, principal: PrincipalId) -> None:
        """A directory handle `opendir` charged to `principal` is closed."""
        self.principals.refund_object(self.principal(principal), "grants")

    def readdir(self: FileSystem, ino: int, after: int,
                limit: int) -> list[tuple[int, bytes, Inode]]:
        """Entries past cookie `after` (0 = from the start): (cookie, name, inode).
        Cookies 1 and 2 are '.' and '..'; entry cookies are dentry ids + 2 (stable)."""
        node = self.inode(ino)
        out: list[tuple[int, bytes, Inode]] = []
        if after < 1:
            out.append((1, b".", node))
        if after < 2:
            out.append((2, b"..", self.inode(node.parent)))
        for row in self.md.readdir(ino, max(0, after - 2), limit):
            name = row[1]
            try:
                # (a damaged or crafted meta.db: a name the kernel would refuse, which
                # fails the whole listing, or an inode row that makes no sense; the
                # others of the directory stay listable, fsck repairs these)
                if not isinstance(name, bytes) or name in (b".", b".."):
                    raise InvalidArgument(f"invalid name {name!r}")
                check_name(name)
                child = _named(self._cache_row(row[2:]))
            except (InvalidArgument, NameTooLong, Damaged) as exc:
                log.error("readdir of inode %d: entry %d skipped: %s (run sluice fsck)",
                          ino, row[0], exc)
                continue
            out.append((row[0] + 2, name, child))
        if after == 0:
            self._touch_atime(node)
        return out
