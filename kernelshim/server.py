"""The shim's socket server: a capability space per connection, and the direct data path.

The wire format is protocol.py's (version 2): JSON control requests, binary data
requests, server push; docs/dev/protocol.md explains framing, push, flow control and
bounds. This module accepts connections, reads frames and dispatches them; the send
queue and push live in `sendpath.py`, the operations in `fileops.py` (files and data),
`adminops.py` (principals, statistics) and `pagerops.py`, all mixed into ShimServer;
`connection.py` holds what they share.

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
| reclaim_done {ticket, released?} | - | ProtocolError (pagerops.py)              |
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
| shim_stats {cursor, reset?}        | - (as principal_ls; `reset` root only) | - |

read, write and append normally travel as binary DATA frames (same arguments, same
checks, same errors); their JSON form is kept for tools and tests. WRITE_ALLOC (a DATA
frame only) is write that lays out the holes it meets itself, as `layout_get` would
(WRITE rights; also QuotaExceeded, NoSpace): the client's pipelined writes use it.

`advise`, `reclaim_done`, `trace_start` and `trace_stop` are the pager's (pagerops.py),
and so is what subscribing to "reclaim" does (a pager subscription per connection).

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
closed; established connections may idle, counted against their principal. A
connection refused (its principal's bank or the global cap full) is answered with the
error and closed REFUSE_SECONDS (20 ms) after it came, at most REFUSED_HELD (64)
waiting: a tenant reconnecting in a loop beyond its bank is slowed to that pace per
process, instead of making the daemon accept, refuse and wake it as fast as the loop
turns (bench_hostile's churn: a third of the loop's time).

Fairness between principals: a principal's connections take turns on the event loop
(FairTurns in connection.py): each principal serves requests in at most one step of
the run loop per batch, whatever its number of connections, and a step serving
requests gives the loop back after TURN_SECONDS (0.1 ms) while several principals
have work (after HOG_SECONDS alone) — so a request of one principal waits for at most
one short step of each other principal with work, not for all their connections'
backlogs. While they compete, a batch of the loop also has a budget: a backlogged
principal (its last turn ended with requests left over) starts no step in a batch that
has run BATCH_SECONDS (0.1 ms), nor in one where another backlogged principal's step has
begun, nor while others wait parked; it parks in a queue released one a batch, first
come first served, so a batch holds one backlogged step and a client waiting for each
reply waits behind about one of them, not one per hostile principal; a request the
loop's poll picks up goes before the backlogged step released into that batch
(FairTurns, `_PollWatch`), and one that comes during a batch ends the step in
progress after its current request (a non-blocking look at a side epoll set of the
waiting readers' sockets: `FairTurns.quiet_waiting`), so it waits for that request and
not a quantum (a tenant whose counted socket then brought no complete request loses
that for SIDE_BACKLOG_BATCHES batches: a dribbler cannot cut every step). A
connection's reader takes the turn before every read of the socket and every slice it
decodes, a new connection before its setup, and the accept
loop (from `accept` on) and the refusals take the server's admission turn
(FairTurns.admission), backlogged like a flooding principal. A request that blocks (I/O, a lock) passes its
principal's turn on, so one principal's connections still overlap their waits. A
pipelined backlog of JSON requests is decoded FEED_BYTES (512) at a time (a frame
longer than that up to its end at once), each slice served before the next is
decoded, so decoding cannot make a step longer than its turn (a read of 64 pipelined
requests took 0.2-0.3 ms to decode whole); and while principals compete, a costly
operation (below) or an `open` starts a step of its own rather than ending one that
already served requests; a connection's teardown gives the turn up between the slots
it closes once the quantum is used.
Operations that walk the principal table (COSTLY_OPS: `stats`, `principal_ls`,
`shim_stats`, principal changes, `register`) are limited to the principal's
`costly_rate` bank (ADMIN_RATE, 50, by default) a second after a burst of ADMIN_BURST
(32), and so are its ancestors' below root: one beyond it waits (its connection's
later requests behind it). `shim_stats` reports per principal the server's own time
for its requests (from asking for the turn to the reply written) and the part spent
waiting for the turn, so a client's latency can be split into the daemon's service
and the rest (the socket, the scheduling of processes).

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
import errno as _errno
import logging
import math
import os
import resource
import socket
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import trio

from blockdev import PrincipalId, SluiceError

from .grants import Rights
from .kernel import Kernel
from .pagerops import PagerOps
from .principals import Principal, PrincipalTable, TooManyObjects
from .protocol import (DATA_OPS, ERROR, OK, OLD_VERSION, READ, REQUEST, WRITE, WRITE_ALLOC,
                       DataReply,
                       DataRequest, Decoded, Decoder, FramingError, Message, OldVersion,
                       ProtocolError, brief, decode_data_frames, encode, encode_data_ok,
                       error_payload)
from .service import Credentials, MetadataService
from .adminops import AdminOps
from .loglimit import LogLimiter
from .budget import run_within_budget
from .connection import HANDSHAKE_SECONDS as HANDSHAKE_SECONDS
from .connection import REFUSE_SECONDS as REFUSE_SECONDS
from .connection import REFUSED_HELD as REFUSED_HELD
from .connection import MAX_CONNECTIONS as MAX_CONNECTIONS
from .connection import MAX_SEND_QUEUE as MAX_SEND_QUEUE
from .connection import MAX_SHM as MAX_SHM
from .connection import MAX_SHM_TOTAL as MAX_SHM_TOTAL
from .connection import PAGE_ROWS as PAGE_ROWS
from .connection import PUSH_KINDS as PUSH_KINDS
from .connection import RECV_BYTES as RECV_BYTES
from .connection import peer_hung_up as peer_hung_up
from .connection import ROOT_CONNECTIONS as ROOT_CONNECTIONS
from .connection import ROOT_SHM as ROOT_SHM
from .connection import FLOOR_CONNECTIONS, TENANT_CONNECTIONS, tenant_of
from .connection import SEND_HIGH_WATER as SEND_HIGH_WATER
from .connection import SEND_STALL_SECONDS as SEND_STALL_SECONDS
from .connection import ADMIN_BURST as ADMIN_BURST
from .connection import ADMIN_RATE as ADMIN_RATE
from .connection import TURN_SECONDS as TURN_SECONDS
from .connection import (REQUEST_CHECKPOINT_BUDGET, FairTurns, MAX_OFFSET, Connection, Share,
                         _InternalError)
from .fileops import FileOps
from .sendpath import SendPath, _close_all

log = logging.getLogger(__name__)

#: bytes of JSON requests decoded at a time (about 10 small requests, ~30 us): a
#: pipelining client's backlog is decoded a slice at a time, as it is served
FEED_BYTES = 512
#: refused connections answered in one step of the loop, at most (the next ones in the
#: next step: sleep_until a deadline already past is a checkpoint)
REFUSALS_PER_STEP = 8
#: the largest queued DATA request that may skip its own look for a hang-up (the look
#: once a step is for bursts of small requests: a few blocks each, cheap; a larger one
#: may be served for long, a throttled wait or a relocation of each block, and looks)
HANGUP_LOOK_BYTES = 16 << 10
#: a burst of pipelined whole-block writes over committed blocks (random overwrites)
#: is relocated together (`_write_burst`): at most this many requests, each at most
#: BURST_BYTES, and only as many as the rest of the step's quantum has room for at
#: BURST_WRITE_SECONDS each. A write in a burst costs the loop thread 0.13-0.23 ms of
#: CPU on this busy VM (`shim_stats`' burst_cpu_ms; less than one by one, ~0.25 ms),
#: so a burst of 8 may end its step ~0.3 ms past the quantum, as the last lone
#: request of a step may end ~0.25 ms past it. (A bound from the measured cost, a
#: moving average, made bursts shrink on a loaded machine, where the CPU time per
#: write rises: docs/BENCHMARKS.md, "Stop 17".)
BURST_WRITES = 8
#: (no larger than HANGUP_LOOK_BYTES: one by one, a larger pipelined request looks for
#: a hang-up before it is served, which the requests of a burst after its first do
#: not; and BURST_WRITE_SECONDS is the cost of a small write, not of a 64 KiB one:
#: review of direct6, B3)
BURST_BYTES = HANGUP_LOOK_BYTES
BURST_WRITE_SECONDS = 0.1e-3

#: operations that walk the principal table (or change it and save it), limited per
#: principal to ADMIN_RATE a second beyond a burst of ADMIN_BURST
COSTLY_OPS = frozenset({"stats", "principal_ls", "shim_stats", "principal_add",
                        "principal_set", "principal_rm", "register"})
#: operations that cannot be cut and take a step of their own while principals compete
#: (the costly ones, and `open`: a path walk and a grant from the metadata server,
#: 0.2-0.3 ms), instead of lengthening a step that already had its quantum
LONG_OPS = COSTLY_OPS | {"open"}

class IdleWindow(Protocol):
    """What `ShimServer._poll_next` asks of the loop's idle poll (fs/idlepoll.py
    `IdlePoll`): whether to poll now and how long, whether another descriptor has an
    event, and the outcome of a poll; `spun`: the seconds spent polling so far (the
    loop thread on a CPU serving nothing: `shim_stats`)."""

    spun: float

    def window_now(self) -> float: ...

    def ready(self) -> bool: ...

    def polled(self, hit: bool, *, now: float) -> None: ...

    def spent(self, *, now: float) -> None: ...


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


def socket_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether a live process listens on the unix socket at `path` (a connection is
    taken, or the backlog is full); False for nothing there or a stale file."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except BlockingIOError:
        return True  # (listening, its backlog full)
    except OSError:
        return False  # (ENOENT, ECONNREFUSED: no listener; ENOTSOCK ...)
    finally:
        probe.close()
    return True


class ShimServer(SendPath, FileOps, AdminOps, PagerOps):
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
        #: of those, admitted under their tenant's floor (TENANT_CONNECTIONS), and of
        #: `shm_bytes`, the buffers admitted under it (TENANT_SHM): apart from the caps
        self.floor_connections = 0
        #: how many connections the floors may hold in all (FLOOR_CONNECTIONS, less
        #: where the descriptor limit cannot be raised for them)
        self.floor_cap = FLOOR_CONNECTIONS
        #: the log lines tenants cause, rate-limited per uid (probe 16, F2)
        self.loglimit = LogLimiter()
        self.shm_bytes = 0
        self.floor_shm = 0
        #: connections closed because of an unexpected exception (bugs; see the log)
        self.connection_bugs = 0
        self._last_yield = 0.0
        # (`_request_budget`: the step whose FUSE queue was last probed, and whether it
        # was empty then)
        self._probed_step: float | None = None
        self._probed_quiet = False
        #: every connection being served (for push)
        self._conns: set[Connection] = set()
        self.send_stall_seconds = SEND_STALL_SECONDS
        self.turns = FairTurns(self._uncork)
        #: refused connections waiting for their error reply (REFUSE_SECONDS): when
        #: due, the socket, the reply
        self._refused: collections.deque[tuple[float, trio.socket.SocketType, bytes]] = \
            collections.deque()
        self._refused_wake = trio.Event()
        #: the loop's idle poll (fs/idlepoll.py `IdlePoll`, set by the mount; None: off):
        #: a connection task that served its request polls for the next one in its place
        #: while nothing else can run (`_poll_next`), and FairTurns' holds wait with its
        #: probe (`FairTurns.ready`)
        self._idle_poll: IdleWindow | None = None
        self._ops: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_op_")}

    @property
    def idle_poll(self) -> IdleWindow | None:
        return self._idle_poll

    @idle_poll.setter
    def idle_poll(self, idle: IdleWindow | None) -> None:
        self._idle_poll = idle
        self.turns.ready = idle.ready if idle is not None else None
        self.turns.may_hold = (lambda: idle.window_now() > 0) if idle is not None else None

    def idle_spun(self) -> float:
        idle = self._idle_poll
        return idle.spun if idle is not None else 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A plain non-blocking listener, waited on with trio's readiness calls: the accept
        # loop takes the admission turn after the wake-up and before `accept`, so that
        # its system calls are admission work (FairTurns) like the rest of it.
        if socket_in_use(self.path):
            # Another daemon serves this socket: a copy of this volume (the same uuid)
            # mounted elsewhere. Its socket is not ours to take (probe 19, F1).
            raise SluiceError(f"control socket {self.path} is served by another sluice "
                              "daemon: a copy of this volume (same uuid) is mounted")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # everyone may connect; identity comes from SO_PEERCRED
        mine = os.stat(self.path)
        sock.listen(64)
        sock.setblocking(False)
        _raise_fd_limit(self.max_connections + FLOOR_CONNECTIONS)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            # (where the hard limit kept it low, the floors take what is left above the
            # connections' and the daemon's own descriptors: review of stop 25, 7)
            self.floor_cap = max(0, min(FLOOR_CONNECTIONS, soft - 512 - self.max_connections))
        trio.lowlevel.add_instrument(self.turns)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._answer_refused, name="shim-refusals")
                task_status.started()
                # The accept loop's wake-ups are admission work (backlogged while
                # principals compete), not a request that goes first (FairTurns).
                self.turns.waiting_for(trio.lowlevel.current_task(), self.turns.admission)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    await self.turns.admit()
                    try:
                        conn = trio.socket.from_stdlib_socket(sock.accept()[0])
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        # Out of descriptors or memory: the daemon must not die of it;
                        # the backlog waits until connections close.
                        if exc.errno not in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS,
                                             _errno.ENOMEM, _errno.ECONNABORTED):
                            raise
                        log.warning("control socket: accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if self.connections >= self.max_connections + self.floor_cap:
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
            while self._refused:
                self._refuse_now(*self._refused.popleft()[1:])
            try:
                trio.lowlevel.remove_instrument(self.turns)
            except KeyError:
                pass
            self.turns.close()
            trio.lowlevel.notify_closing(sock)
            sock.close()
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self.path)  # (only our own: never another daemon's)
            except FileNotFoundError:
                pass

    # -- per connection ----------------------------------------------------------------

    def _identify(self, sock: trio.socket.SocketType
                  ) -> tuple[Credentials, Principal, bool] | None:
        """Who is connecting (SO_PEERCRED) and for which principal, and whether it is
        admitted under its tenant's floor (TENANT_CONNECTIONS); the connection is
        charged to that principal's bank. If the bank (or the global cap) is full, the
        peer is told so and the socket closed: returns None."""
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", raw)
            creds = Credentials(pid, uid, gid)
            principal = self.principals.resolve(pid, uid)
            pooled = self.connections - self.floor_connections
            floor = uid != 0 and self.floor_connections < self.floor_cap and \
                tenant_of(principal).usage.connections < TENANT_CONNECTIONS
            if floor:
                pass  # (its first connections: whatever the cap, its bank decides)
            elif uid != 0 and pooled >= self.max_connections - ROOT_CONNECTIONS:
                raise TooManyObjects(f"the daemon serves {pooled} connections beyond each "
                                     f"user's first {TENANT_CONNECTIONS}; the rest are "
                                     "kept for root")
            elif pooled >= self.max_connections:
                raise TooManyObjects(f"the daemon serves {pooled} connections")
            self.principals.charge_object(principal, "connections")
        except TooManyObjects as exc:
            log.debug("refusing a shim connection: %s", exc)
            if len(self._refused) >= REFUSED_HELD:
                self._refuse_now(*self._refused.popleft()[1:])
            self._refused.append((trio.current_time() + REFUSE_SECONDS, sock,
                                  self._frame(ERROR, 0, error_payload(exc))))
            self._refused_wake.set()
            return None
        except Exception:  # noqa: BLE001 - a bug: drop this connection, keep the daemon
            self.connection_bugs += 1
            log.exception("unexpected error identifying a shim connection; closing it")
            sock.close()
            return None
        self.floor_connections += floor
        return creds, principal, floor

    @staticmethod
    def _refuse_now(sock: trio.socket.SocketType, reply: bytes) -> None:
        try:  # a fresh socket has room for one small frame; never wait for it
            os.write(sock.fileno(), reply)
        except OSError:
            pass
        sock.close()

    async def _answer_refused(self) -> None:
        """Answer and close refused connections when due (REFUSE_SECONDS)."""
        while True:
            if not self._refused:
                await self._refused_wake.wait()
                self._refused_wake = trio.Event()
                continue
            await trio.sleep_until(self._refused[0][0])
            await self.turns.admit()
            now = t0 = trio.current_time()
            # At most REFUSALS_PER_STEP in one step of the loop (each is a write and a
            # close, 5-15 us): a churning tenant's 64 due at once took 0.2 ms in one go;
            # fewer if a request of a principal with no backlog comes meanwhile.
            for _ in range(REFUSALS_PER_STEP):
                if not (self._refused and self._refused[0][0] <= now):
                    break
                self._refuse_now(*self._refused.popleft()[1:])
                now = trio.current_time()
                if self.turns.part_done(t0, now):
                    break

    async def _serve_connection(self, tsock: trio.socket.SocketType, creds: Credentials,
                                principal: Principal, floor: bool) -> None:
        """Serve one admitted connection until it closes. Whatever happens here stays
        here: an unexpected exception is logged and closes this connection only."""
        share = self.turns.share(principal.id)
        turn = self.turns.turn_of(principal)
        # The setup (the peer's groups and start time: system calls and a read of /proc)
        # is the tenant's work: under its turn, so a churning tenant parks before it.
        try:
            await self.turns.take(turn)
        except BaseException:
            tsock.close()
            self.connections -= 1
            self.floor_connections -= floor
            self.principals.refund_object(principal, "connections")
            raise
        # A plain non-blocking socket, waited on with trio's readiness calls: a reply
        # that fits the socket buffer is written at once, without a task switch.
        raw = socket.socket(fileno=tsock.detach())
        raw.setblocking(False)
        conn = Connection(creds, principal, raw, share=share, turn=turn, floor=floor)
        self._conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._write_loop, conn, name="shim-writer")
                try:
                    await self._serve_requests(conn)
                finally:
                    if conn.corked:  # replies gathered in this step: out now
                        conn.corked = False
                        self._uncork(conn)
                    nursery.cancel_scope.cancel()  # the writer
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # noqa: BLE001 - a bug: close this connection, keep the daemon
            self.connection_bugs += 1
            self.loglimit.log(log, logging.ERROR, f"uid {conn.creds.uid}",
                              "unexpected error serving a shim connection (%s); closing it",
                              conn.creds, exc_info=True)
        finally:
            self._conns.discard(conn)
            conn.doom("closed")
            self.connections -= 1
            self.floor_connections -= floor
            with trio.CancelScope(shield=True):
                try:
                    await self.turns.take(turn)  # the teardown is the tenant's work
                    await self._release_all(conn)
                except Exception:  # noqa: BLE001
                    log.exception("unexpected error releasing a shim connection")
                self.principals.refund_object(principal, "connections")
            for _data, fds in conn.sendq:
                for fd in fds:
                    os.close(fd)
            conn.sendq.clear()
            self.turns.unwatch(conn)
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
        share, turn = conn.share, conn.turn
        assert share is not None and turn is not None
        turns = self.turns
        # This task's wake-ups by the poll are its tenant's work (FairTurns: they go
        # before a backlogged step unless the tenant is backlogged itself).
        me = trio.lowlevel.current_task()
        turns.waiting_for(me, turn)
        try:
            await self._serve_requests_of(conn, decoder, deadline=trio.current_time()
                                          + self.handshake_seconds)
        finally:
            turns.waiting_for(me, None)

    async def _serve_requests_of(self, conn: Connection, decoder: Decoder, *,
                                 deadline: float) -> None:
        raw = conn.sock
        share, turn = conn.share, conn.turn
        assert share is not None and turn is not None
        turns = self.turns
        # The first complete request (the handshake) must come within the deadline: a
        # connection that says nothing would otherwise hold its slot for good.
        while conn.doomed is None:
            if conn.queued > SEND_HIGH_WATER:  # backpressure: let the client read first
                while conn.queued > SEND_HIGH_WATER and conn.doomed is None:
                    if not await self._wait(conn, conn.progress.wait):
                        return
                continue
            # The turn before the read (and before each slice's decoding, below): a step
            # that begins after the last one gave the turn up (its quantum used) parks
            # before it reads and decodes, not after (that was 0.04-0.1 ms a step outside
            # every budget, run ahead of other principals' requests). The data path's
            # check: no coroutine, no clock read, when the turn is this step's already.
            if not turns.take_nowait(turn):
                await turns.take(turn)  # (always a wait when take_nowait refused)
                self._last_yield = trio.current_time()  # a new step: a new quantum
            data: bytes | None
            try:
                data = raw.recv(RECV_BYTES)
            except BlockingIOError:
                data = self._poll_next(conn) if deadline == math.inf else None
            except OSError:
                return
            if data is None:
                if deadline == math.inf:
                    # Past the handshake: wait without a cancel scope of its own (one per
                    # request costs more than the rest of a 4 KiB read's dispatch);
                    # `Connection.doom` wakes this wait by `notify_closing`.
                    conn.reading = True
                    turns.watch(conn)  # (FairTurns.quiet_waiting: once, while it stays in)
                    try:
                        await trio.lowlevel.wait_readable(raw)
                    except trio.ClosedResourceError:
                        return
                    finally:
                        conn.reading = False
                    if conn.doomed is not None:
                        return
                elif not await self._wait(conn, lambda: trio.lowlevel.wait_readable(raw),
                                          deadline=deadline):
                    if conn.doomed is None:
                        # debug: a tenant can make this happen as often as its bank allows
                        log.debug("closing a shim connection of pid %d (uid %d): no request "
                                  "within %g s", conn.creds.pid, conn.creds.uid,
                                  self.handshake_seconds)
                    return
                # The turn before the read: a backlogged tenant parks before it reads and
                # decodes its next requests, not after (that read and the first slice's
                # decoding made a step of 0.04-0.1 ms outside every budget).
                await self.turns.take(turn)
                self._last_yield = trio.current_time()  # waiting gave the loop back
                continue
            if not data:
                return
            # Whole DATA frames (a read; a burst of pipelined writes) skip the decoder.
            msgs: list[Decoded | ProtocolError] | None = \
                None if decoder.pending else decode_data_frames(data)  # type: ignore[assignment]
            # Else the decoder takes FEED_BYTES at a time, each slice served before the
            # next is decoded: one read may bring a thousand pipelined JSON requests, and
            # decoding them all first (~3.5 us each) would make a step of milliseconds
            # whatever the turn (bench_hostile's floods: 64 requests, 0.2-0.3 ms). A frame
            # longer than a slice is fed up to its end at once (once its length is known):
            # sliced, it would take ~120 feeds for 60 KB, ~60 us, and complete nothing.
            pos = 0
            while True:
                if msgs is None:
                    if not turns.take_nowait(turn):
                        await turns.take(turn)
                        self._last_yield = trio.current_time()
                    if len(data) <= FEED_BYTES:
                        chunk = data
                    else:
                        step = max(FEED_BYTES, decoder.frame_rest(data, pos))
                        chunk = data[pos:pos + step]
                    pos += len(chunk)
                    try:
                        msgs = decoder.feed(chunk)
                    except FramingError as exc:
                        self.loglimit.log(log, logging.INFO, f"uid {conn.creds.uid}",
                                          "closing shim connection of pid %d: %s",
                                          conn.creds.pid, exc)
                        for m in exc.messages:  # complete requests before the bad length
                            await self._handle(conn, m)
                        self._emit(conn, self._frame(ERROR, 0, error_payload(exc)))
                        await self._flush(conn)
                        return
                else:
                    pos = len(data)
                if msgs:
                    deadline = math.inf
                    if turns.side_hits:  # (FairTurns.watch: it brought a request)
                        turns.side_hits.discard(conn)
                # (the step in which a queued DATA request last looked for a hang-up)
                looked = None
                skip = 0  # (requests of this read served in a burst already)
                for i, m in enumerate(msgs):
                    if skip:
                        skip -= 1
                        continue
                    # A client that pipelined requests and hung up is not served any
                    # more: nobody reads the replies (a few queued layout_gets kept the
                    # daemon busy for minutes, RELIABILITY 2026-12-01). Checked before
                    # each queued JSON request, and before the first queued DATA request
                    # of each step (the loop given back since: `_last_yield`), so that a
                    # burst of pipelined 4 KiB writes pays one `poll` a step, not one each,
                    # and at most one step's DATA requests are served after a hang-up. A
                    # DATA request larger than HANGUP_LOOK_BYTES looks each time: one
                    # may be served for long (a relocation of every block, a throttled
                    # wait), and the `poll` is nothing beside it (review of direct4,
                    # H1). A lone 4 KiB read skips the syscall.
                    if (i or type(m) is not DataRequest) and \
                            (type(m) is not DataRequest or looked != self._last_yield
                             or m.length > HANGUP_LOOK_BYTES):
                        if peer_hung_up(raw):
                            conn.doom("the client hung up")
                            return
                        looked = self._last_yield
                    # The principal's turn first (fairness between principals, see
                    # FairTurns), then the request; what it cost goes to its histogram.
                    t0 = trio.current_time()
                    if turns.take_nowait(turn):  # the common case: no wait, no clock read
                        t1 = t0
                        share.waited.record_zero()
                    else:
                        parked = turn.parked
                        await turns.take(turn)
                        t1 = trio.current_time()
                        if turn.parked != parked:
                            self._last_yield = t1  # parking gave the loop back: a new quantum
                        share.waited.record(t1 - t0)
                    if t1 < turns.contended_until and (i + 1 < len(msgs) or pos < len(data)):
                        # Principals compete and this read brought more requests: the
                        # replies of this step go out together, one `sendmsg`, when it
                        # ends (alone, each goes out at once: that is quicker for one
                        # client). The last request of a read is not corked on its own:
                        # a client waiting for each reply has it at once, not after the
                        # step's next `recv` and poll (0.03-0.045 ms a request under
                        # bench_hostile's attack). (direct4 also corked an uncontended
                        # pipelined burst; merged with victim4's hold, that left a
                        # killed hostile client's connection open for good:
                        # tests/test_hostile.py::test_hostile_uids_at_once, left for
                        # the next stop.)
                        turns.cork(conn)
                    if type(m) is DataRequest:
                        # (its schedule points within the budget answered in place, as a
                        # FUSE handler's are: kernelshim/budget.py)
                        budget = self._request_budget(t1)
                        burst = (self._burst_of(conn, msgs, i, budget)
                                 if (m.op == WRITE or m.op == WRITE_ALLOC)
                                 and budget >= 2 * BURST_WRITE_SECONDS
                                 and i + 1 < len(msgs) else None)
                        if burst is not None and \
                                await run_within_budget(self._write_burst(conn, burst), budget):
                            skip = len(burst) - 1
                        else:
                            await run_within_budget(self._data_request(conn, m), budget)
                    else:
                        await self._handle(conn, m)
                    now = trio.current_time()
                    share.service.record(now - t0)
                    for _ in range(skip):
                        # A burst's other requests, each in the principal's histograms
                        # (their replies went with the first's; no wait for the turn):
                        # `principal_stats` counts requests, not bursts (review of
                        # direct6, B2).
                        share.service.record(now - t0)
                        share.waited.record_zero()
                    # A client that keeps the socket full never makes the reader wait, and
                    # one read may bring thousands of requests: give the loop back (and the
                    # turn to the principal's next connection) every TURN_SECONDS.
                    if now - self._last_yield >= turns.quantum(now):
                        if i + 1 < len(msgs) or pos < len(data):
                            # Requests left over: the principal is backlogged (it may
                            # park: FairTurns.take); a client waiting for its one reply is
                            # not, however long that request took.
                            self.turns.backlogged(turn)
                        await self._give_turn()
                    elif now < turns.contended_until and (i + 1 < len(msgs) or
                                                          pos < len(data)) \
                            and turns.quiet_waiting():
                        # A request of a principal with no backlog came during this step:
                        # the step ends here, so the batch ends and the loop's next poll
                        # picks it up (it waited for this request, not for a quantum).
                        turns.preempted += 1
                        self.turns.backlogged(turn)
                        await self._give_turn()
                if pos >= len(data) or conn.doomed is not None:
                    break
                msgs = None

    def _request_budget(self, now: float) -> float:
        """How long from `now` a DATA request's schedule points are answered in place
        (`run_within_budget`): REQUEST_CHECKPOINT_BUDGET, as a FUSE handler's, or what
        is left of the step's quantum if that is longer — alone (no principal
        competing) with no FUSE request queued, a step of pipelined requests holds the
        loop for HOG_SECONDS anyway between the requests, and a request's schedule
        points before the step's end only added passes of the loop inside it (a 4 KiB
        overwrite, ~0.2 ms, passed the device scheduler's past 0.1 ms in every other
        request, and each pass ended the step's corked replies: docs/BENCHMARKS.md,
        "Direct 4 KiB random writes"). The step still ends at its quantum; a FUSE
        request that comes during it now waits for that end (at most HOG_SECONDS, as
        behind a step of short requests) rather than for the next schedule point of a
        long one; while principals compete the quantum is the turn, as before."""
        budget = REQUEST_CHECKPOINT_BUDGET
        rest = self._last_yield + self.turns.quantum(now) - now
        if rest > budget:
            # The FUSE queue is probed (a `poll`) once a step, not once a request: a
            # FUSE request that comes during the step waits for its end, as it would
            # behind the step's requests between them.
            if self._probed_step != self._last_yield:
                pending = self.metadata_pending
                self._probed_step = self._last_yield
                self._probed_quiet = pending is None or not pending()
            if self._probed_quiet:
                return rest
        return budget

    def _poll_next(self, conn: Connection) -> bytes | None:
        """The connection's next request, polled for in the loop's place (None: not
        polled, or nothing came). A client that sends one small request after another
        (a 4 KiB random read) has its next one out a few µs after its reply; parking
        this task in `wait_readable` and taking the request through the loop's epoll
        costs more than the rest of the request (two `epoll_ctl`, the loop's batch, its
        instruments, the task's wake-up: docs/BENCHMARKS.md, "Direct 4 KiB requests").
        So when the loop would go idle anyway — no task runnable, no thread's callback
        queued, no deadline within the window — the task polls its own socket for up
        to the idle poll's window (fs/idlepoll.py decides when polling pays, and learns
        from these polls too), and stops at the first event of any other descriptor (a
        FUSE request, another connection, a thread's wake-up): those go through the
        loop at once, as before. It takes no one's time: the loop would spin in its idle
        poll meanwhile. The request caught is served in the same step, under the same
        turn and quantum as a request that came in the same read. Replies gathered in
        this step (principals compete: `FairTurns.cork`) go out first, whether it polls
        or not: the client sends its next request only once it has them (held to the
        step's end, they waited for the whole window); and a connection whose send
        queue still holds output (the socket took part: the writer has the rest) does
        not poll, so its writer runs at once."""
        idle = self.idle_poll
        if idle is None:
            return None
        window = idle.window_now()
        if not window:
            return None
        if conn.corked:
            # Out first, whatever is decided below: left corked, a task that does not
            # poll waits until its step ends anyway, but a partial send's rest would
            # wait for the writer (`wake_writer`) behind a whole window of polling.
            self.turns.uncork_now(conn)
        if conn.sendq:
            return None  # (the writer has the rest: let it run, the loop's poll waits)
        st = trio.lowlevel.current_statistics()
        if st.tasks_runnable or st.run_sync_soon_queue_size or \
                st.seconds_to_next_deadline <= window:
            return None
        raw = conn.sock
        now = trio.current_time
        t0 = now()
        end = t0 + window
        ready = idle.ready
        peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
        while True:
            try:
                # A byte's look (the loop's recv takes a 256 KiB buffer each call)
                raw.recv(1, peek)
            except BlockingIOError:
                if ready():  # someone else's I/O: the loop takes it (neither hit nor miss)
                    idle.spent(now=t0)
                    return None
                if now() >= end:
                    idle.polled(False, now=t0)
                    return None
                continue
            except OSError:
                idle.spent(now=t0)
                return b""  # (as the loop's own recv: the connection ends)
            idle.polled(True, now=t0)
            try:
                return raw.recv(RECV_BYTES)  # (b"" at the end of the stream)
            except BlockingIOError:
                return None
            except OSError:
                return b""

    async def _give_turn(self) -> None:
        """End this step: the loop goes to the others, the principal's turn to its next
        connection. FUSE requests the kernel holds go in the next batch (the poll's
        wake-ups run first: FairTurns), and they are their tenants' steps like any
        other (`FairTurns.serves`): one yield, not the rounds of `_yield_if_hogging`
        while requests are queued — with those, a tenant flooding the mount held every
        other tenant's step that used its quantum for eight batches of its own requests
        (docs/BENCHMARKS.md, "Stop 30"). (Between the slices of a large request:
        `FileOps._yield_if_hogging`.)"""
        now = self._last_yield = trio.current_time()
        pending = self.metadata_pending
        if pending is not None and pending():
            self._metadata_seen = now  # (the slice sizes: `FileOps._read`)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _rate_limited(self, conn: Connection) -> bool:
        """Wait until the rate of costly operations of the principal and of each
        ancestor below root (their `costly_rate` banks, read now: a change holds at
        once) admits one more, then for its turn again: whether the connection is
        still served."""
        assert conn.share is not None
        now = trio.current_time()
        p = conn.principal
        chain = [q for q in p.chain() if q.parent is not None] or [p]
        delay = 0.0
        for q in chain:
            # The tightest rate along q's chain, root's included (banks are ceilings).
            rates = [r.banks.costly_rate for r in q.chain() if r.banks.costly_rate is not None]
            sh = conn.share if q is p else self.turns.share(q.id)
            delay = max(delay, sh.admin.delay(now, float(min(rates)) if rates else ADMIN_RATE))
        if delay:
            if not await self._wait(conn, lambda: trio.sleep(delay)):
                return False
            assert conn.turn is not None
            await self.turns.take(conn.turn)
        return True

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
        if op in COSTLY_OPS and not await self._rate_limited(conn):
            return
        if op in LONG_OPS:
            now = trio.current_time()
            if now < self.turns.contended_until and \
                    now - self._last_yield > self.turns.quantum(now) / 4:
                # A long operation takes a step of its own while principals compete (it
                # cannot be cut short: `stats` is ~0.15-0.5 ms, `open` 0.2-0.3 ms), not
                # the end of a step that already served other requests; it counts as
                # work left over, so it may park to a later batch (FairTurns).
                assert conn.turn is not None
                self.turns.backlogged(conn.turn)
                await self._give_turn()
                await self.turns.take(conn.turn)
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
            self.loglimit.log(log, logging.ERROR, f"uid {conn.creds.uid}",
                              "unexpected error in shim op %s from pid %d",
                              brief(m.payload.get("op")), conn.creds.pid, exc_info=True)
            self._emit(conn, self._frame(ERROR, rid, error_payload(_InternalError(
                f"{type(exc).__name__}: {exc}"))))
            return
        fds = result.pop("_fds", None)
        self._emit(conn, self._frame(OK, rid, result), fds)

    def _burst_of(self, conn: Connection, msgs: list[Any], i: int,
                  budget: float) -> list[DataRequest] | None:
        """The pipelined writes from msgs[i] on that may be relocated together: whole
        blocks, at most BURST_BYTES each, on distinct blocks entirely over committed
        (sealed) blocks of the same grant, as many as `budget` has room for at
        BURST_WRITE_SECONDS each, and at most BURST_WRITES; None for fewer than two.
        Only a step with the quantum to itself asks (the budget is the quantum's rest
        only when no principal competes and no FUSE request is queued)."""
        first: DataRequest = msgs[i]
        g = conn.slots.get(first.slot)
        if g is None or g.revoked:
            return None
        bs = self.kernel.block_size
        emap = g.extents
        most = min(BURST_WRITES, int(budget / BURST_WRITE_SECONDS), len(msgs) - i)
        out: list[DataRequest] = []
        seen: set[int] = set()
        for m in msgs[i:i + most]:
            if type(m) is not DataRequest or m.slot != first.slot or \
                    not (m.op == WRITE or m.op == WRITE_ALLOC) or \
                    m.offset % bs or m.length % bs or not 0 < m.length <= BURST_BYTES or \
                    m.offset > MAX_OFFSET:
                break
            fb, n = m.offset // bs, m.length // bs
            if any(b in seen for b in range(fb, fb + n)) or \
                    emap.sealed_runs(fb, n) != [(fb, n)]:
                break
            seen.update(range(fb, fb + n))
            out.append(m)
        return out if len(out) >= 2 else None

    async def _write_burst(self, conn: Connection, burst: list[DataRequest]) -> bool:
        """Relocate a burst of pipelined writes together (`_burst_of`; the metadata
        server's `write_relocating_many`) and answer each (one send for all the
        replies). False, with nothing answered, when the burst could not be done as
        one (a write no longer over committed blocks, a bad buffer range, an error:
        nothing of it is done then): the caller serves the requests one by one, and
        each gets the result and the error it would have had alone."""
        cpu0 = time.thread_time()
        try:
            g = self._grant(conn, burst[0].slot)
            self.kernel.check(g, Rights.WRITE)
            self.kernel.check_pending(g)  # (its tenant's uncommitted ranges)
            writes = [(m.offset, memoryview(bytearray(self._buf(conn, m.buf, m.length))))
                      for m in burst]  # copies: see FileOps._write
            # (the host kernel's dirty pages of the file written back first, F2; the
            # writes' places at the writer's limits: `write_relocating_many`)
            await self.service.before_direct_change(g)
            if not await self.service.write_relocating_many(g, writes):
                return False
        except SluiceError:
            return False
        except Exception:  # noqa: BLE001 - served one by one, which logs it
            return False
        self._emit(conn, b"".join(encode_data_ok(m.request_id, m.length) for m in burst))
        self.turns.bursts += 1
        self.turns.burst_writes += len(burst)
        self.turns.burst_cpu += time.thread_time() - cpu0
        return True

    async def _data_request(self, conn: Connection, m: DataRequest) -> None:
        """A binary READ, WRITE or APPEND: the same checks and errors as the JSON ops."""
        try:
            if m.offset > MAX_OFFSET:  # as arg_int bounds the JSON form's offsets
                raise ProtocolError(f"offset {m.offset} exceeds {MAX_OFFSET}")
            g = self._grant(conn, m.slot)
            if m.op == READ:
                n = await self._read(conn, g, m.offset, m.length, m.buf)
                reply = encode_data_ok(m.request_id, n)
            elif m.op == WRITE or m.op == WRITE_ALLOC:
                n = await self._write(conn, g, m.offset, m.length, m.buf,
                                      allocate=m.op == WRITE_ALLOC)
                reply = encode_data_ok(m.request_id, n)
            else:
                offset, size = await self._append(conn, g, m.length, m.buf)
                reply = encode_data_ok(m.request_id, m.length, offset, size)
        except SluiceError as exc:
            reply = self._frame(ERROR, m.request_id, error_payload(exc))
        except Exception as exc:  # noqa: BLE001 - a client must never take the daemon down
            self.loglimit.log(log, logging.ERROR, f"uid {conn.creds.uid}",
                              "unexpected error in shim data op %s from pid %d",
                              DATA_OPS.get(m.op), conn.creds.pid, exc_info=True)
            reply = self._frame(ERROR, m.request_id, error_payload(_InternalError(
                f"{type(exc).__name__}: {exc}")))
        self._emit(conn, reply)

    async def _release_all(self, conn: Connection) -> None:
        """A connection ended: its trace (if it records one) and then its slots and
        shared buffer. Called holding the principal's turn (and shielded): the slots
        are closed one after the other, and once the turn's quantum is used the turn
        is given up between two of them and taken again, as between requests — a
        churned connection's teardown (each close of a written file is a metadata
        release) is no longer one step of up to a millisecond."""
        self._release_trace(conn)
        self._release_reclaim(conn)
        turn = conn.turn
        for slot in list(conn.slots):
            try:
                await self._close_slot(conn, slot)
            except Exception:  # noqa: BLE001
                log.exception("releasing slot %d failed", slot)
            now = trio.current_time()
            if turn is not None and conn.slots and self.turns.part_done(self._last_yield, now):
                self.turns.backlogged(turn)
                await self._give_turn()
                await self.turns.take(turn)
        self._drop_shm(conn)
