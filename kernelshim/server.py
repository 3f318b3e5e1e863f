"""The shim's socket server: a capability space per connection, and the direct data path.

The wire format is protocol.py's (version 2): JSON control requests, binary data
requests, server push; docs/dev/protocol.md explains framing, push, flow control and
bounds. This module moves frames and dispatches them; the operations follow.

Each connection is authenticated by SO_PEERCRED (pid, uid, gid as the kernel reports
them) and acts for the principal its process is registered to (or its uid's default).
Clients name capabilities by slot in their own connection's capability space, so
they cannot forge one; a slot holds a grant, and every request through it is checked
by the kernel. File data moves through a shared memory buffer (op "attach"); the
socket carries only small requests.

Operations (each: rights required on the slot's grant; errors besides ProtocolError):

| op               | rights | errors                                                |
|------------------|--------|-------------------------------------------------------|
| hello            | -      | -                                                     |
| subscribe {kinds}| -      | ProtocolError (unknown kind)                          |
| attach {size}    | -      | ProtocolError (size), TooManyObjects (shm bank)       |
| open {path, flags, mode} | checked by the metadata server as the kernel would (O_CREAT, O_EXCL, O_TRUNC as through the mount) | NotFound, Exists, PermissionDenied, TooManyObjects, ... |
| read {slot, offset, length, buf}   | READ  | GrantRevoked, RightsError, ChecksumError |
| write {slot, offset, length, buf}  | WRITE | GrantRevoked, RightsError, NotAllocated  |
| append {slot, length, buf}         | WRITE | GrantRevoked, QuotaExceeded, NoSpace     |

read, write and append normally travel as binary DATA frames (same arguments, same
checks, same errors); their JSON form is kept for tools and tests.
| layout_get {slot, offset, length}  | WRITE | GrantRevoked, QuotaExceeded, NoSpace     |
| commit {slot, offset, length}      | WRITE | GrantRevoked                             |
| truncate {slot, size}              | WRITE | GrantRevoked, QuotaExceeded              |
| fsync {slot} / stat {slot}         | any   | GrantRevoked                             |
| mint {slot, rights}                | ⊇ rights | RightsError, GrantRevoked, TooManyObjects |
| revoke {slot} / close {slot}       | -     | BadSlot                                   |
| register {principal}               | owner of the principal, or root | NotAllowed |
| principal_add/set/rm               | see principals.py | PrincipalError, TooManyObjects (children) |
| principal_ls {cursor}, stats {cursor} | - (non-root: only its own principals and their ancestors) | - |

`append` writes the buffer range at the end of the file and commits it under the
inode's lock, as the kernel's O_APPEND writes through the mount do: concurrent
appenders (direct or through the mount) never overlap. The reply names the offset.

Listings are paged: a reply whose `next_cursor` is not null has more rows; ask again
with `cursor` set to it (the client library does). Non-root callers see the principals
they may run as (and the one they act for) with their ancestors, and device-wide
totals; other tenants' names, owners and use stay hidden.

Bounds (the daemon is shared by tenants who do not trust each other): each connection
acts for one principal (its process's registered principal, else its uid's default)
and is charged to that principal's kernel-object bank: `connections` for the
connection itself, `shm` for its attached buffer, `caps` per slot, `grants` per grant.
Below those per-principal banks sit global caps (MAX_CONNECTIONS, MAX_SHM_TOTAL) with
a reserve only root may use, so that tenants together cannot lock root out. A
connection must send its first complete request within HANDSHAKE_SECONDS or it is
closed; established connections may idle, counted against their principal.

A client may send many requests without waiting (pipelining); one connection's
requests are served one after the other, in arrival order, so a pipelined request may
depend on an earlier one (open, then mint its slot) and replies come in request order.
Concurrency comes from connections (each served by its own task), not from one
connection's requests: a client that wants a slow fsync beside its reads uses two. Replies and
notifications go out through a per-connection send queue: written at once when the
socket takes them, queued otherwise. While more than SEND_HIGH_WATER bytes are queued
the connection's requests are not read (backpressure); a connection whose queue would
exceed MAX_SEND_QUEUE, or that leaves queued output unread for SEND_STALL_SECONDS, is
closed — a client that does not read is disconnected, never buffered without end.

A connection that sends an undelimitable frame (bad length) or disconnects mid-frame
is closed; everything it held (slots, grants, shared memory, its bank charges) is
released. An unexpected exception while serving a connection is a bug: it is logged
and closes that connection, never another one or the daemon.
"""

from __future__ import annotations

import collections
import dataclasses
import errno as _errno
import logging
import math
import mmap
import os
import resource
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import trio

from blockdev import PrincipalId, SluiceError

from .grants import Grant, Rights
from .kernel import Kernel
from .principals import OBJECT_BANKS, Banks, Principal, PrincipalTable, Rate, TooManyObjects
from .protocol import (APPEND, DATA_OPS, ERROR, MAX_FRAME, OK, OLD_VERSION, PUSH, READ, REQUEST,
                       VERSION, WRITE, DataReply, DataRequest, Decoded, Decoder, FramingError, Message, OldVersion,
                       ProtocolError, ReplyTooLarge, arg_int, arg_str, brief, encode,
                       encode_data_ok, error_payload)
from .service import Credentials, MetadataService

log = logging.getLogger(__name__)

#: largest shared buffer a connection may attach
MAX_SHM = 64 << 20
#: connections served at once (each holds a descriptor, a capability space and maybe a
#: buffer); each principal's `connections` bank is well below it
MAX_CONNECTIONS = 512
#: ... of which only root's processes may use the last ROOT_CONNECTIONS, so that
#: tenants together cannot lock the administrator out
ROOT_CONNECTIONS = 32
#: shared buffers of all connections together (bounds the daemon's memory); each
#: principal's `shm` bank is well below it, and the last ROOT_SHM bytes are root's
MAX_SHM_TOTAL = 1 << 30
ROOT_SHM = 128 << 20
#: seconds a new connection has to send its first complete request
HANDSHAKE_SECONDS = 5.0
#: rows per page of `principal_ls` and `stats` (a row is at most ~1 KB as JSON)
PAGE_ROWS = 32
#: large direct requests are served in slices of this size, and give the event loop
#: back between slices once they have held it for HOG_SECONDS
SLICE_BYTES = 256 << 10
HOG_SECONDS = 1e-3
#: bytes of replies and notifications queued for one connection at most
MAX_SEND_QUEUE = 1 << 20
#: while more than this is queued, the connection's requests are not read
SEND_HIGH_WATER = 256 << 10
#: seconds a connection may leave queued output unread before it is closed
SEND_STALL_SECONDS = 10.0
#: notification kinds a connection may subscribe to ("reclaim": release N frames by a
#: deadline; "revoked": a grant was revoked; "notice": free text from the administrator)
PUSH_KINDS = frozenset({"reclaim", "revoked", "notice"})
#: bytes asked of a socket per read
RECV_BYTES = 256 << 10


class BadSlot(SluiceError):
    errno = _errno.EBADF


class _InternalError(SluiceError):
    """The reply to a request that failed with a bug (logged with its traceback)."""

    errno = _errno.EIO


def _raise_fd_limit(connections: int) -> None:
    """Let the process hold a descriptor per connection, besides its own: raise the soft
    RLIMIT_NOFILE towards the hard limit (1024 by default would run out first)."""
    want = connections + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit to %d: %s", new, exc)


@dataclasses.dataclass(eq=False)
class Connection:
    creds: Credentials
    #: what the connection acts for, and is charged to (fixed at connect)
    principal: Principal
    sock: socket.socket
    slots: dict[int, Grant] = dataclasses.field(default_factory=dict)
    #: slots whose grant the metadata server issued (closing them closes the file)
    opened: set[int] = dataclasses.field(default_factory=set)
    next_slot: int = 1
    shm: mmap.mmap | None = None
    shm_view: memoryview | None = None
    #: notification kinds the client asked for
    subscribed: frozenset[str] = frozenset()
    push_seq: int = 0
    #: frames (and the descriptors riding on the first byte of one) not yet sent
    sendq: collections.deque[tuple[memoryview, list[int]]] = dataclasses.field(
        default_factory=collections.deque)
    queued: int = 0
    #: when the queue last moved (or became non-empty)
    last_sent: float = 0.0
    #: why the connection is being closed (None: it is not)
    doomed: str | None = None
    #: set when the writer should look at the queue; when it sent some; replaced after
    wake_writer: trio.Event = dataclasses.field(default_factory=trio.Event)
    progress: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: the wait the reader is in (cancelled to close the connection)
    wait_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None

    def doom(self, reason: str) -> None:
        if self.doomed is None:
            self.doomed = reason
            if self.wait_scope is not None:
                self.wait_scope.cancel()
            self.wake_writer.set()

    def signal_progress(self) -> None:
        ev, self.progress = self.progress, trio.Event()
        ev.set()


class ShimServer:
    def __init__(self, kernel: Kernel, principals: PrincipalTable, service: MetadataService,
                 path: Path, *, metadata_pending: Callable[[], bool] | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 handshake_seconds: float = HANDSHAKE_SECONDS) -> None:
        self.kernel = kernel
        #: whether metadata requests are waiting (the mount's FUSE queue is readable):
        #: large data requests then give the loop back between slices at once
        self.metadata_pending = metadata_pending
        self.principals = principals
        self.service = service
        self.path = path
        self.max_connections = max_connections
        self.handshake_seconds = handshake_seconds
        #: connections accepted and not yet closed (counted at accept, before their
        #: peer is known, so that a burst cannot overshoot the cap)
        self.connections = 0
        self.shm_bytes = 0
        #: connections closed because of an unexpected exception (bugs; see the log)
        self.connection_bugs = 0
        self._last_yield = 0.0
        #: every connection being served (for push)
        self._conns: set[Connection] = set()
        self.send_stall_seconds = SEND_STALL_SECONDS
        self._ops: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_op_")}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        await sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # everyone may connect; identity comes from SO_PEERCRED
        sock.listen(64)
        _raise_fd_limit(self.max_connections)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as exc:
                        # Out of descriptors or memory: the daemon must not die of it;
                        # the backlog waits until connections close.
                        if exc.errno not in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS,
                                             _errno.ENOMEM, _errno.ECONNABORTED):
                            raise
                        log.warning("control socket: accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if self.connections >= self.max_connections:
                        conn.close()
                        continue
                    # Identified and charged here, before anything can wait: a refused
                    # connection is closed at once, so the descriptors held stay within
                    # the banks of the principals connected.
                    who = self._identify(conn)
                    if who is None:
                        continue
                    self.connections += 1
                    nursery.start_soon(self._serve_connection, conn, *who,
                                       name="shim-connection")
        finally:
            sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- per connection ----------------------------------------------------------------

    def _identify(self, sock: trio.socket.SocketType) -> tuple[Credentials, Principal] | None:
        """Who is connecting (SO_PEERCRED) and for which principal; the connection is
        charged to that principal's bank. If the bank (or the global cap) is full, the
        peer is told so and the socket closed: returns None."""
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", raw)
            creds = Credentials(pid, uid, gid)
            principal = self.principals.resolve(pid, uid)
            if uid != 0 and self.connections >= self.max_connections - ROOT_CONNECTIONS:
                raise TooManyObjects(f"the daemon serves {self.connections} connections; "
                                     "the rest are kept for root")
            self.principals.charge_object(principal, "connections")
        except TooManyObjects as exc:
            log.debug("refusing a shim connection: %s", exc)
            try:  # a fresh socket has room for one small frame; never wait for it
                os.write(sock.fileno(), self._frame(ERROR, 0, error_payload(exc)))
            except OSError:
                pass
            sock.close()
            return None
        except Exception:  # noqa: BLE001 - a bug: drop this connection, keep the daemon
            self.connection_bugs += 1
            log.exception("unexpected error identifying a shim connection; closing it")
            sock.close()
            return None
        return creds, principal

    async def _serve_connection(self, tsock: trio.socket.SocketType, creds: Credentials,
                                principal: Principal) -> None:
        """Serve one admitted connection until it closes. Whatever happens here stays
        here: an unexpected exception is logged and closes this connection only."""
        # A plain non-blocking socket, waited on with trio's readiness calls: a reply
        # that fits the socket buffer is written at once, without a task switch.
        raw = socket.socket(fileno=tsock.detach())
        raw.setblocking(False)
        conn = Connection(creds, principal, raw)
        self._conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._write_loop, conn, name="shim-writer")
                try:
                    await self._serve_requests(conn)
                finally:
                    nursery.cancel_scope.cancel()  # the writer
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # noqa: BLE001 - a bug: close this connection, keep the daemon
            self.connection_bugs += 1
            log.exception("unexpected error serving a shim connection (%s); closing it",
                          conn.creds)
        finally:
            self._conns.discard(conn)
            conn.doom("closed")
            self.connections -= 1
            with trio.CancelScope(shield=True):
                try:
                    await self._release_all(conn)
                except Exception:  # noqa: BLE001
                    log.exception("unexpected error releasing a shim connection")
                self.principals.refund_object(principal, "connections")
            for _data, fds in conn.sendq:
                for fd in fds:
                    os.close(fd)
            conn.sendq.clear()
            trio.lowlevel.notify_closing(raw)
            raw.close()

    async def _wait(self, conn: Connection, fn: Callable[[], Awaitable[object]], *,
                    deadline: float = math.inf) -> bool:
        """Await `fn()` unless the connection is doomed meanwhile or `deadline` passes:
        whether it returned."""
        if conn.doomed is not None:
            return False
        with trio.CancelScope(deadline=deadline) as cs:
            conn.wait_scope = cs
            try:
                await fn()
            finally:
                conn.wait_scope = None
        return not cs.cancelled_caught and conn.doomed is None

    async def _serve_requests(self, conn: Connection) -> None:
        decoder = Decoder()
        raw = conn.sock
        # The first complete request (the handshake) must come within the deadline: a
        # connection that says nothing would otherwise hold its slot for good.
        deadline = trio.current_time() + self.handshake_seconds
        while conn.doomed is None:
            if conn.queued > SEND_HIGH_WATER:  # backpressure: let the client read first
                while conn.queued > SEND_HIGH_WATER and conn.doomed is None:
                    if not await self._wait(conn, conn.progress.wait):
                        return
                continue
            try:
                data = raw.recv(RECV_BYTES)
            except BlockingIOError:
                if not await self._wait(conn, lambda: trio.lowlevel.wait_readable(raw),
                                        deadline=deadline):
                    if conn.doomed is None:
                        # debug: a tenant can make this happen as often as its bank allows
                        log.debug("closing a shim connection of pid %d (uid %d): no request "
                                  "within %g s", conn.creds.pid, conn.creds.uid,
                                  self.handshake_seconds)
                    return
                continue
            except OSError:
                return
            if not data:
                return
            try:
                msgs = decoder.feed(data)
            except FramingError as exc:
                log.info("closing shim connection of pid %d: %s", conn.creds.pid, exc)
                for m in exc.messages:  # complete requests before the bad length
                    await self._handle(conn, m)
                self._emit(conn, self._frame(ERROR, 0, error_payload(exc)))
                await self._flush(conn)
                return
            if msgs:
                deadline = math.inf
            for m in msgs:
                await self._handle(conn, m)
            # A client that keeps the socket full never makes the reader wait: give the
            # loop back now and then (a clock read here; the FUSE queue probe, a system
            # call, only once that is due).
            if trio.current_time() - self._last_yield >= HOG_SECONDS:
                await self._yield_if_hogging()

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

    def _emit(self, conn: Connection, data: bytes, fds: list[int] | None = None) -> None:
        """Send a frame now if the socket takes it, else queue it for the writer. Never
        waits. The descriptors in `fds` are the connection's to close from here on."""
        fds = list(fds or ())
        if conn.doomed is not None:
            for fd in fds:
                os.close(fd)
            return
        view = memoryview(data)
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
            log.info("closing shim connection of pid %d: %d bytes of replies and "
                     "notifications unread", conn.creds.pid, conn.queued)
            conn.doom("send queue full")
        conn.wake_writer.set()

    @staticmethod
    def _send_now(sock: socket.socket, view: memoryview, fds: list[int]) -> int:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            return sock.sendmsg([view], anc)
        return sock.send(view)

    async def _write_loop(self, conn: Connection) -> None:
        """The connection's writer: sends what `_emit` could not, waiting for the socket;
        closes a connection that does not read for send_stall_seconds."""
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
                    await trio.lowlevel.wait_writable(conn.sock)
                if cs.cancelled_caught:
                    log.info("closing shim connection of pid %d: it read nothing for %g s",
                             conn.creds.pid, self.send_stall_seconds)
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

    # -- dispatch ------------------------------------------------------------------------

    async def _handle(self, conn: Connection, m: Decoded | ProtocolError) -> None:
        if isinstance(m, DataReply):
            m = ProtocolError(f"expected a request, got a data reply (id {m.request_id})")
        if isinstance(m, OldVersion):
            self._emit(conn, encode(ERROR, m.request_id, error_payload(m), version=OLD_VERSION))
            return
        if isinstance(m, ProtocolError):
            self._emit(conn, self._frame(ERROR, 0, error_payload(m)))
            return
        if isinstance(m, DataRequest):
            await self._data_request(conn, m)
            return
        rid = m.request_id
        try:
            if m.kind != REQUEST:
                raise ProtocolError(f"expected a request, got message kind {m.kind}")
            op = m.payload.get("op")
            fn = self._ops.get(op) if isinstance(op, str) else None
            if fn is None:
                raise ProtocolError(f"unknown operation {brief(op)}")
        except SluiceError as exc:
            self._emit(conn, self._frame(ERROR, rid, error_payload(exc)))
            return
        await self._run_op(conn, fn, m)

    async def _run_op(self, conn: Connection,
                      fn: Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]],
                      m: Message) -> None:
        rid = m.request_id
        try:
            result = await fn(conn, m.payload)
        except SluiceError as exc:
            self._emit(conn, self._frame(ERROR, rid, error_payload(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a client must never take the daemon down
            log.exception("unexpected error in shim op %s from pid %d", brief(m.payload.get("op")),
                          conn.creds.pid)
            self._emit(conn, self._frame(ERROR, rid, error_payload(_InternalError(
                f"{type(exc).__name__}: {exc}"))))
            return
        fds = result.pop("_fds", None)
        self._emit(conn, self._frame(OK, rid, result), fds)

    async def _data_request(self, conn: Connection, m: DataRequest) -> None:
        """A binary READ, WRITE or APPEND: the same checks and errors as the JSON ops."""
        try:
            g = self._grant(conn, m.slot)
            if m.op == READ:
                n = await self._read(conn, g, m.offset, m.length, m.buf)
                reply = encode_data_ok(m.request_id, n)
            elif m.op == WRITE:
                n = await self._write(conn, g, m.offset, m.length, m.buf)
                reply = encode_data_ok(m.request_id, n)
            else:
                offset, size = await self._append(conn, g, m.length, m.buf)
                reply = encode_data_ok(m.request_id, m.length, offset, size)
        except SluiceError as exc:
            reply = self._frame(ERROR, m.request_id, error_payload(exc))
        except Exception as exc:  # noqa: BLE001 - a client must never take the daemon down
            log.exception("unexpected error in shim data op %s from pid %d",
                          DATA_OPS.get(m.op), conn.creds.pid)
            reply = self._frame(ERROR, m.request_id, error_payload(_InternalError(
                f"{type(exc).__name__}: {exc}")))
        self._emit(conn, reply)

    async def _release_all(self, conn: Connection) -> None:
        for slot in list(conn.slots):
            try:
                await self._close_slot(conn, slot)
            except Exception:  # noqa: BLE001
                log.exception("releasing slot %d failed", slot)
        self._drop_shm(conn)

    def _drop_shm(self, conn: Connection, *, refund: bool = True) -> None:
        if conn.shm_view is not None:
            conn.shm_view.release()
            conn.shm_view = None
        if conn.shm is not None:
            self.shm_bytes -= len(conn.shm)
            if refund:
                self.principals.refund_object(conn.principal, "shm", len(conn.shm))
            conn.shm.close()
            conn.shm = None

    # -- slots -------------------------------------------------------------------------

    def _new_slot(self, conn: Connection, grant: Grant) -> int:
        self.principals.charge_object(conn.principal, "caps")
        slot = conn.next_slot
        conn.next_slot += 1
        conn.slots[slot] = grant
        return slot

    def _slot(self, conn: Connection, p: dict[str, Any]) -> Grant:
        return self._grant(conn, arg_int(p, "slot", hi=1 << 31))

    @staticmethod
    def _grant(conn: Connection, slot: int) -> Grant:
        g = conn.slots.get(slot)
        if g is None:
            raise BadSlot(f"no capability in slot {slot}")
        return g

    async def _close_slot(self, conn: Connection, slot: int) -> None:
        g = conn.slots.pop(slot)
        self.principals.refund_object(conn.principal, "caps")
        if slot in conn.opened:
            conn.opened.discard(slot)
            self.kernel.release(g)
            await self.service.close(g)
        else:
            self.kernel.release(g)

    @staticmethod
    def _buf(conn: Connection, off: int, length: int) -> memoryview:
        if conn.shm_view is None:
            raise ProtocolError("no shared buffer attached (send 'attach' first)")
        if length > MAX_SHM:
            raise ProtocolError(f"length {length} exceeds {MAX_SHM}")
        if off > len(conn.shm_view) or off + length > len(conn.shm_view):
            raise ProtocolError(f"buffer range {off}+{length} exceeds the shared buffer "
                                f"({len(conn.shm_view)} bytes)")
        return conn.shm_view[off:off + length]

    # -- operations --------------------------------------------------------------------

    async def _op_hello(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        return {"version": VERSION, "principal": conn.principal.name, "pid": conn.creds.pid,
                "uid": conn.creds.uid, "max_frame": MAX_FRAME, "max_shm": MAX_SHM,
                "block_size": self.kernel.block_size}

    async def _op_subscribe(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        kinds = p.get("kinds")
        if not isinstance(kinds, list) or len(kinds) > len(PUSH_KINDS) or \
                not all(isinstance(k, str) and k in PUSH_KINDS for k in kinds):
            raise ProtocolError(f"argument 'kinds' must list notification kinds of "
                                f"{sorted(PUSH_KINDS)}")
        conn.subscribed = frozenset(kinds)
        return {"kinds": sorted(conn.subscribed)}

    async def _op_attach(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        size = arg_int(p, "size", lo=4096, hi=MAX_SHM)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        held = len(conn.shm) if conn.shm is not None else 0
        budget = MAX_SHM_TOTAL if conn.creds.uid == 0 else MAX_SHM_TOTAL - ROOT_SHM
        if self.shm_bytes - held + size > budget:
            raise TooManyObjects(f"shared memory budget exhausted ({self.shm_bytes} of "
                                 f"{budget} bytes attached); ask for less")
        # The new buffer replaces the old: the principal pays the difference (its bank
        # must hold the new one whole).
        self.principals.charge_object(conn.principal, "shm", size - held)
        fd = os.memfd_create("sluice-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.principals.refund_object(conn.principal, "shm", size - held)
            raise
        try:
            self._drop_shm(conn, refund=False)
        except BufferError:  # requests in flight use the old buffer
            m.close()
            os.close(fd)
            self.principals.refund_object(conn.principal, "shm", size - held)
            raise ProtocolError("the shared buffer is in use by requests in flight") from None
        conn.shm, conn.shm_view = m, memoryview(m)
        self.shm_bytes += size
        # The fd travels with the reply and is closed here once sent: the client has its
        # own copy, and the mapping keeps the memory alive on this side.
        return {"size": size, "_fds": [fd]}

    async def _op_open(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        path = arg_str(p, "path")
        flags = arg_int(p, "flags", hi=0o77777777)
        mode = arg_int(p, "mode", hi=0o7777) if "mode" in p else 0o644
        grant = await self.service.open_path(path, flags, mode, conn.creds, conn.principal)
        try:
            slot = self._new_slot(conn, grant)
        except BaseException:
            self.kernel.release(grant)
            await self.service.close(grant)
            raise
        conn.opened.add(slot)
        return {"slot": slot, "inode": grant.inode, "rights": int(grant.rights),
                "size": self.service.size_of(grant)}

    async def _op_read(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=MAX_SHM)
        return {"n": await self._read(conn, g, offset, length,
                                      arg_int(p, "buf", hi=1 << 62))}

    async def _read(self, conn: Connection, g: Grant, offset: int, length: int,
                    at: int) -> int:
        buf = self._buf(conn, at, length)
        self.kernel.check(g, Rights.READ)
        n = max(0, min(length, self.service.size_of(g) - offset))
        pos = 0
        while pos < n:
            k = min(SLICE_BYTES, n - pos)
            await self.kernel.read_into(g, offset + pos, buf[pos:pos + k])
            pos += k
            if pos < n:
                await self._yield_if_hogging()
        return n

    async def _yield_if_hogging(self) -> None:
        """Give the event loop back if this request has held it for a while, so that the
        metadata requests of the mount wait behind a stream for at most that long."""
        pending = self.metadata_pending
        if pending is not None and pending():
            # Metadata first: let the FUSE workers take what is queued (a bounded number
            # of rounds, so a storm of metadata cannot stall a stream for good).
            for _ in range(8):
                await trio.lowlevel.cancel_shielded_checkpoint()
                if not pending():
                    break
            self._last_yield = trio.current_time()
            return
        now = trio.current_time()
        if now - self._last_yield >= HOG_SECONDS:
            self._last_yield = now
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _op_write(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=MAX_SHM)
        return {"n": await self._write(conn, g, offset, length,
                                       arg_int(p, "buf", hi=1 << 62))}

    async def _write(self, conn: Connection, g: Grant, offset: int, length: int,
                     at: int) -> int:
        buf = self._buf(conn, at, length)
        pos = 0
        while pos < length:
            k = min(SLICE_BYTES, length - pos)
            if pos + k < length:
                k -= (offset + pos + k) % self.kernel.block_size  # slices end on blocks
            await self.kernel.write(g, offset + pos, buf[pos:pos + k])
            pos += k
            if pos < length:
                await self._yield_if_hogging()
        return length

    async def _op_append(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        length = arg_int(p, "length", hi=MAX_SHM)
        offset, size = await self._append(conn, g, length, arg_int(p, "buf", hi=1 << 62))
        return {"offset": offset, "n": length, "size": size}

    async def _append(self, conn: Connection, g: Grant, length: int,
                      at: int) -> tuple[int, int]:
        self.kernel.check(g, Rights.WRITE)
        buf = self._buf(conn, at, length)
        return await self.service.append(g, buf)

    async def _op_layout_get(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=1 << 40)
        return {"allocated": await self.service.layout_get(g, offset, length)}

    async def _op_commit(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=1 << 40)
        return {"size": await self.service.layout_commit(g, offset, length)}

    async def _op_truncate(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        await self.service.truncate(g, arg_int(p, "size"))
        return {"size": self.service.size_of(g)}

    async def _op_fsync(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.NONE)
        await self.service.fsync(g)
        return {}

    async def _op_stat(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.NONE)
        return self.service.stat_of(g)

    async def _op_mint(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        rights = Rights(arg_int(p, "rights", hi=int(Rights.RW)))
        child = self.kernel.mint(g, rights)
        try:
            slot = self._new_slot(conn, child)
        except BaseException:
            self.kernel.release(child)
            raise
        return {"slot": slot, "rights": int(child.rights)}

    async def _op_revoke(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        await self.kernel.revoke(g)
        return {}

    async def _op_close(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        slot = arg_int(p, "slot", hi=1 << 31)
        if slot not in conn.slots:
            raise BadSlot(f"no capability in slot {slot}")
        await self._close_slot(conn, slot)
        return {}

    async def _op_register(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        principal = self.principals.get(arg_str(p, "principal", maxlen=64))
        self.principals.register(conn.creds.pid, principal, uid=conn.creds.uid)
        return {"pid": conn.creds.pid, "principal": principal.name}

    async def _op_whoami(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        who = self.principals.resolve(conn.creds.pid, conn.creds.uid)
        return {"pid": conn.creds.pid, "uid": conn.creds.uid, "principal": who.name}

    # -- administration ------------------------------------------------------------------

    @staticmethod
    def _banks_args(p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("space", "inodes", "cache_min", "cache_max", "io_weight", *OBJECT_BANKS):
            if k in p and p[k] is not None:
                out[k] = arg_int(p, k, hi=1 << 62)
        for k in ("io_reserve", "io_limit"):
            if k in p and p[k] is not None:
                out[k] = Rate.parse(arg_str(p, k, maxlen=64))
        return out

    async def _op_principal_add(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        args = self._banks_args(p)
        parent = arg_str(p, "parent", optional=True, maxlen=64) or "root"
        # Kernel-object banks not asked for: the default, or what the parent has if
        # that is less (asking for more than the parent holds stays an error).
        par = self.principals.get(parent)
        defaults = Banks()
        for k in OBJECT_BANKS:
            if k not in args:
                lim = self.principals.effective(par, k)
                mine = getattr(defaults, k)
                args[k] = mine if lim is None or (mine is not None and mine <= lim) else lim
        owner = arg_int(p, "owner_uid", hi=1 << 32) if p.get("owner_uid") is not None \
            else conn.creds.uid
        pr = self.principals.add(arg_str(p, "name", maxlen=64), parent=parent,
                                 owner_uid=owner, banks=Banks(**args),
                                 caller_uid=conn.creds.uid)
        return {"id": pr.id, "name": pr.name}

    async def _op_principal_set(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        pr = self.principals.set(arg_str(p, "name", maxlen=64), conn.creds.uid,
                                 **self._banks_args(p))
        return {"id": pr.id, "name": pr.name}

    async def _op_principal_rm(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = arg_str(p, "name", maxlen=64)
        move_to = arg_str(p, "move_to", optional=True, maxlen=64) or None
        victim = self.principals.get(name)
        heir = self.principals.remove(name, conn.creds.uid, move_to=move_to, save=False)
        try:
            if heir is not None:
                await self.service.move_storage(victim, heir)  # re-tagged, durably
        finally:
            self.principals.save()
        return {"removed": name, "storage_to": heir.name if heir else None}

    def _page(self, conn: Connection, p: dict[str, Any]) -> tuple[list[Principal], int | None]:
        """The principals of the page `cursor` names (of those the caller may see), and
        the cursor of the next page (None: this is the last)."""
        cursor = arg_int(p, "cursor", hi=1 << 31) if p.get("cursor") is not None else 0
        rows = self.principals.visible_to(conn.creds.uid, conn.principal)
        end = cursor + PAGE_ROWS
        return rows[cursor:end], (end if end < len(rows) else None)

    async def _op_principal_ls(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        page, nxt = self._page(conn, p)
        return {"principals": [dataclasses.asdict(i) for i in self.principals.info(page)],
                "next_cursor": nxt}

    async def _op_stats(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        page, nxt = self._page(conn, p)
        return {**self.service.statistics(names=[q.name for q in page]), "next_cursor": nxt}



def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
