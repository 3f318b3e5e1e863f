"""The shim server's send path: replies and notifications through a bounded
per-connection send queue, and server push (docs/dev/protocol.md, "Push" and "Flow
control"). Mixed into ShimServer (server.py); it owns no state of its own beyond the
connections' send queues (`Connection.sendq`, `queued`, `corked`, `last_sent`,
`push_seq`) and reads the server's `_conns` and `send_stall_seconds`.
"""

from __future__ import annotations

import errno as _errno
import itertools
import logging
import os
import socket
import struct
from typing import Any, Iterable

import trio

from blockdev import PrincipalId

from .connection import MAX_SEND_QUEUE, PUSH_KINDS, Connection, FairTurns
from .loglimit import LogLimiter
from .principals import Principal
from .protocol import ERROR, PUSH, ReplyTooLarge, encode, error_payload

log = logging.getLogger("kernelshim.server")


class SendPath:
    """Sending replies and pushing notifications (ShimServer's; see the module)."""

    _conns: set[Connection]
    turns: FairTurns
    send_stall_seconds: float
    connection_bugs: int
    loglimit: LogLimiter

    # -- sending -------------------------------------------------------------------------

    def _frame(self, kind: int, rid: int, payload: dict[str, Any]) -> bytes:
        """The encoded reply; a reply that cannot be encoded (too large, not JSON) is a
        bug of this server, answered with an error instead of taking anything down."""
        try:
            return encode(kind, rid, payload)
        except ReplyTooLarge as exc:
            log.error("unexpected: reply to request %d too large: %s", rid, exc)
            return encode(ERROR, rid, error_payload(exc))
        except (TypeError, ValueError) as exc:
            log.error("unexpected: reply to request %d not encodable: %s", rid, exc)
            return encode(ERROR, rid, {"error": "InternalError", "errno": _errno.EIO,
                                       "message": "the reply could not be encoded"})

    def _emit(self, conn: Connection, data: bytes | memoryview,
              fds: list[int] | None = None) -> None:
        """Send a frame now if the socket takes it, else queue it for the writer. Never
        waits. The descriptors in `fds` are the connection's to close from here on."""
        if fds is None and not conn.sendq and not conn.corked and conn.doomed is None:
            # The common case (a small reply, nothing queued): one send, no bookkeeping.
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                conn.doom(f"send failed: {exc}")
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]  # the rest waits for the writer, as below
        fds = list(fds or ())
        if conn.doomed is not None:
            for fd in fds:
                os.close(fd)
            return
        view = memoryview(data)
        if conn.corked:  # sent at the end of the step (_uncork)
            if not conn.sendq:
                conn.last_sent = trio.current_time()
            conn.sendq.append((view, fds))
            conn.queued += len(view)
            if conn.queued > MAX_SEND_QUEUE:
                conn.doom("send queue full")
            return
        if not conn.sendq:
            try:
                sent = self._send_now(conn.sock, view, fds)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                _close_all(fds)
                conn.doom(f"send failed: {exc}")
                return
            if sent:
                _close_all(fds)
                fds = []
            if sent == len(view):
                return
            view = view[sent:]
        if not conn.sendq:
            conn.last_sent = trio.current_time()  # the stall clock starts now
        conn.sendq.append((view, fds))
        conn.queued += len(view)
        if conn.queued > MAX_SEND_QUEUE:
            self.loglimit.log(log, logging.INFO, f"uid {conn.creds.uid}",
                              "closing shim connection of pid %d: %d bytes of replies and "
                              "notifications unread", conn.creds.pid, conn.queued)
            conn.doom("send queue full")
        conn.wake_writer.set()

    def _uncork(self, conn: Connection) -> None:
        """The end of a step that gathered `conn`'s output: send what the socket takes
        now, as few system calls as possible; the writer gets the rest. Never raises
        (it runs in FairTurns.after_task_step)."""
        try:
            if conn.doomed is not None:
                conn.wake_writer.set()
                return
            while conn.sendq:
                views = []
                for view, fds in itertools.islice(conn.sendq, 256):
                    if fds:
                        break
                    views.append(view)
                try:
                    if views:
                        sent = conn.sock.sendmsg(views)
                    else:  # descriptors ride on the first byte of this frame alone
                        view, fds = conn.sendq[0]
                        sent = self._send_now(conn.sock, view, fds)
                except BlockingIOError:
                    break
                except OSError as exc:
                    conn.doom(f"send failed: {exc}")
                    return
                if not sent:
                    break
                conn.last_sent = trio.current_time()
                conn.queued -= sent
                while sent:
                    view, fds = conn.sendq[0]
                    _close_all(fds)
                    if sent >= len(view):
                        sent -= len(view)
                        conn.sendq.popleft()
                    else:
                        conn.sendq[0] = (view[sent:], [])
                        sent = 0
            if conn.sendq:
                conn.wake_writer.set()
            else:
                conn.signal_progress()
        except Exception:  # noqa: BLE001 - a bug: close this connection, keep the rest
            self.connection_bugs += 1
            self.loglimit.log(log, logging.ERROR, f"uid {conn.creds.uid}",
                              "unexpected error sending to a shim connection; closing it",
                              exc_info=True)
            conn.doom("internal error")

    @staticmethod
    def _send_now(sock: socket.socket, view: memoryview, fds: list[int]) -> int:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            return sock.sendmsg([view], anc)
        return sock.send(view)

    async def _write_loop(self, conn: Connection) -> None:
        """The connection's writer: sends what `_emit` could not, waiting for the socket;
        closes a connection that does not read for send_stall_seconds."""
        me = trio.lowlevel.current_task()
        self.turns.waiting_for(me, conn.turn)  # its wake-ups are its tenant's work
        try:
            await self._write_loop_of(conn)
        finally:
            self.turns.waiting_for(me, None)

    async def _write_loop_of(self, conn: Connection) -> None:
        while True:
            await conn.wake_writer.wait()
            conn.wake_writer = trio.Event()
            if conn.doomed is not None and not conn.sendq:
                return
            await self._flush(conn)

    async def _flush(self, conn: Connection) -> None:
        """Send the queue out (or give up on a connection that does not read)."""
        while conn.sendq:
            view, fds = conn.sendq[0]
            try:
                sent = self._send_now(conn.sock, view, fds)
            except BlockingIOError:
                with trio.move_on_at(conn.last_sent + self.send_stall_seconds) as cs:
                    try:
                        await trio.lowlevel.wait_writable(conn.sock)
                    except trio.ClosedResourceError:  # doomed while the reader waited
                        return
                if cs.cancelled_caught:
                    self.loglimit.log(log, logging.INFO, f"uid {conn.creds.uid}",
                                      "closing shim connection of pid %d: it read nothing "
                                      "for %g s", conn.creds.pid, self.send_stall_seconds)
                    conn.doom("peer does not read")
                    return
                continue
            except OSError as exc:
                conn.doom(f"send failed: {exc}")
                return
            _close_all(fds)
            conn.last_sent = trio.current_time()
            conn.queued -= sent
            if sent == len(view):
                conn.sendq.popleft()
            else:
                conn.sendq[0] = (view[sent:], [])
            conn.signal_progress()

    # -- push ----------------------------------------------------------------------------

    def push(self, principal: PrincipalId | Principal, kind: str,
             payload: dict[str, Any]) -> int:
        """Notify every connection of `principal` subscribed to `kind`; returns how many
        were notified. Never waits: the notification is queued behind the connection's
        replies; a connection that does not read is closed, not buffered for."""
        pid = principal.id if isinstance(principal, Principal) else principal
        return self.push_to((c for c in self._conns if c.principal.id == pid), kind, payload)

    def push_to(self, conns: Iterable[Connection], kind: str, payload: dict[str, Any]) -> int:
        """Notify the connections of `conns` that subscribed to `kind` (see `push`).
        The payload must fit one frame (ReplyTooLarge otherwise: the caller's bug)."""
        if kind not in PUSH_KINDS:
            raise ValueError(f"unknown notification kind {kind!r}")
        body = {**payload, "kind": kind}
        n = 0
        for conn in list(conns):
            if kind not in conn.subscribed or conn.doomed is not None:
                continue
            conn.push_seq = (conn.push_seq + 1) & 0xFFFFFFFF
            self._emit(conn, encode(PUSH, conn.push_seq, body))
            n += 1
        return n

    def connections_of(self, principal: PrincipalId) -> list[Connection]:
        return [c for c in self._conns if c.principal.id == principal]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
