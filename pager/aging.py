"""Aging: frames dirty for longer than `dirty_expire` are written back in the
background, each dirtier's by a task of its own, on its own bank (hostile probe 5,
L3: in one task a throttled tenant's aged frames held every other's). And the other
write-back at the dirtier's own pace: debt-paced frames (pager/frames.py `_paced`)
written before a tenant's next requests (`pay_paced`) and before an fsync of their
file (`write_back_paced`), never expedited (review of tidy5, R2)."""

from __future__ import annotations

import logging

import numpy as np
import trio

from blockdev import ROOT_PRINCIPAL, PrincipalId

from . import trace as tr
from .cache import DIRTY, WRITEBACK
from .writeback import WriteBack

log = logging.getLogger(__name__)


class Aging(WriteBack):
    """The aging task (`Pager.run` starts it under write-back); the debt-paced
    frames' write-back; an fsync's write-back of one file (`writeback_file`)."""

    async def writeback_file(self, file: int, *,
                             principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """fsync of one file: its dirty frames (discardable ones included: asked for
        explicitly) reach the device, and the device is flushed; nobody else's dirty
        frames are written. Charged to `principal` (the fsync's caller)."""
        self._trace_op(tr.WRITEBACK_FILE, 0, 0, 0, file, 0)
        if self.writeback:
            await self._wait_behind()
            st = self._state
            frames = np.flatnonzero((self._file == file) & ((st == DIRTY) | (st == WRITEBACK)))
            # (debt-paced ones left here, rewritten during the fsync's paced pass or
            # paced by a clear since, expeditable: this runs inside the fsync's
            # barrier, every writer held — never expedited, they held them all at
            # the tenant's limit: review of pager7, P6)
            await self._write_back_until_clean(frames, principal=principal,
                                               expeditable=True)
        await self.device.flush(principal=principal)

    async def write_back_paced(self, file: int) -> None:
        """Return when each of `file`'s debt-paced frames has been written back once
        since the call (or is no longer paced): each on its dirtier's bank at its
        limit, never expedited, after whatever that principal has queued (the tenant
        pays its own debt). Done by an fsync of the file before its barrier
        (`Kernel.writeback_file`), so that no commit, and none of the writers a
        barrier holds, waits for that pace. One pass: a frame rewritten during its
        write-back stays paced and dirty, for the fsync's barrier to write with the
        file's other frames (looping until none was paced kept the fsync waiting for
        as long as anyone rewrote a block of the file: review of pager7, P4)."""
        frames = np.flatnonzero((self._file == file) & self._paced)
        if not len(frames):
            return
        self._epoch += 1
        epoch = self._epoch
        gens = self._gen[frames].copy()
        while True:
            left = ((self._gen[frames] == gens) & self._paced[frames]
                    & (self._wb_epoch[frames] < epoch))
            st = self._state[frames]
            dirty = frames[left & (st == DIRTY)]
            if len(dirty):
                await self._writeback_frames([int(f) for f in dirty])
            elif (left & (st == WRITEBACK)).any():
                await self._io_done.park()  # (on their way in a run begun before)
            else:
                return

    async def pay_paced(self, principal: PrincipalId, nblocks: int) -> None:
        """Before a request of `principal` that dirties `nblocks` frames: while it has
        debt-paced frames and, counting them, is at a limited node's dirty bound,
        write back its own oldest paced frames, `nblocks` of them (at least one), at
        its limit, never expedited — its own cost, never the whole debt (Linux holds
        the file's i_rwsem across a FUSE write: second review of probe 5, R2). So a
        tenant over its bound by the frames whose hint it cleared dirties at most
        at its limit until they are written, as it would over its bound for any
        other dirty data. Called by `Kernel.repay_limit`, holding no lock and not
        inside a write a barrier waits for (which is why the in-write throttle
        leaves paced frames alone)."""
        p = int(principal)
        a = self._acct.get(p)
        if a is None or not a.paced or not self._lim_path:
            return
        room = self._dirty_room(p)
        if room is None or room - a.paced > 0:
            return
        cand = np.flatnonzero(self._paced & (self._dirtier == p) & (self._state == DIRTY))
        if len(cand):
            oldest = cand[np.argsort(self._dirty_since[cand], kind="stable")]
            await self._writeback_frames([int(f) for f in oldest[:max(1, nblocks)]])
        else:
            await self._io_done.park()  # (all on their way: wait for one to land)

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

    async def wait_write_room(self, principal: PrincipalId) -> None:
        """Under write-back, wait until `principal` may dirty a frame without being
        throttled (`write`'s test: its dirty share, the dirty bound of the limited
        nodes on its path), writing back its own frames as `write` would. A caller
        about to take a lock that other principals may wait for calls it first, so
        that its `write` under the lock does not wait at its own limit meanwhile
        (review of probe 6, R2). No checkpoint when there is room."""
        if not self.writeback:
            return
        p = int(principal)
        limit = self._dirty_limit(p)
        room = self._dirty_room(p) if self._lim_path else None
        if (self._global and sum(a.dirty for a in self._acct.values()) >= limit
                or self._acct_of(p).dirty >= limit
                or room is not None and room <= 0):
            await self._throttle(p)
