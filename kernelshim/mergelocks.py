"""Locks of the file blocks a partial write merges (`Kernel.write`).

A write that covers part of a block writes the whole block: the block's current
contents read (`Kernel._fill_block`), the new bytes put over them, the block written.
Two such writes of the same file block by different requests (two direct clients of a
shared file; a direct client and the mount, whose inode lock direct writes do not take)
each read the block before the other wrote it, and the second to write erased the
first one's bytes: acknowledged writes of disjoint bytes were lost (probe 6, W2). A
write holds the lock of each block it merges (at most two: its first and its last),
from the read of the old contents until the block is written and its range noted.

Writes of whole blocks merge nothing, but a merge of one of their blocks around them
erased them: a whole-block write landing between a merge's read and its write was
overwritten by the merge's old contents (probe 6, W4). A whole-block write therefore
first waits for the merges holding any of its blocks (it takes those blocks, in
order, and lets them go once registered), then is registered as a range of file
blocks being written whole until it ends (`enter_whole_nowait`, else `enter_whole`;
`leave_whole`: one entry per write, not per block, so large writes of one file still
go side by side); a merge, once it holds its block, waits for the whole-block writes
registered over it (`wait_whole`). New whole-block writes of a block wait for a merge holding it, and
a merge waits only for the whole-block writes that began before it: nobody waits
for a later arrival, and no one waits for the other in a cycle. A write that merges
its ends and writes whole blocks between them registers that middle too, in block
order (`Kernel.write`: first end, middle, last end with no checkpoint after the
registration; review of shared7, S1)."""

from __future__ import annotations

import trio


class MergeLocks:
    """Per (inode, file block) locks. An uncontended one is a dict entry (set and
    deleted: no lock object; the merge path is measured in `scripts/bench_merge.py`);
    a parking lot is made for a block only when a second write waits for it, and the
    block is handed to the next waiter on release."""

    __slots__ = ("_held", "_whole", "_whole_done")

    def __init__(self) -> None:
        #: (inode, file block) held -> the writes waiting for it (None: none yet)
        self._held: dict[tuple[int, int], trio.lowlevel.ParkingLot | None] = {}
        #: inode -> the file block ranges [start, end) of its whole-block writes in
        #: flight (one entry per write; W4)
        self._whole: dict[int, list[tuple[int, int]]] = {}
        #: inode -> woken when one of its whole-block writes ends (made only when a
        #: merge waits for one)
        self._whole_done: dict[int, trio.Event] = {}

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

    def enter_whole_nowait(self, inode: int, start: int, end: int) -> bool:
        """A write of the whole blocks [start, end) of `inode` begins: registered until
        `leave_whole` (which the caller must reach: try/finally), unless a merge holds
        one of them — then False, nothing done, and the caller calls `enter_whole`.
        Never blocks (the common case: no merge of the file at all)."""
        if self._held and self._busy_in(inode, start, end):
            return False
        self._register(inode, start, end)
        return True

    def enter_nowait(self, inode: int, fblocks: tuple[int, ...], start: int,
                     end: int) -> bool:
        """A write that merges `fblocks` and writes the blocks [start, end) between
        them whole: takes the one and registers the other at once when no merge holds
        any of them (no checkpoint: as `acquire` then `enter_whole_nowait` would,
        with nothing between); else False, nothing done (the caller takes them in
        block order: `Kernel.write`). Never blocks."""
        held = self._held
        if held:
            for fb in fblocks:
                if (inode, fb) in held:
                    return False
            if self._busy_in(inode, start, end):
                return False
        for fb in fblocks:
            held[(inode, fb)] = None
        self._register(inode, start, end)
        return True

    def _register(self, inode: int, start: int, end: int) -> None:
        """Note a write of the whole blocks [start, end) of `inode` in progress."""
        w = self._whole.get(inode)
        if w is None:
            self._whole[inode] = [(start, end)]
        else:
            w.append((start, end))

    async def enter_whole(self, inode: int, start: int, end: int) -> None:
        """`enter_whole_nowait` that waits for the merges holding any of the blocks
        (taking those blocks in order, as a merge would, and letting them go once
        registered: the merge handed one next then waits for this write, which began
        before it). Registered only when no merge holds a block of the range: a merge
        that took another of its blocks while it waited (it found no whole-block write
        registered, and may have read the block already) is waited for too, else its
        write of what it read undid this one's (review of shared7, S2). Cancelled
        while waiting: nothing held, nothing registered."""
        while True:
            busy = self._busy_in(inode, start, end)
            if not busy:
                break
            await self.acquire(inode, busy)
            try:
                if len(self._busy_in(inode, start, end)) == len(busy):  # (only its own)
                    break
            finally:
                self.release(inode, busy)
        self._register(inode, start, end)

    def _busy_in(self, inode: int, start: int, end: int) -> tuple[int, ...]:
        """The blocks of [start, end) of `inode` a merge holds, ascending."""
        held = self._held
        if end - start <= len(held):
            return tuple(fb for fb in range(start, end) if (inode, fb) in held)
        return tuple(sorted(fb for (ino, fb) in held if ino == inode and start <= fb < end))

    def leave_whole(self, inode: int, start: int, end: int) -> None:
        """The whole-block write registered by `enter_whole(_nowait)` has ended."""
        ranges = self._whole[inode]
        if len(ranges) == 1:
            del self._whole[inode]
        else:
            ranges.remove((start, end))
        if self._whole_done:
            ev = self._whole_done.pop(inode, None)
            if ev is not None:
                ev.set()

    async def wait_whole(self, inode: int, fblocks: tuple[int, ...]) -> bool:
        """A merge holding `fblocks` (`acquire`) waits for the whole-block writes of
        any of them in flight (they began before it: later ones wait for the merge);
        whether it waited. No checkpoint when there are none."""
        waited = False
        while True:
            ranges = self._whole.get(inode)
            if not ranges or not any(a <= fb < b for a, b in ranges for fb in fblocks):
                return waited
            ev = self._whole_done.get(inode)
            if ev is None:
                ev = self._whole_done[inode] = trio.Event()
            waited = True
            await ev.wait()
