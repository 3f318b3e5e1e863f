# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Discardable files: when the pager drops a discardable file's dirty pages, the file
reads as empty at once and is emptied on the volume and marked user.sluice.discarded
by `run_discarder` (docs/dev/invariants.md, crash rule 4)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from kernelshim import ROOT_PRINCIPAL, PrincipalId, SluiceError

from .inodes import Inode, now_ns
from .xattrs import DISCARDED_XATTR

if TYPE_CHECKING:
    from .filesystem import FileSystem

log = logging.getLogger(__name__)


class Discards:
    """Discardable files the pager emptied (a `FileSystem` concern; see filesystem.py).

    State it owns: `discarded` (files dropped by the pager, not yet emptied on the
    volume) and the wakeup of `run_discarder`."""

    #: discardable files whose dirty pages the pager dropped, not yet emptied on
    #: the volume (`run_discarder` does it): they read as empty, size 0, meanwhile
    discarded: set[int]
    _discard_wakeup: trio.Event

    def _on_discarded(self: FileSystem, ino: int) -> None:
        """The pager dropped the dirty pages of discardable file `ino` (synchronous,
        from inside reclaim): from now on it reads as empty, size 0, and the kernel
        forgets what it cached; `run_discarder` empties it on the volume and marks it."""
        self.discarded.add(ino)
        node = self._inodes.get(ino)
        self.on_data_changed(ino, node.principal if node is not None else ROOT_PRINCIPAL)
        self._discard_wakeup.set()

    async def run_discarder(self: FileSystem, *,
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

    async def _empty_locked(self: FileSystem, node: Inode, *, mark: bool) -> None:
        """Empty the file (size 0, blocks freed as truncate frees them) and set or
        clear its user.sluice.discarded mark (under the inode lock).

        The file leaves `discarded` only with the mark, in one step: the truncate
        saves size 0 at once but then waits for requests in flight through the
        file's old grants, and a commit in that wait must still list the file as
        unflushed (`_save_unflushed`), or a crash would keep it empty and unmarked
        (R7: empty *and* marked)."""
        if node.size or node.blocks:
            await self._truncate_locked(node, 0, principal=PrincipalId(node.principal))
        self.discarded.discard(node.id)
        self._set_discarded_mark(node, mark)
        self.on_data_changed(node.id, node.principal)

    def _set_discarded_mark(self: FileSystem, node: Inode, mark: bool) -> None:
        has = DISCARDED_XATTR in self._hints(node)
        if has == mark:
            return
        if mark:
            self.md.set_xattr(node.id, DISCARDED_XATTR, b"1")
        else:
            self.md.remove_xattr(node.id, DISCARDED_XATTR)
        node.hints = None
        node.xattr_bytes = None
        node.ctime_ns = now_ns()
        self._save(node, "ctime_ns")
        self.on_attr_changed(node.id)

    async def _undiscard_locked(self: FileSystem, node: Inode) -> None:
        """A write or truncate of a discarded file: empty it first if the pager
        dropped its pages since (the write then lands in an empty file, never beside
        what is left of the old contents), and clear the mark."""
        if node.id in self.discarded:
            await self._empty_locked(node, mark=False)
        elif node.hints is None or DISCARDED_XATTR in node.hints:
            self._set_discarded_mark(node, False)
