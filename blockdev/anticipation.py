"""Anticipation: keeping the last free channel idle, briefly, for a reserved principal
whose next request is predicted to arrive soon (anticipatory scheduling: Iyer and
Druschel, SOSP 2001; Linux's anticipatory scheduler, CFQ's slice_idle and BFQ's idling
descend from it). Used by MClockScheduler when the profile's `anticipation_s` (W) is
above 0: on `hdd` by default, off elsewhere.

Why. mClock orders requests, but it cannot preempt one in service. On a device with one
channel (`hdd`) a reserved reader beside a bulk writer finds the head busy with a write
nearly every time it arrives, and waits for the rest of it (8 ms on average, 11 ms at
p99) before its reservation puts it first: twice its latency alone. Keeping the
channel free just before the reader's next request is due lets the request find it
idle, at the expense of the requests served by weight.

Prediction, per principal with a reservation (`Pattern`), from what the scheduler sees,
in modeled time:

- the gap between its arrivals (a periodic reader on a fixed schedule: audio, video);
- its think time, from the completion of its previous request to the arrival of the
  next, counted when nothing else of it was outstanding (a dependent reader that issues
  its next read when the last returns: what the anticipatory scheduler measured).

Each keeps a mean absolute deviation of its prediction error (gain 1/4, as TCP smooths
a round-trip time's, RFC 6298). The think time is a mean (gain 1/8). The gap drives a
second-order loop on the schedule: each arrival's error moves the predicted phase by
1/4 and the period by 1/16 of it, so one late arrival does not make the next look
early. An error above W/2 (no grace could cover it) is an outlier: it does not move the
estimate, and two in a row mean the rhythm changed (the estimate restarts from the
new one). The predictor with the smaller deviation (after one sample: two arrivals)
predicts the next arrival `a`: the schedule's next point (made at the arrival), or
the last completion plus the think time (made at the completion). Its grace is
`g = clamp(4 * deviation, W/4, W/2)`; a predictor is not used while `4 * deviation`
is above W/2 or more than 1/4 of its errors (smoothed, gain 1/8) are outliers.

The rule (`Anticipator.hold`, applied by MClockScheduler._dispatch when it is about to
give the *last* free channel, at modeled time t, to a request chosen by weight — never
to one served under a reservation): for a principal with nothing waiting, whose
reservation is due by `a` and whose limits (and its ancestors') allow a request at
`a`, if the candidate's service time by the cost model (`TimingProfile.service_time`
with the average random seek) would run past `a`, and `a + g - t <= W`, the channel
stays idle until that principal's request arrives or until `a + g`, whichever is
first. The choice is then made again as of that time, in modeled time (the idle is the
device's, on its timeline). A hold that runs out without the request is a miss: the
principal is not anticipated again before its next arrival. The grace is on the late
side only: on `hdd` the cost model's service time (with an average seek) is longer
than most requests take, so the channel is usually free a few milliseconds before `a`
and a request a little early finds it free too; a request that comes later than `a + g`
waits as it would without anticipation.

Bounds. Every hold made for one prediction lies within the W before its end `a + g`, so
one prediction idles the channel at most W. Predictions are made once per request (for
the next one) and held for only while due under the reservation, so a principal
reserved at r IOPS costs the others at most about `(r * T + 1) * W` seconds of device
time over T seconds; a principal that stops costs one hold (at most W) and then nothing:
the scheduler is work-conserving again. Channels beyond the last free one are never
held (queue depth > 1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from .profiles import RANDOM_SEEK_FRACTION, TimingProfile

if TYPE_CHECKING:
    from .mclock_tree import Node, Req

_INF = math.inf
#: smoothing gains of the mean and of the mean absolute deviation (RFC 6298)
_GAIN, _DEV_GAIN = 1 / 8, 1 / 4
#: how far a periodic principal's schedule follows one arrival's error, in phase and
#: in period
_PHASE_GAIN, _PERIOD_GAIN = 1 / 4, 1 / 16
#: a predictor whose share of outliers (smoothed, gain 1/8) is above this is not used
_MAX_OUTLIERS = 1 / 4
#: samples a predictor needs before it is used
MIN_SAMPLES = 1


class Pattern:
    """What the scheduler learned of one reserved principal's arrivals."""

    __slots__ = ("node", "n_gap", "gap", "dev_gap", "sched", "out_gap", "run_gap",
                 "out_think", "run_think", "n_think", "think", "dev_think",
                 "last_arrival", "last_end", "outstanding", "at", "grace", "prev_at",
                 "prev_grace", "held")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.n_gap = self.n_think = 0
        self.gap = self.dev_gap = self.think = self.dev_think = 0.0
        #: the periodic schedule's next arrival (the gap predictor's, armed or not)
        self.sched = _INF
        #: share of outliers (smoothed) and outliers in a row, of each predictor
        self.out_gap = self.out_think = 0.0
        self.run_gap = self.run_think = 0
        self.last_arrival = self.last_end = -_INF
        #: its requests between arrival and completion
        self.outstanding = 0
        #: the predicted next arrival and its grace (at = inf: none)
        self.at, self.grace = _INF, 0.0
        #: the prediction its last arrival answered (see Anticipator.hold)
        self.prev_at, self.prev_grace = _INF, 0.0
        #: whether the channel has idled for the current prediction
        self.held = False


class Anticipator:
    """The predictions and holds of one MClockScheduler (see the module docstring)."""

    __slots__ = ("profile", "window", "patterns", "since", "holder")

    def __init__(self, profile: TimingProfile) -> None:
        self.profile = profile
        #: W: the longest one prediction may idle the channel
        self.window = profile.anticipation_s
        #: one per principal with a reservation (MClockScheduler.configure_banks)
        self.patterns: Sequence[Pattern] = ()
        #: modeled time the channel started idling for a hold, and for whom
        self.since: float | None = None
        self.holder: Pattern | None = None

    # -- learning --------------------------------------------------------------------------

    def arrive(self, p: Pattern, t: float) -> None:
        """A request of `p`'s principal arrived at modeled time `t`."""
        half = self.window / 2
        if p.last_arrival > -_INF:
            interval = t - p.last_arrival
            p.n_gap += 1
            if p.n_gap == 1:
                p.gap, base = interval, t
            else:
                # A second-order loop on the schedule: the error of its prediction
                # for this arrival moves its phase by a quarter and its period by a
                # sixteenth of it, so that one late arrival does not make the next
                # look early. An error no grace could cover (above W/2) is an
                # outlier: the schedule stays; two in a row, it has changed: follow.
                err = t - p.sched
                if -half <= err <= half:
                    p.run_gap = 0
                    p.dev_gap += _DEV_GAIN * (abs(err) - p.dev_gap)
                    p.out_gap -= _GAIN * p.out_gap
                    p.gap += _PERIOD_GAIN * err
                    base = p.sched + _PHASE_GAIN * err
                else:
                    p.out_gap += _GAIN * (1.0 - p.out_gap)
                    p.run_gap += 1
                    # late: the schedule's next point; early: it is still to come
                    base = p.sched if err > 0 else p.sched - p.gap
                    if p.run_gap >= 2:
                        p.gap, base, p.run_gap = interval, t, 0
            p.sched = base + p.gap
        if p.outstanding == 0 and p.last_end > -_INF:
            p.n_think += 1
            think = t - p.last_end if t > p.last_end else 0.0
            err = think - p.think
            if p.n_think == 1:
                p.think, p.dev_think = think, 0.0
            elif -half <= err <= half:
                p.run_think = 0
                p.dev_think += _DEV_GAIN * (abs(err) - p.dev_think)
                p.out_think -= _GAIN * p.out_think
                p.think += _GAIN * err
            else:
                p.out_think += _GAIN * (1.0 - p.out_think)
                p.run_think += 1
                if p.run_think >= 2:
                    p.think, p.run_think = think, 0
        elif p.outstanding:
            p.n_think = 0  # not a dependent reader (several requests at once)
        p.outstanding += 1
        p.last_arrival = t
        if p.held and t > p.at + p.grace:
            self.miss(p, p.at + p.grace)  # came after its window
        p.prev_at, p.prev_grace = p.at, p.grace
        p.at = _INF
        if self._uses_gap(p):
            self._predict(p, p.sched, p.dev_gap, p.out_gap)

    def complete(self, p: Pattern, end: float) -> None:
        """A request of `p`'s principal completed at modeled time `end` (or left the
        queue unserved)."""
        if p.outstanding:
            p.outstanding -= 1
        if end > p.last_end:
            p.last_end = end
        if not p.outstanding and not self._uses_gap(p) and p.n_think >= MIN_SAMPLES:
            self._predict(p, p.last_end + p.think, p.dev_think, p.out_think)

    def _uses_gap(self, p: Pattern) -> bool:
        if p.n_gap < MIN_SAMPLES:
            return False
        return p.n_think < MIN_SAMPLES or p.dev_gap <= p.dev_think

    def _predict(self, p: Pattern, at: float, dev: float, outliers: float) -> None:
        w = self.window
        if 4 * dev > w / 2 or outliers > _MAX_OUTLIERS:
            return
        p.at = at
        p.grace = 4 * dev if 4 * dev > w / 4 else w / 4

    # -- holding ---------------------------------------------------------------------------

    def hold(self, t: float, req: Req) -> tuple[float, Pattern] | None:
        """Whether to keep the last free channel idle at modeled time `t` rather than
        start `req` (chosen by weight): (until when, for whom), or None."""
        best: tuple[float, Pattern] | None = None
        est = -1.0
        for p in self.patterns:
            q = p.node.queue
            if q:
                if q[0].arrival <= t:
                    continue  # it is waiting, and the choice at t saw it
                # It arrived after t (the choice is made as of a channel's modeled
                # free time, before the clock): the prediction it answered counts.
                at, g = p.prev_at, p.prev_grace
            else:
                at, g = p.at, p.grace
            if at == _INF:
                continue
            end = at + g
            if end <= t:
                self.miss(p, end)  # it did not come in time
                continue
            if end - t > self.window:
                continue
            if est < 0:
                est = self.profile.service_time(req.nbytes, write=req.write,
                                                seek_fraction=RANDOM_SEEK_FRACTION)
            if t + est <= at:
                continue  # done before it is due
            node = p.node
            if node.res_at() > at:
                continue  # not due under its reservation: no idling for it
            if any(n.has_lim and n.limit_at() > at for n in node.path):
                continue
            if best is None or end < best[0]:
                best = (end, p)
        return best

    def begin_hold(self, p: Pattern, t: float) -> None:
        p.held = True
        if self.since is None:
            self.since, self.holder = t, p

    def end_hold(self, t: float, node: Node | None) -> None:
        """The channel stops idling at `t`: a request of `node` starts (None: none)."""
        since, holder = self.since, self.holder
        if since is not None and holder is not None:
            holder.node.counters.antic_idle += t - since if t > since else 0.0
            self.since = self.holder = None
        if node is not None:
            p = node.pattern
            if p is not None and p.held:
                p.held = False
                node.counters.antic_hits += 1

    def miss(self, p: Pattern, end: float) -> None:
        """`p`'s prediction ran out at `end` without its request: no more holds for it
        before its principal's next arrival."""
        if self.holder is p:
            self.end_hold(end, None)
        if p.held:
            p.held = False
            p.node.counters.antic_misses += 1
        if p.node.queue:
            p.prev_at = _INF
        else:
            p.at = _INF

    def forget(self, p: Pattern) -> None:
        if self.holder is p:
            self.since = self.holder = None
