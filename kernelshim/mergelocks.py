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
    """Per (inode, file block) locks. An uncontended one is a dict entry (set and
    deleted: no lock object; the merge path is measured in `scripts/bench_merge.py`);
    a parking lot is made for a block only when a second write waits for it, and the
    block is handed to the next waiter on release."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        #: (inode, file block) held -> the writes waiting for it (None: none yet)
        self._held: dict[tuple[int, int], trio.lowlevel.ParkingLot | None] = {}

    def busy(self, inode: int, fblock: int) -> bool:
        """Whether a write is merging that block."""
        return (inode, fblock) in self._held

    async def acquire(self, inode: int, fblocks: tuple[int, ...]) -> bool:
        """Hold the blocks `fblocks` of `inode` (sorted, distinct: taken in that order,
        so two writes never wait for each other's second block); whether it had to
        wait for one (then the caller looks at the map again). A free block is taken
        without a checkpoint (the write this serves checkpoints anyway). Cancelled
        while waiting: nothing is held."""
        waited = False
        done: list[int] = []
        try:
            for fb in fblocks:
                key = (inode, fb)
                if key not in self._held:
                    self._held[key] = None
                else:
                    lot = self._held[key]
                    if lot is None:
                        lot = self._held[key] = trio.lowlevel.ParkingLot()
                    waited = True
                    await lot.park()  # (woken by `release`: the block is this write's)
                done.append(fb)
        except BaseException:
            self.release(inode, tuple(done))
            raise
        return waited

    def release(self, inode: int, fblocks: tuple[int, ...]) -> None:
        """Let go of the blocks `acquire` took: each to its next waiter, if any."""
        for fb in fblocks:
            key = (inode, fb)
            lot = self._held[key]
            if lot is None or not lot.unpark(count=1):
                del self._held[key]
