"""Idle polling of the daemon's event loop: poll briefly for the next request before
sleeping.

A FUSE round trip on this project's VMs costs 70-110 µs although the daemon's work for
a cheap request is a third of that (docs/BENCHMARKS.md, "Untar: the per-request cost
of the daemon"): when the daemon's loop runs out of work it sleeps in `epoll_wait`, its
vCPU halts (the guest never polls in idle), and the next request wakes it with an
inter-processor interrupt through the hypervisor. A program that sends one request
after another (tar: create, write, chown, chmod, utimensat, close per file) pays that
wake-up on every request.

`IdlePoll` is a trio instrument. Just before the loop sleeps — trio calls
`before_io_wait(timeout)` with a timeout above zero only when no task is runnable —
and only if the loop was woken by I/O last time (it is serving requests, not a timer),
it polls trio's own epoll descriptor (`poll(2)` with timeout 0 on the epoll fd: ready
when any descriptor the loop waits for is, without taking the event) for at most
`window` seconds, never longer than the loop's own timeout. A request that arrives
meanwhile is then read by the loop's `epoll_wait` at once, without a wake-up.

Polling pays only when the client runs on another CPU while the daemon polls. On a
loaded machine the polling daemon takes a CPU the client needs, and on an idle mount
nothing comes. So polling backs off as the direct client's does (kernelshim/
hybridwait.py), in time: two polls in a row that end without a request stop polling
for `pause` seconds, and `pause` doubles with each further miss (from MIN_PAUSE up to
MAX_PAUSE), halving again with each catch. An idle daemon does not poll at all (only
a wake-up by I/O starts polling, not the timers of its own tasks); a daemon with more
work than its CPU never goes idle and never polls; a machine too loaded for the client
to answer within the window soon polls at most twice per MAX_PAUSE. And on a machine
with more runnable threads than CPUs a poll that catches its request may still cost
more than it saves (the client waited for a CPU meanwhile, or someone else did): every
LOAD_CHECK seconds the loop thread's own wait for a CPU is read
(/proc/thread-self/schedstat), and while it waited more than MAX_CPU_WAIT of the time,
nothing is polled.

The spin runs inside the instrument hook, between the loop's last task step and its
`epoll_wait`: no task runs meanwhile, nothing is reordered, and the loop's other
instruments (the shim's fair turns, kernelshim/connection.py) count it as waiting when
they were added first. A timer due during a failed poll fires up to `window` late,
less than `epoll_wait`'s own millisecond granularity.
"""

from __future__ import annotations

import logging
import os
import select
from typing import Callable

import trio

log = logging.getLogger(__name__)

#: the default window (seconds): `sluice mount --idle-poll` in µs. See README and
#: docs/BENCHMARKS.md for the measurements behind it.
DEFAULT_WINDOW = 200e-6
#: the largest window accepted: far below a scheduler time slice
MAX_WINDOW = 2e-3
#: the pause after the second miss in a row (seconds)...
MIN_PAUSE = 1e-3
#: ... doubling with each further miss up to this
MAX_PAUSE = 1.0
#: how often (seconds) the loop thread's wait for a CPU is looked at ...
LOAD_CHECK = 0.05
#: ... and polling stops until the next look when the thread waited for a CPU more
#: than this share of the last interval: the machine has more runnable threads than
#: CPUs, and a poll would take a CPU the client (or anyone) needs
MAX_CPU_WAIT = 0.1


def parse_window(text: str) -> float:
    """`--idle-poll USEC` (0: off) as seconds; ValueError with a one-line reason."""
    try:
        usec = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of microseconds") from None
    if not 0 <= usec <= MAX_WINDOW * 1e6:
        raise ValueError(f"{text} µs is outside 0 (off) .. {MAX_WINDOW * 1e6:.0f} µs")
    return usec * 1e-6


class ThreadCpuWait:
    """The seconds the thread that made this object has waited for a CPU (runnable,
    not running: /proc/thread-self/schedstat's second field, read with one pread of
    a descriptor kept open). `open()` returns None where the kernel does not say."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls) -> ThreadCpuWait | None:
        try:
            fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        waits = cls(fd)
        try:
            waits()
        except (OSError, IndexError, ValueError):
            waits.close()
            return None
        return waits

    def __call__(self) -> float:
        return int(os.pread(self._fd, 128, 0).split()[1]) * 1e-9

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def epoll_ready_probe() -> Callable[[], bool] | None:
    """A function telling, without blocking, whether the running trio loop's epoll
    descriptor has an event ready; None where the loop has none (another platform or
    a trio that keeps it elsewhere: polling is then off).

    trio keeps its epoll object private (trio._core._io_epoll.EpollIOManager._epoll);
    it is found by behaviour, like the binding's checkpoint probe (fs/mount.py)."""
    from trio._core._run import GLOBAL_RUN_CONTEXT  # private: probed, not assumed

    runner = getattr(GLOBAL_RUN_CONTEXT, "runner", None)
    epoll = getattr(getattr(runner, "io_manager", None), "_epoll", None)
    if not isinstance(epoll, select.epoll):
        return None
    poller = select.poll()
    poller.register(epoll.fileno(), select.POLLIN)
    poll = poller.poll

    def ready() -> bool:
        return bool(poll(0))
    return ready


class IdlePoll(trio.abc.Instrument):
    """Poll `ready()` for up to `window` seconds before the loop sleeps after serving.

    A trio instrument. `clock` is the loop's (trio.current_time by default): tests
    drive it with MockClock; `cpu_wait`, the loop thread's seconds spent waiting for
    a CPU (`ThreadCpuWait`; None: no load check)."""

    def __init__(self, window: float, ready: Callable[[], bool],
                 clock: Callable[[], float] | None = None,
                 cpu_wait: Callable[[], float] | None = None) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise ValueError(f"window must be above 0 and at most {MAX_WINDOW} s, "
                             f"not {window!r}")
        self.window = window
        self._ready = ready
        self._clock = clock if clock is not None else trio.current_time
        #: seconds the loop thread has waited for a CPU (None: not known, no check)
        self._cpu_wait = cpu_wait
        self._next_check = 0.0
        self._checked_at = 0.0
        self._waited = 0.0
        #: the last check found the machine overloaded: no polls until the next
        self.overloaded = False
        #: polls left out because the machine was overloaded
        self.skipped = 0
        #: the loop was woken by I/O (or a catch) last time it slept: it is serving
        self._serving = False
        #: when the current sleep would end by its timeout
        self._wake_by = 0.0
        #: no polling before this time (the backoff)
        self._pause_until = 0.0
        #: the pause the next miss-after-a-miss sets
        self.pause = MIN_PAUSE
        #: misses in a row
        self._misses = 0
        #: polls, and of them those that caught a request; seconds spent polling (here
        #: and by the shim's connections: `polled`), which the loop thread spends on a
        #: CPU without serving anything
        self.polls = 0
        self.hits = 0
        self.spun = 0.0

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0:
            return  # tasks are runnable (or a timer is due): the loop does not sleep
        now = self._clock()
        self._wake_by = now + timeout
        if not self._serving or now < self._pause_until:
            return
        if self._cpu_wait is not None and now >= self._next_check:
            self._check_load(now)
        if self.overloaded:
            self.skipped += 1
            return
        end = now + min(self.window, timeout)
        ready = self._ready
        clock = self._clock
        while True:
            if ready():
                hit = True
                break
            t = clock()
            if t >= end:
                hit = False
                break
        self.polled(hit, now=now)

    def window_now(self) -> float:
        """Seconds a task may poll now for the next request of the connection it just
        served, in the loop's place (0: not now): under the conditions of the loop's
        own poll (serving, no backoff pause, the machine not overloaded). The caller
        polls only while nothing else can run, stops at the first event of any other
        descriptor (`ready()`), and reports the outcome with `polled` (the shim's
        `ShimServer._poll_next`)."""
        if not self._serving:
            return 0.0
        now = self._clock()
        if now < self._pause_until:
            return 0.0
        if self._cpu_wait is not None and now >= self._next_check:
            self._check_load(now)
        if self.overloaded:
            self.skipped += 1
            return 0.0
        return self.window

    def ready(self) -> bool:
        """Whether a descriptor the loop waits for has an event (see `epoll_ready_probe`)."""
        return self._ready()

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            # Woken before the timeout: by I/O (or a thread's or signal's wake-up).
            self._serving = self._clock() < self._wake_by

    def _check_load(self, now: float) -> None:
        assert self._cpu_wait is not None
        try:
            waited = self._cpu_wait()
        except (OSError, ValueError, IndexError) as exc:
            # (an exception would make trio drop the instrument: polling goes on
            # without the check)
            log.warning("idle polling: the load check is off: %s", exc)
            self._cpu_wait = None
            return
        if self._checked_at:
            share = (waited - self._waited) / max(now - self._checked_at, 1e-9)
            self.overloaded = share > MAX_CPU_WAIT
        self._checked_at, self._waited = now, waited
        self._next_check = now + LOAD_CHECK

    def spent(self, *, now: float) -> None:
        """Count the time of a poll begun at `now` and ending now that was neither a
        catch nor a miss (another descriptor's event ended it): `spun` only."""
        self.spun += self._clock() - now

    def polled(self, hit: bool, *, now: float) -> None:
        """Count one poll begun at `now` and ending now, and adjust the backoff."""
        self.polls += 1
        self.spent(now=now)
        if hit:
            self.hits += 1
            self._misses = 0
            self.pause = max(MIN_PAUSE, self.pause / 2)
            return
        self._misses += 1
        if self._misses >= 2:
            self._pause_until = now + self.pause
            self.pause = min(MAX_PAUSE, self.pause * 2)

    def summary(self) -> str:
        return (f"idle polling ({self.window * 1e6:.0f} µs): {self.polls} polls, "
                f"{self.hits} caught a request, {self.spun:.3f} s spent polling, "
                f"{self.skipped} left out on an overloaded machine")
