"""Locks of the file blocks a partial write merges (`Kernel.write`).

A write that covers part of a block writes the whole block: the block's current
contents read (`Kernel._fill_block`), the new bytes put over them, the block written.
Two such writes of the same file block by different requests (two direct clients of a
shared file; a direct client and the mount, whose inode lock direct writes do not take)
each read the block before the other wrote it, and the second to write erased the
first one's bytes: acknowledged writes of disjoint bytes were lost (probe 6, W2). A
write holds the lock of each block it merges (at most two: its first and its last),
from the read of the old contents until the block is written and its range noted.
Writes of whole blocks merge nothing and take no lock."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


class MergeLocks:
    """Per (inode, file block) locks, made on first use and dropped with their last
    holder or waiter (at most two per write in flight)."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        #: (inode, file block) -> (the lock, holders and waiters)
        self._locks: dict[tuple[int, int], list] = {}

    def busy(self, inode: int, fblock: int) -> bool:
        """Whether a write is merging (or waits to merge) that block."""
        return (inode, fblock) in self._locks

    @asynccontextmanager
    async def hold(self, inode: int, fblocks: tuple[int, ...]) -> AsyncIterator[None]:
        """Hold the locks of `fblocks` of `inode` (taken in ascending order, so two
        writes never wait for each other's second block)."""
        got: list[tuple[int, int]] = []  # counted in (holders and waiters)
        held: list[trio.Lock] = []
        try:
            for fb in sorted(set(fblocks)):
                key = (inode, fb)
                entry = self._locks.get(key)
                if entry is None:
                    entry = self._locks[key] = [trio.Lock(), 0]
                entry[1] += 1
                got.append(key)
                if entry[1] == 1:
                    # (nobody else: taken without a trip through the scheduler; the
                    # write this serves checkpoints anyway)
                    entry[0].acquire_nowait()
                else:
                    await entry[0].acquire()
                held.append(entry[0])
            yield
        finally:
            for lock in held:
                lock.release()
            for key in got:
                entry = self._locks[key]
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]
