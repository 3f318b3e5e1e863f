"""A measurement aid for scripts/bench_hostile.py --loop-trace, not part of sluice.

Put on PYTHONPATH (with SLUICE_LOOP_TRACE=FILE) for the daemon only: when the daemon
imports kernelshim.server, a trio instrument is added to the shim server's loop that
logs every task step (batch number, task name, the principal of a connection's task,
the loop thread's CPU time of the step, and its wall-clock start and end) and the CPU
time of every control operation and connection teardown, appended to FILE.<pid> twice
a second. The CPU clock (`thread_time`) says what a step cost the daemon: on a machine
loaded by others the wall time of a step is mostly the OS's doing. The wall clock
(`perf_counter`, CLOCK_MONOTONIC: the same clock in every process) places each step,
each poll of the loop (rows "IO": `before_io_wait` to `after_io_wait`) and each send
to a root connection (rows "SEND") against the victim's own timestamps, so that
bench_hostile can split the victim's latency end to end (`decompose`).

Row: batch, name, who, cpu seconds, wall start, wall end (tab-separated); an operation
(name "OP", who: the operation) adds the principal of its connection; a cyclic garbage
collection (name "GC", who: its generation) the number of objects it freed. The wall times
after a send may be late: the woken client often takes the daemon's CPU (bench_hostile
matches the victim's operations to its requests by order, not by these times).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

_PATH = os.environ.get("SLUICE_LOOP_TRACE")


class _Trace:
    def __init__(self, path: str) -> None:
        self.path = f"{path}.{os.getpid()}"
        self.rows: list[tuple[Any, ...]] = []
        self.batch = 0
        self.who: dict[Any, str] = {}
        self.c0 = self.w0 = self.io0 = 0.0
        self.last_dump = time.perf_counter()

    # trio.abc.Instrument's hooks (duck-typed: trio is imported late)
    def before_io_wait(self, timeout: float) -> None:
        self.batch += 1
        now = time.perf_counter()
        if now - self.last_dump > 0.5:
            self.last_dump = now
            self.dump()
        self.io0 = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self.rows.append((self.batch, "IO", "", 0.0, self.io0, time.perf_counter()))

    def before_task_step(self, task: Any) -> None:
        self.w0 = time.perf_counter()
        self.c0 = time.thread_time()

    def after_task_step(self, task: Any) -> None:
        c1 = time.thread_time()
        self.rows.append((self.batch, task.name, self.who.get(task, ""),
                          c1 - self.c0, self.w0, time.perf_counter()))

    def dump(self) -> None:
        if self.rows:
            with open(self.path, "a") as f:
                f.writelines("%d\t%s\t%s\t%.9f\t%.9f\t%.9f" % r[:6]
                             + "".join("\t" + x for x in r[6:]) + "\n" for r in self.rows)
            self.rows = []


def _patch(mod: Any) -> None:
    import trio

    assert _PATH is not None
    tr = _Trace(_PATH)
    S = mod.ShimServer
    run, serve, run_op, release = S.run, S._serve_connection, S._run_op, S._release_all
    emit, uncork, data_request = S._emit, S._uncork, S._data_request

    gc_t0 = [0.0, 0.0]

    def gc_callback(phase: str, info: dict[str, int]) -> None:
        # Every cyclic garbage collection (rows "GC": who = its generation), CPU and
        # wall: a collection runs inside whatever step allocated last.
        if phase == "start":
            gc_t0[:] = [time.perf_counter(), time.thread_time()]
        elif gc_t0[0]:
            tr.rows.append((tr.batch, "GC", str(info.get("generation")),
                            time.thread_time() - gc_t0[1], gc_t0[0], time.perf_counter(),
                            str(info.get("collected", 0))))

    async def traced_run(self: Any, *a: Any, **k: Any) -> None:
        import gc
        gc.callbacks.append(gc_callback)
        trio.lowlevel.add_instrument(tr)  # type: ignore[arg-type]
        try:
            await run(self, *a, **k)
        finally:
            tr.dump()

    async def traced_serve(self: Any, tsock: Any, creds: Any, principal: Any,
                           *rest: Any) -> None:
        tr.who[trio.lowlevel.current_task()] = principal.name
        await serve(self, tsock, creds, principal, *rest)

    async def traced_op(self: Any, conn: Any, fn: Any, m: Any) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            await run_op(self, conn, fn, m)
        finally:
            c1 = time.thread_time()
            tr.rows.append((tr.batch, "OP", str(m.payload.get("op")), c1 - c0, w0,
                            time.perf_counter(), conn.principal.name))

    async def traced_data(self: Any, conn: Any, m: Any) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            await data_request(self, conn, m)
        finally:
            c1 = time.thread_time()
            tr.rows.append((tr.batch, "OP", "data", c1 - c0, w0, time.perf_counter(),
                            conn.principal.name))

    async def traced_release(self: Any, conn: Any) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            await release(self, conn)
        finally:
            c1 = time.thread_time()
            tr.rows.append((tr.batch, "OP", "(teardown)", c1 - c0, w0, time.perf_counter(),
                            conn.principal.name))

    def traced_emit(self: Any, conn: Any, data: Any, fds: Any = None) -> None:
        emit(self, conn, data, fds)
        if conn.principal.parent is None and not conn.corked:  # root's, sent now
            t = time.perf_counter()
            tr.rows.append((tr.batch, "SEND", "root", 0.0, t, t))

    def traced_uncork(self: Any, conn: Any) -> None:
        uncork(self, conn)
        if conn.principal.parent is None:
            t = time.perf_counter()
            tr.rows.append((tr.batch, "SEND", "root", 0.0, t, t))

    S.run, S._serve_connection, S._run_op, S._release_all = (
        traced_run, traced_serve, traced_op, traced_release)
    S._emit, S._uncork, S._data_request = traced_emit, traced_uncork, traced_data


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "kernelshim.server":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        exec_module = spec.loader.exec_module

        def traced_exec(mod: Any) -> None:
            exec_module(mod)
            _patch(mod)

        spec.loader.exec_module = traced_exec  # type: ignore[method-assign, assignment]
        return spec


if _PATH:
    sys.meta_path.insert(0, _Hook())
