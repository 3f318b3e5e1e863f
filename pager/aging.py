"""Aging: frames dirty for longer than `dirty_expire` are written back in the
background, each dirtier's by a task of its own, on its own bank (hostile probe 5,
L3: in one task a throttled tenant's aged frames held every other's)."""

from __future__ import annotations

import logging

import numpy as np
import trio

from .cache import DIRTY
from .writeback import WriteBack

log = logging.getLogger(__name__)


class Aging(WriteBack):
    """The aging task (`Pager.run` starts it under write-back)."""

    async def _aging_loop(self) -> None:
        """Every `writeback_interval`, the frames dirty for `dirty_expire` or longer
        (not discardable ones) are written back, each dirtier's by a task of its own
        (`_age_of`): one dirtier's write-back waits for its own I/O limit, and in one
        task, in block order, a throttled tenant's aged frames held every other
        tenant's aging behind them (hostile probe 5, L3). A dirtier whose aging task
        is still running is skipped and looked at again at the next pass. At most one
        task per principal with aged frames."""
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.writeback_interval)
                old = (self._state == DIRTY) & (self._dirty_since
                                                <= trio.current_time() - self.dirty_expire)
                if self._hinted:
                    old &= ~self._disc
                if not old.any():
                    continue
                for d in np.unique(self._dirtier[old]).tolist():
                    if d not in self._aging:
                        self._aging.add(d)
                        nursery.start_soon(self._age_of, d,
                                           name=f"pager write-back aging of principal {d}")

    async def _age_of(self, d: int) -> None:
        """Write back principal `d`'s frames dirty for `dirty_expire` or longer, on its
        bank (at its limit: it waits for nobody else's)."""
        try:
            old = ((self._state == DIRTY) & (self._dirtier == d)
                   & (self._dirty_since <= trio.current_time() - self.dirty_expire))
            if self._hinted:
                old &= ~self._disc
            frames = np.flatnonzero(old)
            if len(frames):
                try:
                    await self._writeback_frames([int(f) for f in frames], dirtier=d)
                except Exception:
                    # the frames stay dirty; flush or fsync will report the error
                    log.exception("write-back of %d aged frames of principal %d failed",
                                  len(frames), d)
        finally:
            self._aging.discard(d)
