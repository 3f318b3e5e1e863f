"""The shim's socket server: a capability space per connection, and the direct data path.

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
| attach {size}    | -      | ProtocolError (size), TooManyObjects (shm bank)       |
| open {path, flags, mode} | checked by the metadata server as the kernel would (O_CREAT, O_EXCL, O_TRUNC as through the mount) | NotFound, Exists, PermissionDenied, TooManyObjects, ... |
| read {slot, offset, length, buf}   | READ  | GrantRevoked, RightsError, ChecksumError |
| write {slot, offset, length, buf}  | WRITE | GrantRevoked, RightsError, NotAllocated  |
| append {slot, length, buf}         | WRITE | GrantRevoked, QuotaExceeded, NoSpace     |
| layout_get {slot, offset, length}  | WRITE | GrantRevoked, QuotaExceeded, NoSpace     |
| commit {slot, offset, length}      | WRITE | GrantRevoked                             |
| truncate {slot, size}              | WRITE | GrantRevoked, QuotaExceeded              |
| fsync {slot} / stat {slot}         | any   | GrantRevoked                             |
| mint {slot, rights}                | ⊇ rights | RightsError, GrantRevoked, TooManyObjects |
| revoke {slot} / close {slot}       | -     | BadSlot                                   |
| advise {slot, offset, length, priority?, discardable?, willneed?, dontneed?} | READ (WRITE with discardable) | GrantRevoked, RightsError |
| register {principal}               | owner of the principal, or root | NotAllowed |
| trace_start {} / trace_stop {}     | root or the daemon's uid (the volume owner) | NotAllowed, TraceBusy |
| principal_add/set/rm               | see principals.py | PrincipalError, TooManyObjects (children) |
| principal_ls {cursor}, stats {cursor} | - (non-root: only its own principals and their ancestors) | - |

`advise`, `trace_start` and `trace_stop` are the pager's (pagerops.py).

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

A connection that sends an undelimitable frame (bad length) or disconnects mid-frame
is closed; everything it held (slots, grants, shared memory, its bank charges) is
released. An unexpected exception while serving a connection is a bug: it is logged
and closes that connection, never another one or the daemon.
"""

from __future__ import annotations

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
from typing import Any, Awaitable, Callable

import trio

from blockdev import SluiceError

from .grants import Grant, Rights
from .kernel import Kernel
from .pagerops import PagerOps
from .principals import OBJECT_BANKS, Banks, Principal, PrincipalTable, Rate, TooManyObjects
from .protocol import (ERROR, MAX_FRAME, OK, REQUEST, VERSION, Decoder, FramingError, Message,
                       ProtocolError, ReplyTooLarge, arg_int, arg_str, brief, encode,
                       error_payload)
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
    slots: dict[int, Grant] = dataclasses.field(default_factory=dict)
    #: slots whose grant the metadata server issued (closing them closes the file)
    opened: set[int] = dataclasses.field(default_factory=set)
    next_slot: int = 1
    shm: mmap.mmap | None = None
    shm_view: memoryview | None = None


class ShimServer(PagerOps):
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

    async def _serve_connection(self, sock: trio.socket.SocketType, creds: Credentials,
                                principal: Principal) -> None:
        """Serve one admitted connection until it closes. Whatever happens here stays
        here: an unexpected exception is logged and closes this connection only."""
        conn = Connection(creds, principal)
        try:
            await self._serve_requests(sock, conn)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # noqa: BLE001 - a bug: close this connection, keep the daemon
            self.connection_bugs += 1
            log.exception("unexpected error serving a shim connection (%s); closing it",
                          conn.creds)
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                try:
                    await self._release_all(conn)
                except Exception:  # noqa: BLE001
                    log.exception("unexpected error releasing a shim connection")
                self.principals.refund_object(principal, "connections")
            sock.close()

    async def _serve_requests(self, sock: trio.socket.SocketType, conn: Connection) -> None:
        decoder = Decoder()
        # The first complete request (the handshake) must come within the deadline: a
        # connection that says nothing would otherwise hold its slot for good.
        deadline = trio.current_time() + self.handshake_seconds
        while True:
            with trio.move_on_at(deadline) as cs:
                data = await sock.recv(MAX_FRAME + 8)
            if cs.cancelled_caught:
                # debug: a tenant can make this happen as often as its bank allows
                log.debug("closing a shim connection of pid %d (uid %d): no request within "
                         "%g s", conn.creds.pid, conn.creds.uid, self.handshake_seconds)
                return
            if not data:
                return
            try:
                msgs = decoder.feed(data)
            except FramingError as exc:
                log.info("closing shim connection of pid %d: %s", conn.creds.pid, exc)
                for m in exc.messages:  # complete requests before the bad length
                    await self._handle(sock, conn, m)
                await self._send(sock, ERROR, 0, error_payload(exc))
                return
            if msgs:
                deadline = math.inf
            for m in msgs:
                await self._handle(sock, conn, m)

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

    async def _send(self, sock: trio.socket.SocketType, kind: int, rid: int,
                    payload: dict[str, Any], fds: list[int] | None = None) -> None:
        data = self._frame(kind, rid, payload)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            sent = await sock.sendmsg([data], anc)
        else:
            sent = await sock.send(data)
        while sent < len(data):
            sent += await sock.send(data[sent:])

    async def _handle(self, sock: trio.socket.SocketType, conn: Connection,
                      m: Message | ProtocolError) -> None:
        if isinstance(m, ProtocolError):
            await self._send(sock, ERROR, 0, error_payload(m))
            return
        rid = m.request_id
        try:
            if m.kind != REQUEST:
                raise ProtocolError(f"expected a request, got message kind {m.kind}")
            op = m.payload.get("op")
            fn = self._ops.get(op) if isinstance(op, str) else None
            if fn is None:
                raise ProtocolError(f"unknown operation {brief(op)}")
            result = await fn(conn, m.payload)
        except SluiceError as exc:
            await self._send(sock, ERROR, rid, error_payload(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a client must never take the daemon down
            log.exception("unexpected error in shim op %s from pid %d", brief(m.payload.get("op")),
                          conn.creds.pid)
            await self._send(sock, ERROR, rid, error_payload(_InternalError(
                f"{type(exc).__name__}: {exc}")))
            return
        fds = result.pop("_fds", None)
        try:
            await self._send(sock, OK, rid, result, fds)
        finally:
            for fd in fds or ():
                os.close(fd)

    async def _release_all(self, conn: Connection) -> None:
        self._release_trace(conn)
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
        slot = arg_int(p, "slot", hi=1 << 31)
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

    def _buf(self, conn: Connection, p: dict[str, Any], length: int) -> memoryview:
        if conn.shm_view is None:
            raise ProtocolError("no shared buffer attached (send 'attach' first)")
        off = arg_int(p, "buf", hi=len(conn.shm_view))
        if off + length > len(conn.shm_view):
            raise ProtocolError(f"buffer range {off}+{length} exceeds the shared buffer "
                                f"({len(conn.shm_view)} bytes)")
        return conn.shm_view[off:off + length]

    # -- operations --------------------------------------------------------------------

    async def _op_hello(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        return {"version": VERSION, "principal": conn.principal.name, "pid": conn.creds.pid,
                "uid": conn.creds.uid, "max_frame": MAX_FRAME, "max_shm": MAX_SHM,
                "block_size": self.kernel.block_size}

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
        self._drop_shm(conn, refund=False)
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
        buf = self._buf(conn, p, length)
        self.kernel.check(g, Rights.READ)
        n = max(0, min(length, self.service.size_of(g) - offset))
        pos = 0
        while pos < n:
            k = min(SLICE_BYTES, n - pos)
            await self.kernel.read_into(g, offset + pos, buf[pos:pos + k])
            pos += k
            if pos < n:
                await self._yield_if_hogging()
        return {"n": n}

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
        buf = self._buf(conn, p, length)
        pos = 0
        while pos < length:
            k = min(SLICE_BYTES, length - pos)
            if pos + k < length:
                k -= (offset + pos + k) % self.kernel.block_size  # slices end on blocks
            await self.kernel.write(g, offset + pos, buf[pos:pos + k])
            pos += k
            if pos < length:
                await self._yield_if_hogging()
        return {"n": length}

    async def _op_append(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        length = arg_int(p, "length", hi=MAX_SHM)
        buf = self._buf(conn, p, length)
        offset, size = await self.service.append(g, buf)
        return {"offset": offset, "n": length, "size": size}

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

