"""Request scheduling in front of the timing model, and per-principal accounting.

A scheduler decides the order in which principals' requests get one of the device's
`queue_depth` service slots (channels). There is one scheduler per device: every
request of every principal — reads, writes, discards, flushes — passes through its
`slot()`, charged to the principal named.

- `FifoScheduler` is the baseline: one global arrival order, as a kernel without QoS.
- `MClockScheduler` (the default) is hierarchical mClock (Gulati et al., OSDI 2010;
  hClock, EuroSys 2013, for the tree): each principal has a reservation, a weight and
  a limit, the rates in operations/s and in bytes/s, over the principal tree.

mClock, as done here (the tree, its tags and their charging are in
blockdev/mclock_tree.py; choosing and the request path here). Every node of the tree
(a principal) keeps tags, in seconds of the trio clock:

- R (reservation): when its next request is due under its reservation; advanced by
  `1/r_iops` per request and `nbytes/r_bps` per byte (both kept; a node is "under its
  reservation" only while both are due: with two rates, the tighter holds);
- L (limit): when its next request may start at all; advanced by `1/l_iops` and
  `nbytes/l_bps` (both kept; a node may go only when both have passed: the tighter
  limit wins);
- P (proportional share): virtual time advanced by `cost / weight`, where `cost` is the
  request's device time under the profile (`TimingProfile.cost`: a cost per request
  and per byte).

A node that goes idle banks no credit: when it has work again, R and L restart at
the current time (never earlier) and P at its parent's virtual time (start-time fair
queuing: the start tag of the child served last). A node blocked by its own limit is
treated the same when it becomes eligible again (its P is clamped to the parent's
virtual time at every choice), so waiting behind a limit earns no burst either.

Choosing the next request, whenever a slot is free:

1. Reservation phase: among the root's children that have a reservation, are under it
   (R <= now) and within their limits, the one with the smallest R; inside it, a child
   under its own reservation if there is one, else the children share the
   reservation by weight (P). Service here does not advance the P tags at or above the
   reserving node (reserved service is not counted against the weight share, as in
   dmClock): a principal gets its reservation plus its weighted share of the rest.
2. Otherwise the weight phase: from the root down, the child with the smallest P among
   those with work and within their limits (a principal's own requests compete with
   its children as one more child of the same weight). What an idle or limited
   subtree does not use goes to its siblings first, then up the tree — a parent's
   unused share stays among its own children (hClock), rather than being spread over
   every principal as flattened weights would.
3. If requests wait but every one is held by a limit, nothing is dispatched: one of the
   waiting tasks sleeps until the earliest limit tag (work-conserving otherwise).

The choice is made as of the modeled time the channel became free (the device says,
`free_at`), not when the task holding it got round to giving it back: on a loaded
machine the event loop runs that task milliseconds late, and choosing then would idle
the modeled device for that long and let a request that arrived meanwhile jump the
queue. So a late release chooses among the requests that had arrived by `free_at`,
with the tags as of then, and the chosen request starts then in the model (see
`MClockScheduler._dispatch` and `BlockDevice._model`).

Every request dispatched advances L of every node on its path (L counts all of a
node's service), R only of the nodes whose reservation serves it (the path down to the
reserving node, in the reservation phase: service by weight is not counted against a
reservation, as in mClock, or a principal that had the idle device to itself ran its R
tag seconds ahead and lost its reservation when others came), and P as said above.

Anticipation (blockdev/anticipation.py, on profiles with `anticipation_s`: `hdd`): a
request cannot be preempted once in service, so before giving the last free channel to
a request chosen by weight, the scheduler checks whether a reserved principal's next
request is predicted to arrive before that request would be done; if so the channel
stays idle for it, a bounded time (the module says how long and why that is safe).

Barriers: the kernel's barrier (a metadata commit) must wait for the writes in flight,
and every principal's writes wait for the barrier; so while it waits
(`expedite_writes()`), writes held back only by a limit are dispatched anyway (and so
is the barrier's own flush, charged to the principal whose fsync asked for it), their
tags advanced as usual: the principal repays them with its next requests, and a
throttled queue never holds a commit (and everyone's fsync) for queue/limit seconds.
Requests made inside `never_expedited()` are the exception: the pager's write-back of
frames a tenant dirtied while they were discardable, over its dirty bound
(debt-paced frames, docs/dev/invariants.md), goes at its principal's limit even while a
barrier waits, since no barrier waits for it (review of tidy5, R2).

Concurrency: all state lives on the trio loop; `slot()` and `_dispatch()` mutate it
without a checkpoint in between, so a choice and its charge are atomic. Waiting tasks
park with `wait_task_rescheduled` and are woken by whoever dispatches them; a
dispatched request is counted in `_busy` before its task runs again, so at most
`queue_depth` requests ever hold a slot. A cancelled waiter leaves the queue in its
abort path; if it was granted meanwhile it gives the slot back.

Statistics (both schedulers): per principal, requests and bytes by kind, latency from
arrival to completion (queue + service) in a log-linear histogram
(blockdev/histogram.py), requests waiting now, throughput over the last complete
second, and for reservations the requests served in time (completed — the modeled
service and the host's own I/O both — no later than one reservation interval, plus the
time the request takes alone on the device, after they were due: their R tag or their
arrival, whichever is later) and late.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import weakref
from contextlib import contextmanager
from typing import Awaitable, Callable, Collection, Iterator

import outcome
import trio

from .anticipation import Anticipator, Pattern
from .errors import OverReserved
from .histogram import LatencyHistogram
from .places import Place, PlaceBook
from .mclock_tree import (Node, Req, activate, any_waiter, charge, expedited_write,
                          count_past, first_arrival, held_past, p_key,
                          rescale_limit_tags)
from .profiles import CAPACITY_IO_BYTES, CAPACITY_SEQ_BYTES, TimingProfile
from .types import ROOT_PRINCIPAL, BankNode, BankTree, PrincipalId

_INF = math.inf
#: kinds of request (`slot(..., kind=...)`)
READ, WRITE, DISCARD, FLUSH = "read", "write", "discard", "flush"
KINDS = (READ, WRITE, DISCARD, FLUSH)
#: the task inside `never_expedited()` (a weak reference): its writes are never expedited
_NEVER_EXPEDITED: contextvars.ContextVar[object] = contextvars.ContextVar(
    "sluice_never_expedited", default=None)
#: the task inside `past_limits()` (a weak reference): its requests are never held by a
#: limit (The task, not True: a task spawned inside copies the context, and must not
#: inherit the flag. pyfuse3 starts a new worker from the handler that blocks, so a
#: worker started by a write-through write under `past_limits()` served every later
#: FUSE read of the mount past the limits: the quick QoS benchmark's limited reader
#: at twice its limit. No task works on a flagged task's behalf: the pager's
#: write-behinds run only under write-back, where no write is made past its limits.)
_PAST_LIMITS: contextvars.ContextVar[object] = contextvars.ContextVar(
    "sluice_past_limits", default=None)
#: the task's open `place_scope()` (its task held weakly, as above)
_SCOPE: contextvars.ContextVar[_PlaceScope | None] = contextvars.ContextVar(
    "sluice_place_scope", default=None)


class _PlaceScope:
    """A task's `place_scope()`: the places it took, the requests they are priced at in
    all, and the requests it has made past its limits since it began."""

    __slots__ = ("task", "made", "priced", "held", "places")

    def __init__(self) -> None:
        self.task = _me()
        self.made = 0
        self.priced = 0.0
        #: of `priced`, what `hold_place` added
        self.held = 0.0
        self.places: list[Place] = []


def _my_scope() -> _PlaceScope | None:
    s = _SCOPE.get()
    return s if s is not None and s.task() is trio.lowlevel.current_task() else None


def _place_factor(old: tuple[float, float], new: tuple[float, float]) -> float | None:
    """How much longer a place (a 4 KiB request's worth) lasts at limits `new` than at
    `old` (IOPS, bytes/s; 0: none): 0 when no limit is left, None when there was none."""
    def cost(l_iops: float, l_bps: float) -> float:
        return max(1.0 / l_iops if l_iops else 0.0, 4096.0 / l_bps if l_bps else 0.0)
    if not any(new):
        return 0.0
    if not any(old):
        return None
    return cost(*new) / cost(*old)


def _mine(var: contextvars.ContextVar[object]) -> bool:
    """Whether `var` was set by the current task (not inherited from its spawner)."""
    owner = var.get()
    return owner is not None and owner() is trio.lowlevel.current_task()  # type: ignore[operator]


def _me() -> weakref.ref:
    """What `_mine` recognises: a weak reference to the current task (the task itself
    kept every task spawned inside, and theirs, alive through their contexts: review
    of d4a70cd, 3)."""
    return weakref.ref(trio.lowlevel.current_task())


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalIOStats:
    """One principal's I/O as its device's scheduler saw it (see the module docstring)."""

    principal: PrincipalId
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    #: latency percentiles in seconds, arrival to completion (queue + service)
    p50_s: float
    p99_s: float
    max_s: float
    p95_s: float = 0.0
    mean_s: float = 0.0
    discards: int = 0
    flushes: int = 0
    #: requests of every kind
    ops: int = 0
    #: requests waiting for a slot now
    waiting: int = 0
    #: requests and bytes completed in the last complete one-second window
    iops: float = 0.0
    bps: float = 0.0
    #: requests dispatched in the reservation phase (mclock)
    reserved_ops: int = 0
    #: requests of a principal with a reservation completed no later than one
    #: reservation interval after they were due (met), and later (missed)
    reservation_met: int = 0
    reservation_missed: int = 0
    #: requests that had to wait for a limit (theirs or an ancestor's)
    throttled: int = 0
    #: writes let past their limit because a barrier waited for them, or made under a
    #: lock others may wait for (`past_limits`), while held back (repaid after)
    expedited: int = 0
    #: anticipation (blockdev/anticipation.py): requests that found the channel kept
    #: idle for them, holds that ran out without the request, and the device time
    #: idled for this principal in all (modeled seconds)
    anticipated: int = 0
    anticipation_missed: int = 0
    anticipation_idle_s: float = 0.0


class _Counters:
    __slots__ = ("reads", "writes", "discards", "flushes", "bytes_read", "bytes_written",
                 "hist", "waiting", "reserved", "met", "missed", "throttled", "expedited",
                 "win_start", "win_ops", "win_bytes", "last_ops", "last_bytes",
                 "antic_hits", "antic_misses", "antic_idle")

    def __init__(self) -> None:
        self.reads = self.writes = self.discards = self.flushes = 0
        self.bytes_read = self.bytes_written = 0
        self.hist = LatencyHistogram()
        self.waiting = self.reserved = self.met = self.missed = self.throttled = 0
        self.expedited = 0
        self.win_start = -_INF
        self.win_ops = self.win_bytes = 0
        self.last_ops = self.last_bytes = 0
        self.antic_hits = self.antic_misses = 0
        self.antic_idle = 0.0

    def record(self, nbytes: int, kind: str, latency_s: float, now: float) -> None:
        if kind == READ:
            self.reads += 1
            self.bytes_read += nbytes
        elif kind == WRITE:
            self.writes += 1
            self.bytes_written += nbytes
        elif kind == DISCARD:
            self.discards += 1
        else:
            self.flushes += 1
        self.hist.record(latency_s)
        # Throughput over whole seconds of the trio clock: the last complete window.
        if now >= self.win_start + 1.0:
            if now < self.win_start + 2.0:
                self.last_ops, self.last_bytes = self.win_ops, self.win_bytes
            else:
                self.last_ops = self.last_bytes = 0
            self.win_start = math.floor(now)
            self.win_ops = self.win_bytes = 0
        self.win_ops += 1
        if kind in (READ, WRITE):
            self.win_bytes += nbytes

    def snapshot(self, principal: PrincipalId, now: float | None) -> PrincipalIOStats:
        p50, p95, p99 = self.hist.percentiles((0.5, 0.95, 0.99))
        iops, bps = float(self.last_ops), float(self.last_bytes)
        if now is not None and now >= self.win_start + 2.0:
            iops = bps = 0.0  # nothing completed in the last complete window
        elif now is not None and now >= self.win_start + 1.0:
            iops, bps = float(self.win_ops), float(self.win_bytes)
        return PrincipalIOStats(
            principal=principal, reads=self.reads, writes=self.writes,
            bytes_read=self.bytes_read, bytes_written=self.bytes_written,
            p50_s=p50, p95_s=p95, p99_s=p99, max_s=self.hist.max_s, mean_s=self.hist.mean_s,
            discards=self.discards, flushes=self.flushes,
            ops=self.reads + self.writes + self.discards + self.flushes,
            waiting=self.waiting, iops=iops, bps=bps, reserved_ops=self.reserved,
            reservation_met=self.met, reservation_missed=self.missed,
            throttled=self.throttled, expedited=self.expedited,
            anticipated=self.antic_hits, anticipation_missed=self.antic_misses,
            anticipation_idle_s=self.antic_idle)


def _now_or_none() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:
        return None


# -- reservations against the device's capacity --------------------------------------------


def reserved_fraction(node: BankNode, profile: TimingProfile) -> float:
    """The share of the device (0..) that `node`'s reservation takes, through the cost
    function: an IOPS reservation counted as 4 KiB random reads, a bytes/s one as 1 MiB
    sequential reads; with both, the larger (the reservation serves whichever rate is
    reached first, at any request size in between)."""
    if profile.is_instant:
        return 0.0
    f_iops = (node.io_reserve_iops or 0.0) * profile.cost(CAPACITY_IO_BYTES)
    f_bps = (node.io_reserve_bps or 0.0) * profile.cost(CAPACITY_SEQ_BYTES, sequential=True) \
        / CAPACITY_SEQ_BYTES
    return max(f_iops, f_bps)


def check_reservations(tree: BankTree, profile: TimingProfile) -> None:
    """Raise OverReserved when the reservations of `tree` add up to more than the device
    can serve. Children carve their reservations from their parent's (kernelshim checks
    that), so what counts is each reserving principal with no reserving ancestor."""
    if profile.is_instant:
        return
    tops: list[tuple[BankNode, float]] = []
    for node in tree.values():
        if node.io_reserve_iops is None and node.io_reserve_bps is None:
            continue
        p, covered = node.parent, False
        while p is not None and p in tree:
            q = tree[p]
            if q.io_reserve_iops is not None or q.io_reserve_bps is not None:
                covered = True
                break
            p = q.parent
        if not covered:
            tops.append((node, reserved_fraction(node, profile)))
    total = sum(f for _n, f in tops)
    if total > 1.0 + 1e-9:
        def rate(n: BankNode) -> str:
            parts = []
            if n.io_reserve_iops is not None:
                parts.append(f"{n.io_reserve_iops:g}iops")
            if n.io_reserve_bps is not None:
                parts.append(f"{n.io_reserve_bps / 1e6:g}MB/s")
            return ",".join(parts)
        detail = ", ".join(f"{n.name} {rate(n)} ({f:.0%})"
                           for n, f in sorted(tops, key=lambda t: -t[1]))
        raise OverReserved(
            f"I/O reservations add up to {total:.0%} of what the device can serve "
            f"(profile {profile.name}: {profile.capacity()}): {detail}")


# -- the baseline ------------------------------------------------------------------------------


class _Accounting:
    """What both schedulers share: banks, statistics, the capacity check."""

    name = "?"

    def __init__(self, profile: TimingProfile) -> None:
        self.profile = profile
        self.queue_depth = profile.queue_depth
        self._counters: dict[PrincipalId, _Counters] = {}
        #: every principal's I/O bank, as last configured
        self.banks: BankTree = {}

    def _c(self, principal: PrincipalId) -> _Counters:
        c = self._counters.get(principal)
        if c is None:
            c = self._counters[principal] = _Counters()
        return c

    def check_banks(self, tree: BankTree) -> None:
        """OverReserved if `tree`'s reservations exceed the device's capacity. Called by
        the principal table before it accepts a change, and at mount."""
        check_reservations(tree, self.profile)

    @contextmanager
    def expedite_writes(self) -> Iterator[None]:
        """While inside, writes held back only by a limit go anyway (see MClockScheduler);
        FIFO holds nothing back."""
        yield

    @contextmanager
    def never_expedited(self) -> Iterator[None]:
        """The current task's requests made inside are never expedited by a barrier
        (`expedite_writes`): they wait for their principal's limits whatever waits
        for them. For writes no barrier waits for: the pager's write-back of
        debt-paced frames (pager/writeback.py)."""
        token = _NEVER_EXPEDITED.set(_me())
        try:
            yield
        finally:
            _NEVER_EXPEDITED.reset(token)

    @contextmanager
    def past_limits(self) -> Iterator[None]:
        """The current task's requests made inside are never held back by their
        principal's I/O limits; their tags advance as usual, so the principal repays
        them before its next requests (`limit_slot` places come after the tags; the
        kernel's `repay_limit`). For requests made under a lock that another
        principal's request may wait for — a write-through write under a file's
        inode lock or a merged block's: waiting at the limit there made every other
        writer of the file wait for the limited tenant's queue (hostile probe 7, F1).
        `never_expedited()` inside wins: those go at their limits."""
        token = _PAST_LIMITS.set(_me())
        try:
            yield
        finally:
            _PAST_LIMITS.reset(token)

    def limit_debt(self, principal: PrincipalId) -> float:
        """Seconds `principal` still owes its I/O limits for dispatched requests (those
        a barrier expedited past them among them; see MClockScheduler). 0 when
        nothing is owed; FIFO holds nothing back."""
        return 0.0

    def limit_pace(self, principal: PrincipalId, nbytes: int, slack: float,
                   step: float) -> float | None:
        """When a request dirtying `nbytes` of `principal`'s may go on while it is in
        debt (see MClockScheduler): never in debt here."""
        return None

    def limit_slot(self, principal: PrincipalId, nbytes: int, *,
                   ios: float = 1.0) -> Place | None:
        """The place of a request of `nbytes` of `principal`'s made past its limits
        (see MClockScheduler; it may go at the place's `until`); None: at once. FIFO
        holds nothing back."""
        return None

    @contextmanager
    def place_scope(self) -> Iterator[None]:
        """Places taken inside grow with the requests made past the limits inside it
        (see MClockScheduler). FIFO gives no places."""
        yield

    def hold_place(self, most_ios: float) -> None:
        """The task's places are priced at `most_ios` at least until its scope ends (see
        MClockScheduler). FIFO gives no places."""

    def limit_clear_at(self, principal: PrincipalId) -> float | None:
        """When a request of `principal` will no longer be held by an I/O limit on its
        path (its limit tags), if that is later than now; None when it would go now
        or has no limit. FIFO holds nothing back."""
        return None

    def limited(self, principal: PrincipalId) -> bool:
        """Whether an I/O limit is on `principal`'s path. FIFO enforces none."""
        return False

    async def wait_place(self, place: Place) -> None:
        """Sleep until `place` (from `limit_slot`) may go; it moves earlier when a
        limit on its path is raised or removed, later when a place before it grows
        (see MClockScheduler). FIFO gives no places."""
        await trio.sleep_until(place.until)

    def record(self, principal: PrincipalId, nbytes: int, *, write: bool = False,
               latency_s: float, kind: str | None = None, arrival: float | None = None,
               deadline: float | None = None) -> None:
        """Account one completed request (arrival to completion: `latency_s`). With the
        `deadline` its slot gave (a principal with a reservation) and its `arrival`,
        it counts as served in time (`reservation_met`) when it completed by then:
        judged at completion, the host's own time and the event loop's included, not
        when it was chosen (a request chosen in time and then held up behind the
        host's disk counted as met: probe 20, F2)."""
        c = self._c(principal)
        c.record(nbytes, kind or (WRITE if write else READ), latency_s, trio.current_time())
        if deadline is not None and arrival is not None:
            if arrival + latency_s <= deadline + 1e-9:
                c.met += 1
            else:
                c.missed += 1

    def statistics(self, principals: Collection[int] | None = None
                   ) -> list[PrincipalIOStats]:
        """A snapshot of each principal that did I/O or waits for it (of `principals`
        only, if given: a snapshot costs its histogram's percentiles, and a tenant's
        `stats` page shows a few principals of however many the volume has)."""
        now = _now_or_none()
        if principals is None:
            items = sorted(self._counters.items())
        else:
            get = self._counters.get
            items = [(PrincipalId(p), c) for p in sorted(set(principals))
                     if (c := get(PrincipalId(p))) is not None]
        return [c.snapshot(p, now) for p, c in items if c.hist.total or c.waiting]


class FifoScheduler(_Accounting):
    """Serves requests in one global arrival order, `queue_depth` at a time. Banks are
    recorded and reservations checked against the capacity, but nothing is enforced:
    it is the baseline."""

    name = "fifo"

    def __init__(self, queue_depth: int | TimingProfile) -> None:
        if isinstance(queue_depth, TimingProfile):
            profile = queue_depth
        else:
            profile = TimingProfile("fifo", 0.0, 0.0, 0.0, queue_depth)
        super().__init__(profile)
        self._slots = trio.Semaphore(profile.queue_depth)

    def configure_banks(self, tree: BankTree) -> None:
        self.banks = tree

    def slot(self, principal: PrincipalId, nbytes: int, *, write: bool = False,
             kind: str | None = None, arrival: float | None = None) -> _Slot:
        """Hold one of the `queue_depth` slots, in arrival order (async with; gives the
        modeled time the request may start: its arrival, see MClockScheduler.slot)."""
        return _Slot(self._acquire, self._release, principal, nbytes,
                     write or kind == WRITE, arrival)

    async def _acquire(self, principal: PrincipalId, nbytes: int, write: bool,
                       arrival: float | None, flush: bool = False
                       ) -> tuple[float, float | None]:
        c = self._c(principal)
        c.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            c.waiting -= 1
        # One global order: the oldest waiter takes the channel that frees, so it
        # starts when that channel is free (the device knows) or at its arrival.
        return (trio.current_time() if arrival is None else arrival), None

    def _release(self, free_at: float | None = None,
                 principal: PrincipalId | None = None) -> None:
        self._slots.release()


# -- mClock --------------------------------------------------------------------------------------


class _Slot:
    """`async with scheduler.slot(...)`: a plain class rather than an
    asynccontextmanager (a generator per request costs a few microseconds)."""

    __slots__ = ("_acquire", "_release", "_args", "free_at", "deadline")

    def __init__(self, acquire: Callable[[PrincipalId, int, bool, float | None, bool],
                                         Awaitable[tuple[float, float | None]]],
                 release: Callable[[float | None, PrincipalId], None],
                 principal: PrincipalId,
                 nbytes: int, write: bool, arrival: float | None = None,
                 flush: bool = False) -> None:
        self._acquire = acquire
        self._release = release
        self._args = (principal, nbytes, write, arrival, flush)
        #: set by the device before leaving: the modeled time its channel is free again
        self.free_at: float | None = None
        #: once entered, by when the request must complete to count as served in time
        #: under its principal's reservation (None: no reservation; `record`)
        self.deadline: float | None = None

    async def __aenter__(self) -> float:
        start, self.deadline = await self._acquire(*self._args)
        return start

    async def __aexit__(self, *exc: object) -> None:
        self._release(self.free_at, self._args[0])


class MClockScheduler(_Accounting):
    """Hierarchical mClock over the principal tree (see the module docstring)."""

    name = "mclock"

    def __init__(self, profile: TimingProfile) -> None:
        super().__init__(profile)
        self._cost: Callable[..., float] = profile.cost
        self._busy = 0
        self._queued = 0
        self._nodes: dict[PrincipalId, Node] = {}
        self._root = self._node(ROOT_PRINCIPAL)
        self._root.path = (self._root,)
        self._any_res = False
        #: the waiting request whose task sleeps until the earliest limit tag, and when
        self._timer_req: Req | None = None
        self._timer_at = _INF
        self._res_node: Node | None = None
        #: requests that arrived later than this are not chosen (see _dispatch)
        self._horizon = _INF
        #: barriers waiting for the writes in flight (see expedite_writes)
        self._expedite = 0
        #: what each limited node is owed for its subtree's dispatched requests, repaid
        #: at its own limit as time passes: [requests, bytes, since, debtors] — the
        #: principals whose requests went into it since it last ended (`limit_debt`).
        self._owed: dict[PrincipalId, list] = {}
        #: per limited node in debt, when the requests that dirty frames of its
        #: subtree's have been paced up to (`limit_pace`)
        self._pace: dict[PrincipalId, float] = {}
        #: per limited node, the places its subtree's requests made past their limits
        #: were given (`limit_slot`, blockdev/places.py)
        self._places = PlaceBook(self._place_cost)
        #: the places whose tasks are in `wait_place`
        self._waiters: set[Place] = set()
        #: anticipation (blockdev/anticipation.py), on profiles that ask for it
        self._antic = Anticipator(profile) if profile.anticipation_s > 0 else None
        #: whether the timer (`_timer_at`) ends an anticipation hold (it then chooses
        #: as of that modeled time) rather than waits for a limit
        self._timer_hold = False

    # -- the tree -------------------------------------------------------------------------

    def _node(self, pid: PrincipalId) -> Node:
        n = self._nodes.get(pid)
        if n is None:
            n = self._nodes[pid] = Node(pid, self._c(pid))
            if pid != ROOT_PRINCIPAL:
                # Not (yet) in the configured tree: a default principal under root.
                n.configure(None)
                n.parent = self._root
                self._root.children.append(n)
                n.path = (self._root, n)
        return n

    def configure_banks(self, tree: BankTree) -> None:
        """Take a new snapshot of the banks: rebuild the tree, keeping every node's tags
        and waiting requests, then dispatch what the new banks allow."""
        self.banks = tree
        nodes = self._nodes
        now = _now_or_none()
        if self._owed and now is not None:
            # What is owed is kept in requests and bytes, repaid at the limits in
            # force: settle it at the old ones, the new ones apply from now on (a
            # limit removed or raised takes effect at once for the debt too).
            for pid in list(self._owed):
                self._settle(pid, now)
        for pid in tree:
            if pid not in nodes:
                nodes[pid] = Node(pid, self._c(pid))
        for n in nodes.values():
            n.children = []
            n.active = []
        root = self._root
        new_limits = False
        for pid, n in nodes.items():
            b = tree.get(pid)
            old = (n.l_iops, n.l_bps)
            n.configure(b)
            if old != (n.l_iops, n.l_bps):
                # The places given at the old limits are re-counted at the new ones, in
                # their order; a limit gone holds no place, a new one is given places
                # below (review of hostile probe 7's fixes, R3; of d4a70cd, 1 and 4).
                f = _place_factor(old, (n.l_iops, n.l_bps))
                if f is None:
                    new_limits = True
                elif not f:
                    self._places.drop_node(pid, now if now is not None else _INF)
                elif now is not None:
                    self._places.rescale(pid, f, now)
                if now is not None:
                    rescale_limit_tags(n, old, now)
            if pid == ROOT_PRINCIPAL:
                n.parent = None
                continue
            par = nodes.get(b.parent) if b is not None and b.parent is not None else None
            n.parent = par if par is not None else root
            n.parent.children.append(n)
        # paths, backlogs and active lists, top-down then bottom-up
        order: list[Node] = []
        stack = [root]
        root.path = (root,)
        while stack:
            n = stack.pop()
            order.append(n)
            for c in n.children:
                c.path = n.path + (c,)
                stack.append(c)
        for n in reversed(order):
            n.backlog = len(n.queue) + sum(c.backlog for c in n.children)
            n.past_below = sum(1 for r in n.queue if r.past_limits) + \
                sum(c.past_below for c in n.children)
            n.active = [c for c in n.children if c.backlog]
            n.res_below = any(c.has_res or c.res_below for c in n.children)
        self._any_res = root.has_res or root.res_below
        if new_limits and now is not None and self._waiters:
            # A place waiting under a node newly limited takes a new place, on every
            # limited node of its path, in the order they were taken (one whose other
            # limit went in the same change too: review of F1, C).
            again = sorted((p for p in self._waiters
                            if (node := nodes.get(p.principal)) is not None and
                            any(n.has_lim and n.id not in p.starts for n in node.path)),
                           key=lambda p: p.seq)
            if again:
                self._places.withdraw(again, now)
                for p in again:
                    self._take_place(p, nodes[p.principal], now)
                    if p.woken is not None:
                        p.woken.set()
        if self._antic is not None:
            for n in nodes.values():
                if n.has_res and n.pattern is None:
                    n.pattern = Pattern(n)
                elif not n.has_res and n.pattern is not None:
                    self._antic.forget(n.pattern)
                    n.pattern = None
            self._antic.patterns = [n.pattern for n in nodes.values() if n.pattern is not None]
        now = _now_or_none()
        if now is not None:
            self._dispatch(now)

    @contextmanager
    def expedite_writes(self) -> Iterator[None]:
        """While inside, a waiting write (or flush) held back only by a limit is
        dispatched anyway (its tags still advance, so its principal repays it: later
        requests wait the longer). The kernel's barrier waits inside this for the
        writes in flight, and flushes inside it (the flush is charged to the fsync's
        caller): a commit, and with it every principal's writes and fsyncs, must not
        wait for a throttled principal's queue to drain at its limit."""
        self._expedite += 1
        try:
            now = _now_or_none()
            if now is not None and self._queued:
                self._dispatch(now)
            yield
        finally:
            self._expedite -= 1

    def limit_debt(self, principal: PrincipalId) -> float:
        """Seconds `principal` still owes its I/O limits for dispatched requests (those
        a barrier expedited past them among them), repaid as time passes: the largest
        debt of a limited node on its path of which it owes a part. The debt is kept
        per limited node — its whole subtree's requests at its own limit, as its tags
        count them — so a tenant's children share their parent's debt as they share
        its tags (per principal, N children wrote back at N x the parent's limit:
        second review of probe 5, R1). A principal owes a part of a node's debt when
        one of its own requests went into it since that debt last ended: a sibling
        that did no I/O under the node never waits for it (review of probe 5, P1)."""
        return max((left for _, left in self._owed_on_path(principal, trio.current_time())),
                   default=0.0)

    def limit_pace(self, principal: PrincipalId, nbytes: int, slack: float,
                   step: float) -> float | None:
        """For a request that dirties `nbytes` of `principal`'s: None when it owes no
        limited node on its path more than `slack` seconds; else the time until which
        it waits. It is paced, not made to wait for the whole debt (a FUSE request
        waiting holds the host kernel's inode lock: second review of probe 5, R2):
        each limited node in debt keeps a clock that every such request of its
        subtree's moves on by the request's cost at the node's limit (at least
        `step`), so its debtors together dirty at most at its limit while it is in
        debt, and a request waits its own cost plus that of the requests ahead."""
        now = trio.current_time()
        until: float | None = None
        for n, left in self._owed_on_path(principal, now):
            if left <= slack:
                continue
            at = max(now, self._pace.get(n.id, now)) + \
                max(step, self._owed_seconds(n, 1.0, float(nbytes)))
            self._pace[n.id] = at
            if until is None or at > until:
                until = at
        return until

    def limit_slot(self, principal: PrincipalId, nbytes: int, *,
                   ios: float = 1.0) -> Place | None:
        """For `ios` requests of `nbytes` in all of `principal`'s that will be made past
        its limits (`past_limits`: a write-through write, under locks others wait for),
        its place: each limited node on its path keeps a line of the places given to
        its subtree's such requests, each place its cost at the node's limits, none
        before the node's limit tags (what went past the limits without a place, a
        barrier's expedited requests, is repaid so), so that together they go at the
        limits, with no burst, and none waits for a limit under a lock (hostile probe
        7, F1). It may go at the place's `until` (`wait_place`). None: no limit on the
        path. Taken whether or not the caller waits for it.

        Inside the task's `place_scope()` the place grows by each request the task
        makes past its limits beyond what its places are priced at, as it makes it: the
        places after it still to start move later by as much (blockdev/places.py;
        hostile probe 8, F1). There a request priced at no request of its own (`ios`
        0: a burst's later writes) joins the scope's last place with its bytes."""
        node = self._nodes.get(principal)
        if node is None or not any(n.has_lim for n in node.path):
            return None
        now = trio.current_time()
        scope = _my_scope()
        if scope is not None and not ios and scope.places:
            # No request of its own (a burst's later writes, which go down with the
            # first): its bytes join the scope's last place.
            last = scope.places[-1]
            self._places.grow(last, 0.0, nbytes)
            return last
        place = Place(principal, nbytes, ios)
        if scope is not None:
            place.open = True
        self._take_place(place, node, now)
        if place.until <= now:
            place.gone = True  # (its caller goes at once)
        if scope is not None:
            scope.places.append(place)
            scope.priced += ios
        if place.until > now:
            # held back at its limit, before the request (`throttled` in the stats)
            self._c(principal).throttled += 1
        return place

    def _take_place(self, place: Place, node: Node, now: float) -> None:
        self._places.take(place, [(n.id, max(now, n.L_i, n.L_b))
                                  for n in node.path if n.has_lim], now)

    def _place_cost(self, pid: PrincipalId, ios: float, nbytes: int) -> float:
        n = self._nodes.get(pid)
        return 0.0 if n is None else self._owed_seconds(n, ios, float(nbytes))

    def hold_place(self, most_ios: float) -> None:
        """Before the wait of a writer whose place went for a lock another holds: the
        current task's scope prices its places at `most_ios` requests at least (the most
        its write can make) from then until the scope ends, when the price comes back
        to the requests made (at least what it was): the places after them still to
        start are held back meanwhile. Its growth would come only once it holds the
        lock, too late to move anyone, and the writers waiting behind a held lock all
        went down at once after it (16 writers of 16 requests at 4 IOPS behind a lock
        held 2 s: 144 in a second; second review of F1, A). Not brought back as soon as
        it holds the lock: the writers after it would go at once, before its requests,
        and queue on the lock again. A lock serialises its writers anyway."""
        scope = _my_scope()
        if scope is not None and scope.places and most_ios > scope.priced:
            extra = most_ios - scope.priced
            self._places.grow(scope.places[-1], extra, 0)
            scope.priced += extra
            scope.held += extra

    async def wait_place(self, place: Place) -> None:
        self._waiters.add(place)
        try:
            while True:
                self._places.refresh(place, trio.current_time())  # (growths before it)
                if place.until <= trio.current_time():
                    return
                woken = place.woken = trio.Event()
                with trio.move_on_at(place.until):
                    await woken.wait()
        finally:
            place.gone = True  # (gone, or given up: its place stays taken)
            self._waiters.discard(place)

    @contextmanager
    def place_scope(self) -> Iterator[None]:
        """Each request the current task makes past its limits inside, beyond what the
        places it took inside are priced at, makes its last place one request longer,
        as it is made (`_acquire`): the places after it still to start move later. For
        a write-through write whose device requests are known only under its locks (a
        relocation into fresh blocks: one request per run; a merge's read). Nested: the
        outermost counts."""
        if _my_scope() is not None:
            yield
            return
        scope = _PlaceScope()
        token = _SCOPE.set(scope)
        try:
            yield
        finally:
            _SCOPE.reset(token)
            over = min(scope.held, scope.priced - scope.made)
            if over > 0:  # (priced at its most while it waited for a held lock)
                self._places.shrink(scope.places[-1], over, trio.current_time())
            for p in scope.places:
                self._places.settle(p)

    def _owed_on_path(self, principal: PrincipalId, now: float
                      ) -> Iterator[tuple[Node, float]]:
        """Each limited node on `principal`'s path of whose debt it owes a part, with
        the seconds left of that debt; debts that have ended are forgotten on the way."""
        node = self._nodes.get(principal)
        if node is None or not self._owed:
            return
        for n in node.path:
            o = self._owed.get(n.id)
            if o is None or principal not in o[3]:
                continue
            left = self._owed_seconds(n, o[0], o[1]) - (now - o[2])
            if left <= 0.0:
                del self._owed[n.id]
                self._pace.pop(n.id, None)
                continue
            yield n, left

    @staticmethod
    def _owed_seconds(n: Node, ios: float, nbytes: float) -> float:
        """How long `ios` requests of `nbytes` in all take at `n`'s own limits."""
        s = 0.0
        if n.l_iops:
            s = ios / n.l_iops
        if n.l_bps and nbytes / n.l_bps > s:
            s = nbytes / n.l_bps
        return s

    def _settle(self, pid: PrincipalId, now: float) -> list | None:
        """Scale limited node `pid`'s debt down to what is left of it at `now` (at its
        limits in force), from `now` on; None when nothing is left (its debtors with it)."""
        o = self._owed.get(pid)
        if o is None:
            return None
        n = self._nodes.get(pid)
        total = self._owed_seconds(n, o[0], o[1]) if n is not None else 0.0
        left = total - (now - o[2])
        if left <= 0.0 or total <= 0.0:
            del self._owed[pid]
            self._pace.pop(pid, None)
            return None
        f = left / total
        o[0] *= f
        o[1] *= f
        o[2] = now
        return o

    def _accrue(self, node: Node, nbytes: int, now: float) -> None:
        """A request of `node`'s principal is dispatched at `now`: every limited node on
        its path is owed its cost (one request, its bytes) at that node's limit, after
        what it is owed still (as its limit tags count it), and the principal becomes
        one of that node's debtors."""
        for n in node.path:
            if not n.has_lim:
                continue
            o = self._settle(n.id, now)
            if o is None:
                o = self._owed[n.id] = [0.0, 0.0, now, set()]
            o[0] += 1.0
            o[1] += float(nbytes)
            o[3].add(node.id)

    # -- the request path -------------------------------------------------------------------

    def slot(self, principal: PrincipalId, nbytes: int, *, write: bool = False,
             kind: str | None = None, arrival: float | None = None) -> _Slot:
        """Hold one of the `queue_depth` slots when the scheduler picks this request
        (async with); `kind` read, write, discard or flush. `arrival` is when the
        request reached the device in modeled time (default: now). The slot gives the
        modeled time the scheduler chose the request, the earliest it may start; the
        holder sets the slot's `free_at` to the modeled time its channel is free again
        before leaving (see `_dispatch`)."""
        return _Slot(self._acquire, self._release, principal, nbytes, write or kind == WRITE,
                     arrival, kind == FLUSH)

    async def _acquire(self, principal: PrincipalId, nbytes: int, write: bool,
                       arrival: float | None = None, flush: bool = False
                       ) -> tuple[float, float | None]:
        await trio.lowlevel.checkpoint_if_cancelled()
        now = trio.current_time()
        if arrival is None or arrival < now:
            arrival = now
        node = self._nodes.get(principal) or self._node(principal)
        never = _mine(_NEVER_EXPEDITED)
        past = not never and _mine(_PAST_LIMITS)
        paid: dict[PrincipalId, float] | None = None
        if past:
            scope = _my_scope()
            if scope is not None:
                scope.made += 1
                if scope.made > scope.priced and scope.places:
                    # more than its places were priced at: the last grows
                    self._places.grow(scope.places[-1], scope.made - scope.priced, 0)
                    scope.priced = scope.made
                if scope.places:
                    # paid for at its place: the limit tags go on from the place's
                    # start, not from now (mclock_tree.activate; probe 15, F4)
                    paid = scope.places[-1].starts
        req = Req(node, nbytes, self._cost(nbytes, write=write), arrival, write,
                  barrier=(write or flush) and not never, past_limits=past,
                  paid_from=paid)
        if node.has_res:
            req.service = self.profile.service_time(nbytes, write=write, seek_fraction=1.0)
        may_go = past or self._may_go(node, now)
        req.throttled = not may_go
        antic = self._antic
        if antic is not None and antic.patterns:
            if node.pattern is not None:
                antic.arrive(node.pattern, arrival)
            if self._busy + 1 == self.queue_depth:
                may_go = False  # the last channel: the choice may anticipate (_dispatch)
        if self._busy < self.queue_depth and not self._queued and may_go:
            # The device has a free channel and nobody waits: go now.
            charge(req, now, res_node=None)
            self._accrue(node, nbytes, now)
            self._busy += 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return arrival, req.deadline
        self._enqueue(req, now)
        try:
            await self._wait(req)
            return req.start, req.deadline
        except BaseException:
            if req.granted:  # granted while the cancellation was on its way
                self._release(None, principal)
            else:
                self._dequeue(req)
                if node.pattern is not None and self._antic is not None:
                    self._antic.complete(node.pattern, trio.current_time())
                if self._timer_req is req:
                    self._timer_req, self._timer_at = None, _INF
                    self._dispatch(trio.current_time())
            raise

    def limited(self, principal: PrincipalId) -> bool:
        """Whether an I/O limit is on `principal`'s path. Never blocks."""
        node = self._nodes.get(principal)
        if node is None:
            return False
        for n in node.path:
            if n.has_lim:
                return True
        return False

    def limit_clear_at(self, principal: PrincipalId) -> float | None:
        """When a request of `principal` will no longer be held by an I/O limit on its
        path (the latest limit tag of its limited nodes), if later than now; None
        otherwise (no limit, or none holding it now). A caller about to take a lock
        that others of another principal may wait for sleeps until then first, so that
        the lock is not held across its own limit's wait (review of probe 6, R2).
        Never blocks."""
        node = self._nodes.get(principal)
        if node is None:
            return None
        at = -_INF
        for n in node.path:
            if n.has_lim:
                at = max(at, n.L_i, n.L_b)
        if at == -_INF:
            return None
        return at if at > trio.current_time() else None

    def _may_go(self, node: Node, now: float) -> bool:
        for n in node.path:
            if n.has_lim and (n.L_i > now or n.L_b > now):
                return False
        return True

    async def _wait(self, req: Req) -> None:
        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            req.blocked = False
            return trio.lowlevel.Abort.SUCCEEDED

        if req.granted:  # dispatched at once by its own arrival
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        req.task = trio.lowlevel.current_task()
        while not req.granted:
            at = self._timer_at if self._timer_req is req else _INF
            req.blocked = True
            if at < _INF:
                with trio.move_on_at(at) as cs:
                    await trio.lowlevel.wait_task_rescheduled(abort)
                if cs.cancelled_caught and not req.granted and self._timer_req is req:
                    # The earliest limit tag has passed, or a hold ran out: look
                    # again (as of the hold's end in the model: the loop may be late).
                    model = at if self._timer_hold else None
                    self._timer_req, self._timer_at = None, _INF
                    self._dispatch(trio.current_time(), model)
            else:
                await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self, req: Req) -> None:
        if req.blocked:
            req.blocked = False
            assert req.task is not None
            trio.lowlevel.reschedule(req.task, outcome.Value(None))

    def _enqueue(self, req: Req, now: float) -> None:
        node = req.node
        node.queue.append(req)
        if req.past_limits:
            count_past(req, 1)
        node.counters.waiting += 1
        self._queued += 1
        # Activate the nodes that had nothing waiting: no credit banked while idle.
        for n in reversed(node.path):
            if n.backlog == 0:
                activate(n, now, req.paid_from)
                n.backlog = 1
                if n.parent is not None:
                    n.parent.active.append(n)
            else:
                n.backlog += 1
        self._dispatch(now)

    def _dequeue(self, req: Req) -> None:
        node = req.node
        try:
            node.queue.remove(req)
        except ValueError:
            return
        if req.past_limits:
            count_past(req, -1)
        node.counters.waiting -= 1
        self._queued -= 1
        self._unbacklog(node)

    def _unbacklog(self, node: Node) -> None:
        for n in reversed(node.path):
            n.backlog -= 1
            if not n.backlog and n.parent is not None:
                n.parent.active.remove(n)

    def _release(self, free_at: float | None = None,
                 principal: PrincipalId | None = None) -> None:
        self._busy -= 1
        if self._antic is not None and principal is not None:
            p = self._nodes[principal].pattern
            if p is not None:
                self._antic.complete(p, trio.current_time() if free_at is None else free_at)
        if self._queued:
            self._dispatch(trio.current_time(), free_at)

    # -- choosing ----------------------------------------------------------------------------

    def _dispatch(self, now: float, free_at: float | None = None) -> None:
        """Hand free channels to waiting requests, each to the one the tags choose.

        The choice is made as of the modeled time the channel became free: its
        holder's task gives the slot back only when the event loop runs it, which
        on a loaded machine is milliseconds after the modeled completion (`free_at`).
        A device would have started its next request then, not when our loop got
        round to it; so the choice is made among the requests that had arrived by
        then (or, if none had, the first to arrive after), with the tags as of that
        time, and the request starts then in the model (`Req.start`). Choosing at
        the late real time instead would idle the channel for the loop's lateness
        and let a request that arrived during it jump the queue.

        Anticipation (blockdev/anticipation.py) may keep the last free channel idle
        instead of giving it to a request chosen by weight: until the anticipated
        principal's request arrives (the choice is made again as of its arrival) or
        the hold runs out (again as of its end), in modeled time."""
        wake = _INF
        hold_end = _INF
        antic = self._antic
        while self._queued and self._busy < self.queue_depth:
            t, horizon = now, _INF
            if free_at is not None and free_at < now:
                first = first_arrival(self._root)
                t = horizon = min(now, max(free_at, first))
            free_at = None
            self._horizon = horizon
            req, res_node, wake = self._select(t)
            self._horizon = _INF
            if req is None and horizon < _INF:
                # What had arrived by then is held by limits: choose as of now.
                t = now
                req, res_node, wake = self._select(now)
            if req is None:
                break
            if (antic is not None and res_node is None and antic.patterns
                    and self._busy + 1 == self.queue_depth):
                held = antic.hold(t, req)
                if held is not None:
                    end, pat = held
                    antic.begin_hold(pat, t)
                    q = pat.node.queue
                    arrived = q[0].arrival if q else _INF
                    if arrived <= end and arrived <= now:
                        free_at = arrived  # it came during the hold: choose as of then
                        continue
                    if end <= now:
                        antic.miss(pat, end)  # the hold ran out: choose as of its end
                        free_at = end
                        continue
                    hold_end = end
                    break
            req.start = t if t > req.arrival else req.arrival
            if antic is not None and (antic.since is not None or (
                    req.node.pattern is not None and req.node.pattern.held)):
                antic.end_hold(req.start, req.node)
            node = req.node
            if node.queue[0] is req:
                node.queue.popleft()
            else:
                node.queue.remove(req)
            if req.past_limits:
                count_past(req, -1)
            node.counters.waiting -= 1
            self._queued -= 1
            charge(req, t, res_node=res_node, queued=True)
            self._accrue(node, req.nbytes, t)
            self._unbacklog(node)
            self._busy += 1
            req.granted = True
            if self._timer_req is req:
                self._timer_req, self._timer_at = None, _INF
            self._wake(req)
        else:
            return
        # Requests wait, a channel is free, and every one of them is held by a limit
        # (or the last channel is kept for an anticipated request): one waiting task
        # sleeps until the earliest limit tag (or the end of the hold).
        hold = hold_end < wake
        if hold:
            wake = hold_end
        if wake < self._timer_at:
            old = self._timer_req
            holder = old
            if holder is None:
                holder = any_waiter(self._root)
            if holder is None:
                return
            self._timer_req, self._timer_at = holder, wake
            self._timer_hold = hold
            self._wake(holder)  # it re-arms its sleep with the new deadline

    def _select(self, now: float) -> tuple[Req | None, Node | None, float]:
        """The next request to serve; the node whose reservation serves it (None: the
        weight phase); and, when there is no request to serve, the earliest time a
        limit lets one go."""
        wake = [_INF]
        root = self._root
        req = None
        if root.has_lim and root.limit_at() > now:
            wake[0] = root.limit_at()
        else:
            if self._any_res:
                self._res_node = None
                req = self._select_res(root, now, wake)
                if req is not None:
                    return req, self._res_node, _INF
            req = self._select_w(root, now, wake)
        if req is None:
            # Held by limits: a request that goes past them (`past_limits`, whose
            # node's reservation or root's limit held it, or any write while a barrier
            # waits: `expedite_writes`), if one waits.
            req = expedited_write(self._root, barriers=bool(self._expedite))
            if req is not None:
                req.node.counters.expedited += 1
        return req, None, wake[0]

    def _select_res(self, n: Node, now: float, wake: list[float]) -> Req | None:
        """Reservation phase below `n`: a child under its reservation, smallest R first
        (inside it, a descendant under its own reservation, else by weight). Sets
        `_res_node` to the deepest node whose reservation serves the request."""
        cands = [c for c in n.active if c.has_res or c.res_below]
        if not cands:
            return None
        if len(cands) > 1:
            cands.sort(key=Node.res_at)
        for c in cands:
            if c.has_lim and c.limit_at() > now:
                continue
            req = self._select_res(c, now, wake) if c.res_below else None
            if req is not None:
                return req
            if c.has_res and c.res_at() <= now:
                req = self._select_w(c, now, wake)
                if req is not None:
                    self._res_node = c
                    return req
        return None

    def _select_w(self, n: Node, now: float, wake: list[float]) -> Req | None:
        """Weight phase below `n`: smallest P among the children with work and within
        their limits, n's own queue competing as one more child."""
        active = n.active
        q = n.queue
        own = q[0] if q and q[0].arrival <= self._horizon else None
        if not active:
            return own
        if len(active) == 1 and not own:
            c = active[0]
            if c.has_lim:
                t = c.limit_at()
                if t > now:
                    if t < wake[0]:
                        wake[0] = t
                    return held_past(c, self._horizon)
            return self._select_w(c, now, wake)
        v = n.vtime
        own_p = (n.own_P if n.own_P > v else v) if own else _INF
        tried: list[tuple[float, Node, Req | None]] = []
        for c in active:
            if c.has_lim:
                t = c.limit_at()
                if t > now:
                    if t < wake[0]:
                        wake[0] = t
                    # Held by its limit, but a request made past the limits (under a
                    # lock others wait for) competes by weight all the same: it must
                    # not wait for the limit tags under that lock while others keep
                    # the device busy (review of hostile probe 7's fixes, R4). Not
                    # first: by weight, so a reservation or a fair share is not passed.
                    past = held_past(c, self._horizon)
                    if past is not None:
                        tried.append((c.P if c.P > v else v, c, past))
                    continue
            tried.append((c.P if c.P > v else v, c, None))
        tried.sort(key=p_key)
        for p, c, past in tried:
            if own_p <= p:
                return own
            if past is not None:
                return past
            req = self._select_w(c, now, wake)
            if req is not None:
                return req
            # c's subtree is held by limits further down (or has nothing that had
            # arrived by the time of the choice): the next one in P order
        return own

def make_scheduler(name: str, profile: TimingProfile) -> FifoScheduler | MClockScheduler:
    """The scheduler called `name` ("mclock" or "fifo") for a device of `profile`."""
    if name == "mclock":
        return MClockScheduler(profile)
    if name == "fifo":
        return FifoScheduler(profile)
    raise ValueError(f"unknown I/O scheduler {name!r}: use mclock or fifo")


SCHEDULERS = ("mclock", "fifo")
