"""A measurement aid for scripts/bench_hostile.py --loop-trace, not part of sluice.

Put on PYTHONPATH (with SLUICE_LOOP_TRACE=FILE) for the daemon only: when the daemon
imports kernelshim.server, a trio instrument is added to the shim server's loop that
logs every task step (batch number, task name, the principal of a connection's task,
the loop thread's CPU time of the step) and the CPU time of every control operation
and connection teardown, appended to FILE.<pid> twice a second. The CPU clock
(`thread_time`), not the wall clock: on a machine loaded by others the wall time of
a step is mostly the OS's doing.
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
        self.rows: list[tuple[int, str, str, float]] = []
        self.batch = 0
        self.who: dict[Any, str] = {}
        self.c0 = 0.0
        self.last_dump = time.perf_counter()

    # trio.abc.Instrument's hooks (duck-typed: trio is imported late)
    def before_io_wait(self, timeout: float) -> None:
        self.batch += 1
        now = time.perf_counter()
        if now - self.last_dump > 0.5:
            self.last_dump = now
            self.dump()

    def before_task_step(self, task: Any) -> None:
        self.c0 = time.thread_time()

    def after_task_step(self, task: Any) -> None:
        self.rows.append((self.batch, task.name, self.who.get(task, ""),
                          time.thread_time() - self.c0))

    def dump(self) -> None:
        if self.rows:
            with open(self.path, "a") as f:
                f.writelines("%d\t%s\t%s\t%.9f\n" % r for r in self.rows)
            self.rows = []


def _patch(mod: Any) -> None:
    import trio

    assert _PATH is not None
    tr = _Trace(_PATH)
    S = mod.ShimServer
    run, serve, run_op, release = S.run, S._serve_connection, S._run_op, S._release_all

    async def traced_run(self: Any, *a: Any, **k: Any) -> None:
        trio.lowlevel.add_instrument(tr)  # type: ignore[arg-type]
        try:
            await run(self, *a, **k)
        finally:
            tr.dump()

    async def traced_serve(self: Any, tsock: Any, creds: Any, principal: Any) -> None:
        tr.who[trio.lowlevel.current_task()] = principal.name
        await serve(self, tsock, creds, principal)

    async def traced_op(self: Any, conn: Any, fn: Any, m: Any) -> None:
        c0 = time.thread_time()
        try:
            await run_op(self, conn, fn, m)
        finally:
            tr.rows.append((tr.batch, "OP", str(m.payload.get("op")), time.thread_time() - c0))

    async def traced_release(self: Any, conn: Any) -> None:
        c0 = time.thread_time()
        try:
            await release(self, conn)
        finally:
            tr.rows.append((tr.batch, "OP", "(teardown)", time.thread_time() - c0))

    S.run, S._serve_connection, S._run_op, S._release_all = (
        traced_run, traced_serve, traced_op, traced_release)


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
