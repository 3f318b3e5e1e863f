"""The principal tree of the mClock scheduler (blockdev/scheduler.py): a node per
principal with its bank, tags and queue of waiting requests, and what is done to the
tags when a request is dispatched (`charge`) or a node wakes up (`activate`). The
module docstring of blockdev/scheduler.py says what the tags mean; MClockScheduler
owns the tree and chooses from it.

Everything here runs on the trio loop between two checkpoints of the scheduler: no
function blocks, none checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import trio

from .types import ROOT_PRINCIPAL, BankNode, PrincipalId

if TYPE_CHECKING:
    from .anticipation import Pattern
    from .scheduler import _Counters

_INF = math.inf


class Req:
    """One request, waiting in its node's queue or dispatched."""

    __slots__ = ("node", "nbytes", "cost", "task", "blocked", "granted", "arrival",
                 "throttled", "write", "barrier", "past_limits", "start", "paid_from",
                 "deadline", "service")

    def __init__(self, node: Node, nbytes: int, cost: float, arrival: float,
                 write: bool = False, *, barrier: bool = False,
                 past_limits: bool = False,
                 paid_from: dict[PrincipalId, float] | None = None) -> None:
        self.node = node
        self.write = write
        #: a write or flush: what a barrier waits for (expedited past limits then),
        #: unless made inside `never_expedited()` (the caller passes barrier=False)
        self.barrier = barrier
        #: made inside `past_limits()`: never held by a limit (its tags still advance)
        self.past_limits = past_limits
        #: a request its place at the limits paid for (blockdev/places.py): per
        #: limited node, the place's start there, from which the node's limit tags
        #: advance for it rather than from its arrival
        self.paid_from = paid_from
        self.nbytes = nbytes
        self.cost = cost
        self.arrival = arrival
        self.task: trio.lowlevel.Task | None = None
        self.blocked = False
        self.granted = False
        self.throttled = False
        #: the modeled time the scheduler chose it (see MClockScheduler._dispatch)
        self.start = arrival
        #: set when it is dispatched, for a principal with a reservation: by when it
        #: must complete to count as served in time (one reservation interval, plus
        #: `service`, after it was due; the device's `record` judges it once the
        #: request is done)
        self.deadline: float | None = None
        #: the longest it takes alone on the idle device (its longest seek), which the
        #: deadline allows beyond the reservation's interval: a reservation is a rate,
        #: and a request of a principal reserved 20,000 IOPS on `nvme` cannot complete
        #: in its 50 µs interval (review of stop 28, 1)
        self.service = 0.0


class Node:
    """One principal in the scheduler's tree: its bank, tags and own queue."""

    __slots__ = ("id", "parent", "children", "active", "queue", "backlog", "weight",
                 "r_iops", "r_bps", "l_iops", "l_bps", "has_res", "has_lim",
                 "R_i", "R_b", "L_i", "L_b", "P", "own_P", "vtime", "path", "res_below",
                 "counters", "pattern", "past_below")

    def __init__(self, pid: PrincipalId, counters: _Counters) -> None:
        self.id = pid
        self.parent: Node | None = None
        self.children: list[Node] = []
        #: children with work waiting in their subtree
        self.active: list[Node] = []
        #: this principal's own waiting requests, in arrival order
        self.queue: deque[Req] = deque()
        #: requests waiting in this subtree (own queue and descendants)
        self.backlog = 0
        #: of them, those made inside `past_limits()` (`held_past` looks only where
        #: there are some)
        self.past_below = 0
        self.weight = 100.0
        self.r_iops = self.r_bps = self.l_iops = self.l_bps = 0.0  # 0: none
        self.has_res = self.has_lim = False
        self.R_i = self.R_b = self.L_i = self.L_b = -_INF
        self.P = 0.0
        #: P tag of the node's own queue when it competes with its children
        self.own_P = 0.0
        #: start tag of the child served last (start-time fair queuing)
        self.vtime = 0.0
        #: root .. self
        self.path: tuple[Node, ...] = ()
        #: whether some descendant has a reservation of its own
        self.res_below = False
        self.counters = counters
        #: what anticipation learned of its arrivals (a reserving principal, on a
        #: profile with anticipation; else None)
        self.pattern: Pattern | None = None

    def configure(self, b: BankNode | None) -> None:
        if b is None:
            b = BankNode(self.id, ROOT_PRINCIPAL, str(self.id))
        self.weight = float(max(1, b.io_weight))
        self.r_iops = b.io_reserve_iops or 0.0
        self.r_bps = b.io_reserve_bps or 0.0
        self.l_iops = b.io_limit_iops or 0.0
        self.l_bps = b.io_limit_bps or 0.0
        self.has_res = self.r_iops > 0 or self.r_bps > 0
        self.has_lim = self.l_iops > 0 or self.l_bps > 0

    def limit_at(self) -> float:
        """When this node's limits next allow a request."""
        return max(self.L_i, self.L_b) if self.has_lim else -_INF

    def res_at(self) -> float:
        return max(self.R_i, self.R_b)


def rescale_limit_tags(n: Node, old: tuple[float, float], now: float) -> None:
    """`n`'s limits changed from `old` (IOPS, bytes/s; 0: none): what its limit tags
    still hold in the future was counted at the old rates, and is counted again at the
    new ones — a limit raised lets the requests it held go sooner (review of hostile
    probe 7's fixes, R3), one lowered holds them longer; a limit that is new starts
    from now (no tags of the past), one removed holds nothing."""
    for attr, was, rate in (("L_i", old[0], n.l_iops), ("L_b", old[1], n.l_bps)):
        tag = getattr(n, attr)
        if not rate:
            # (a unit no longer limited holds nothing, though the other still does:
            # both tags are read while any limit is on; review of d4a70cd, 4)
            setattr(n, attr, -_INF)
            continue
        if tag > now:
            setattr(n, attr, now + (tag - now) * was / rate if was else now)


def activate(n: Node, now: float, paid_from: dict[PrincipalId, float] | None = None) -> None:
    """Restart the tags of a node that had nothing waiting: no credit banked while idle.
    The limit tags of a request a place paid for (`Req.paid_from`) restart from the
    place's start at the node, when that is earlier: the place went at the limit, and
    the time between it and the request (the write's locks, its allocation) is not idle
    time, nor is it the writer's to pay again (probe 15, F4: a serial 4 KiB writer got
    40-73% of its limit, each write's next place later by that time)."""
    if n.R_i < now:
        n.R_i = now
    if n.R_b < now:
        n.R_b = now
    lim = now
    if paid_from is not None:
        lim = min(now, paid_from.get(n.id, now))
    if n.L_i < lim:
        n.L_i = lim
    if n.L_b < lim:
        n.L_b = lim
    if n.parent is not None and n.P < n.parent.vtime:
        n.P = n.parent.vtime


def charge(req: Req, now: float, *, res_node: Node | None, queued: bool = False) -> None:
    """Advance the tags of every node on `req`'s path and its principal's counters, as
    the request is dispatched at `now` (`res_node`: the node whose reservation serves it;
    None in the weight phase)."""
    node = req.node
    nbytes = req.nbytes
    cost = req.cost
    path = node.path
    if not queued:
        # Straight from arrival to a free channel: each node on the path had
        # nothing waiting, so none banks credit from its idle time.
        for n in path:
            activate(n, now, req.paid_from)
    c = node.counters
    if node.has_res:
        interval = max(1.0 / node.r_iops if node.r_iops else 0.0,
                       nbytes / node.r_bps if node.r_bps else 0.0)
        due = node.res_at()
        if req.arrival > due:
            due = req.arrival
        req.deadline = due + interval + req.service
    if res_node is not None:
        c.reserved += 1
    if req.throttled:
        c.throttled += 1
    # P: in the weight phase on the whole path; in the reservation phase only below
    # the node whose reservation serves the request (reserved service is not
    # counted against the weight share).
    charge_p = res_node is None
    # R: only in the reservation phase, on the path down to the node whose reservation
    # serves the request (a child's reservation is carved from its parent's). Service
    # by weight is not counted against a reservation (mClock, Gulati et al., sec. 3.1:
    # the R tags are reduced again after a weight-phase request): when R counted all
    # service, a principal that had the idle device to itself ran its R tag seconds
    # ahead, and got its weight share, not its reservation, when others came (a 3,000
    # IOPS reservation that had run at 8,000 alone got 8 IOPS beside a heavy flooder
    # for 3 s; found beside probe 20, F2).
    charge_r = res_node is not None
    prev: Node | None = None
    for n in path:
        if charge_r and n.has_res:
            if n.r_iops:
                n.R_i += 1.0 / n.r_iops
            if n.r_bps:
                n.R_b += nbytes / n.r_bps
        if n.has_lim:
            if n.l_iops:
                n.L_i += 1.0 / n.l_iops
            if n.l_bps:
                n.L_b += nbytes / n.l_bps
        if prev is not None and charge_p:
            v = prev.vtime
            if n.P < v:
                n.P = v
            prev.vtime = n.P
            n.P += cost / n.weight
        if n is res_node:
            charge_p = True
            charge_r = False
        prev = n
    # The principal's own queue competes with its children as one more child.
    if node.children and charge_p:
        v = node.vtime
        if node.own_P < v:
            node.own_P = v
        node.vtime = node.own_P
        node.own_P += cost / node.weight


def first_arrival(root: Node) -> float:
    """The earliest arrival among the requests at the head of a queue."""
    first = _INF
    stack = [root]
    while stack:
        n = stack.pop()
        if n.queue and n.queue[0].arrival < first:
            first = n.queue[0].arrival
        stack.extend(n.active)
    return first

def any_waiter(root: Node) -> Req | None:
    stack = [root]
    while stack:
        n = stack.pop()
        if n.queue:
            return n.queue[0]
        stack.extend(n.active)
    return None


def expedited_write(root: Node, *, barriers: bool = True) -> Req | None:
    """A waiting request that goes past its limits: one made inside `past_limits()`,
    or (`barriers`: while a barrier waits) a write or flush — the first of its
    principal's queue: it may pass the principal's reads, which are not expedited."""
    stack = [root]
    while stack:
        n = stack.pop()
        for r in n.queue:
            if r.past_limits or (barriers and r.barrier):
                return r
        stack.extend(n.active)
    return None


def held_past(root: Node, horizon: float = _INF) -> Req | None:
    """The first request made inside `past_limits()` waiting in `root`'s subtree (that
    had arrived by `horizon`), or None: what a node held by its limit may still send."""
    if not root.past_below:
        return None
    stack = [root]
    while stack:
        n = stack.pop()
        for r in n.queue:
            if r.past_limits and r.arrival <= horizon:
                return r
        stack.extend(c for c in n.active if c.past_below)
    return None


def count_past(req: Req, d: int) -> None:
    """A request made inside `past_limits()` joins (`d` 1) or leaves (-1) its queue."""
    for n in req.node.path:
        n.past_below += d


def p_key(t: tuple[float, Node, Req | None]) -> float:
    return t[0]
