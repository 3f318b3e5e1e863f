"""The cooperative pager: a fixed pool of frames caching device blocks, each frame
charged to a principal's memory bank, replaced per principal by policy and hints,
written back by whoever dirtied it, and given back on request by self-paging clients.

Frames. One numpy buffer holds every frame's data; per-frame state lives in numpy
arrays indexed by frame number (`FrameNo`): the device block, the file and file block
it belongs to, the principal charged (`_owner`) and the one that dirtied it
(`_dirtier`), the state (FREE, FILLING, CLEAN, DIRTY, WRITEBACK), the referenced bit,
priority, discardable, pin count, the time it was first dirtied, and a generation
bumped whenever the frame is (re)assigned so a task that awaited can tell that its
frame now holds something else. `_where` maps a resident device block to its frame.
There is no Python object per page.

Policies (`POLICIES`):
- `global-lru`: one CLOCK over the whole pool, principals ignored, every read and write
  goes through the pool (no bypass): the kernel that only observes behaviour.
- `principal`: one SIEVE queue per principal; each principal is kept between its
  guarantee (`cache_min`) and its ceiling (`cache_max`). Hints are ignored.
- `hinted` (default): `principal` plus hints. A principal's frames sit in one SIEVE
  queue per class: discardable, sequential drop-behind, then one per priority.

Reclaim order when a frame is needed: (0) a principal at its own (or an ancestor's)
ceiling reclaims from itself; (1) else a free frame; (2) else principals above their
ceiling; (3, hinted) what principals above their guarantee said they can do without:
clean discardable frames, discardable files idle for `nframes/8` block accesses (all
their dirty frames dropped at once, no write-back) and frames a sequential reader is
done with; (4) the principal furthest above its guarantee: its drop-behind frames,
then its priorities from the lowest, and only then a discardable file still in use.
A principal is never taken below its guarantee (memcg's memory.min: a guarantee it
does not use is lent to others until it needs it, and then taken back from whoever is
above theirs); the sum of guarantees is admission-checked (`check_banks`). Priority
orders only a principal's own frames. A block read or written by several principals
stays charged to the first (memcg's rule): charges equal residency, always.

Write-back (`writeback=True`; `False` writes through, as the mount does until the
crash rules are integrated). Writes dirty frames charged to the writer; write-back I/O
is tagged with the principal that dirtied the frame, read-ahead with the one that
asked. A writer over its dirty share (`dirty_ratio` of its allowance) writes back its
own oldest frames before going on — never someone else's. `run()` writes back frames
dirty for longer than `dirty_expire`. Reads that bypass the pool overlay resident
frames, so they see dirty data; `discard` waits for write-back in flight on the blocks
it frees. Discardable dirty frames are never written back by the pager on its own
(reclaim, aging, throttling, `flush`): under pressure they are dropped and the file is
reported to `on_discarded(file)` — all its dirty frames go, so it is lost as a whole.
Only `writeback_file` (an explicit fsync of that file) writes them.

Cooperative reclaim (`principal`, `hinted`): `run()` keeps a reserve of free frames.
When it runs low, or a principal is over its ceiling, each principal over its share
is asked to release N frames by a deadline if it has subscribers (`on_reclaim`), and
reclaimed by policy at once otherwise. The deadline is `reclaim_grace` (2 s) after
the request: room for a client's callback and a round trip on a busy host. When the
principal has dropped the frames itself (dontneed), or a subscriber says it is done
(`answer_reclaim`), or at the deadline, the pager settles the request — answered or
missed — and takes what is still above the target by policy; meanwhile direct
reclaim prefers other principals, but falls back to them rather than wait, so a
client that never answers never stalls anyone.

Hints act on the advising principal's own frames: `advise` (priority, discardable,
dontneed) never changes or drops a frame charged to another principal, even of a
block both read; a file's own hints (`set_file_hints`, its xattrs) apply to all of
its frames.

Hot per-frame state is read and written through memoryviews of the numpy arrays
(`_state_m` for `_state`, ...): a Python-level scalar access to a memoryview costs a
fraction of a numpy scalar's, and vectorised scans (flush, fsync, throttling, hints)
use the arrays themselves.

Concurrency (all on the trio thread): code between two checkpoints is atomic. A frame
in FILLING or WRITEBACK, or pinned, is never evicted. A fill that completes copies the
device data into its frame only if the frame still has its generation and is still
FILLING (a write meanwhile wins and is copied out to the reader instead). A write to
a frame under write-back sets `_redirty`, and the frame goes back to DIRTY when the
write-back lands.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NewType

import numpy as np
import trio

from blockdev import BankTree, BlockDevice, BlockNo, PrincipalId

from . import trace as tr
from .cache import (BYPASS_BLOCKS, CLASS_DISCARDABLE, CLASS_DROP_BEHIND, CLEAN, DIRTY,
                    FILLING, FREE, POLICIES, WRITEBACK, WRITEBACK_CLUSTER,
                    PagerStatistics, PrincipalCacheStats)
from .errors import GuaranteeExceeded, UnknownPolicy
from .policy import NIL, Clock, Links, Sieve, scalar_view

log = logging.getLogger(__name__)

FrameNo = NewType("FrameNo", int)

#: range hints (advise priority/discardable) kept per file and principal; older ones
#: are forgotten
MAX_RANGE_HINTS = 64

class _Acct:
    """One principal's counters (per principal, not per page)."""

    __slots__ = ("resident", "hits", "misses", "evictions", "discarded", "dirty",
                 "wb_bytes", "sent", "answered", "missed", "prefetched")

    def __init__(self) -> None:
        self.resident = self.hits = self.misses = self.evictions = self.discarded = 0
        self.dirty = self.wb_bytes = self.sent = self.answered = self.missed = 0
        self.prefetched = 0


class ReclaimSubscription:
    """What `on_reclaim` returns; `cancel()` stops the requests."""

    __slots__ = ("_pager", "principal", "callback")

    def __init__(self, pager: Pager, principal: PrincipalId,
                 callback: Callable[[int, float], object]) -> None:
        self._pager = pager
        self.principal = principal
        self.callback = callback

    def cancel(self) -> None:
        subs = self._pager._subs.get(self.principal)
        if subs and self in subs:
            subs.remove(self)
            if not subs:
                del self._pager._subs[self.principal]


class _Request:
    """A reclaim request pending for one principal: release `nframes` (down to
    `target` resident) by `deadline`. `ticket` names it to the subscribers; `released`
    counts the frames the principal dropped itself (dontneed) since it was sent;
    `answered` is set when a subscriber says it is done."""

    __slots__ = ("ticket", "nframes", "target", "deadline", "answered", "released")

    def __init__(self, ticket: int, nframes: int, target: int, deadline: float) -> None:
        self.ticket = ticket
        self.nframes = nframes
        self.target = target
        self.deadline = deadline
        self.answered = False
        self.released = 0


class Pager:
    """The frame pool. See the module docstring."""

    def __init__(self, device: BlockDevice, *, nframes: int, policy: str = "hinted",
                 writeback: bool = False, dirty_ratio: float = 0.5,
                 dirty_expire: float = 5.0, writeback_interval: float = 1.0,
                 reclaim_grace: float = 2.0, readahead: int = 16,
                 on_discarded: Callable[[int], object] | None = None) -> None:
        if policy not in POLICIES:
            raise UnknownPolicy(f"unknown pager policy {policy!r} "
                                f"(one of {', '.join(POLICIES)})")
        self.device = device
        self.policy = policy
        self.writeback = writeback
        self._global = policy == "global-lru"
        self._hinted = policy == "hinted"
        self.block_size = bs = device.block_size
        self.nframes = n = max(1, nframes)
        self.dirty_ratio = dirty_ratio
        self.dirty_expire = dirty_expire
        self.writeback_interval = writeback_interval
        self.reclaim_grace = reclaim_grace
        self.readahead = readahead
        #: called with a file's id when its dirty discardable frames were dropped
        self.on_discarded = on_discarded
        self._frames = np.zeros((n, bs), dtype=np.uint8)
        #: the same memory as bytes (memoryview slices copy faster than numpy rows)
        self._mem = memoryview(self._frames.reshape(-1).data)
        self._frame_block = np.full(n, -1, dtype=np.int64)
        self._file = np.zeros(n, dtype=np.int64)
        self._fblock = np.zeros(n, dtype=np.int64)
        self._owner = np.zeros(n, dtype=np.int32)
        self._dirtier = np.zeros(n, dtype=np.int32)
        self._state = np.zeros(n, dtype=np.int8)
        self._prio = np.zeros(n, dtype=np.int16)
        self._disc = np.zeros(n, dtype=np.bool_)
        self._pin = np.zeros(n, dtype=np.int16)
        self._redirty = np.zeros(n, dtype=np.bool_)
        self._dirty_since = np.zeros(n, dtype=np.float64)
        self._gen = np.zeros(n, dtype=np.int64)
        #: the flush epoch in which the last completed write-back of the frame started
        self._wb_epoch = np.zeros(n, dtype=np.int64)
        #: read ahead / prefetched and not used since (its first hit counts as a miss:
        #: the hit ratio stays comparable with demand-paging policies and MIN)
        self._pf = np.zeros(n, dtype=np.bool_)
        #: block accesses so far, and per file the count at its last access
        self._tick = 0
        self._idle_ticks = max(4, n // 8)
        self._file_tick: dict[int, int] = {}
        self._links = Links(n)
        self._ref = self._links.visited  # referenced bit (SIEVE visited / CLOCK ref)
        self._clock = Clock(n)
        self._clock.ref = self._ref
        # The same memory as memoryviews: scalar access from Python (the hot paths)
        # costs a fraction of a numpy scalar's; vectorised scans use the arrays.
        self._state_m = scalar_view(self._state)
        self._disc_m = scalar_view(self._disc)
        self._ref_m = scalar_view(self._ref)
        self._prio_m = scalar_view(self._prio)
        self._owner_m = scalar_view(self._owner)
        self._gen_m = scalar_view(self._gen)
        self._file_m = scalar_view(self._file)
        self._dirtier_m = scalar_view(self._dirtier)
        self._redirty_m = scalar_view(self._redirty)
        self._frame_block_m = scalar_view(self._frame_block)
        self._fblock_m = scalar_view(self._fblock)
        self._pin_m = scalar_view(self._pin)
        self._pf_m = scalar_view(self._pf)
        self._dirty_since_m = scalar_view(self._dirty_since)
        self._wb_epoch_m = scalar_view(self._wb_epoch)
        self._queues: list[Sieve] = []
        #: the queues of discardable and drop-behind frames (reclaimed first)
        self._cheap_queues: list[Sieve] = []
        self._pq: dict[int, dict[int, Sieve]] = {}
        self._pq_order: dict[int, list[Sieve]] = {}
        self._where: dict[int, int] = {}
        self._free = list(range(n - 1, -1, -1))
        self._acct: dict[int, _Acct] = {}
        self.hits = self.misses = self.bypassed = self.evictions = 0
        self._epoch = 1
        self._io_done = trio.lowlevel.ParkingLot()
        # banks
        #: every principal's memory bank (min, max, parent), pushed down by kernelshim
        self.banks: BankTree = {}
        self._min: dict[int, int] = {}
        self._max: dict[int, int] = {}
        self._parent: dict[int, int | None] = {}
        # hints: file -> (priority, discardable, sequential); ranges per file, each
        # (first, end, priority, discardable, principal): a range hint applies only to
        # frames charged to the principal that gave it (see `advise`)
        self._hints: dict[int, tuple[int, bool, bool]] = {}
        self._range_hints: dict[int, list[tuple[int, int, int | None, bool | None, int]]] = {}
        # cooperative reclaim
        self._subs: dict[int, list[ReclaimSubscription]] = {}
        self._requests: dict[int, _Request] = {}
        #: the last reclaim request's ticket
        self._tickets = 0
        self._wakeup: trio.Event | None = None
        self.low_watermark = max(1, n // 32)
        self.high_watermark = max(2, n // 16)
        # tracing
        self._tw: tr.TraceWriter | None = None

    # -- banks -------------------------------------------------------------------------

    def _protections(self, tree: BankTree) -> dict[int, int]:
        """Each principal's own guarantee in bytes: its cache_min less what its children
        carve from it (the sum over the tree is what must fit in the pool)."""
        carved: dict[int, int] = {}
        for node in tree.values():
            if node.parent is not None:
                carved[node.parent] = carved.get(node.parent, 0) + node.cache_min
        return {pid: max(0, node.cache_min - carved.get(pid, 0)) for pid, node in tree.items()}

    def check_banks(self, tree: BankTree) -> None:
        """Raise GuaranteeExceeded when the guarantees in `tree` add up to more than
        the pool (called at mount and before a principal's bank is added or changed)."""
        total = sum(self._protections(tree).values())
        pool = self.nframes * self.block_size
        if total > pool:
            raise GuaranteeExceeded(
                f"memory guarantees (cache_min) add up to {total} bytes, more than the "
                f"pager's pool of {pool} bytes ({self.nframes} frames)")

    def configure_banks(self, tree: BankTree) -> None:
        """The principals' memory banks changed (or the mount started). Guarantees past
        the pool are logged and honoured only as far as frames exist (the admission
        check, `check_banks`, is the caller's)."""
        self.banks = tree
        bs = self.block_size
        prot = self._protections(tree)
        self._min = {pid: v // bs for pid, v in prot.items() if v >= bs}
        self._max = {pid: node.cache_max // bs for pid, node in tree.items()
                     if node.cache_max is not None}
        self._parent = {pid: node.parent for pid, node in tree.items()}
        if sum(self._min.values()) > self.nframes:
            log.error("memory guarantees exceed the pager's pool of %d frames", self.nframes)
        self._poke()

    def _acct_of(self, p: int) -> _Acct:
        a = self._acct.get(p)
        if a is None:
            a = self._acct[p] = _Acct()
        return a

    def _ancestors(self, p: int) -> list[int]:
        out = []
        seen = set()
        q = self._parent.get(p)
        while q is not None and q not in seen:
            seen.add(q)
            out.append(q)
            q = self._parent.get(q)
        return out

    def _subtree_resident(self, q: int) -> int:
        total = 0
        for p, a in self._acct.items():
            if a.resident and (p == q or q in self._ancestors(p)):
                total += a.resident
        return total

    def _at_max(self, p: int) -> int | None:
        """The principal whose ceiling `p` would pass with one more frame (p itself or
        an ancestor), or None."""
        if not self._max:
            return None
        m = self._max.get(p)
        if m is not None and self._acct_of(p).resident >= m:
            return p
        for q in self._ancestors(p):
            m = self._max.get(q)
            if m is not None and self._subtree_resident(q) >= m:
                return q
        return None

    def _wake_io(self) -> None:
        if self._io_done:  # (unparking nobody costs more than this check)
            self._io_done.unpark_all()

    # -- frame classes and queues ---------------------------------------------------

    def _queue(self, p: int, cls: int) -> Sieve:
        qs = self._pq.get(p)
        if qs is None:
            qs = self._pq[p] = {}
        q = qs.get(cls)
        if q is None:
            q = qs[cls] = Sieve(self._links, len(self._queues))
            self._queues.append(q)
            if cls in (CLASS_DISCARDABLE, CLASS_DROP_BEHIND):
                self._cheap_queues.append(q)
            self._pq_order[p] = [qs[c] for c in sorted(qs) if c != CLASS_DISCARDABLE]
        return q

    def _class_of(self, f: int) -> int:
        if not self._hinted:
            return 0
        if self._disc_m[f]:
            return CLASS_DISCARDABLE
        return int(self._prio_m[f])

    def _enqueue(self, f: int, cls: int | None = None) -> None:
        if self._global:
            return
        q = self._queue(int(self._owner_m[f]), self._class_of(f) if cls is None else cls)
        q.push(f)

    def _dequeue(self, f: int) -> None:
        qid = self._links.qu[f]
        if qid != NIL:
            self._queues[qid].remove(f)

    def _requeue(self, f: int, cls: int | None = None) -> None:
        if self._global:
            return
        visited = bool(self._ref_m[f])
        self._dequeue(f)
        q = self._queue(int(self._owner_m[f]), self._class_of(f) if cls is None else cls)
        q.push(f, visited=visited)

    def _hints_for(self, file: int, fblock: int, owner: int) -> tuple[int, bool, bool]:
        """The hints of a frame of `file` at `fblock` charged to `owner`: the file's
        own (its xattrs), then the range hints `owner` gave, latest last."""
        prio, disc, seq = self._hints.get(file, (0, False, False))
        for f0, f1, rp, rd, rq in self._range_hints.get(file, ()):
            if f0 <= fblock < f1 and rq == owner:
                if rp is not None:
                    prio = rp
                if rd is not None:
                    disc = rd
        return prio, disc, seq

    # -- mapping and eviction --------------------------------------------------------

    def _map(self, f: int, block: int, p: int, file: int, fblock: int, state: int) -> None:
        self._where[block] = f
        self._frame_block_m[f] = block
        self._owner_m[f] = p
        self._file_m[f] = file
        self._fblock_m[f] = fblock
        self._state_m[f] = state
        self._redirty_m[f] = False
        self._pf_m[f] = False
        self._gen_m[f] += 1
        if file and (file in self._hints or file in self._range_hints):
            prio, disc, _ = self._hints_for(file, fblock, p)
            self._prio_m[f] = prio
            self._disc_m[f] = disc
        else:
            self._prio_m[f] = 0
            self._disc_m[f] = False
        a = self._acct.get(p)
        if a is None:
            a = self._acct_of(p)
        a.resident += 1
        if self._global:
            self._ref_m[f] = True
        else:
            cls = self._class_of(f) if self._hinted else 0
            qs = self._pq.get(p)
            q = qs.get(cls) if qs is not None else None
            if q is None:
                q = self._queue(p, cls)
            q.push(f)

    def _unmap(self, f: int) -> None:
        b = self._frame_block_m[f]
        del self._where[b]
        qid = self._links.qu[f]
        if qid != NIL:
            self._queues[qid].remove(f)
        st = self._state_m[f]
        if st == DIRTY or st == WRITEBACK:
            self._acct_of(self._dirtier_m[f]).dirty -= 1
        self._frame_block_m[f] = -1
        self._state_m[f] = FREE
        self._ref_m[f] = False
        self._gen_m[f] += 1
        self._acct[self._owner_m[f]].resident -= 1
        self._free.append(f)

    def _evictable(self, f: int) -> bool:
        st = self._state_m[f]
        return (st == CLEAN or st == DIRTY) and not self._pin_m[f]

    def _droppable(self, f: int) -> bool:
        """Whether a dirty frame may go without write-back (hinted, discardable)."""
        return self._hinted and bool(self._disc_m[f])

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
        self._unmap(f)
        if file:
            others = np.flatnonzero((self._file == file) & (self._state == DIRTY)
                                    & self._disc & (self._pin == 0))
            for g in others.tolist():
                self._acct_of(int(self._owner_m[g])).discarded += 1
                self._unmap(g)
            if self.on_discarded is not None:
                try:
                    self.on_discarded(file)
                except Exception:
                    log.exception("on_discarded(%d) failed", file)

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
        req = self._requests
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
                await self._writeback_frames(self._cluster(v))
            except Exception:
                failures += 1
                if failures >= 3:
                    raise
                continue
            if (self._gen_m[v] == g and self._state_m[v] == CLEAN and not self._pin_m[v]):
                self._evict(v)
                return self._free.pop()

    def _give_back(self, f: int) -> None:
        """Return an allocated but unused frame."""
        self._free.append(f)

    # -- write-back ------------------------------------------------------------------

    def _cluster(self, f: int) -> list[int]:
        """f and its dirty, same-dirtier, written-back-able neighbours on the device."""
        b = int(self._frame_block_m[f])
        d = self._dirtier_m[f]
        where = self._where
        out = [f]
        for step in (1, -1):
            nb = b + step
            while len(out) < WRITEBACK_CLUSTER:
                g = where.get(nb)
                if (g is None or self._state_m[g] != DIRTY or self._dirtier_m[g] != d
                        or self._droppable(g)):
                    break
                out.append(g)
                nb += step
        return out

    async def _writeback_frames(self, frames: list[int]) -> int:
        """Write the DIRTY frames among `frames` to the device, in runs of adjacent
        blocks with the same dirtier, each run tagged with that principal. Returns the
        number of frames written."""
        todo = sorted((int(self._frame_block_m[f]), f) for f in frames
                      if self._state_m[f] == DIRTY)
        written = 0
        bs = self.block_size
        i = 0
        while i < len(todo):
            j = i + 1
            d = self._dirtier_m[todo[i][1]]
            while (j < len(todo) and j - i < WRITEBACK_CLUSTER
                   and todo[j][0] == todo[j - 1][0] + 1 and self._dirtier_m[todo[j][1]] == d
                   and self._state_m[todo[j][1]] == DIRTY):
                j += 1
            run = [f for _, f in todo[i:j] if self._state_m[f] == DIRTY]
            i = j
            if not run:
                continue
            # the run may have lost members to the checks above: keep it contiguous
            run = run[:1] + [g for k, g in enumerate(run[1:], 1)
                             if self._frame_block_m[g] == self._frame_block_m[run[0]] + k]
            written += await self._writeback_run(run)
        return written

    async def _writeback_run(self, run: list[int]) -> int:
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
        try:
            await self.device.write(BlockNo(b0), buf, principal=PrincipalId(d))
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
                self._acct_of(int(self._dirtier_m[f])).dirty -= 1
        self._wake_io()
        return len(run)

    def _dirty_limit(self, p: int) -> int:
        allowance = self.nframes
        if not self._global:
            m = self._max.get(p)
            if m is not None:
                allowance = min(allowance, m)
        return max(1, int(allowance * self.dirty_ratio))

    async def _throttle(self, p: int) -> None:
        """A writer over its dirty share writes back its own oldest dirty frames (under
        `global-lru`, the pool's share and anyone's frames, as a kernel would)."""
        limit = self._dirty_limit(p)
        while True:
            if self._global:
                dirty = sum(a.dirty for a in self._acct.values())
                mine = self._state == DIRTY
            else:
                dirty = self._acct_of(p).dirty
                mine = (self._state == DIRTY) & (self._dirtier == p)
            if dirty < limit:
                return
            cand = np.flatnonzero(mine & ~self._disc) if self._hinted else np.flatnonzero(mine)
            if len(cand):
                oldest = int(cand[np.argmin(self._dirty_since[cand])])
                await self._writeback_frames(self._cluster(oldest))
                continue
            busy = ((self._state == WRITEBACK) if self._global
                    else (self._state == WRITEBACK) & (self._dirtier == p))
            if busy.any():
                await self._io_done.park()
                continue
            return  # only discardable dirty frames: bounded by the bank, not written

    async def _write_back_until_clean(self, frames: np.ndarray) -> None:
        """Return when every write to `frames` before this call is on the device."""
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
                await self._writeback_frames([int(f) for f in dirty])
            else:
                await self._io_done.park()

    async def flush(self) -> None:
        """Write back every dirty frame that is not discardable (those are a cache by
        contract and reach the device only by `writeback_file`), wait for write-back in
        flight, then flush the device."""
        if self._tw is not None:
            self._trace_op(tr.FLUSH, 0, 0, 0, 0, 0)
        if self.writeback:
            cand = (self._state == DIRTY) | (self._state == WRITEBACK)
            if self._hinted:
                cand &= ~self._disc
            await self._write_back_until_clean(np.flatnonzero(cand))
        await self.device.flush()

    def dirty_files(self) -> set[int]:
        """The files with frames dirty or under write-back (after `flush`, only
        discardable ones: the metadata server records them at each commit, because
        a crash may lose their data and they must then come back empty)."""
        st = self._state
        files = self._file[(st == DIRTY) | (st == WRITEBACK)]
        return {int(f) for f in np.unique(files) if f}

    def dirty_discardable_files(self) -> set[int]:
        """The files with discardable frames dirty or under write-back."""
        st = self._state
        files = self._file[((st == DIRTY) | (st == WRITEBACK)) & self._disc]
        return {int(f) for f in np.unique(files) if f}

    def has_dirty(self, file: int) -> bool:
        """Whether `file` has frames dirty or under write-back."""
        st = self._state
        return bool(((self._file == file) & ((st == DIRTY) | (st == WRITEBACK))).any())

    async def writeback_file(self, file: int) -> None:
        """fsync of one file: its dirty frames (discardable ones included: asked for
        explicitly) reach the device, and the device is flushed; nobody else's dirty
        frames are written."""
        self._trace_op(tr.WRITEBACK_FILE, 0, 0, 0, file, 0)
        if self.writeback:
            st = self._state
            frames = np.flatnonzero((self._file == file) & ((st == DIRTY) | (st == WRITEBACK)))
            await self._write_back_until_clean(frames)
        await self.device.flush()

    # -- data path -------------------------------------------------------------------

    async def read(self, block: BlockNo, count: int, *, principal: PrincipalId,
                   file: int = 0, fblock: int = 0) -> bytearray:
        """Contents of `count` blocks from `block`, from frames where resident."""
        out = bytearray(count * self.block_size)
        await self.read_into(block, count, memoryview(out), principal=principal,
                             file=file, fblock=fblock)
        return out

    async def _read_stream(self, block: BlockNo, count: int, view: memoryview,
                           principal: PrincipalId) -> None:
        """A large read that does not go through the pool (it would push out the small,
        hot blocks the pool is for): resident blocks are copied from their frames, the
        runs of the others read from the device, uncached. Frames are never older than
        the device (dirty, under write-back, or written through), so after each device
        read, with no checkpoint in between, frames that became resident meanwhile are
        laid over what the device returned."""
        bs = self.block_size
        where = self._where
        mem = self._mem
        state = self._state_m
        missing: list[int] = []
        for i in range(count):
            f = where.get(block + i) if where else None
            if f is None or state[f] == FILLING:
                missing.append(i)
            else:
                view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
        self.bypassed += len(missing)
        j = 0
        while j < len(missing):
            k = j
            while k + 1 < len(missing) and missing[k + 1] == missing[k] + 1:
                k += 1
            first, n = missing[j], k - j + 1
            await self.device.read_into(BlockNo(block + first), n,
                                        view[first * bs:(first + n) * bs], principal=principal)
            if where:
                for i in range(first, first + n):
                    f = where.get(block + i)
                    if f is not None and state[f] != FILLING:
                        view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
            j = k + 1

    async def read_into(self, block: BlockNo, count: int, view: memoryview, *,
                        principal: PrincipalId, file: int = 0, fblock: int = 0) -> None:
        """Put the contents of `count` blocks from `block` into `view`."""
        if self._tw is not None:
            self._trace_op(tr.READ, principal, block, count, file, fblock)
        bs = self.block_size
        p = int(principal)
        if count > BYPASS_BLOCKS and not self._global:
            await self._read_stream(block, count, view, principal)
            return
        self._tick += count
        if file and (file in self._hints or file in self._range_hints):
            self._file_tick[file] = self._tick  # (only hinted files: a bounded map)
        where = self._where
        mem = self._mem
        state = self._state_m
        ref = self._ref_m
        pf = self._pf_m
        missing: list[int] = []
        pf_hits = 0
        for i in range(count):
            f = where.get(block + i)
            if f is None or state[f] == FILLING:
                missing.append(i)
            else:
                view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                ref[f] = True
                if pf[f]:
                    pf[f] = False
                    pf_hits += 1
        hits = count - len(missing) - pf_hits
        a = self._acct_of(p)
        self.hits += hits
        a.hits += hits
        if missing or pf_hits:
            self.misses += len(missing) + pf_hits
            a.misses += len(missing) + pf_hits
        if missing:
            await self._fill(block, missing, view, p, file, fblock)
        if self._hinted and file:
            h = self._hints.get(file)
            if h is not None and h[2]:
                self._drop_behind(block, count)
                if missing:
                    await self._read_ahead(block + count, p, file, fblock + count)

    async def _fill(self, block: int, missing: list[int], view: memoryview, p: int,
                    file: int, fblock: int) -> None:
        """Read the `missing` blocks (indexes into the request) into frames charged to
        `p` and into `view`."""
        bs = self.block_size
        mem = self._mem
        where = self._where
        state = self._state_m
        gen = self._gen_m
        pending = missing
        while pending:
            mine: list[tuple[int, int, int]] = []
            waits: list[int] = []
            done = 0
            try:
                for i in pending:
                    b = block + i
                    f = where.get(b)
                    if f is None:
                        nf, dirty_victim = self._try_alloc(p)
                        if nf == NIL:
                            if mine:
                                break  # read what we hold first (never wait holding frames)
                            nf = await self._alloc(p, dirty_victim)
                        f = where.get(b)
                        if f is None:
                            self._map(nf, b, p, file, fblock + i, FILLING)
                            mine.append((i, nf, int(gen[nf])))
                            done += 1
                            continue
                        self._give_back(nf)
                    if state[f] == FILLING:
                        waits.append(i)
                    else:
                        view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                        self._ref_m[f] = True
                    done += 1
                k = 0
                while k < len(mine):
                    m = k + 1
                    while m < len(mine) and mine[m][0] == mine[m - 1][0] + 1:
                        m += 1
                    i0, n = mine[k][0], m - k
                    dv = view[i0 * bs:(i0 + n) * bs]
                    await self.device.read_into(BlockNo(block + i0), n, dv,
                                                principal=PrincipalId(p))
                    for i, f, g in mine[k:m]:  # no checkpoint since the read returned
                        if gen[f] != g:
                            continue  # dropped meanwhile (discarded)
                        if state[f] == FILLING:
                            mem[f * bs:(f + 1) * bs] = view[i * bs:(i + 1) * bs]
                            state[f] = CLEAN
                        else:  # written meanwhile: the frame is newer
                            view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                    self._wake_io()
                    k = m
            except BaseException:
                for _, f, g in mine:
                    if gen[f] == g and state[f] == FILLING:
                        self._unmap(f)
                self._wake_io()
                raise
            # Blocks another request is filling: read them ourselves, charged to us,
            # rather than wait on someone else's I/O (which runs under their bank).
            for i in waits:
                b = block + i
                dv = view[i * bs:(i + 1) * bs]
                await self.device.read_into(BlockNo(b), 1, dv, principal=PrincipalId(p))
                f = where.get(b)  # no checkpoint since the read: a newer frame wins
                if f is not None and state[f] != FILLING:
                    dv[:] = mem[f * bs:(f + 1) * bs]
            pending = pending[done:]

    async def _prefetch(self, block: int, count: int, p: int, file: int, fblock: int) -> None:
        """Bring blocks into frames charged to `p` (read-ahead, willneed)."""
        count = min(count, self.device.nblocks - block)
        if count <= 0:
            return
        count = min(count, max(1, self.nframes // 2))
        missing = [i for i in range(count) if (block + i) not in self._where]
        if not missing:
            return
        self._acct_of(p).prefetched += len(missing)
        scratch = memoryview(bytearray(count * self.block_size))
        await self._fill(block, missing, scratch, p, file, fblock)
        where = self._where
        for i in missing:
            f = where.get(block + i)
            if f is not None and self._owner_m[f] == p and not self._ref_m[f]:
                self._pf_m[f] = True

    async def _read_ahead(self, block: int, p: int, file: int, fblock: int) -> None:
        """Read-ahead of a sequential file, charged to the reader. The pager knows
        device blocks, not the file's map: it reads the device blocks that follow,
        which is where the allocator puts a file's next blocks. A wrong guess costs
        frames of the reader's own bank, never data (frames hold device contents;
        only a grant can read them)."""
        await self._prefetch(block, self.readahead, p, file, fblock)

    def _drop_behind(self, block: int, count: int) -> None:
        """Frames a sequential reader has used go to the front of its reclaim order."""
        where = self._where
        for i in range(count):
            f = where.get(block + i)
            if f is not None and not self._disc_m[f]:
                self._ref_m[f] = False
                self._requeue(f, CLASS_DROP_BEHIND)

    async def write(self, block: BlockNo, data: bytes | bytearray | memoryview, *,
                    principal: PrincipalId, file: int = 0, fblock: int = 0) -> None:
        """Write whole blocks: into dirty frames (write-back) or through to the device,
        keeping resident frames current (write-through)."""
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count = len(mv) // bs
        if self._tw is not None:
            self._trace_op(tr.WRITE, principal, block, count, file, fblock)
        p = int(principal)
        if not self.writeback or (count > BYPASS_BLOCKS and self._may_bypass(
                block, count, file, fblock, p)):
            await self._write_through(block, mv, count, p, file, fblock)
            return
        self._tick += count
        if file and (file in self._hints or file in self._range_hints):
            self._file_tick[file] = self._tick  # (only hinted files: a bounded map)
        where = self._where
        mem = self._mem
        state = self._state_m
        now = trio.current_time()
        limit = self._dirty_limit(p)
        acct = self._acct_of(p)
        for start in range(0, count, WRITEBACK_CLUSTER):
            for i in range(start, min(count, start + WRITEBACK_CLUSTER)):
                b = block + i
                if (self._global and sum(a.dirty for a in self._acct.values()) >= limit
                        or acct.dirty >= limit):
                    await self._throttle(p)
                f = where.get(b)
                if f is None:
                    nf, dirty_victim = self._try_alloc(p)
                    if nf == NIL:
                        nf = await self._alloc(p, dirty_victim)
                    f = where.get(b)
                    if f is None:
                        f = nf
                        self._map(f, b, p, file, fblock + i, CLEAN)  # new: not referenced
                    else:
                        self._give_back(nf)
                        self._ref_m[f] = True
                else:
                    self._ref_m[f] = True  # a write to a resident block is a reuse
                    if file:
                        self._retag(f, file, fblock + i)
                mem[f * bs:(f + 1) * bs] = mv[i * bs:(i + 1) * bs]
                st = state[f]
                if st == DIRTY or st == WRITEBACK:
                    old = int(self._dirtier_m[f])
                    if old != p:
                        self._acct_of(old).dirty -= 1
                        self._acct_of(p).dirty += 1
                        self._dirtier_m[f] = p
                    if st == WRITEBACK:
                        self._redirty_m[f] = True
                        self._dirty_since_m[f] = now
                else:  # CLEAN, or FILLING (the fill will copy this out, not over it)
                    state[f] = DIRTY
                    self._dirtier_m[f] = p
                    self._dirty_since_m[f] = now
                    self._acct_of(p).dirty += 1

    def _may_bypass(self, block: int, count: int, file: int, fblock: int,
                    owner: int) -> bool:
        """Whether a large write (a stream, as large reads) goes around the pool to the
        device, as under write-through: not under `global-lru` (the honest baseline
        caches everything), never for a discardable file (its data is not to reach
        the device unasked), and only when no block of the range is resident — a
        dirty frame or one under write-back would otherwise land over it later. From
        this check to the device write's start there is no checkpoint."""
        if self._global:
            return False
        if self._hinted and file and self._hints_for(file, fblock, owner)[1]:
            return False
        where = self._where
        if where:
            for b in range(block, block + count):
                if b in where:
                    return False
        return True

    def _retag(self, f: int, file: int, fblock: int) -> None:
        if self._file_m[f] != file or self._fblock_m[f] != fblock:
            self._file_m[f] = file
            self._fblock_m[f] = fblock
            if self._hinted:
                prio, disc, _ = self._hints_for(file, fblock, int(self._owner_m[f]))
                if prio != self._prio_m[f] or disc != self._disc_m[f]:
                    self._prio_m[f] = prio
                    self._disc_m[f] = disc
                    self._requeue(f)

    async def _write_through(self, block: int, mv: memoryview, count: int, p: int,
                             file: int, fblock: int) -> None:
        await self.device.write(BlockNo(block), mv, principal=PrincipalId(p))
        # No checkpoint from here on: frames end up equal to what the device holds.
        bs = self.block_size
        where = self._where
        mem = self._mem
        state = self._state_m
        install = count <= BYPASS_BLOCKS or self._global
        for i in range(count):
            b = block + i
            f = where.get(b)
            if f is None:
                if not install:
                    continue
                f, _ = self._try_alloc(p)
                if f == NIL:
                    continue  # nothing free without waiting: leave it uncached
                self._map(f, b, p, file, fblock + i, CLEAN)
            else:
                self._ref_m[f] = True
                if file:
                    self._retag(f, file, fblock + i)
            mem[f * bs:(f + 1) * bs] = mv[i * bs:(i + 1) * bs]
            if state[f] == FILLING:
                state[f] = CLEAN
            elif state[f] == WRITEBACK:
                # (write-back: a frame dirtied by a racing write and sent meanwhile) its
                # write-back may land after ours: write it again, with these bytes
                self._redirty_m[f] = True

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget freed blocks: wait for their write-back in flight (so it cannot land
        after the hole punch), drop their frames (dirty ones unwritten), discard them on
        the device."""
        if self._tw is not None:
            self._trace_op(tr.DISCARD, principal, block, count, 0, 0)
        where = self._where
        if where:
            while True:
                busy = False
                for b in range(block, block + count):
                    f = where.get(b)
                    if f is not None and (self._state_m[f] == WRITEBACK or self._pin_m[f]):
                        busy = True
                        break
                if not busy:
                    break
                await self._io_done.park()
            # no checkpoint from the check above to the device discard's start
            for b in range(block, block + count):
                f = where.get(b)
                if f is not None:
                    self._unmap(f)
        await self.device.discard(block, count, principal=principal)

    # -- hints -----------------------------------------------------------------------

    def set_file_hints(self, file: int, *, priority: int | None = None,
                       discardable: bool | None = None, sequential: bool | None = None) -> None:
        """The hints of a whole file (its xattrs); None leaves a hint as it is."""
        prio, disc, seq = self._hints.get(file, (0, False, False))
        if priority is not None:
            prio = max(-32768, min(32767, int(priority)))
        if discardable is not None:
            disc = bool(discardable)
        if sequential is not None:
            seq = bool(sequential)
        if (prio, disc, seq) == (0, False, False):
            self._hints.pop(file, None)
        else:
            self._hints[file] = (prio, disc, seq)
        self._rehint(np.flatnonzero((self._file == file) & (self._state != FREE)))

    def _rehint(self, frames: np.ndarray) -> None:
        for f in frames.tolist():
            prio, disc, _ = self._hints_for(int(self._file_m[f]), int(self._fblock_m[f]),
                                            int(self._owner_m[f]))
            if prio != self._prio_m[f] or disc != self._disc_m[f]:
                self._prio_m[f] = prio
                self._disc_m[f] = disc
                if self._links.qu[f] != NIL:
                    self._requeue(f)

    def forget_file(self, file: int) -> None:
        """The file is gone: drop its hints."""
        if self._tw is not None:
            self._trace_op(tr.FORGET, 0, 0, 0, file, 0)
        self._hints.pop(file, None)
        self._range_hints.pop(file, None)
        self._file_tick.pop(file, None)
        self._rehint(np.flatnonzero((self._file == file) & (self._state != FREE)))

    async def advise(self, file: int, runs: list[tuple[int, int, int]], *,
                     principal: PrincipalId, priority: int | None = None,
                     discardable: bool | None = None, willneed: bool = False,
                     dontneed: bool = False) -> None:
        """Hints for ranges of a file: `runs` are (file block, device block, count).
        priority/discardable stick to the range; willneed reads it in (charged to
        `principal`); dontneed drops its frames now (dirty ones written back first,
        discardable dirty ones dropped and the file reported). Only `hinted` acts on
        them; the other policies record and ignore them.

        A tenant acts on its own pages only: priority, discardable and dontneed touch
        the frames charged to `principal` (now, and those it brings in later), never
        another principal's frames of the same blocks — a shared block is charged to
        the first principal that brought it in, and only that one's hints move it.
        (Several tenants may read one file; one of them must not be able to drop or
        reorder the others' cached pages.) willneed charges what it reads in to
        `principal` and leaves blocks resident for others as they are. A file's own
        hints (`set_file_hints`, from its xattrs, set by a writer) apply to every
        frame of the file."""
        if self._tw is not None:
            flags = ((tr.F_WILLNEED if willneed else 0) | (tr.F_DONTNEED if dontneed else 0)
                     | (tr.F_SET_PRIORITY if priority is not None else 0)
                     | (tr.F_SET_DISCARDABLE if discardable is not None else 0)
                     | (tr.F_DISCARDABLE if discardable else 0))
            for fb, db, n in runs:
                self._tw.add(trio.current_time(), int(principal), n, file, fb, db,
                             tr.ADVISE, flags, priority or 0)
        if priority is not None or discardable is not None:
            p = int(principal)
            rh = self._range_hints.setdefault(file, [])
            for fb, _db, n in runs:
                rh.append((fb, fb + n, priority, discardable, p))
            mine = [i for i, h in enumerate(rh) if h[4] == p]
            if len(mine) > MAX_RANGE_HINTS:
                # bounded per principal: its own oldest ranges are forgotten (never
                # another's, which a tenant could otherwise flush with its own)
                drop = set(mine[:len(mine) - MAX_RANGE_HINTS])
                rh[:] = [h for i, h in enumerate(rh) if i not in drop]
            frames = []
            owner = self._owner_m
            for fb, db, n in runs:
                for k in range(n):
                    f = self._where.get(db + k)
                    if f is not None and owner[f] == p:
                        self._retag_hint(f, file, fb + k)
                        frames.append(f)
            self._rehint(np.array(frames, dtype=np.int64))
        if not self._hinted:
            return
        p = int(principal)
        if willneed:
            for fb, db, n in runs:
                await self._prefetch(db, n, p, file, fb)
        if dontneed:
            for fb, db, n in runs:
                await self._drop_range(db, n, p)
            self._poke()

    def _retag_hint(self, f: int, file: int, fblock: int) -> None:
        self._file_m[f] = file
        self._fblock_m[f] = fblock

    async def _drop_range(self, block: int, count: int, p: int) -> None:
        """dontneed: drop the range's frames charged to `p` now (frames charged to
        other principals stay). A dirty discardable frame takes its whole file's dirty
        discardable frames with it (the file is lost as a whole, and reported); other
        dirty frames are written back first."""
        where = self._where
        owner = self._owner_m
        for b in range(block, block + count):
            f = where.get(b)
            if f is None or owner[f] != p or not self._evictable(f):
                continue
            if self._state_m[f] == DIRTY:
                if self._disc_m[f]:
                    a = self._acct_of(p)
                    a.discarded += 1
                    before = a.resident
                    self._drop_discardable_file(f)
                    self._released(p, before - a.resident)
                    continue
                g = int(self._gen_m[f])
                await self._writeback_frames(self._cluster(f))
                if (self._gen_m[f] != g or not self._evictable(f)
                        or self._state_m[f] != CLEAN or owner[f] != p):
                    continue
            self._unmap(f)
            self._released(p, 1)

    def _released(self, p: int, n: int) -> None:
        """p let n of its frames go by itself (dontneed): counted towards a pending
        reclaim request."""
        r = self._requests.get(p)
        if r is not None:
            r.released += n

    # -- cooperative reclaim ---------------------------------------------------------

    def on_reclaim(self, principal: PrincipalId,
                   callback: Callable[[int, float], object]) -> ReclaimSubscription:
        """Subscribe to reclaim requests for `principal`: `callback(nframes, deadline)`
        means "release nframes by deadline" (trio clock; `pending_reclaim` names the
        request's ticket). The callback must not block: it runs in the pager's
        reclaim task. Every subscriber of the principal gets the same request, one at
        a time per principal.

        Answer by dropping frames of the principal (advise dontneed); the request is
        settled as soon as the principal dropped `nframes` itself, or a subscriber
        calls `answer_reclaim`, or at the deadline, whichever comes first. Then what
        is still above the target is taken by policy at once. It counts as
        `reclaim_answered` if the principal answered (answer_reclaim, or dropped
        nframes itself) before the deadline, else as `reclaim_missed` — frames that
        others' direct reclaim took meanwhile do not make a silent client count as
        answering."""
        sub = ReclaimSubscription(self, principal, callback)
        self._subs.setdefault(int(principal), []).append(sub)
        return sub

    def pending_reclaim(self, principal: PrincipalId) -> tuple[int, int, float] | None:
        """The reclaim request pending for `principal`: (ticket, nframes, deadline), or
        None."""
        r = self._requests.get(int(principal))
        return None if r is None else (r.ticket, r.nframes, r.deadline)

    def answer_reclaim(self, principal: PrincipalId, released: int = 0, *,
                       ticket: int | None = None) -> bool:
        """A subscriber says it is done releasing: the request is settled now rather
        than at the deadline (the pager measures what was really released and takes
        the rest by policy; `released`, the client's own count, is only logged).
        With `ticket`, only the request of that ticket is answered (a late answer to
        an older request answers nothing). Returns whether a request was answered."""
        r = self._requests.get(int(principal))
        if r is None or (ticket is not None and ticket != r.ticket):
            return False
        log.debug("principal %d answered reclaim request %d (%d frames asked, says %d "
                  "released, %d dropped)", int(principal), r.ticket, r.nframes, released,
                  r.released)
        r.answered = True
        self._poke()
        return True

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _shares(self) -> dict[int, int]:
        """How many frames each principal should give back now."""
        need: dict[int, int] = {}
        for p, a in self._acct.items():
            m = self._max.get(p)
            if m is not None and a.resident > m:
                need[p] = a.resident - m
        short = self.high_watermark - len(self._free) - sum(need.values())
        if len(self._free) < self.low_watermark and short > 0:
            above = {p: a.resident - self._min.get(p, 0) - need.get(p, 0)
                     for p, a in self._acct.items()}
            above = {p: v for p, v in above.items() if v > 0}
            total = sum(above.values())
            if total:
                for p, v in above.items():
                    n = min(v, math.ceil(short * v / total))
                    if n:
                        need[p] = need.get(p, 0) + n
        return need

    async def _reclaim_from(self, p: int, n: int, *, floor: int) -> int:
        """Take up to n frames from p by policy, not below `floor` frames."""
        a = self._acct_of(p)
        start = a.resident
        # Counted in frames given up, not victims: a dirty discardable victim takes
        # its whole file with it (dropping one file per frame asked for would empty
        # every discardable file of the principal for a reserve of a few frames).
        while start - a.resident < n and a.resident > floor:
            v = self._victim_of(p)
            if v == NIL:
                break
            if self._state_m[v] == DIRTY and not self._droppable(v):
                g = int(self._gen_m[v])
                await self._writeback_frames(self._cluster(v))
                if self._gen_m[v] != g or self._state_m[v] != CLEAN or self._pin_m[v]:
                    continue
            self._evict(v)
        return start - a.resident

    async def _balance(self) -> None:
        now = trio.current_time()
        for p, n in self._shares().items():
            if p in self._requests:
                continue
            subs = self._subs.get(p)
            a = self._acct_of(p)
            if subs:
                self._tickets += 1
                r = self._requests[p] = _Request(self._tickets, n, a.resident - n,
                                                 now + self.reclaim_grace)
                a.sent += 1
                for s in list(subs):
                    try:
                        s.callback(n, r.deadline)
                    except Exception:
                        log.exception("reclaim callback of principal %d failed", p)
            else:
                await self._reclaim_from(p, n, floor=self._min.get(p, 0))

    async def _enforce(self) -> None:
        now = trio.current_time()
        for p, r in list(self._requests.items()):
            replied = r.answered or r.released >= r.nframes
            if not replied and r.deadline > now:
                continue
            del self._requests[p]
            a = self._acct_of(p)
            if replied:
                a.answered += 1
            else:
                a.missed += 1
            if a.resident <= r.target:
                continue
            floor = max(r.target, min(self._min.get(p, 0), a.resident))
            m = self._max.get(p)
            if m is not None and a.resident > m:
                floor = min(floor, max(r.target, m))
            await self._reclaim_from(p, a.resident - r.target, floor=floor)

    async def _reclaim_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            await self._enforce()
            await self._balance()
            deadline = min((r.deadline for r in self._requests.values()), default=math.inf)
            if any(r.answered or r.released >= r.nframes for r in self._requests.values()):
                continue
            with trio.move_on_at(deadline):
                await self._wakeup.wait()

    async def _aging_loop(self) -> None:
        while True:
            await trio.sleep(self.writeback_interval)
            old = (self._state == DIRTY) & (self._dirty_since
                                            <= trio.current_time() - self.dirty_expire)
            if self._hinted:
                old &= ~self._disc
            frames = np.flatnonzero(old)
            if len(frames):
                try:
                    await self._writeback_frames([int(f) for f in frames])
                except Exception:
                    # the frames stay dirty; flush or fsync will report the error
                    log.exception("write-back of %d aged frames failed", len(frames))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pager's background work: write-back of aged dirty frames, the free
        reserve, reclaim requests and their deadlines. Start it in the mount's nursery."""
        async with trio.open_nursery() as nursery:
            self._wakeup = trio.Event()
            if not self._global:  # the baseline knows no principals, hence no shares
                nursery.start_soon(self._reclaim_loop, name="pager reclaim")
            if self.writeback:
                nursery.start_soon(self._aging_loop, name="pager write-back aging")
            task_status.started()

    # -- tracing ---------------------------------------------------------------------

    def start_trace(self, sink: tr.Sink) -> None:
        """Record every access to `sink` (a binary file or a callable taking record
        arrays) until `stop_trace`. See pager/trace.py."""
        self.stop_trace()
        self._tw = tr.TraceWriter(sink)

    def stop_trace(self) -> None:
        if self._tw is not None:
            self._tw.flush()
            self._tw = None

    def _trace_op(self, op: int, principal: int, block: int, count: int, file: int,
                  fblock: int) -> None:
        if self._tw is None:
            return
        prio, disc, seq = self._hints.get(file, (0, False, False)) if file else (0, False, False)
        flags = (tr.F_DISCARDABLE if disc else 0) | (tr.F_SEQUENTIAL if seq else 0)
        try:
            now = trio.current_time()
        except RuntimeError:
            now = 0.0
        self._tw.add(now, int(principal), count, file, fblock, int(block), op, flags, prio)

    # -- statistics ------------------------------------------------------------------

    def statistics(self) -> PagerStatistics:
        per: dict[PrincipalId, PrincipalCacheStats] = {}
        for p in sorted(set(self._acct) | set(self.banks)):
            a = self._acct.get(p) or _Acct()
            per[PrincipalId(p)] = PrincipalCacheStats(
                a.resident, self._min.get(p, 0), self._max.get(p), a.hits, a.misses,
                a.evictions, a.discarded, a.dirty, a.wb_bytes, a.sent, a.answered,
                a.missed, a.prefetched)
        return PagerStatistics(
            self.nframes, len(self._where), self.hits, self.misses, self.bypassed,
            self.evictions,
            {PrincipalId(p): a.resident for p, a in sorted(self._acct.items()) if a.resident},
            self.policy, self.writeback, sum(a.dirty for a in self._acct.values()),
            sum(a.wb_bytes for a in self._acct.values()),
            sum(a.discarded for a in self._acct.values()), per)
