"""Hybrid waiting for the reply of a small data request: poll briefly, then sleep.

A 4 KiB read through the direct path is one request and one reply on the control
socket. When the client and the daemon run on two CPUs that are otherwise idle, the
client falling asleep in `recv` and being woken by the daemon's reply costs a wake-up
of a halted CPU — on this project's VMs an inter-processor interrupt through the
hypervisor, more than the daemon's whole work for the read (docs/BENCHMARKS.md,
"Direct 4 KiB reads: hybrid polling"). Polling the socket for a short while instead
(`recv(MSG_DONTWAIT)`) takes the reply without that wake-up, as the kernel's hybrid
polling of NVMe completions and io_uring's busy-poll do.

Polling only pays when the daemon runs on another CPU while the client polls. When
both share a CPU (a loaded machine), the polling client takes the CPU the daemon needs
and the reply comes later. So polling here is bounded (`SPIN_SECONDS`) and adaptive:
two polls in a row that end without the reply switch polling off for the next
`skip` requests, and `skip` doubles with every further failure (up to `MAX_SKIP`),
halving again with each success (one failure alone, a reply that was late once, only
counts towards the next). On a loaded machine polling therefore stays off nearly always (one
failed poll of at most SPIN_SECONDS per MAX_SKIP requests); on an idle one it stays on.

The same holds for the replies a client waits for behind a queue of its own requests:
the next piece of a sequential read (the daemon is filling it while the client copies
the last one out), the oldest of its pipelined writes when the write window is full.
Each such reply, sent to a client asleep in `recv`, costs the daemon a wake-up too, and
the daemon is the bottleneck of those streams. `ReplyClock` paces these waits: the
daemon serves a connection's requests in order, so the arrival of a reply can be
predicted from when each request ahead of it was sent and what a request of its kind
(operation and size) has cost the daemon lately. The client sleeps on a timer for most
of the predicted wait (a timer wakes it on its own CPU: the daemon's `send` finds
nobody asleep on the socket and wakes no one), then polls the rest, then sleeps in
`recv` only if the reply is late. The costs are learnt from the waits themselves: a
reply caught by polling (or by `recv`) gives its exact arrival; one already there when
the sleep ended says the sleep was too long, and the estimate shrinks. Polling after
the sleep is switched off by itself as above (`HybridWait`) when it does not pay.

This module holds only the decisions (no socket); the sync client's `_data_call` and
`_wait` use them (`kernelshim/client.py`). The trio client never polls or paces: its
waits give the event loop to the application's other tasks.
"""

from __future__ import annotations

from typing import Hashable, Sequence

#: the longest one request polls for its reply before sleeping (seconds): longer than
#: a 4 KiB read's round trip on an idle two-CPU machine (about 100-150 µs including the
#: wake-up of the daemon), far shorter than a scheduler time slice
SPIN_SECONDS = 250e-6
#: requests that sleep without polling after the first failed poll
MIN_SKIP = 8
#: ... and at most, after many failures in a row
MAX_SKIP = 4096


class HybridWait:
    """Whether (and how long) to poll for the next reply, learned from the last polls.

    `budget()` before a wait: seconds to poll (0: sleep at once). `polled(ok)` after a
    wait that polled: whether the reply came while polling."""

    __slots__ = ("spin", "skip", "_backoff", "_fails", "polls", "hits")

    def __init__(self, spin: float = SPIN_SECONDS) -> None:
        if not 0 <= spin <= 0.01:
            raise ValueError(f"spin must be between 0 and 0.01 seconds, not {spin!r}")
        #: seconds one wait may poll (0: never poll)
        self.spin = spin
        #: waits left that sleep without polling
        self.skip = 0
        self._backoff = MIN_SKIP
        #: failed polls in a row
        self._fails = 0
        #: waits that polled, and of them those whose reply came while polling
        self.polls = 0
        self.hits = 0

    def budget(self) -> float:
        if not self.spin:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return self.spin

    def polled(self, ok: bool) -> None:
        self.polls += 1
        if ok:
            self.hits += 1
            self._fails = 0
            self._backoff = max(MIN_SKIP, self._backoff // 2)
            return
        self._fails += 1
        if self._fails >= 2:
            self.skip = self._backoff
            self._backoff = min(MAX_SKIP, self._backoff * 2)


#: the share of a reply's predicted wait that a paced wait sleeps before it polls
SLEEP_SHARE = 0.75
#: a paced wait polls for at least this long after its sleep (an estimate a little low
#: still catches its reply) ...
MIN_POLL = SPIN_SECONDS
#: ... and at most this long
MAX_POLL = 2e-3
#: a paced wait sleeps at most this long (a wrong estimate costs at most that much)
MAX_SLEEP = 5e-3
#: weight of a new sample in a kind's cost (a moving average): a cheaper request counts
#: at once, a dearer one slowly, and one more than twice the estimate as twice it — a
#: stall of the daemon (a metadata commit, a preempted vCPU) says nothing about the next
#: request, and an estimate too high makes the client sleep while the daemon runs dry
GAIN_DOWN = 0.5
GAIN_UP = 1 / 16
MAX_RISE = 2.0
#: a reply that was already there when the sleep ended: its kind's cost times this
SHRINK = 0.9
#: requests tracked at most (more are not paced: a leak would cost memory, no more)
MAX_TRACKED = 4096
#: kinds of request whose cost is learnt, at most
MAX_KINDS = 64


class ReplyClock:
    """When the reply to a request is due, from an in-order server's recent costs.

    `sent(rid, kind, now)` when a request goes out (`kind`: anything hashable, e.g.
    the operation and its size class); `plan(ahead, now)` before waiting for the last
    of `ahead` (the unanswered requests up to it, oldest first): `(sleep_until,
    poll_until)` or None when some request ahead is of an unknown kind (then the
    caller sleeps in recv as before); `arrived(ahead, at, exact)` once that reply is
    in: `exact` if it was seen as it came (polling, or woken by it), else it was found
    after the sleep and came at or before `at`. `done(rid)` when a reply is taken."""

    __slots__ = ("cost", "_sent", "last", "poll", "paced", "early", "caught", "late")

    def __init__(self, spin: float = SPIN_SECONDS) -> None:
        #: seconds a request of each kind has kept the daemon busy lately
        self.cost: dict[Hashable, float] = {}
        self._sent: dict[int, tuple[float, Hashable]] = {}
        #: when the last reply waited for arrived (or was found)
        self.last = 0.0
        #: whether to poll after the sleep (switched off by itself, see HybridWait)
        self.poll = HybridWait(spin)
        #: waits paced; of them, replies found right after the sleep, caught while
        #: polling, and waited for in recv after all
        self.paced = self.early = self.caught = self.late = 0

    def sent(self, rid: int, kind: Hashable, now: float) -> None:
        if len(self._sent) < MAX_TRACKED:
            self._sent[rid] = (now, kind)

    def done(self, rid: int) -> None:
        self._sent.pop(rid, None)

    def forget(self) -> None:
        """Drop every request tracked (a connection's failure, a cancelled plan)."""
        self._sent.clear()

    def _due(self, ahead: Sequence[int]) -> float | None:
        t = self.last
        for rid in ahead:
            entry = self._sent.get(rid)
            if entry is None:
                return None
            c = self.cost.get(entry[1])
            if c is None:
                return None
            t = max(t, entry[0]) + c
        return t

    def plan(self, ahead: Sequence[int], now: float) -> tuple[float, float] | None:
        due = self._due(ahead) if ahead else None
        if due is None:
            return None
        wait = due - now
        sleep_until = now + min(MAX_SLEEP, SLEEP_SHARE * wait) if wait > 0 else now
        poll = self.poll.budget()
        if poll:
            poll = min(MAX_POLL, max(MIN_POLL, (1 - SLEEP_SHARE) * wait))
        return sleep_until, sleep_until + poll

    def arrived(self, ahead: Sequence[int], at: float, exact: bool) -> None:
        """Learn from the wait for the last of `ahead`, whose reply came at `at`."""
        kinds = [self._sent[rid] for rid in ahead if rid in self._sent]
        if kinds and len(kinds) == len(ahead):
            kind = kinds[0][1]
            if all(k == kind for _t, k in kinds):
                c = self.cost.get(kind)
                if exact:
                    # The daemon served them one after the other from when the first
                    # was both sent and next in line (the last reply before it).
                    per = max(0.0, at - max(self.last, kinds[0][0])) / len(kinds)
                    if c is None:
                        if len(self.cost) < MAX_KINDS:
                            self.cost[kind] = per
                    elif per < c:
                        self.cost[kind] = c + GAIN_DOWN * (per - c)
                    else:
                        self.cost[kind] = c + GAIN_UP * (min(per, MAX_RISE * c) - c)
                elif c is not None:
                    self.cost[kind] = c * SHRINK
        self.last = at
