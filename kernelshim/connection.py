"""What the shim server's parts share: a connection's state, the server's limits, and
the attributes every part of the server relies on (`ServerBase`).

The server is split by concern: `server.py` moves frames (accept, read, send queue,
push, dispatch), `fileops.py` serves the file and data operations through the
connection's capability space, `adminops.py` the principals and statistics. They are
mixed into one `ShimServer`; this module is what they have in common.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import errno as _errno
import logging
import math
import mmap
import os
import select
import signal
import socket
import struct
import time
from typing import Any, Callable, Iterable

import trio
import trio._core._run as _trio_run

from blockdev import PrincipalId
from pager import ReclaimSubscription

from .grants import Grant
from .kernel import Kernel
from .loglimit import LogLimiter
from .principals import DEFAULT_COSTLY_RATE, Principal, PrincipalTable
from .processes import start_time
from .rooterror import SluiceError
from .service import Credentials, MetadataService

log = logging.getLogger(__name__)

#: largest file offset a request may name (JSON integers are bounded the same way)
MAX_OFFSET = 1 << 62
#: largest shared buffer a connection may attach
MAX_SHM = 64 << 20
#: connections served at once (each holds a descriptor, a capability space and maybe a
#: buffer); each principal's `connections` bank is well below it
MAX_CONNECTIONS = 512
#: ... of which only root's processes may use the last ROOT_CONNECTIONS, so that
#: tenants together cannot lock the administrator out
ROOT_CONNECTIONS = 32
#: shared buffers of all connections together (bounds the daemon's memory); each
#: principal's `shm` bank is well below it, and the last ROOT_SHM bytes are root's
MAX_SHM_TOTAL = 1 << 30
ROOT_SHM = 128 << 20
#: every tenant (`tenant_of`: a uid's `uid-N` and what it made below it) may hold its
#: first TENANT_CONNECTIONS connections and TENANT_SHM bytes of shared buffers whatever
#: the global caps above say (its own banks still bound them): tenants that fill the
#: caps, each within its own banks, cannot lock another out of its first session (a
#: direct client's default buffer is 8 MiB; `sluice run`, `stats` need a connection
#: and no buffer) (probe 16, F3). What the floors hold is bounded too, by
#: FLOOR_CONNECTIONS and FLOOR_SHM in all: the daemon holds at most MAX_CONNECTIONS +
#: FLOOR_CONNECTIONS connections and MAX_SHM_TOTAL + FLOOR_SHM bytes of buffers
TENANT_CONNECTIONS = 4
TENANT_SHM = 8 << 20
FLOOR_CONNECTIONS = 256
FLOOR_SHM = 512 << 20
#: seconds a new connection has to send its first complete request
HANDSHAKE_SECONDS = 5.0
#: a connection refused (its principal's bank or the global cap is full) gets its
#: error reply and is closed this long after it came, not at once: a tenant that
#: reconnects in a loop beyond its bank then makes the daemon accept and refuse at
#: most one connection per REFUSE_SECONDS per connecting process, instead of as fast
#: as the loop turns (each refusal wakes the refused process: on a busy machine that
#: costs the daemon its CPU); at most REFUSED_HELD such sockets wait (older ones are
#: answered at once beyond)
REFUSE_SECONDS = 0.02
REFUSED_HELD = 64
#: rows per page of `principal_ls` and `stats` (a row is at most ~1 KB as JSON)
PAGE_ROWS = 32
#: large direct requests are served in slices of this size, and give the event loop
#: back between slices once they have held it for HOG_SECONDS
SLICE_BYTES = 256 << 10
HOG_SECONDS = 1e-3
#: bytes of replies and notifications queued for one connection at most
MAX_SEND_QUEUE = 1 << 20
#: while more than this is queued, the connection's requests are not read
SEND_HIGH_WATER = 256 << 10
#: seconds a connection may leave queued output unread before it is closed
SEND_STALL_SECONDS = 10.0
#: notification kinds a connection may subscribe to ("reclaim": release N frames by a
#: deadline; "revoked": a grant was revoked; "notice": free text from the administrator)
PUSH_KINDS = frozenset({"reclaim", "revoked", "notice"})
#: bytes asked of a socket per read
RECV_BYTES = 256 << 10
#: fair share of the event loop between principals (FairTurns): a principal's
#: connections take turns, one step of the loop per batch, and while several principals
#: have work a step serving requests gives the loop back after TURN_SECONDS (alone, a
#: principal's steps last HOG_SECONDS: yielding costs a system call and a task switch)
TURN_SECONDS = 0.1e-3
#: seconds from a direct data request's start during which its schedule points do not
#: give the loop back (kernelshim/budget.py): a FUSE handler's HANDLER_CHECKPOINT_BUDGET
#: (fs/operations.py), bounded by the same turn
REQUEST_CHECKPOINT_BUDGET = TURN_SECONDS
#: seconds after two principals last had steps in one batch during which the short
#: TURN_SECONDS holds
CONTENDED_SECONDS = 0.05
#: while principals compete, a backlogged principal (one that gave up its last turn
#: with work left) starts no step in a batch of the run loop that has already run this
#: long, nor in one where another backlogged principal's step has begun, nor while
#: others wait parked: it parks, and the parked steps are released first come, first
#: served, one a batch (FairTurns.take). So a batch holds one backlogged step, the
#: loop polls its sockets between backlogged steps, and a principal that had nothing
#: left to do (a client waiting for each reply) waits behind the rest of at most one
#: such step and at most one before its own, however many principals are backlogged
BATCH_SECONDS = TURN_SECONDS
#: while principals compete, a step with requests left over ends after the request in
#: progress (and a backlogged step parks before it begins) when the side poll
#: (`FairTurns.quiet_waiting`) finds a request of a principal with no backlog in its
#: socket, its reader waiting for the loop's poll; a principal counts as backlogged
#: there while it gave up a turn with work left within this many batches (the floods'
#: released steps come every few batches: their own readers' wake-ups are no such
#: request)
SIDE_BACKLOG_BATCHES = 8
#: while principals compete, a step of a principal with no backlog (a client waiting
#: for each reply) holds the backlogged principals' steps back for this long after it
#: ends: they stay parked, and the loop sleeps (or the idle poll spins) rather than run
#: them, so that the client's next request, a few tens of µs away, finds the loop idle
#: and the attackers' processes asleep instead of a backlogged step in progress and
#: their clients on the CPUs (anticipation: FairTurns.hold). Not work-conserving for
#: the backlogged: see HOLD_MAX_WAIT for what it costs them
HOLD_SECONDS = 0.3e-3
#: ... but a backlogged step is released at least this often (after the last one was
#: released or began), hold or not: while a principal with no backlog keeps the loop
#: held without a pause, the backlogged principals together still get one step (a
#: TURN_SECONDS quantum and the request that overran it, or less when a request of the
#: holder cuts it short) in every HOLD_MAX_WAIT, and all of the loop whenever nobody
#: holds it. Within that, a hold after a backlogged step lasts no longer than that step
#: times H/K (H principals holding, K backlogged: `FairTurns._hold_gap`), so that every
#: backlogged principal keeps at least 1/(H+K) of the loop
HOLD_MAX_WAIT = 1e-3
#: a principal counts among those holding the loop (H above) for this long after its
#: last hold
HOLDER_SECONDS = 2 * HOLD_MAX_WAIT
#: FairTurns times one batch of the run loop in this many (its loop statistics)
BATCH_SAMPLE = 16
#: costly operations (`stats`, `principal_ls`, principal changes: each walks the
#: principal table) per second per principal, beyond a burst of ADMIN_BURST; a request
#: beyond the rate waits for its turn (its connection's later requests wait behind it).
#: The rate is each principal's `costly_rate` bank (this is its default), charged to
#: the principal and each ancestor below root; root changes it with `principal set`.
ADMIN_RATE = float(DEFAULT_COSTLY_RATE)
ADMIN_BURST = 32


class TokenBucket:
    """`rate` events per second after a burst of `burst`: `delay(now)` takes one and
    says how long its taker must wait for it (0.0: at once). Never refuses: a taker that
    waits keeps later takers behind it, so the rate holds however many wait."""

    __slots__ = ("rate", "burst", "_t")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        #: when the bucket is (or was) full; a taker spends 1/rate of it
        self._t = -math.inf

    def delay(self, now: float, rate: float | None = None) -> float:
        """`rate`: the rate now, if it changed (a bank set on a live mount); the time
        already spent is kept, the burst is counted at the new rate."""
        if rate is not None:
            self.rate = rate
        t = max(self._t, now - self.burst / self.rate) + 1.0 / self.rate
        self._t = t
        return max(0.0, t - now)


class ServiceHistogram:
    """A compact log-scale histogram of request latencies (seconds): 8 buckets per
    power of two from 1 us, so a percentile is within 9% of the exact one. 1.6 KB,
    cheap enough to keep per principal."""

    __slots__ = ("counts", "n", "max_s")
    _PER_OCTAVE = 8
    _BUCKETS = 8 * 28  # 1 us .. 2**28 us (4.5 min)

    def __init__(self) -> None:
        self.counts = array.array("q", bytes(8 * self._BUCKETS))
        self.n = 0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        i = 0 if us <= 1.0 else min(self._BUCKETS - 1, int(math.log2(us) * self._PER_OCTAVE))
        self.counts[i] += 1
        self.n += 1
        if seconds > self.max_s:
            self.max_s = seconds

    def record_zero(self) -> None:
        """`record(0.0)`, cheaper (a request that waited for nothing)."""
        self.counts[0] += 1
        self.n += 1

    def percentile(self, q: float) -> float:
        """The q-quantile in seconds (the geometric middle of its bucket, at most the
        largest value recorded); 0.0 when empty."""
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= rank:
                mid = 2 ** ((i + 0.5) / self._PER_OCTAVE) * 1e-6
                return min(mid, self.max_s)
        return self.max_s

    def summary(self) -> dict[str, float]:
        return {"n": self.n, "p50_ms": self.percentile(0.5) * 1e3,
                "p99_ms": self.percentile(0.99) * 1e3, "max_ms": self.max_s * 1e3}


@dataclasses.dataclass(eq=False)
class Share:
    """One principal's share of the shim server: its turn on the event loop, its rate
    limits, and what its requests cost (kept while it has connections, and after)."""

    #: the task whose step is this principal's now (None: nobody's)
    holder: trio.lowlevel.Task | None = None
    #: tasks of the principal's connections waiting for a turn, in arrival order
    waiters: collections.deque[trio.lowlevel.Task] = dataclasses.field(
        default_factory=collections.deque)
    admin: TokenBucket = dataclasses.field(
        default_factory=lambda: TokenBucket(ADMIN_RATE, ADMIN_BURST))
    #: seconds from a request taken off the socket to its reply written (or queued)
    service: ServiceHistogram = dataclasses.field(default_factory=ServiceHistogram)
    #: ... of which waiting for the principal's turn or a rate limit
    waited: ServiceHistogram = dataclasses.field(default_factory=ServiceHistogram)
    #: turns that had to wait for another connection of the principal
    turns_waited: int = 0
    #: the batch of the run loop in which the principal last had its step
    spent: int = -1
    #: the last batch in which it gave up its turn with work left (`FairTurns.backlogged`;
    #: long before the first batch: never)
    backlog: int = -(1 << 62)
    #: steps parked to a later batch (FairTurns.take: BATCH_SECONDS)
    parked: int = 0
    #: the last batch in which a socket of it ended a step by the side poll and its
    #: reader then served no complete request (`FairTurns.watch`: a dribbled byte, a
    #: partial frame); it counts there as backlogged for SIDE_BACKLOG_BATCHES batches
    side_miss: int = -(1 << 62)
    #: the batch in which its current (or last) step began (FairTurns._begin)
    stepped: int = -1


def tenant_of(p: Principal) -> Principal:
    """The tenant `p` belongs to: the top-most principal below root in its chain (root
    for root). Only root makes principals directly below root (a uid's default `uid-N`
    is one, and so is any principal root makes for a user or a group); everything a
    tenant makes itself (`principal add --parent` a principal it owns) lies below one
    of them, so the tree below such a principal is one tenant's, whatever it does."""
    while p.parent is not None and p.parent.parent is not None:
        p = p.parent
    return p


def order_batches() -> bool:
    """Make trio run every batch of this process's run loops in the order of its run
    queue, newest first, instead of that order or its reverse at random; True if that
    took effect (FairTurns then puts the requests of a poll first: `ordered`).

    trio reverses half its batches at random so that programs do not come to rely on an
    order (trio 0.35, `unrolled_run`: `if _r.random() < 0.5: batch.reverse()`, then the
    batch runs from its end). The daemon relies on none; what it needs is that a request
    the poll brings runs before the steps of backlogged work already runnable, and a
    random order let half of them wait behind those (docs/BENCHMARKS.md, "Stop 18").
    Under Hypothesis (`_ALLOW_DETERMINISTIC_SCHEDULING`, a test process) trio shuffles
    every batch from a seeded generator instead: nothing is changed then. Called once by
    the daemon (fs/mount.py) before it serves; trio is pinned to 0.35 (pyproject.toml)."""
    if getattr(_trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True):
        return False
    r = getattr(_trio_run, "_r", None)
    if r is None or not hasattr(r, "random") or not hasattr(r, "uniform"):
        return False
    # trio draws from `_r` once more: each SystemClock's random offset (`_r.uniform`,
    # which calls `random()`); that one stays random (review victim7, V7-2). `shuffle`
    # (Hypothesis' path) draws with `getrandbits`, not `random()`.
    real = r.random
    r.uniform = lambda a, b: a + (b - a) * real()
    r.random = _never_reversed
    return True


def _never_reversed() -> float:
    return 1.0  # (`_r.random() < 0.5` is never true: the batch keeps its order)


class FairTurns(trio.abc.Instrument):
    """Fair share of the event loop between tenants, by turns.

    The turns are a tenant's (`tenant_of`: the principal tree below a top-most
    principal, such as a uid's `uid-N`), not each principal's: a tenant that makes
    child principals and connects as each of them gets no more turns than with one
    (probe finding 13). Below, "principal" means the tenant whose turn it is; each
    principal's own statistics (latency, rate limits) stay its own (`Share`).

    Every connection is served by its own task, and one principal may have many
    (up to its `connections` bank). Unchecked, a batch of the trio run loop runs one
    step of every runnable task, so a principal with 60 busy connections gets 60 steps
    for every step of a principal with one. Here a task must `take` its principal's
    turn before serving a request. The turn is the principal's for one step of that
    task (until it next blocks or yields: `after_task_step`); then the principal's next
    waiting task, in arrival order, is rescheduled with the turn, and so runs in the
    next batch (trio runs what is rescheduled during a batch in the next one). A task
    asking for a turn its principal already used in this batch (`before_io_wait`
    counts the batches) holds it from the next batch on. So each principal has at most
    one task serving requests per batch of the loop, whatever its number of
    connections, and while two principals or more have work (had turns in one batch
    within CONTENDED_SECONDS) a step serving requests ends after TURN_SECONDS: a
    request of another principal waits for at most one short step of each principal
    with work, not for all of their connections. (Alone, a principal's steps last
    HOG_SECONDS, as every long request's do: a pipelining client pays no more yields
    than before.) A request that blocks (I/O, a lock) gives the turn away
    at once, so a principal's connections still overlap their waits.

    A batch also has a budget while principals compete: a *backlogged* principal (it
    gave up its last turn, in this batch or the one before, with work left: its
    quantum ran out, or another of its connections waited for the turn) does not start
    a step in a batch that has run BATCH_SECONDS of wall time already, nor in one where
    another backlogged principal's step has begun, nor while others wait parked; it
    parks (the turn kept) in a queue, and the head of the queue is released as the
    backlogged step of each batch. So a batch holds one backlogged step
    besides the principals that had nothing left to do, the backlogged principals take
    the batches in turn, in the order they parked (none waits longer than one batch per
    other backlogged principal), and the loop polls its sockets between backlogged
    steps: a request of an idle principal waits for the rest of at most one such step
    and at most one before its own, not for one step of every backlogged principal
    (two hostile uids: bench_hostile). A parked step costs nothing until released (it
    is not runnable: the batch budget alone made each parked step a step of its own
    every batch, 0.03-0.06 ms each, run ahead of other principals' requests). A
    principal alone never parks. The server's admission work (accepting and refusing
    connections) takes a turn of its own, always backlogged (`admission`).

    And a request the poll brings goes before the backlogged step of its batch: the
    released step is runnable when the loop polls, and trio runs a batch in order or
    reversed at random, so half the requests of a principal with nothing left over
    waited behind a whole backlogged step in the batch that picked them up. While
    principals compete, `_PollWatch` notes the tasks each poll wakes (`_fresh`) unless
    they are backlogged work (`waiting_for`: a backlogged tenant's reader or writer, the
    accept loop); a released step that finds one not yet run goes back to the head of
    the queue as the next batch's backlogged step (`_park`), once, and no step is
    released for the next batch until it has decided (`_deciding`). A backlogged
    principal then waits at most two batches per other backlogged principal.

    And with ordered batches (`order_batches`: the daemon has trio run every batch in
    queue order, not reversed at random) the poll's tasks that are not backlogged work
    are moved to the end of the run queue after each poll (`_fresh_first`), which trio
    runs first: a request of a principal with no backlog runs before every step that
    was runnable when the poll brought it (a released backlogged step, the floods'
    handed-over turns, admission work), not only before the backlogged step (measured:
    docs/BENCHMARKS.md, "Stop 18: victim7").

    And a request that comes *during* a batch does not wait for the rest of it: trio
    polls only between batches, so it waited for the step in progress (a backlogged
    step's quantum and the request that overran it) and every step after it in the
    batch. A side epoll set (`watch`: the sockets of connections whose reader waits for
    them; level-triggered, apart from trio's) is looked at with a non-blocking
    `epoll_wait` (`quiet_waiting`) while principals compete: after each request of a
    step that has requests left over (server.py: the step ends there, backlogged, as
    when its quantum is used), before a backlogged step begins (`_over_budget`: it
    parks) and when a released one is woken (`_park`: it goes to the head of the
    queue, once, as for `_fresh`). Only a request of a principal with no backlog
    (`SIDE_BACKLOG_BATCHES`) whose reader waits counts; any other readable socket (a
    flood's, a reader held back by its send queue) leaves the set until its reader
    waits again. So such a request waits for the request in progress, not a quantum,
    and the batch ends at that step (`preempted` counts the cuts). Each look is one
    system call, made only while principals compete and only by steps that would go
    on or begin backlogged.
    A tenant whose counted socket brought no complete request (a dribbled byte or
    partial frame: every look positive, every backlogged step cut to one request)
    counts as backlogged there for SIDE_BACKLOG_BATCHES batches (`watch`,
    `Share.side_miss`): it cuts at most one step in that many batches.

    And the loop waits a little for the principal that is not backlogged (`hold`,
    anticipation): a client that waits for each reply sends its next request a few
    tens of µs after the last one's reply, and found the loop in a backlogged step (or
    the batch in progress) and the floods' client processes, woken by their replies,
    on the CPUs. While principals compete, the end of a step of a principal with no
    backlog (`after_task_step`) holds the parked steps for HOLD_SECONDS: none is
    released and no backlogged step begins (`_over_budget`), so the loop sleeps in its
    poll and the next request finds it idle. The loop thread waits for it by polling
    (`before_io_wait`: `ready`, a non-blocking look at the loop's epoll descriptor, as
    the idle poll does, fs/idlepoll.py) until the hold's end, then wakes the loop so
    that the parked steps go on: a poll bounded by HOLD_SECONDS that costs no task
    step (a timer task's wake-up, a cancel scope's deadline, cost 0.04-0.07 ms of
    the loop each). The backlogged principals are not starved: a backlogged step is
    released at least every HOLD_MAX_WAIT (`_backlog_ran`), whatever the holds, and
    when nobody holds the loop they have all of it. Nor held beyond their fair share:
    after a backlogged step of d seconds, the loop is held for at most d * H / K
    (`_hold_gap`: H principals that held the loop lately, K backlogged ones parked or
    running), so that the backlogged steps have at least K/(H+K) of the loop's time,
    each backlogged principal (served in turn) 1/(H+K) — its fair share — whatever
    the holders do (a hold's idle time is charged to the holders). Without `ready` (the server sets
    it from the mount's idle poll; off: `--idle-poll 0`) nothing is held.
    """

    def __init__(self, uncork: Callable[[Connection], None]) -> None:
        self.shares: dict[int, Share] = {}
        self._held: dict[trio.lowlevel.Task, Share] = {}
        #: batches of the run loop so far
        self._batch = 0
        #: connections whose replies of this step go out together when it ends (one
        #: system call, one wake-up of the client, instead of one per reply)
        self._corked: dict[trio.lowlevel.Task, Connection] = {}
        self._uncork = uncork
        #: how long the batches of the run loop took (one in BATCH_SAMPLE, a fair
        #: sample: see `after_io_wait`; the OS's clocks, not trio's: this
        #: is about the OS scheduling the loop thread; wall clock: how long a socket
        #: that became readable may wait for the loop), and of that, seconds the loop
        #: thread ran on a CPU (the rest it was runnable but the OS ran others, or it
        #: was in a blocking system call)
        self.batches = ServiceHistogram()
        #: ... and the loop thread's CPU time in each batch: what a request arriving
        #: during a batch waits for it in CPU terms, whatever else the machine runs
        self.batches_cpu = ServiceHistogram()
        self.batch_wall = 0.0
        self.batch_cpu = 0.0
        self._wall0 = self._cpu0 = 0.0
        #: batches until the next one timed (see `after_io_wait`)
        self._sample = 0
        #: the principal whose turn ended first in this batch (None: none yet), and
        #: until when steps are short: another principal had a turn in the same batch
        self._first: Share | None = None
        self.contended_until = -math.inf
        #: when the current batch began (trio's clock, after the poll)
        self._batch_t0 = 0.0
        #: steps parked to a later batch (BATCH_SECONDS), all principals
        self.parked = 0
        #: released parked steps that let the requests of a poll go first (`_park`)
        self.deferred = 0
        #: steps of backlogged principals begun in this batch (`_over_budget`)
        self._backlogged_steps = 0
        #: parked steps released in this batch to run in the next (`after_task_step`)
        self._released = 0
        #: the principal released as the backlogged step of the next batch (None: none,
        #: or several at once), and of this batch
        self._next: Share | None = None
        self._current: Share | None = None
        #: the poll brought requests (`_fresh`) into a batch with a released backlogged
        #: step that has not run yet: until it has decided whether they go first
        #: (`_park`), no step is released for the next batch (the one it would
        #: go behind)
        self._deciding = False
        #: parked steps (their tasks and principals), in the order they parked
        self._parked: collections.deque[tuple[trio.lowlevel.Task, Share]] = \
            collections.deque()
        #: the turn of the server's admission work (accepting connections, identifying
        #: and charging them, answering refused ones): a tenant that connects in a loop
        #: makes it, before it is known whose it is. While principals compete it is
        #: always backlogged (`admit`), so it takes batches in turn with the
        #: backlogged principals instead of adding a step to each batch.
        self.admission = Share()
        #: tasks that wait for a socket on a principal's behalf: a connection's reader
        #: (its tenant's turn) and the accept loop (`admission`); see `waiting_for`
        self._waiters_for: dict[trio.lowlevel.Task, Share] = {}
        #: tasks the last poll of the loop woke that are not backlogged work (a request
        #: of a principal with no backlog, a FUSE request, ...) and that have not had
        #: their step in this batch yet: a backlogged step meeting one goes to the next
        #: batch first (`_park`, `_over_budget`), since trio runs a batch in order or
        #: reversed at random
        self._fresh: set[trio.lowlevel.Task] = set()
        #: whether the loop is in its poll (`before_io_wait` .. `after_io_wait`)
        self._polling = False
        #: the instrument that notes the poll's wake-ups, added only while principals
        #: compete (a hook on every reschedule costs every step a call)
        self._watch: _PollWatch | None = None
        #: the side poll (`quiet_waiting`): the sockets of connections whose reader
        #: waits for them (`watch`), level-triggered (None: none yet), and whose they are
        self._side: select.epoll | None = None
        self._side_conns: dict[int, Connection] = {}
        #: steps cut short, or parked before they began, because the side poll found a
        #: request of a principal with no backlog waiting (statistics)
        self.preempted = 0
        #: bursts of pipelined overwrites relocated together, the write requests they
        #: served, and the loop thread's CPU seconds in them (ShimServer._write_burst;
        #: statistics)
        self.bursts = self.burst_writes = 0
        self.burst_cpu = 0.0
        #: connections whose socket the side poll counted (`quiet_waiting`) and whose
        #: reader has not served a complete request since (the server takes a connection
        #: out when it decodes one); one that waits again still here made a cut for
        #: nothing (`watch`: its tenant loses the side poll for a while)
        self.side_hits: set[Connection] = set()
        #: such cuts for nothing (statistics)
        self.side_misses = 0
        #: the hold (`hold`): until when the step of a principal with no backlog that
        #: ended last holds the backlogged steps back, and when a backlogged step was
        #: last released or began (a hold never lasts HOLD_MAX_WAIT past it)
        self._hold_until = -math.inf
        self._backlog_ran = -math.inf
        #: how long past `_backlog_ran` the loop may be held: the last backlogged step's
        #: time times H/K, at most HOLD_MAX_WAIT (`_backlog_ended`; 0 before the first)
        self._hold_gap = 0.0
        #: the backlogged step in progress (None: none) and when it began
        self._backlog_step: Share | None = None
        self._backlog_began = 0.0
        #: principals with no backlog that held the loop lately: when each last did
        self._holders: dict[Share, float] = {}
        #: whether a descriptor the loop waits for has an event, without taking it (the
        #: idle poll's probe, set by the server; None: nothing is held)
        self.ready: Callable[[], bool] | None = None
        #: whether the loop may wait for an event now, spinning on `ready` (the idle
        #: poll's own conditions: serving, no backoff pause, the machine not
        #: overloaded; set by the server, None: always): a hold spins the loop thread,
        #: so it is not taken when an idle poll would not be (review of victim4, R2)
        self.may_hold: Callable[[], bool] | None = None
        #: times the loop went to sleep with parked steps held back (statistics)
        self.held = 0
        #: trio runs every batch in run-queue order (`order_batches`, set by the
        #: daemon): the poll's requests are then put first (`_fresh_first`)
        self.ordered = False
        #: steps serving a request that took no turn (a FUSE request: `serves`), and
        #: whose tenant's share they count as
        self._serving: dict[trio.lowlevel.Task, Share] = {}
        #: the tenants whose requests that took no turn (`serves`) had steps in this batch
        self._served: set[Share] = set()

    def cork(self, conn: Connection) -> None:
        """Gather `conn`'s output until the current step ends (see `after_task_step`)."""
        if not conn.corked:
            conn.corked = True
            self._corked[trio.lowlevel.current_task()] = conn

    def uncork_now(self, conn: Connection) -> None:
        """Send `conn`'s output gathered in this step now, not when the step ends (the
        step goes on: it polls for the client's next request, `ShimServer._poll_next`)."""
        if conn.corked:
            conn.corked = False
            self._corked.pop(trio.lowlevel.current_task(), None)
            self._uncork(conn)

    def waiting_for(self, task: trio.lowlevel.Task, sh: Share | None) -> None:
        """`task` waits for a socket on behalf of `sh`'s principal (None: no longer),
        so that a wake-up of it by the poll counts as `sh`'s work: backlogged work when
        `sh` is backlogged (a flood's reader, the accept loop under churn), else a
        request that goes before the backlogged step of the batch it comes in."""
        if sh is None:
            self._waiters_for.pop(task, None)
        else:
            self._waiters_for[task] = sh

    def watch(self, conn: Connection) -> None:
        """`conn`'s reader is about to wait for its socket: keep the socket in the side
        poll (one `epoll_ctl` when it is not there already; a reader that waits for
        every request pays it once).

        A connection whose socket the side poll counted (`quiet_waiting`) and whose
        reader comes back here without having served a complete request (a byte, a
        partial frame, dribbled to make every look positive) cut a step for nothing:
        its tenant counts as backlogged there for SIDE_BACKLOG_BATCHES batches
        (`Share.side_miss`), so that it cuts no more than one step in that many
        batches."""
        hits = self.side_hits
        if hits and conn in hits:
            hits.discard(conn)
            if conn.turn is not None:
                conn.turn.side_miss = self._batch
            self.side_misses += 1
        if conn.side:
            return
        side = self._side
        if side is None:
            side = self._side = select.epoll()
        fd = conn.sock.fileno()
        old = self._side_conns.pop(fd, None)
        if old is not None:
            # A descriptor closed without unwatch, then reused: the kernel dropped the
            # old socket's entry when it closed (modify would fail, ENOENT, and leave
            # the new connection unwatched). Take out whatever is left, then register.
            old.side = False
            try:
                side.unregister(fd)
            except OSError:
                pass
        try:
            side.register(fd, select.EPOLLIN)
        except FileExistsError:
            # (the old socket still open elsewhere, a dup: its entry stays the kernel's;
            # point it at this connection's events)
            try:
                side.modify(fd, select.EPOLLIN)
            except OSError:
                return
        except OSError:
            return
        conn.side = True
        self._side_conns[fd] = conn

    def unwatch(self, conn: Connection) -> None:
        """Take `conn`'s socket out of the side poll (before it is closed, or when it is
        readable and no request that goes first: see `quiet_waiting`)."""
        self.side_hits.discard(conn)
        if not conn.side:
            return
        conn.side = False
        fd = conn.sock.fileno()
        if self._side_conns.get(fd) is conn:
            del self._side_conns[fd]
            if self._side is not None:
                try:
                    self._side.unregister(fd)
                except OSError:
                    pass

    def serves(self, principal: Principal) -> None:
        """The current step serves a request of `principal` that took no turn: a FUSE
        request (fs/operations.py; its handlers run as the kernel sends them, in
        pyfuse3's workers). When the step ends it counts as a step of the tenant's
        (`turn_of`) for what the turns learn from steps: principals competing (the
        short quantum while they do) and, for a tenant with no backlog, the hold — a
        program that waits for each reply through the mount sends its next request a
        few tens of µs after the last one's, as a direct client does. A step that is a
        turn's already stays that turn's."""
        task = trio.lowlevel.current_task()
        if task not in self._held:
            self._serving[task] = self.turn_of(principal)

    def quiet_waiting(self) -> bool:
        """Whether a request of a principal with no backlog is in its socket while its
        reader waits for the loop's poll to wake it (a non-blocking look at the side
        poll: one system call). A readable socket that is not that (a backlogged
        tenant's, one whose reader does not wait) leaves the side poll until its reader
        waits again (`watch`), so that it is not seen at every look. A tenant whose
        socket was counted and whose reader then served no complete request counts as
        backlogged (`Share.side_miss`, see `watch`)."""
        side = self._side
        if side is None or not self._side_conns:
            return False
        oldest = self._batch - SIDE_BACKLOG_BATCHES
        for _ in range(16):  # (bounded, whatever the kernel answers)
            try:
                ready = side.poll(0, 8)
            except OSError:
                return False
            if not ready:
                return False
            for fd, _ev in ready:
                conn = self._side_conns.get(fd)
                if conn is not None:
                    turn = conn.turn
                    if conn.reading and turn is not None and turn.backlog < oldest \
                            and turn.side_miss < oldest:
                        self.side_hits.add(conn)
                        return True
                    del self._side_conns[fd]
                    conn.side = False
                try:  # (each round takes the sockets it saw out: the loop ends)
                    side.unregister(fd)
                except OSError:
                    pass
        return False

    def part_done(self, since: float, now: float) -> bool:
        """Whether a step doing work in parts (`stats`' parts, a teardown's slots, the
        refusals) gives the loop back after the part that just ended: its quantum
        (from `since`, the step's start) is used, or — while principals compete — a
        request of a principal with no backlog came during it (`quiet_waiting`), which
        then waits for that part and not for the rest of a quantum."""
        if now - since >= self.quantum(now):
            return True
        if now < self.contended_until and self.quiet_waiting():
            self.preempted += 1
            return True
        return False

    def close(self) -> None:
        """Close the side poll (the server stops)."""
        if self._side is not None:
            self._side.close()
            self._side = None
        for conn in self._side_conns.values():
            conn.side = False
        self._side_conns.clear()
        self.side_hits.clear()

    def _woken(self, task: trio.lowlevel.Task) -> None:
        """The poll woke `task` (`_PollWatch`): note it unless it is backlogged work."""
        sh = self._waiters_for.get(task)
        if sh is None or sh.backlog < self._batch - 1:
            self._fresh.add(task)

    def share(self, principal: int) -> Share:
        sh = self.shares.get(principal)
        if sh is None:
            sh = self.shares[principal] = Share()
        return sh

    def turn_of(self, principal: Principal) -> Share:
        """The share whose turn `principal`'s connections take: its tenant's
        (`tenant_of`), so that making child principals gives a tenant no more turns."""
        return self.share(tenant_of(principal).id)

    async def take(self, sh: Share) -> None:
        """Make the current step `sh`'s turn: at once (no checkpoint) if the turn is
        free and unused in this batch, or already this task's, and `sh` need not park
        (BATCH_SECONDS); else wait for it (a checkpoint)."""
        task = trio.lowlevel.current_task()
        if sh.holder is task:
            if self._over_budget(sh):
                await self._park(sh)
            self._begin(sh, task)
            return
        if sh.holder is None:
            sh.holder = task
            if sh.spent == self._batch:
                # Used in this batch: ours from the next one (a shielded yield, so the
                # turn cannot be left reserved by a cancelled task).
                await trio.lowlevel.cancel_shielded_checkpoint()
            if self._over_budget(sh):
                await self._park(sh)
            self._begin(sh, task)
            return
        sh.turns_waited += 1
        sh.waiters.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            sh.waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # handed over: see below
        if self._over_budget(sh):
            await self._park(sh)
        self._begin(sh, task)

    def _begin(self, sh: Share, task: trio.lowlevel.Task) -> None:
        """The current step is `sh`'s turn (counted once a batch: see `_over_budget`)."""
        self._held[task] = sh
        if sh.stepped != self._batch:
            sh.stepped = self._batch
            if sh.backlog >= self._batch - 1:
                self._backlogged_steps += 1
                if self.ready is not None:
                    self._backlog_ran = trio.current_time()
        if self._backlog_step is None and self.ready is not None and \
                sh.backlog >= self._batch - 1:
            # (a released step too: its `stepped` was set when it was released)
            self._backlog_step, self._backlog_began = sh, trio.current_time()

    def take_nowait(self, sh: Share) -> bool:
        """`take` when it would not wait: make the current step `sh`'s turn and return
        True if the turn is this task's already or free and unused in this batch, and
        `sh` need not park; else False, nothing done (the caller awaits `take`). The
        data path's per-request check, without a coroutine or a clock read."""
        task = trio.lowlevel.current_task()
        holder = sh.holder
        if holder is None:
            if sh.spent == self._batch:
                return False
            if sh.backlog >= self._batch - 1 and self._over_budget(sh):
                return False
            sh.holder = task
        elif holder is not task or (sh.backlog >= self._batch - 1 and self._over_budget(sh)):
            return False
        self._begin(sh, task)  # (counts a backlogged step: one a batch, see _over_budget)
        return True

    def _over_budget(self, sh: Share) -> bool:
        """Whether `sh` must park now. Only a backlogged principal while principals
        compete: when the batch has run BATCH_SECONDS already; or, for a step it has
        not begun in this batch, when another backlogged step has (one a batch), or
        when others wait parked (they go first: `_park`)."""
        if sh.backlog < self._batch - 1:
            return False
        now = trio.current_time()
        if now >= self.contended_until:
            return False
        if now - self._batch_t0 > BATCH_SECONDS:
            return True
        if sh.stepped == self._batch:
            return False  # its own step, going on
        if now < self._hold_until and self._holding(now):
            return True  # the loop is kept for a principal with no backlog (`hold`)
        # Tasks the poll woke that are not backlogged work and have not run yet, and
        # requests of principals with no backlog that came since the poll: they go
        # first (the step goes to the next batch: `_park`).
        if self._backlogged_steps or self._parked or self._fresh:
            return True
        if self.quiet_waiting():
            self.preempted += 1
            return True
        return False

    async def _park(self, sh: Share) -> None:
        """Wait in the queue of parked steps (the turn stays `sh`'s, reserved by its
        holder) until it is released as the backlogged step of a batch: the head of the
        queue, one a batch, while principals compete (all at once when they stop). The
        head is released for the next batch when a step parks or a turn's step ends
        (rescheduled then, it keeps the loop from sleeping), else when the next batch
        begins (`after_io_wait`). Not cancellable (a cancelled task would leave the
        turn reserved); the queue moves every batch (every HOLD_MAX_WAIT at worst while a
        principal with no backlog holds the loop: `hold`), so a cancellation waits for at
        most that per backlogged principal."""
        task = trio.lowlevel.current_task()
        # A parked step is no turn: the step it ends must not hand the turn on.
        self._held.pop(task, None)
        sh.backlog = self._batch
        sh.parked += 1
        self.parked += 1
        first = False  # whether it was released once and let a poll's requests go first
        while True:
            # (a step released once and deferred goes next, hold or not: the hold's
            # bound, HOLD_MAX_WAIT, has passed for it)
            held = not first and self._holding(trio.current_time())
            if not self._released and not self._deciding and (first or not self._parked) \
                    and not held:
                # Nobody else waits (or it goes first): the next batch's backlogged step.
                sh.stepped = self._batch + 1
                self._released = 1
                self._next = sh
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                if not self._released and not self._deciding and not held:
                    self._released = self._release_parked(self._batch + 1, everyone=False)
                if first:
                    self._parked.appendleft((task, sh))
                else:
                    self._parked.append((task, sh))
                await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            if sh is self._current:
                self._deciding = False
            if first or sh.stepped != self._batch:
                return
            if self._fresh:
                # Released into a batch with requests the poll just brought that have
                # not run yet (trio ran this step first: it runs a batch in order or
                # reversed at random): they go first, and this step waits again at the
                # head of the queue. Once: the next batch's poll may bring more, but this
                # step runs then.
                self.deferred += 1
            elif self.quiet_waiting():
                # A request of a principal with no backlog came during this batch: the
                # batch ends without this step, the next poll picks the request up.
                self.preempted += 1
            else:
                return
            first = True

    def _release_parked(self, batch: int, *, everyone: bool | None = None) -> int:
        """Release the head of the parked queue to run in `batch` as its backlogged
        step (everyone, once principals no longer compete); how many were released."""
        if everyone is None:
            everyone = trio.current_time() >= self.contended_until
        n = len(self._parked) if everyone else 1
        for _ in range(n):
            task, sh = self._parked.popleft()
            sh.stepped = batch
            trio.lowlevel.reschedule(task)
        one = sh if n == 1 else None
        self._backlog_ran = trio.current_time()
        if one is not None and self.ready is not None:
            # (its `backlog` is the batch it parked in, long ago after holds: `_begin`
            # would not know it for a backlogged step)
            self._backlog_step, self._backlog_began = one, self._backlog_ran
        if batch == self._batch:
            self._current = one
        else:
            self._next = one
        return n

    def hold(self, now: float, sh: Share | None = None) -> None:
        """A step of principal `sh` (with no backlog) ended at `now`, principals
        competing: hold the backlogged steps back for HOLD_SECONDS (see the class
        docstring)."""
        if sh is not None:
            self._holders[sh] = now
        if self._backlog_ran < now - self._hold_gap:
            # The first hold in a while (or after HOLD_MAX_WAIT of holds without a
            # backlogged step: then it ends at once, the next parked step goes).
            if not self._parked:
                self._backlog_ran = now
        if self.may_hold is None or self.may_hold():
            self._hold_until = now + HOLD_SECONDS
        if self._parked:
            # Parked work and a principal with work of its own: they compete, though
            # they no longer share a batch.
            self.contended_until = max(self.contended_until, now + CONTENDED_SECONDS)

    def _holding(self, now: float) -> bool:
        """Whether parked steps are held back now (`hold`)."""
        return now < self._hold_until and now < self._backlog_ran + self._hold_gap

    def _backlog_ended(self, sh: Share, now: float) -> None:
        """A backlogged step of `sh` that began at `_backlog_began` ended at `now`: the
        loop may be held after it for its time times H/K (the fairness bound: see the
        class docstring), HOLD_MAX_WAIT at most."""
        ran = now - self._backlog_began
        self._backlog_step = None
        since = now - HOLDER_SECONDS
        holders = self._holders
        for h in [h for h, t in holders.items() if t < since]:
            del holders[h]  # (at most the principals that stepped in HOLDER_SECONDS)
        backlogged = {s for _, s in self._parked}
        backlogged.add(sh)
        self._hold_gap = min(HOLD_MAX_WAIT, ran * max(len(holders), 1) / len(backlogged))
        self._backlog_ran = now

    def backlogged(self, sh: Share) -> None:
        """`sh` gives up its turn with work left (its quantum ran out)."""
        sh.backlog = self._batch

    async def admit(self) -> None:
        """Take the admission turn (`admission`) for one step of admission work."""
        sh = self.admission
        sh.backlog = self._batch
        await self.take(sh)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._corked:
            conn = self._corked.pop(task, None)
            if conn is not None:
                conn.corked = False
                self._uncork(conn)  # never raises (an instrument that raises is dropped)
        if self._fresh:
            self._fresh.discard(task)
        sh = self._held.pop(task, None)
        if sh is None:
            if self._serving:
                sh = self._serving.pop(task, None)
                if sh is not None:
                    self._stepped(sh, turn=False)
            return
        if sh is self._backlog_step:
            self._backlog_ended(sh, trio.current_time())
        self._stepped(sh)
        if sh.waiters:
            sh.backlog = self._batch  # another connection of the principal has work
            nxt = sh.waiters.popleft()
            sh.holder = nxt
            self._held[nxt] = sh
            trio.lowlevel.reschedule(nxt)  # runs in the next batch
        else:
            sh.holder = None
            sh.spent = self._batch

    def _stepped(self, sh: Share, *, turn: bool = True) -> None:
        """A step of `sh`'s ended (`turn`: a turn's, else a request's that took none:
        `serves`): the hold, the next parked step's release, and whether principals
        compete. FUSE requests of two tenants alone are no competition here: the turns
        shorten and order the shim's steps, and the kernel's queue and the fair intake
        order the FUSE requests (fs/operations.py); a FUSE request beside another
        tenant's shim step is."""
        if self.ready is not None and sh is not self.admission and \
                sh.backlog < self._batch - 1 and \
                sh.side_miss < self._batch - SIDE_BACKLOG_BATCHES:
            now = trio.current_time()
            if now < self.contended_until:
                self.hold(now, sh)
        if self._parked and not self._released and not self._deciding and \
                not self._holding(trio.current_time()):
            # The next batch's backlogged step: rescheduled now, so that the loop does
            # not sleep with it parked (and it costs no step of its own to wake).
            self._released = self._release_parked(self._batch + 1)
        if sh is self.admission:
            pass  # admission alone beside one principal is no competition
        elif not turn:
            self._served.add(sh)
            if self._first is not None and self._first is not sh:
                self._contended()
        elif self._first is None:
            self._first = sh
            if self._served and (len(self._served) > 1 or sh not in self._served):
                self._contended()
        elif self._first is not sh:
            self._contended()

    def _contended(self) -> None:
        """Principals compete (see `quantum`) for CONTENDED_SECONDS from now."""
        self.contended_until = trio.current_time() + CONTENDED_SECONDS
        if self._watch is None:
            self._watch = _PollWatch(self)
            trio.lowlevel.add_instrument(self._watch)

    def quantum(self, now: float) -> float:
        """How long a step serving requests may last now."""
        return TURN_SECONDS if now < self.contended_until else HOG_SECONDS

    def before_io_wait(self, timeout: float) -> None:
        self._batch += 1
        self._first = None
        if self._served:
            self._served.clear()
        if self._watch is not None:
            self._fresh.clear()  # (all ran: a batch runs every task in it)
            self._polling = True
        self._backlogged_steps, self._released = self._released, 0
        self._current, self._next = self._next, None
        self._deciding = False
        if self._wall0:
            wall = time.perf_counter() - self._wall0
            self.batches.record(wall)
            self.batch_wall += wall
            cpu = time.thread_time() - self._cpu0
            self.batches_cpu.record(cpu)
            self.batch_cpu += cpu
            self._wall0 = 0.0
        if self._parked and timeout > 0:
            now = trio.current_time()
            if self._holding(now) and self.ready is not None:
                # Held for a principal with no backlog: wait for its next request (or
                # any other event) until the hold's end, then wake the loop as below.
                self.held += 1
                end = min(self._hold_until, self._backlog_ran + self._hold_gap, now + timeout)
                ready = self.ready
                while True:
                    try:
                        if ready():
                            break
                    except Exception:  # noqa: BLE001 - an instrument that raises is dropped
                        self.ready = None  # (nothing is held any more; the turns go on)
                        trio.lowlevel.current_trio_token().run_sync_soon(_nothing)
                        break
                    if trio.current_time() >= end:
                        trio.lowlevel.current_trio_token().run_sync_soon(_nothing)
                        break
            else:
                # Nothing is runnable, none was released: the loop would sleep with
                # steps parked. Wake it at once (after_io_wait releases one).
                trio.lowlevel.current_trio_token().run_sync_soon(_nothing)

    def after_io_wait(self, timeout: float) -> None:
        self._batch_t0 = now = trio.current_time()
        if self._watch is not None:
            self._polling = False
            if now >= self.contended_until and not self._parked:
                trio.lowlevel.remove_instrument(self._watch)
                self._watch = None
                self._fresh.clear()
        if self._parked and not self._backlogged_steps and not self._holding(now):
            self._backlogged_steps = self._release_parked(self._batch)
        if self._fresh and self.ordered:
            try:
                self._fresh_first()
            except Exception:  # noqa: BLE001 - an instrument that raises is dropped
                self.unordered()
        if self._fresh and self._current is not None:
            self._deciding = True
        # Only one batch in BATCH_SAMPLE is timed: the thread's CPU clock is a system
        # call (no vDSO), and two of them per batch were a tenth of the daemon's CPU
        # time per random 4 KiB FUSE read (docs/BENCHMARKS.md, "bench_fs regression
        # check: bisection"). The batches timed are a fair sample of them all.
        self._sample -= 1
        if self._sample <= 0:
            self._sample = BATCH_SAMPLE
            self._wall0 = time.perf_counter()
            self._cpu0 = time.thread_time()

    def unordered(self) -> None:
        """Stop reordering trio's run queue, with one log line (called where reordering
        raised). trio's private run queue is then not what trio 0.35 had; an instrument
        that raises is dropped, and a FairTurns dropped by trio would never release its
        parked steps, which wait uncancellably. Unordered is what the loop did before
        (review victim7, V7-1)."""
        self.ordered = False
        log.exception("FairTurns: cannot reorder trio's run queue; the poll's requests "
                      "no longer go first in their batch")

    def _fresh_first(self) -> None:
        """Put the tasks the poll just woke that are not backlogged work (`_fresh`) at
        the end of trio's run queue: with the batch in queue order (`order_batches`),
        trio runs them first, before the steps of backlogged work that were runnable
        before the poll (a released backlogged step, the floods' handed-over turns,
        admission work). Only while principals compete (`_fresh` is noted then). The
        tasks trio wakes after this hook in the same pass (expired deadlines,
        `wait_all_tasks_blocked`, MockClock's autojump), and those rescheduled during a
        batch, go to the head of the queue as they come (`_PollWatch`), which runs
        last (review victim7, V7-3)."""
        runq = _trio_run.GLOBAL_RUN_CONTEXT.runner.runq
        if len(runq) < 2:
            return
        fresh = self._fresh
        if len(fresh) == 1 and runq[-1] in fresh:
            return  # (the common case: already last)
        first = [t for t in runq if t in fresh]
        if not first:
            return
        rest = [t for t in runq if t not in fresh]
        runq.clear()
        runq.extend(rest)
        runq.extend(first)

    def reset_statistics(self) -> None:
        self.batches = ServiceHistogram()
        self.batches_cpu = ServiceHistogram()
        self.batch_wall = self.batch_cpu = 0.0
        self.parked = self.deferred = self.preempted = self.side_misses = self.held = 0
        self.bursts = self.burst_writes = 0
        self.burst_cpu = 0.0


class _PollWatch(trio.abc.Instrument):
    """FairTurns' eye on the loop's poll, while principals compete: which tasks the poll
    woke (`task_scheduled` between `before_io_wait` and `after_io_wait`; trio hands
    the poll's events to the tasks before `after_io_wait`)."""

    def __init__(self, turns: FairTurns) -> None:
        self.turns = turns

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        turns = self.turns
        if turns._polling:
            turns._woken(task)
        elif turns.ordered:
            # Rescheduled outside the poll — during a batch (for the next one: a
            # released backlogged step, a handed-over turn) or after `after_io_wait`
            # (an expired deadline, `wait_all_tasks_blocked`, the autojump: review
            # victim7, V7-3) — so not a request the poll brought: to the head of the
            # run queue, which an ordered batch runs last, in the order they came.
            try:
                runq = _trio_run.GLOBAL_RUN_CONTEXT.runner.runq
                if runq[-1] is task:  # (trio appends, then calls this hook)
                    runq.pop()
                    runq.appendleft(task)
            except Exception:  # noqa: BLE001 - an instrument that raises is dropped
                turns.unordered()


def _nothing() -> None:
    pass


class BadSlot(SluiceError):
    """No capability in that slot of the connection's capability space."""

    errno = _errno.EBADF


class _InternalError(SluiceError):
    """The reply to a request that failed with a bug (logged with its traceback)."""

    errno = _errno.EIO


def peer_hung_up(sock: socket.socket) -> bool:
    """Whether the peer of this stream socket has closed its end (POLLHUP: both
    directions shut; a client that only shut down writing still reads its replies)."""
    p = select.poll()
    p.register(sock.fileno(), 0)
    return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0))


@dataclasses.dataclass(eq=False)
class Connection:
    creds: Credentials
    #: what the connection acts for, and is charged to (fixed at connect)
    principal: Principal
    sock: socket.socket
    slots: dict[int, Grant] = dataclasses.field(default_factory=dict)
    #: slots whose grant the metadata server issued (closing them closes the file)
    opened: set[int] = dataclasses.field(default_factory=set)
    next_slot: int = 1
    shm: mmap.mmap | None = None
    shm_view: memoryview | None = None
    #: whether the connection, and its buffer, were admitted under its tenant's floor
    #: (TENANT_CONNECTIONS, TENANT_SHM): counted apart from the global caps
    floor: bool = False
    shm_floor: bool = False
    #: notification kinds the client asked for
    subscribed: frozenset[str] = frozenset()
    push_seq: int = 0
    #: frames (and the descriptors riding on the first byte of one) not yet sent
    sendq: collections.deque[tuple[memoryview, list[int]]] = dataclasses.field(
        default_factory=collections.deque)
    queued: int = 0
    #: when the queue last moved (or became non-empty)
    last_sent: float = 0.0
    #: why the connection is being closed (None: it is not)
    doomed: str | None = None
    #: set when the writer should look at the queue; when it sent some; replaced after
    wake_writer: trio.Event = dataclasses.field(default_factory=trio.Event)
    progress: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: the wait the reader is in (cancelled to close the connection)
    wait_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    #: the pager subscription pushing "reclaim" to this connection (while subscribed)
    reclaim: ReclaimSubscription | None = None
    #: its principal's share of the server (rate limits, latency histograms)
    share: Share | None = None
    #: its tenant's share, whose turn on the event loop it takes (FairTurns.turn_of)
    turn: Share | None = None
    #: replies are being gathered to be sent together at the end of this step
    corked: bool = False
    #: the reader waits for the socket without a cancel scope (server._serve_requests)
    reading: bool = False
    #: the socket is in FairTurns' side poll (`FairTurns.watch`)
    side: bool = False

    def __post_init__(self) -> None:
        self.creds = peer_identity(self.sock, self.creds)

    def alive(self) -> bool:
        """Whether the client is still there: not doomed, its end of the socket not
        closed (a grant's `alive`: R6, a gone writer's uncommitted bytes are zeroed)."""
        if self.doomed is not None:
            return False
        try:
            return not peer_hung_up(self.sock)
        except (OSError, ValueError):  # (closed already: fileno -1)
            return False

    def doom(self, reason: str) -> None:
        if self.doomed is None:
            self.doomed = reason
            if self.wait_scope is not None:
                self.wait_scope.cancel()
            if self.reading:  # wakes the reader (and a waiting writer) with an error
                trio.lowlevel.notify_closing(self.sock)
            self.wake_writer.set()

    def signal_progress(self) -> None:
        ev, self.progress = self.progress, trio.Event()
        ev.set()


#: getsockopt(SOL_SOCKET, ...) options not named by Python 3.11's socket module
SO_PEERGROUPS = 59
SO_PEERPIDFD = 77
#: supplementary groups read with SO_PEERGROUPS at most (getsockopt's buffer is at most
#: 1024 bytes in CPython); a peer with more is given none (its primary group only)
MAX_PEER_GROUPS = 256


def peer_identity(sock: socket.socket, creds: Credentials) -> Credentials:
    """`creds` (SO_PEERCRED) completed with what the kernel fixed when the peer
    connected: its supplementary groups (SO_PEERGROUPS) and the start time of the
    process that connected. The pid alone does not name a process for long: if it exits,
    another may get the pid; the start time is read with the pid while a pidfd of the
    connecting process (SO_PEERPIDFD) shows it still lives, so it is that process's.
    Called once, at accept; registration (`register`) compares it with the pid's
    process then."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
    except OSError:  # ERANGE: more than MAX_PEER_GROUPS; refuse to guess
        groups = frozenset()
    st = -1
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:  # an older kernel: the start time now is the best there is
        st = start_time(creds.pid)
    else:
        try:
            st = start_time(creds.pid)
            signal.pidfd_send_signal(pidfd, 0)  # ESRCH: it exited (the pid may be reused)
        except ProcessLookupError:
            st = -1
        except PermissionError:
            pass  # it lives (a daemon not run by root may not signal it)
        finally:
            os.close(pidfd)
    return dataclasses.replace(creds, groups=groups, start_time=st)


class ServerBase:
    """The attributes the parts of ShimServer share (set by ShimServer.__init__)."""

    kernel: Kernel
    principals: PrincipalTable
    service: MetadataService
    #: whether metadata requests are waiting (the mount's FUSE queue is readable)
    metadata_pending: Callable[[], bool] | None
    #: shared buffers of all connections together, in bytes; of those, the buffers
    #: admitted under their tenant's floor (TENANT_SHM)
    shm_bytes: int
    floor_shm: int
    #: when a long request last gave the event loop back
    _last_yield: float
    #: the principals' turns on the event loop, and their shares
    turns: FairTurns
    #: the log lines tenants cause, rate-limited per uid
    loglimit: LogLimiter
    #: every connection being served
    _conns: set[Connection]

    async def _give_turn(self) -> None:
        """End this step: the loop to the others (ShimServer's, in server.py)."""
        raise NotImplementedError

    def idle_spun(self) -> float:
        """Seconds the loop thread has spent polling for a next request (server.py's)."""
        raise NotImplementedError

    def push_to(self, conns: Iterable[Connection], kind: str,
                payload: dict[str, Any]) -> int:
        """Notify the connections of `conns` subscribed to `kind` (sendpath.py's)."""
        raise NotImplementedError

    def push(self, principal: PrincipalId | Principal, kind: str,
             payload: dict[str, Any]) -> int:
        """Notify the connections of `principal` subscribed to `kind` (sendpath.py's)."""
        raise NotImplementedError
