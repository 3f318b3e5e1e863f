"""The daemon's cyclic garbage collector: what its collections cost, and when; the
start-up heap frozen out of them.

A collection runs inside whatever code allocates when a generation's count passes
its threshold, holding the GIL: in the daemon that is some tenant's request or the
step of the event loop serving it, and every other tenant's request waits behind it.

`freeze_start_up_heap` (fs/mount.py, once the volume is loaded, before the mount goes
live) collects once and moves every object then alive — modules, the volume's tables,
the services — to the collector's permanent generation (`gc.freeze`): they live as
long as the daemon, and a full (generation 2) collection no longer walks them.
Measured (docs/BENCHMARKS.md, "Hostile tenants: the daemon's garbage collector"):
~40,200 objects; under bench_hostile's attack a full collection came every ~160 s and
held the loop for 16-30 ms of CPU (25-70 ms wall) before, 1.0-1.3 ms after.
Collections of the younger generations, and full ones of what was made since, run as
before: cycles made after the freeze are collected, so memory stays bounded; what the
freeze keeps is the start-up heap, once (an object of it that later becomes cyclic
garbage stays, with what it refers to).

`GcLog` (the lab setting SLUICE_GC_LOG=FILE, read in fs/mount.py only) appends one
line per collection to FILE: the wall-clock start (`time.perf_counter`, the
CLOCK_MONOTONIC every process shares, so a benchmark can place collections against
its own requests), the generation, the wall and thread-CPU seconds it took, the
objects it collected, and `gc.get_count()` at its start (generation 0: objects
allocated less those freed since the last collection; 1 and 2: collections of the
generation below since their own last one).
One `os.write` per collection, after it ends: the cost of the line is not in the
measured duration, and nothing is held in memory. `scripts/bench_hostile.py --gc-log`
reads it.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


def freeze_start_up_heap() -> int:
    """Collect, then freeze every object alive (see the module's docstring): the
    number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcLog:
    """Logs every cyclic collection to a file (see the module's docstring)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._start = (0.0, 0.0)
        self._counts = (0, 0, 0)

    @classmethod
    def open(cls, path: str) -> GcLog:
        """Append to `path` (created 0600) and add the hook to `gc.callbacks`."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self = cls(fd)
        gc.callbacks.append(self._callback)
        log.warning("lab setting SLUICE_GC_LOG: logging every garbage collection to %s",
                    path)
        return self

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        os.close(self._fd)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._counts = gc.get_count()
            self._start = (time.perf_counter(), time.thread_time())
            return
        t0, c0 = self._start
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        line = "%.9f\t%d\t%.9f\t%.9f\t%d\t%d\t%d\t%d\n" % (
            t0, info["generation"], wall, cpu, info["collected"], *self._counts)
        try:
            os.write(self._fd, line.encode())
        except OSError:
            pass  # a lab log: a full disk must not fail the collection's allocator

