"""The pid registry of a mount: which process acts for which principal.

`sluice run` registers its own pid (authenticated by the control socket's peer
credentials) and then execs the program, so the program and every process it starts
act for that principal: a process belongs to the principal registered for it or for
its nearest registered ancestor. A registration remembers the process's start time,
so a reused pid is not mistaken for the registered process. Who may register as
whom is the table's decision (PrincipalTable.register); this module only remembers.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

T = TypeVar("T")

#: how long a resolved pid -> principal answer is reused (a process's ancestry can
#: change only by re-parenting to init, which then matches no registration)
RESOLVE_TTL_S = 2.0
#: entries of the resolve cache before it is cleared
RESOLVE_CACHE = 65536
#: parent links followed at most
MAX_ANCESTRY = 64


class ProcessRegistry(Generic[T]):
    """pid -> principal registrations, resolved through the process tree."""

    def __init__(self) -> None:
        #: pid -> (process start time, principal)
        self._registered: dict[int, tuple[int, T]] = {}
        #: pid -> (expiry, principal or None) resolved through the parent chain
        #: (pid, uid of the asker) -> (expiry, answer): keyed by the uid too, so that a
        #: pid reused within the expiry by another user's process (a wrapped pid space)
        #: is never charged to the principal the old one resolved to
        self._resolved: dict[tuple[int, int], tuple[float, T | None]] = {}

    def __bool__(self) -> bool:
        return bool(self._registered)

    def register(self, pid: int, principal: T, *, started: int) -> None:
        """Register process `pid`, which started at `started` (its start time when it
        connected): refused (ProcessLookupError) if the process now at `pid` is
        another one, e.g. the one that connected exited and its pid was reused."""
        if started < 0 or start_time(pid) != started:
            raise ProcessLookupError(f"process {pid} that connected has exited")
        self._registered[pid] = (started, principal)
        self._resolved.clear()

    def forget(self, principal: T) -> None:
        """Drop every registration for `principal` (it is being removed)."""
        for pid, (_st, q) in list(self._registered.items()):
            if q is principal:
                del self._registered[pid]
        self._resolved.clear()

    def resolve(self, pid: int, *, uid: int = -1, now: float | None = None) -> T | None:
        """The principal registered for `pid` (a process of `uid`) or its nearest
        registered ancestor."""
        if not self._registered:
            return None
        now = time.monotonic() if now is None else now
        hit = self._resolved.get((pid, uid))
        if hit is not None and hit[0] > now:
            return hit[1]
        visited: list[int] = [pid]
        p = self._walk_ancestry(pid, uid, now, visited)
        # Every process the walk went through resolves the same way (the answer found
        # above it, or none), and is remembered so: a new process or thread below a
        # known one costs one or two reads of /proc, not a walk to the top. (Each
        # answer used to be kept for the asking thread alone: a tenant whose requests
        # came from fresh threads 62 processes deep cost the event loop ~2.8 ms of
        # /proc reads per request, uncharged, before admission.)
        if len(self._resolved) + len(visited) > RESOLVE_CACHE:
            self._resolved.clear()
        entry = (now + RESOLVE_TTL_S, p)
        for v in visited:
            self._resolved[v, uid] = entry
        return p

    def _walk_ancestry(self, pid: int, uid: int, now: float, visited: list[int]
                       ) -> T | None:
        """The principal registered for `pid` or its nearest registered ancestor, or
        one remembered (still fresh) for a process on the way; appends to `visited`
        the processes walked through that had no fresh answer."""
        # FUSE names the calling thread: start from its process (a thread's own parent
        # link skips the process, which may be the registered one).
        pid = thread_group(pid)
        seen = 0
        while pid > 1 and seen < MAX_ANCESTRY:
            reg = self._registered.get(pid)
            if reg is not None:
                if reg[0] == start_time(pid):
                    return reg[1]
                del self._registered[pid]  # that process is gone; the pid was reused
            else:
                hit = self._resolved.get((pid, uid))
                if hit is not None and hit[0] > now:
                    return hit[1]
            if pid != visited[-1]:
                visited.append(pid)
            pid = parent_pid(pid)
            seen += 1
        return None

    def prune(self) -> None:
        """Forget registrations of processes that exited."""
        for pid, (st, _p) in list(self._registered.items()):
            if start_time(pid) != st:
                del self._registered[pid]
        self._resolved.clear()

    def items(self) -> list[tuple[int, T]]:
        return [(pid, p) for pid, (_st, p) in self._registered.items()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def thread_group(tid: int) -> int:
    """The process (thread group id) thread `tid` belongs to; `tid` if unknown."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


def start_time(pid: int) -> int:
    """Process `pid`'s start time in clock ticks since boot (-1: no such process)."""
    f = _stat_fields(pid)
    return int(f[19]) if f else -1


def parent_pid(pid: int) -> int:
    f = _stat_fields(pid)
    return int(f[1]) if f else 0
