"""Write-back: dirty frames reach the device in runs of adjacent blocks, each run
tagged with the principal that dirtied it; a writer over its dirty share (or its
limited node's dirty bound: pager/dirty.py) writes back its own oldest frames
(throttling); frames dirty for longer than `dirty_expire` are written back by the
aging task (pager/aging.py); `flush` (a commit's barrier) and `writeback_file` (an
fsync) wait until what was dirty at their start is on the device.

Write-behind: a stream write (more than BYPASS_BLOCKS blocks, bypassing the pool) from
an immutable buffer is acknowledged once the device has claimed its blocks and is
written by a task of `run`'s nursery, at most WRITE_BEHIND_BYTES per principal on
their way; `flush` and `writeback_file` wait for all of them first.

Discardable dirty frames are never written back by the pager on its own (aging,
throttling, reclaim, `flush`): a discardable file is a cache by contract (crash rule
R7, docs/dev/invariants.md), and only `writeback_file` — an explicit fsync of that
file — writes them. Why `flush` skips them: it is the data=ordered flush of every
commit, and a commit records the files whose discardable frames are still dirty in
its `unflushed` list, so a crash empties them whole instead of exposing blocks whose
data never reached the device; writing them at every commit would cost the
write-back that discardability exists to save.

Debt-paced frames (`_paced`, pager/frames.py): dirty frames a limited tenant dirtied
while they were discardable (outside its dirty bound, V3) and whose hint was cleared
while it was over its bound. They are ordinary dirty data — never dropped; aging,
throttling, dontneed and fsync write them back — but no barrier writes them (`flush`
and `write_back_dirty` leave them out, and the commit lists their files as unflushed,
as it does discardable ones) and their write-back is made `never_expedited()`: it
goes at the dirtier's own limit, even while a commit waits. An fsync of their file
writes them first, at that pace, before its barrier (`write_back_paced`,
pager/aging.py): the tenant pays its own debt, and nobody's commit waits for it
(review of tidy5, R2).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import trio

from blockdev import ROOT_PRINCIPAL, BlockNo, DeviceError, PrincipalId

from . import trace as tr
from .cache import (CLEAN, DIRTY, DIRTY_LIMIT_SECONDS, FILLING, WRITEBACK,
                    WRITEBACK_CLUSTER, WRITE_BEHIND_BYTES, WRITE_BEHIND_TOTAL)
from .dirty import DirtyBounds

log = logging.getLogger(__name__)


def _held(mv: memoryview) -> int:
    """The memory a write-behind of `mv` keeps alive: the whole object it views (a
    FUSE payload is a view of the buffer its request was read into)."""
    obj = mv.obj
    return max(len(mv), len(obj)) if isinstance(obj, bytes) else len(mv)


class WriteBack(DirtyBounds):
    """Write-back of dirty frames, dirty throttling, flush and fsync, write-behind."""

    def _init_writeback(self, *, dirty_ratio: float, dirty_expire: float,
                        writeback_interval: float) -> None:
        self.dirty_ratio = dirty_ratio
        self.dirty_limit_seconds = DIRTY_LIMIT_SECONDS
        self.dirty_expire = dirty_expire
        self.writeback_interval = writeback_interval
        #: write-behind of stream writes (`_write_behind`): the nursery its writes run
        #: in (`run`'s, while it runs), bytes on their way per principal and in all,
        #: and the first failure, which every later flush reports
        self._behind_nursery: trio.Nursery | None = None
        self._behind: dict[int, int] = {}
        self._behind_total = 0
        #: device blocks of stream writes on their way per principal (their data, not
        #: the memory held): a limited node's dirty bound counts them (`_dirty_room`)
        self._behind_blocks: dict[int, int] = {}
        self._behind_error: str | None = None
        #: the principals whose aged frames a task of the aging loop writes back now
        self._aging: set[int] = set()

    def write_within_nowait(self, block: BlockNo, at: int, data: bytes | memoryview, *,
                            principal: PrincipalId, file: int = 0, fblock: int = 0) -> bool:
        """`write` of part of one block, `data` at byte `at` of block `block`, straight
        into its frame when that is possible without waiting: under write-back, the
        block resident (not FILLING: the frame holds the block's current contents,
        never older than the device) and the writer not over its dirty share. The
        frame then changes exactly as `write` of the block merged with its current
        contents would change it (dirty, dirtier, `_redirty` under write-back), with
        no bytearray, no read of the frame and no checkpoint. False, with nothing
        done, when not possible: the caller merges the block and calls `write`.

        The edge block of a stream written from an unaligned buffer: fio's 1 MiB
        writes reach the daemon as 1 MiB - 16 B and 16 B, and the 16 bytes land in
        the dirty frame the first request left (docs/BENCHMARKS.md)."""
        if not self.writeback:
            return False
        f = self._where.get(block)
        if f is None:
            return False
        state = self._state_m
        st = state[f]
        if st == FILLING:
            return False
        p = int(principal)
        acct = self._acct_of(p)
        limit = self._dirty_limit(p)
        if (self._global and sum(a.dirty for a in self._acct.values()) >= limit
                or acct.dirty >= limit):
            return False  # (`write` throttles this writer first)
        if self._lim_path and not (self._hinted and self._disc_m[f]) and (
                st != DIRTY and st != WRITEBACK or self._dirtier_m[f] != p):
            # (a frame another principal dirtied becomes p's dirty frame as much as a
            # clean one does: review of probe5fix, V1)
            room = self._dirty_room(p)
            if room is not None and room <= 0:
                return False  # (likewise: at its limited node's dirty bound)
        if self._tw is not None:
            self._trace_op(tr.WRITE, principal, block, 1, file, fblock)
        self._tick += 1
        if file and (file in self._hints or file in self._range_hints):
            self._file_tick[file] = self._tick
        self._ref_m[f] = True  # a write to a resident block is a reuse
        if file:
            self._retag(f, file, fblock)
        o = f * self.block_size + at
        self._mem[o:o + len(data)] = data
        if self._lost:
            self._lost.discard(int(block))  # (the frame holds its newest contents)
        now = trio.current_time()
        if st == DIRTY or st == WRITEBACK:
            if self._dirtier_m[f] != p:
                self._take_dirty(f, p, acct)
            if st == WRITEBACK:
                self._redirty_m[f] = True
                self._dirty_since_m[f] = now
        else:  # CLEAN
            state[f] = DIRTY
            self._dirtier_m[f] = p
            self._dirty_since_m[f] = now
            acct.dirty += 1
            if self._disc_m[f]:
                acct.disc_dirty += 1
        return True

    def _may_write_behind(self, mv: memoryview, p: int) -> bool:
        """Whether a stream write (one that bypasses the pool under write-back) may be
        acknowledged before it reaches the device: only when its buffer cannot change
        (a view of `bytes`: a FUSE request's payload, which the binding hands over as
        a read-only view of the buffer it read the request into, a buffer it reads
        nothing into while anything references it — never a direct client's shared
        memory) and the writer has less than
        WRITE_BEHIND_BYTES on their way and the daemon less than WRITE_BEHIND_TOTAL
        (beyond that it writes synchronously, paying for its own stream and nobody
        else's). What counts is the memory held: the whole `bytes` object."""
        if self._behind_nursery is None or not isinstance(mv.obj, bytes):
            return False
        if self._lim_path:
            # Under an I/O limit, only within its limited nodes' dirty bound: a commit
            # expedites write-behinds as it does dirty frames, so 16 MiB of them at
            # 64 KiB/s were a debt of minutes, past L2's few seconds (review of
            # probe5fix, V2). Beyond it the writer writes through, at its limit.
            room = self._dirty_room(p)
            if room is not None and len(mv) // self.block_size > room:
                return False
        n = _held(mv)
        return (self._behind.get(p, 0) + n <= WRITE_BEHIND_BYTES
                and self._behind_total + n <= WRITE_BEHIND_TOTAL)

    def _start_write_behind(self, block: int, mv: memoryview, p: int) -> None:
        """Send a stream write to the device in a task of its own and return at once
        (no checkpoint). The device claims its blocks first, so every later request
        that touches them — a read, another write, a discard — waits until it has
        landed; `flush` and `writeback_file` wait for all of them (R2: a commit's
        barrier flushes, so they are on the device before the metadata exposing
        them). Charged to `p`, with the bytes it holds."""
        assert self._behind_nursery is not None
        claim = self.device.claim(BlockNo(block), len(mv) // self.block_size)
        n = _held(mv)
        self._behind[p] = self._behind.get(p, 0) + n
        self._behind_total += n
        self._behind_blocks[p] = self._behind_blocks.get(p, 0) + len(mv) // self.block_size
        self._behind_nursery.start_soon(self._write_behind, block, mv, p, claim,
                                        name="pager write-behind")

    async def _write_behind(self, block: int, mv: memoryview, p: int, claim: int) -> None:
        n = _held(mv)
        try:
            # Shielded: the write was acknowledged, so a pager that is stopping (an
            # unmount cancels the nursery before the final sync) lets it land rather
            # than lose it; the work is bounded (WRITE_BEHIND_BYTES per principal).
            with trio.CancelScope(shield=True):
                await self.device.write(BlockNo(block), mv, principal=PrincipalId(p),
                                        claim=claim)
        except BaseException as exc:
            # Acknowledged data that will not reach the device: every later flush (a
            # commit, an fsync) fails, so the volume turns read-only and fsync
            # reports EIO, as for a failed write-back of dirty frames.
            self.device.release_claim(claim)
            if self._behind_error is None:
                self._behind_error = (f"write-behind of device blocks {block}+"
                                      f"{len(mv) // self.block_size} failed: {exc!r}")
            if not isinstance(exc, Exception):
                raise  # (Cancelled: the pager is stopping)
            log.error("%s", self._behind_error)
        finally:
            self._behind[p] -= n
            if not self._behind[p]:
                del self._behind[p]
            self._behind_total -= n
            self._behind_blocks[p] -= len(mv) // self.block_size
            if not self._behind_blocks[p]:
                del self._behind_blocks[p]
            self._wake_io()

    async def _wait_behind(self) -> None:
        """Wait until every write-behind started so far has landed; DeviceError if
        one ever failed."""
        if self._behind_total:
            # Written behind, these were the writer's own requests, which a barrier
            # dispatches past their principal's I/O limit (Kernel.barrier): so are they,
            # or a commit would wait for a throttled principal's stream.
            with self.device.scheduler.expedite_writes():
                while self._behind_total:
                    await self._io_done.park()
        if self._behind_error is not None:
            raise DeviceError(self._behind_error)

    def _cluster(self, f: int) -> list[int]:
        """f and its dirty, same-dirtier, written-back-able neighbours on the device
        (debt-paced or not as f is: a run is expedited as a whole or not at all)."""
        b = int(self._frame_block_m[f])
        d = self._dirtier_m[f]
        paced = self._paced_m
        pf = paced[f]
        where = self._where
        out = [f]
        for step in (1, -1):
            nb = b + step
            while len(out) < WRITEBACK_CLUSTER:
                g = where.get(nb)
                if (g is None or self._state_m[g] != DIRTY or self._dirtier_m[g] != d
                        or paced[g] != pf or self._droppable(g)):
                    break
                out.append(g)
                nb += step
        return out

    async def _writeback_frames(self, frames: list[int], *,
                                principal: PrincipalId | None = None,
                                dirtier: int | None = None,
                                expeditable: bool = False) -> int:
        """Write the DIRTY frames among `frames` to the device, in runs of adjacent
        blocks with the same dirtier, each run tagged with that principal (or with
        `principal`: an fsync writing its file's frames, on its caller's bank).
        `dirtier`: only the runs that principal still dirtied when their turn comes (an
        aging task's: a frame another principal took over meanwhile goes with that
        one's own write-back, not at its limit ahead of the rest: review of
        probe5fix, V6). Runs of debt-paced frames are never expedited by a barrier
        unless `expeditable` (a write-back inside a request a barrier may wait
        for: reclaim for a writer, one frame at a time). Returns the number of
        frames written."""
        todo = sorted((int(self._frame_block_m[f]), f) for f in frames
                      if self._state_m[f] == DIRTY)
        written = 0
        paced = self._paced_m
        i = 0
        while i < len(todo):
            j = i + 1
            d = self._dirtier_m[todo[i][1]]
            pf = paced[todo[i][1]]  # (runs are all debt-paced or none: `_writeback_run`)
            while (j < len(todo) and j - i < WRITEBACK_CLUSTER
                   and todo[j][0] == todo[j - 1][0] + 1 and self._dirtier_m[todo[j][1]] == d
                   and self._state_m[todo[j][1]] == DIRTY and paced[todo[j][1]] == pf):
                j += 1
            run = [f for _, f in todo[i:j] if self._state_m[f] == DIRTY]
            i = j
            if not run or dirtier is not None and d != dirtier:
                continue
            # the run may have lost members to the checks above: keep it contiguous
            run = run[:1] + [g for k, g in enumerate(run[1:], 1)
                             if self._frame_block_m[g] == self._frame_block_m[run[0]] + k
                             and paced[g] == paced[run[0]]]
            written += await self._writeback_run(run, principal, expeditable=expeditable)
        return written

    async def _writeback_run(self, run: list[int], principal: PrincipalId | None = None,
                             *, expeditable: bool = False) -> int:
        bs = self.block_size
        mem = self._mem
        b0 = int(self._frame_block_m[run[0]])
        d = int(self._dirtier_m[run[0]])
        gens = [int(self._gen_m[f]) for f in run]
        buf = bytearray(len(run) * bs)
        for k, f in enumerate(run):
            buf[k * bs:(k + 1) * bs] = mem[f * bs:(f + 1) * bs]
            self._state_m[f] = WRITEBACK
            self._redirty_m[f] = False
        epoch = self._epoch
        by = PrincipalId(d) if principal is None else principal
        try:
            # A debt-paced run goes at its principal's limit even while a barrier
            # waits: none waits for it (`flush` leaves it out; tidy5's review, R2).
            with (self.device.scheduler.never_expedited()
                  if self._paced_m[run[0]] and not expeditable else nullcontext()):
                await self.device.write(BlockNo(b0), buf, principal=by)
        except BaseException:
            for f, g in zip(run, gens):
                if self._gen_m[f] == g and self._state_m[f] == WRITEBACK:
                    self._state_m[f] = DIRTY
            self._wake_io()
            raise
        self._acct_of(d).wb_bytes += len(buf)
        for f, g in zip(run, gens):
            if self._gen_m[f] != g:
                continue
            self._wb_epoch_m[f] = max(int(self._wb_epoch_m[f]), epoch)
            if self._redirty_m[f]:
                self._redirty_m[f] = False
                self._state_m[f] = DIRTY
            else:
                self._state_m[f] = CLEAN
                self._undirty(f)
        self._wake_io()
        return len(run)

    async def _throttle(self, p: int) -> None:
        """A writer over its dirty share writes back its own oldest dirty frames (under
        `global-lru`, the pool's share and anyone's frames, as a kernel would). So does
        a writer at a limited node's dirty bound (`_dirty_room`): its own frames, or,
        with none, those of the node's subtree (its own tenant's other principals,
        whose write-back goes at that node's limit too) — never another tenant's, so
        it waits for its own limit only."""
        limit = self._dirty_limit(p)
        while True:
            full: list[frozenset[int]] = []
            if self._global:
                dirty = sum(a.dirty for a in self._acct.values())
                mine = self._state == DIRTY
            else:
                dirty = self._acct_of(p).dirty
                mine = (self._state == DIRTY) & (self._dirtier == p)
                if self._lim_path:
                    self._dirty_room(p, members=full)
            if dirty < limit and not full:
                return
            # (never the debt-paced frames: this runs inside a write a barrier waits
            # for, and their write-back is not expedited; `pay_paced` writes them
            # before the writer's requests: review of tidy5, R2)
            cand = (np.flatnonzero(mine & ~(self._disc | self._paced)) if self._hinted
                    else np.flatnonzero(mine))
            if not len(cand) and full:
                subtree = np.isin(self._dirtier, np.fromiter(full[0], dtype=np.int64))
                ours = (self._state == DIRTY) & subtree
                cand = np.flatnonzero(ours & ~(self._disc | self._paced) if self._hinted
                                      else ours)
            if len(cand):
                oldest = int(cand[np.argmin(self._dirty_since[cand])])
                await self._writeback_frames(self._cluster(oldest))
                continue
            wb = self._state == WRITEBACK
            if self._hinted:
                # (nor wait for them: a paced run goes at its dirtier's limit, never
                # expedited, and a barrier waits for this write — every commit waited
                # for the tenant's pace: review of pager7, P2)
                wb &= ~self._paced
            busy = wb if self._global else wb & (self._dirtier == p)
            if full:
                busy |= wb & np.isin(self._dirtier, np.fromiter(full[0], dtype=np.int64))
                if not busy.any() and any(self._behind_blocks.get(m) for m in full[0]):
                    # (the bound holds the subtree's write-behinds: they land at its
                    # limit, V2)
                    await self._io_done.park()
                    continue
            if busy.any():
                await self._io_done.park()
                continue
            return  # only discardable (or debt-paced) dirty frames: not written here

    async def _write_back_until_clean(self, frames: np.ndarray, *,
                                      principal: PrincipalId | None = None,
                                      expeditable: bool = False) -> None:
        """Return when every write to `frames` before this call is on the device
        (written back on `principal`'s bank if given, else each on its dirtier's;
        `expeditable`: debt-paced ones too may be expedited, `_writeback_frames`)."""
        self._epoch += 1
        epoch = self._epoch
        gens = self._gen[frames].copy()
        while True:
            same = self._gen[frames] == gens
            st = self._state[frames]
            pending = same & ((st == DIRTY) | ((st == WRITEBACK) & (self._wb_epoch[frames] < epoch)))
            if not pending.any():
                return
            dirty = frames[same & (st == DIRTY)]
            if len(dirty):
                await self._writeback_frames([int(f) for f in dirty], principal=principal,
                                             expeditable=expeditable)
            else:
                await self._io_done.park()

    async def flush(self, *, principal: PrincipalId = ROOT_PRINCIPAL,
                    file: int | None = None, by_dirtier: bool = False) -> None:
        """Write back every dirty frame that is not discardable (those are a cache by
        contract and reach the device only by `writeback_file`) nor debt-paced (those
        go at their dirtier's limit: `write_back_paced`), wait for write-back in
        flight, then flush the device. The flush is charged to `principal` (who asked
        for it: an fsync's caller, root for the periodic commit), and so is the
        write-back of `file`'s frames (the fsync'd file), written first, unless
        `by_dirtier` (the kernel's barrier, which expedites it: then on their
        dirtiers' banks, who repay it); every other frame is written on its
        dirtier's bank."""
        if self._tw is not None:
            self._trace_op(tr.FLUSH, 0, 0, 0, 0, 0)
        if self.writeback:
            await self._wait_behind()
            cand = (self._state == DIRTY) | (self._state == WRITEBACK)
            if self._hinted:
                cand &= ~(self._disc | self._paced)
            if file is not None:
                mine = cand & (self._file == file)
                await self._write_back_until_clean(
                    np.flatnonzero(mine), principal=None if by_dirtier else principal)
                cand &= ~mine
            await self._write_back_until_clean(np.flatnonzero(cand))
        await self.device.flush(principal=principal)

    async def write_back_dirty(self, *, principal: PrincipalId | None = None,
                               file: int | None = None, by_dirtier: bool = False) -> None:
        """Write back the frames dirty now that `flush` would write (not the
        discardable nor the debt-paced ones under `hinted`), without waiting for write-behinds or flushing
        the device; `file`'s first, on `principal`'s bank (or, `by_dirtier`, on their
        dirtiers', as every other frame), as `flush` does. A commit's barrier
        calls it before it holds writers back, so that
        its own flush, during which every writer waits, has only what is dirtied
        meanwhile (a sequential writer leaves a dirty edge block per request: hundreds
        of one-block writes per commit). Only an optimisation: `flush` is what R2
        relies on."""
        if not self.writeback:
            return
        cand = self._state == DIRTY
        if self._hinted:
            cand &= ~(self._disc | self._paced)
        if file is not None and (principal is not None or by_dirtier):
            mine = cand & (self._file == file)
            frames = np.flatnonzero(mine)
            if len(frames):
                await self._writeback_frames([int(f) for f in frames],
                                             principal=None if by_dirtier else principal)
            cand = (self._state == DIRTY) & ~mine
            if self._hinted:
                cand &= ~(self._disc | self._paced)
        frames = np.flatnonzero(cand)
        if len(frames):
            await self._writeback_frames([int(f) for f in frames])
