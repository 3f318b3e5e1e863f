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

    async def acquire(self, inode: int, fblocks: tuple[int, ...]) -> bool:
        """Hold the locks of `fblocks` of `inode` (sorted, distinct: taken in that
        order, so two writes never wait for each other's second block); whether it
        had to wait for one (then the caller looks at the map again). An uncontended
        lock is taken without a trip through the scheduler (the write this serves
        checkpoints anyway). Cancelled while waiting: nothing is held."""
        waited = False
        done = 0
        try:
            for fb in fblocks:
                key = (inode, fb)
                entry = self._locks.get(key)
                if entry is None:
                    entry = self._locks[key] = [trio.Lock(), 0]
                entry[1] += 1
                if entry[1] == 1:
                    entry[0].acquire_nowait()
                else:
                    waited = True
                    try:
                        await entry[0].acquire()
                    except BaseException:
                        self._drop(key, held=False)
                        raise
                done += 1
        except BaseException:
            self.release(inode, fblocks[:done])
            raise
        return waited

    def release(self, inode: int, fblocks: tuple[int, ...]) -> None:
        """Let go of the locks `acquire` took."""
        for fb in fblocks:
            self._drop((inode, fb), held=True)

    def _drop(self, key: tuple[int, int], *, held: bool) -> None:
        entry = self._locks[key]
        if held:
            entry[0].release()
        entry[1] -= 1
        if not entry[1]:
            del self._locks[key]
