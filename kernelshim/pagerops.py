"""The shim server's pager operations, mixed into ShimServer: hints for ranges of a
file (`advise`), cooperative reclaim (`subscribe` to "reclaim", `reclaim_done`) and
recording the pager's access trace (`trace_start`, `trace_stop`).

| op                                  | requires                      | errors               |
|-------------------------------------|-------------------------------|----------------------|
| advise {slot, offset, length, priority?, discardable?, willneed?, dontneed?} | READ on the slot's grant; WRITE with `discardable` | GrantRevoked, RightsError, BadSlot |
| reclaim_done {ticket, released?}    | - (answers the connection's own principal's request) | ProtocolError |
| trace_start {}                      | root, or the daemon's uid (the volume's owner) | NotAllowed, TraceBusy |
| trace_stop {}                       | the connection that started it | NotAllowed           |

`advise` hands the range, mapped to device blocks through the grant, to the pager for
the connection's principal (Kernel.advise). `discardable` needs WRITE: it lets the
pager drop the range's data without writing it back. Priority, discardable and
dontneed act only on frames charged to that principal (pager.Pager.advise): a tenant
that may read a shared file cannot drop or reorder another tenant's cached pages.

Reclaim: a connection subscribed to "reclaim" (`subscribe {kinds}`) holds one pager
subscription for its principal (Kernel.on_reclaim), cancelled when it unsubscribes
or closes. Each request of the pager is pushed as
`{"kind": "reclaim", "ticket": T, "frames": N, "within": SECONDS}` (docs/dev/protocol.md,
"Reclaim"). The client answers by `advise ... dontneed` of ranges it chooses (the
pager counts the frames its principal drops) and, optionally, `reclaim_done {ticket}`
to have the request settled now; the reply says whether that ticket was still
pending. Neither is required: at the deadline the pager takes what is missing.

A trace goes into an unlinked temporary file of the daemon's, at most MAX_TRACE_BYTES
(past that the rest is dropped, whole writes at a time, and the reply says
`truncated`); `trace_stop` ends it, appends the names of the principals (the trace
format's trailer, pager/trace.py) and sends that file's descriptor with the reply.
One trace at a time; it belongs to the connection that started it, and ends,
discarded, when that connection closes.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

from blockdev import SluiceError
from pager import name_principals

from .grants import Rights
from .kernel import PRIORITY_MAX, PRIORITY_MIN, Kernel
from .principals import NotAllowed
from .protocol import ProtocolError, arg_int

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger(__name__)

#: bytes of pager trace one `trace_start` may record: the daemon's disk is not the
#: tracer's to fill
MAX_TRACE_BYTES = 1 << 30


class TraceBusy(SluiceError):
    """A pager trace is being recorded already (one at a time)."""

    errno = _errno.EBUSY


class _TraceSink:
    """Where a trace goes: a binary file (pager/trace.py writes whole record arrays to
    it) that takes at most `limit` bytes and drops the rest, marked `truncated`."""

    def __init__(self, limit: int) -> None:
        self.file = tempfile.TemporaryFile(prefix="sluice-trace-")
        self.limit = limit
        self.written = 0
        self.truncated = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if self.truncated or self.written + n > self.limit:
            self.truncated = True
            return n
        self.file.write(data)
        self.written += n
        return n

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class PagerOps:
    """The `_op_*` of the pager (see the module docstring)."""

    kernel: Kernel
    #: the trace being recorded, and the connection that started it
    _trace: tuple[Connection, _TraceSink] | None = None

    async def _op_advise(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)  # type: ignore[attr-defined]
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=1 << 50)
        priority = None
        if p.get("priority") is not None:
            priority = arg_int(p, "priority", lo=PRIORITY_MIN, hi=PRIORITY_MAX)
        flags: dict[str, bool | None] = {}
        for k in ("discardable", "willneed", "dontneed"):
            v = p.get(k)
            if v is not None and not isinstance(v, bool):
                raise ProtocolError(f"argument {k!r} must be true, false or null")
            flags[k] = v
        if flags["discardable"] is not None:
            self.kernel.check(g, Rights.WRITE)
        await self.kernel.advise(g, offset, length, priority=priority,
                                 discardable=flags["discardable"],
                                 willneed=bool(flags["willneed"]),
                                 dontneed=bool(flags["dontneed"]))
        return {}

    # -- cooperative reclaim -------------------------------------------------------

    def _watch_reclaim(self, conn: Connection) -> None:
        """Register with the pager or unregister, as `conn`'s subscriptions now say."""
        want = "reclaim" in conn.subscribed
        if want and conn.reclaim is None:
            pid = conn.principal.id

            def asked(ticket: int, nframes: int, within: float) -> None:
                # In the pager's task: must not block, and no failure may reach it.
                try:
                    self.push_to((conn,), "reclaim",  # type: ignore[attr-defined]
                                 {"ticket": ticket, "frames": nframes,
                                  "within": round(within, 6)})
                except Exception:  # noqa: BLE001
                    log.exception("pushing a reclaim request to pid %d failed",
                                  conn.creds.pid)

            conn.reclaim = self.kernel.on_reclaim(pid, asked)
        elif not want and conn.reclaim is not None:
            conn.reclaim.cancel()
            conn.reclaim = None

    def _release_reclaim(self, conn: Connection) -> None:
        """`conn` is closing: its reclaim subscription ends (a request pending for its
        principal is settled at its deadline, as for a client that never answers)."""
        if conn.reclaim is not None:
            conn.reclaim.cancel()
            conn.reclaim = None

    async def _op_reclaim_done(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        ticket = arg_int(p, "ticket")
        released = arg_int(p, "released") if p.get("released") is not None else 0
        pending = self.kernel.answer_reclaim(conn.principal.id, ticket, released)
        return {"pending": pending}

    async def _op_trace_start(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        # Every tenant's accesses are in it: root's, or the volume owner's, to ask for.
        if conn.creds.uid not in (0, os.geteuid()):
            raise NotAllowed("only root or the volume's owner may record a pager trace")
        if self._trace is not None:
            raise TraceBusy("a pager trace is being recorded already")
        sink = _TraceSink(MAX_TRACE_BYTES)
        try:
            self.kernel.start_trace(sink)
        except BaseException:
            sink.close()
            raise
        self._trace = (conn, sink)
        return {"limit": MAX_TRACE_BYTES}

    async def _op_trace_stop(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        if self._trace is None or self._trace[0] is not conn:
            raise NotAllowed("this connection is not recording a pager trace")
        sink = self._end_trace()
        try:
            sink.flush()
            table = self.kernel.principals
            if table is not None:
                # (so that a replay shows principals by name: a removed one's id stays)
                name_principals(sink.file, {int(q.id): q.name for q in table.walk()})
            fd = os.dup(sink.file.fileno())
        finally:
            sink.close()
        os.lseek(fd, 0, os.SEEK_SET)
        # The descriptor travels with the reply and is closed once sent.
        return {"bytes": sink.written, "truncated": sink.truncated, "_fds": [fd]}

    def _end_trace(self) -> _TraceSink:
        assert self._trace is not None
        _conn, sink = self._trace
        self._trace = None
        self.kernel.stop_trace()
        return sink

    def _release_trace(self, conn: Connection) -> None:
        """`conn` is closing: a trace it was recording ends, discarded."""
        if self._trace is not None and self._trace[0] is conn:
            self._end_trace().close()
