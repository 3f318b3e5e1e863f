"""Freed blocks: their frames dropped once no write-back of theirs is in flight, and
the device told (a hole punched) or not (blocks the metadata server's reaper keeps
for reuse); and the blocks whose newest contents a dropped discardable frame held
(`FrameTable._lost`), which read as zeros until written again or freed."""

from __future__ import annotations

from typing import Sequence

from blockdev import BlockNo, PrincipalId

from . import trace as tr
from .cache import WRITEBACK
from .datapath import DataPath


class Freeing(DataPath):
    """Discard and forgetting of freed blocks (see the module's docstring)."""

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget freed blocks: wait for their write-back in flight (so it cannot land
        after the hole punch), drop their frames (dirty ones unwritten), discard them on
        the device."""
        await self.discard_runs([(block, count)], principal=principal)

    async def discard_runs(self, runs: Sequence[tuple[int, int]], *,
                           principal: PrincipalId) -> None:
        """`discard` of every (block, count) of `runs` (sorted by block, not overlapping),
        as one device request (`BlockDevice.discard_runs`): a commit frees many
        scattered blocks at once."""
        await self.forget_runs(runs, principal=principal)
        await self.device.discard_runs(runs, principal=principal)

    async def forget_runs(self, runs: Sequence[tuple[int, int]], *,
                          principal: PrincipalId) -> None:
        """Drop the frames of freed blocks (`runs` sorted by block, not overlapping)
        once no write-back of theirs is in flight, dirty ones unwritten, and leave the
        blocks' contents on the device: `discard_runs` without the hole punch, for
        freed blocks kept for reuse (the metadata server's reaper). A write that reuses
        one then finds no frame of the old contents, and none of theirs is written back
        over it. (Traced as a discard: to the pager, the blocks' contents are gone.)"""
        if self._tw is not None:
            for block, count in runs:
                self._trace_op(tr.DISCARD, principal, block, count, 0, 0)
        where = self._where
        if where:
            state, pin = self._state_m, self._pin_m
            while True:
                busy = False
                for block, count in runs:
                    for b in range(block, block + count):
                        f = where.get(b)
                        if f is not None and (state[f] == WRITEBACK or pin[f]):
                            busy = True
                            break
                    if busy:
                        break
                if not busy:
                    break
                await self._io_done.park()
            # no checkpoint from the check above to the unmap (nor, in
            # `discard_runs`, to the device discard's start)
            for block, count in runs:
                for b in range(block, block + count):
                    f = where.get(b)
                    if f is not None:
                        self._unmap(f)
        self.freed_unforgotten(runs)  # (freed: no map reads them any more)

    def freed_unforgotten(self, runs: Sequence[tuple[int, int]]) -> None:
        """Freed blocks leave `_lost`: no map reads them any more. `forget_runs` ends
        with it; the metadata server's reaper calls it for blocks it hands back
        without `forget_runs` (once it gave up discarding), which would otherwise stay
        in `_lost` for ever. No checkpoint."""
        for block, count in runs:
            self._not_lost(block, count)
