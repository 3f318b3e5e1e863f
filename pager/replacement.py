"""Replacement: which frame goes when one is needed, by policy and bank.

`global-lru` runs one CLOCK over the pool. `principal` and `hinted` keep SIEVE
queues per principal (per class under `hinted`: discardable, drop-behind, then one
per priority; pager/policy.py) and follow the reclaim order of pager/pool.py's
docstring: a principal at a ceiling reclaims from itself; then free frames; then
principals above their ceiling; then (hinted) what principals above their guarantee
said they can do without; then the principal furthest above its guarantee, by class.
Nobody is taken below a guarantee for someone else. A dirty discardable victim takes
its file's other dirty discardable frames with it, unwritten, and the file is
reported (`on_discarded`); any other dirty victim is written back first.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .cache import CLASS_DISCARDABLE, CLASS_DROP_BEHIND, CLEAN, DIRTY, FILLING, WRITEBACK
from .policy import NIL
from .aging import Aging

log = logging.getLogger(__name__)


class Replacement(Aging):
    """Victim choice, eviction and frame allocation."""

    def _init_replacement(self, *, on_discarded: Callable[[int], object] | None) -> None:
        #: called with a file's id when its dirty discardable frames were dropped
        self.on_discarded = on_discarded

    def _evict(self, f: int) -> None:
        """Reclaim frame f (clean, or dirty and droppable) for reuse."""
        owner = self._acct_of(int(self._owner_m[f]))
        owner.evictions += 1
        self.evictions += 1
        if self._hinted and self._disc_m[f]:
            owner.discarded += 1
            if self._state_m[f] == DIRTY:
                self._drop_discardable_file(f)
                return
        self._unmap(f)

    def _drop_discardable_file(self, f: int) -> None:
        """A dirty discardable frame goes: so do its file's other dirty discardable
        frames (the file is lost as a whole), and the file is reported."""
        file = int(self._file_m[f])
        lost = self._lost
        lost.add(int(self._frame_block_m[f]))  # (its data is gone: see FrameTable)
        self._unmap(f)
        if file:
            others = np.flatnonzero((self._file == file) & (self._state == DIRTY)
                                    & self._disc & (self._pin == 0))
            for g in others.tolist():
                self._acct_of(int(self._owner_m[g])).discarded += 1
                lost.add(int(self._frame_block_m[g]))
                self._unmap(g)
            if self.on_discarded is not None:
                try:
                    self.on_discarded(file)
                except Exception:
                    log.exception("on_discarded(%d) failed", file)

    def _lost_in(self, block: int, count: int) -> list[int]:
        """The blocks of the range whose newest contents were dropped (sorted)."""
        lost = self._lost
        if not lost:
            return []
        if len(lost) < count:
            return sorted(b for b in lost if block <= b < block + count)
        return [b for b in range(block, block + count) if b in lost]

    def _not_lost(self, block: int, count: int) -> None:
        """The range's blocks were written again, or freed: the device's contents are
        theirs from now on (FrameTable._lost)."""
        lost = self._lost
        if lost:
            for b in self._lost_in(block, count):
                lost.discard(b)

    def _idle(self, f: int) -> bool:
        """A discardable frame whose file has not been touched for the last
        `nframes / 8` block accesses: a discardable file in use is not thrown away
        whole before other cold pages, an idle one is."""
        last = self._file_tick.get(int(self._file_m[f]))
        return last is None or self._tick - last > self._idle_ticks

    def _cold_discardable(self, f: int) -> bool:
        return self._evictable(f) and (self._state_m[f] == CLEAN or self._idle(f))

    def _victim_discardable(self, p: int, *, cold: bool) -> int:
        """Under `hinted`, what the application said it can do without: with `cold`,
        clean discardable frames, idle discardable files and frames a sequential
        reader has finished with (drop-behind); else any discardable frame."""
        qs = self._pq.get(p)
        if not qs:
            return NIL
        q = qs.get(CLASS_DISCARDABLE)
        if q is not None and q.size:
            v = q.victim(self._cold_discardable if cold else self._evictable)
            if v != NIL:
                return v
        if cold:
            q = qs.get(CLASS_DROP_BEHIND)
            if q is not None and q.size:
                return q.victim(self._evictable)
        return NIL

    def _victim_of(self, p: int) -> int:
        """p's frame to reclaim: clean discardable frames and idle discardable files
        first, then drop-behind and priorities from the lowest, then (last) a
        discardable file still in use."""
        cheap = self._hinted and bool(self._cheap_queues)
        if cheap:
            v = self._victim_discardable(p, cold=True)
            if v != NIL:
                return v
        for q in self._pq_order.get(p, ()):
            if q.size:
                v = q.victim(self._evictable)
                if v != NIL:
                    return v
        if cheap:
            return self._victim_discardable(p, cold=False)
        return NIL

    def _pick_victim(self, requester: int, *, strict: bool = True) -> int:
        """The frame the policy reclaims for `requester` (not yet removed), or NIL.
        `strict`: never below a guarantee (only a pool whose guarantees were not
        admission-checked can need `strict=False`)."""
        if self._global:
            return self._clock.victim(self._evictable)
        acct = self._acct
        tried: set[int] = set()
        scope = self._at_max(requester)
        if scope is not None:
            # over its own (or an ancestor's) ceiling: reclaim inside that subtree
            if acct.get(requester) and acct[requester].resident:
                v = self._victim_of(requester)
                if v != NIL:
                    return v
                tried.add(requester)
            cands = [(a.resident, p) for p, a in acct.items()
                     if a.resident and p not in tried
                     and (p == scope or scope in self._ancestors(p))]
            for _, p in sorted(cands, reverse=True):
                v = self._victim_of(p)
                if v != NIL:
                    return v
            if strict:
                return NIL  # never out of someone else's pages: wait for its own
        # principals above their ceiling
        if self._max:
            over = [(a.resident - self._max[p], p) for p, a in acct.items()
                    if p in self._max and a.resident > self._max[p]]
            for _, p in sorted(over, reverse=True):
                v = self._victim_of(p)
                if v != NIL:
                    return v
        mins = self._min
        # Principals with a reclaim request pending are left to answer it — unless they
        # missed their last one: a subscriber that never answers would otherwise be
        # spared nearly all the time (a request is pending during every grace) and keep
        # its frames at everyone else's expense (hostile probe 3, F2).
        req = {p for p in self._requests
               if (a := acct.get(p)) is None or not a.last_missed} \
            if self._requests else self._requests
        cheap = self._hinted and any(q.size for q in self._cheap_queues)
        if not cheap:
            # the common case, in one pass: the principal furthest above its guarantee
            # (no reclaim request pending) gives its policy's victim
            best, best_x = -1, 0
            for p, a in acct.items():
                x = a.resident - mins.get(p, 0)
                if (x > best_x or (x == best_x and x > 0 and p > best)) and p not in req:
                    best, best_x = p, x
            if best >= 0:
                v = self._victim_of(best)
                if v != NIL:
                    return v
        above = [(a.resident - mins.get(p, 0), p) for p, a in acct.items()
                 if a.resident > mins.get(p, 0)]
        above.sort(reverse=True)
        if cheap:
            # discardable frames of principals above their guarantee
            for _, p in above:
                v = self._victim_discardable(p, cold=True)
                if v != NIL:
                    return v
        # furthest above the guarantee; principals with a reclaim request pending are
        # left to answer it, unless nobody else has a frame to give
        for pass_ in (0, 1):
            for _, p in above:
                if (p in req) != bool(pass_):
                    continue
                v = self._victim_of(p)
                if v != NIL:
                    return v
        # nobody is above a guarantee (only if guarantees fill the pool exactly)
        if acct.get(requester) and acct[requester].resident:
            v = self._victim_of(requester)
            if v != NIL:
                return v
        if strict:
            return NIL
        for p, a in acct.items():
            if a.resident:
                v = self._victim_of(p)
                if v != NIL:
                    return v
        return NIL

    def _try_alloc(self, p: int) -> tuple[int, int]:
        """(a free frame, NIL) without blocking, or (NIL, a dirty victim that must be
        written back first), or (NIL, NIL) when every frame is busy."""
        if self._free and (self._global or not self._max or self._at_max(p) is None):
            if len(self._free) <= self.low_watermark:
                self._poke()
            return self._free.pop(), NIL
        v = self._pick_victim(p)
        if v == NIL:
            return NIL, NIL
        if self._state_m[v] == DIRTY and not self._droppable(v):
            return NIL, v
        self._evict(v)
        self._poke()
        return self._free.pop(), NIL

    async def _alloc(self, p: int, victim: int = NIL) -> int:
        """A frame for `p`, writing back a dirty victim (`victim`, when `_try_alloc`
        just chose one: choosing again would move the hand past it) or waiting for I/O
        if needed."""
        failures = 0
        while True:
            if victim != NIL and self._state_m[victim] == DIRTY and self._evictable(victim):
                f, v = NIL, victim
            else:
                f, v = self._try_alloc(p)
            victim = NIL
            if f != NIL:
                return f
            if v == NIL:
                if self._free:
                    # at its ceiling with nothing of its own to give back yet (a
                    # ceiling below one request): one frame over, never someone else's
                    return self._free.pop()
                st = self._state
                if ((st == FILLING) | (st == WRITEBACK)).any() or self._pin.any():
                    await self._io_done.park()  # frames come back when that I/O ends
                    continue
                # guarantees fill the pool (not admission-checked): overcommit them
                log.warning("pager: every frame is guaranteed to someone; reclaiming "
                            "below a guarantee for principal %d", p)
                v = self._pick_victim(p, strict=False)
                if v == NIL:
                    raise RuntimeError("pager: no frame can be reclaimed")
                if self._state_m[v] != DIRTY or self._droppable(v):
                    self._evict(v)
                    return self._free.pop()
            g = int(self._gen_m[v])
            try:
                # (a debt-paced victim alone, and expeditable: this may run inside a
                # write a barrier waits for; one frame of its debt at most per
                # allocation is what a commit may write past its dirtier's limit)
                await self._writeback_frames([v] if self._paced_m[v] else self._cluster(v),
                                             expeditable=bool(self._paced_m[v]))
            except Exception:
                failures += 1
                if failures >= 3:
                    raise
                continue
            if (self._gen_m[v] == g and self._state_m[v] == CLEAN and not self._pin_m[v]):
                self._evict(v)
                return self._free.pop()
