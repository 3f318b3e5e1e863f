"""The direct-access client library: open files on a mounted sluice volume and do the
data I/O through grants, without the FUSE metadata server touching the data.

    from kernelshim.client import Client

    with Client.connect("/mnt/sluice") as c:
        with c.open("data/log.bin", "w") as f:
            f.write(b"hello")          # write layout, write, (commit at close)
        with c.open("data/log.bin") as f:
            assert f.read() == b"hello"

`AsyncClient` is the same API for trio (`await AsyncClient.connect(...)`, `await f.read()`).

A file object holds a capability slot; reads and writes go to the shim's data path
through a shared memory buffer (the socket carries only small binary requests, several
in flight). Writing past the allocated blocks asks for a write layout first (pNFS
style); `commit()` (also done by `close()` and `fsync()`) makes the written range part
of the file: extents become written, size and mtime update. Errors arrive typed:
GrantRevoked, RightsError, QuotaExceeded, ... (kernelshim's classes) or OSError
subclasses by errno.

Open modes mean what they mean for `open(2)` through the mount: "w" truncates, "x"
fails with FileExistsError on an existing file, and "a" appends each write at the end
of the file atomically (up to the shared buffer's size per write), also against
processes appending through the mount. `call` fetches every page of a paged reply
(`principal_ls`, `stats`) and returns them merged.

Notifications (server push: reclaim requests, revocation notices): the sync client
takes a callback (`Client.subscribe(kinds, callback)`), run in a background reader
thread, so it is called on time even while the application computes; from then on that
thread reads the socket and callers wait for it. The trio client yields them from
`async for note in client.notifications(kinds)`.

Cooperative reclaim: `Client.on_reclaim(callback)` calls `callback(ReclaimRequest)`
in that reader thread when the pager asks this client's principal to release frames
("release N frames within S seconds"); `async for req in client.reclaims()` on the
trio client. The answer is `file.advise(offset, length, dontneed=True)` of ranges the
client chooses (the pager counts the frames its principal drops) and, optionally,
`client.reclaim_done(req)` ("that is all"): the pager then settles the request at once
instead of at the deadline. A callback may make control calls (advise, reclaim_done)
on the same client; data calls (read, write) belong to the application's thread.

All the logic (requests, pipelining, layouts, commits) is in `clientcore` and runs the
same for both; this module only moves bytes. It imports no numpy, trio or daemon module
(the trio client imports trio when it is used).
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import socket
import stat
import threading
import time
from typing import Any, AsyncIterator, Callable, Collection

from .clientcore import (ClientProtocol, FileCore, Notification, Plan, ReclaimRequest, Ready,
                         Send, SendData, SharedBuffer, Wait, call, flags_for)
from .hybridwait import MIN_POLL, SPIN_SECONDS, HybridWait, ReplyClock
from .protocol import (_DATA_FRAME, _DATA_OK_FRAME, DATA, DATA_OK, MAX_FRAME, READ, VERSION,
                       ProtocolError)
from .rooterror import SluiceError

log = logging.getLogger(__name__)

CONTROL_XATTR = "user.sluice.control"
DEFAULT_SHM = 8 << 20
#: bytes asked of the socket per read
RECV_BYTES = MAX_FRAME + 8
#: seconds a cancelled trio call waits for the replies of its requests in flight
DRAIN_SECONDS = 5.0

_DATA_OK_SIZE = _DATA_OK_FRAME.size
_MSG_DONTWAIT = socket.MSG_DONTWAIT

#: recvmsg's ancillary buffer: room for up to 4 descriptors passed with SCM_RIGHTS
_ANCBUFSIZE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _mountinfo_path(field: str) -> str:
    """A path of /proc/self/mountinfo, its octal escapes (\\040 for a space) undone."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def sluice_mount_owner(path: str | os.PathLike[str]) -> int | None:
    """The uid that mounted the sluice volume whose mount point `path` is (FUSE's
    `user_id=`), or None if `path` is not the root of a fuse.sluice mount (the last
    mount over it counts, as the kernel's lookup sees it)."""
    real = os.path.realpath(path)
    owner: int | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if not sep or len(fields) < 5 or _mountinfo_path(fields[4]) != real:
                    continue
                tail = right.split()
                owner = None
                if len(tail) >= 3 and tail[0] == "fuse.sluice":
                    for opt in tail[2].split(","):
                        if opt.startswith("user_id=") and opt[8:].isdigit():
                            owner = int(opt[8:])
    except OSError:
        return None
    return owner


def control_socket(mountpoint: str | os.PathLike[str]) -> str:
    """The control socket of the volume mounted at `mountpoint`: what its root's
    `user.sluice.control` names, believed only at the root of a fuse.sluice mount made
    by root or by the caller, and for a socket the mount's owner owns (a tenant's
    directory, in the volume or on the host, naming a socket of its own would take in
    whoever is pointed at it: hostile probe 12, L1)."""
    try:
        sock = os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as exc:
        # In words, not the errno's: ENODATA/ENOTSUP only say the attribute is missing.
        if exc.errno == errno.ENOTCONN:
            why = (f"{mountpoint} is a dead mount: its daemon is not running (`sluice "
                   "mount` the volume there again)")
        elif exc.errno == errno.ENOENT:
            why = f"{mountpoint}: no such file or directory"
        elif exc.errno in (errno.ENODATA, errno.ENOTSUP):
            why = f"{mountpoint} is not a mounted sluice volume"
        else:
            why = (f"{mountpoint} is not a mounted sluice volume "
                   f"({os.strerror(exc.errno or 0)})")
        raise OSError(exc.errno, why) from None
    owner = sluice_mount_owner(mountpoint)
    if owner is None:
        raise OSError(errno.ENOTSUP, f"{mountpoint} is not a mounted sluice volume (not "
                      "the root of a sluice mount)")
    if owner not in (0, os.geteuid()):
        # Any user may mount a FUSE filesystem of its own calling itself sluice (on a
        # directory it owns, even inside a volume): as FUSE trusts a user's daemon
        # only for that user, so does this client (review of stop 24, C).
        raise OSError(errno.EPERM, f"{mountpoint} is uid {owner}'s own mount: its "
                      f"daemon is trusted by uid {owner} only")
    try:
        st = os.stat(sock)
    except (OSError, ValueError) as exc:
        raise OSError(errno.ENOENT, f"{mountpoint}: its control socket {sock!r} is "
                      f"missing ({exc})") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner:
        raise OSError(errno.EPERM, f"{mountpoint}: {sock!r} is not a socket of the "
                      f"mount's daemon (uid {owner}): not connecting")
    return sock


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _collect_fds(anc: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    """Add the descriptors one recvmsg passed (SCM_RIGHTS) to `fds`."""
    fdarr = array.array("i")
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fdarr.frombytes(cdata[:len(cdata) - len(cdata) % fdarr.itemsize])
    fds.extend(fdarr)


class _Base:
    """What the sync and trio clients share: the protocol state, the shared buffer."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.proto = ClientProtocol()
        self.shm: mmap.mmap | None = None
        self.shmview: memoryview = memoryview(b"")
        self.info: dict[str, Any] = {}
        self.buffer = SharedBuffer(self.shmview)
        #: descriptors received and not yet taken (`attach` and `trace_stop` send one)
        self._fds: list[int] = []

    def _relpath(self, path: str | os.PathLike[str]) -> str:
        p = os.fspath(path)
        if os.path.isabs(p):
            ap = os.path.abspath(p)
            if ap != self.mountpoint and not ap.startswith(self.mountpoint + os.sep):
                raise ValueError(f"{p} is not inside {self.mountpoint}")
            p = os.path.relpath(ap, self.mountpoint)
        return p

    def _check_hello(self, info: dict[str, Any]) -> None:
        if info.get("version") != VERSION:
            raise ProtocolError(f"the daemon speaks protocol {info.get('version')}, "
                                f"this client {VERSION}")
        self.info = info

    def _map_shm(self, res: dict[str, Any]) -> None:
        """Map the shared buffer passed by the `attach` reply `res`."""
        try:
            if not self._fds:
                raise ProtocolError("the attach reply carried no descriptor")
            self.shm = mmap.mmap(self._fds[0], res["size"])
            self.shmview = memoryview(self.shm)
            self.buffer = SharedBuffer(self.shmview)
        finally:
            _close_fds(self._fds)

    def _unmap_shm(self) -> None:
        if self.shm is not None:
            self.shmview.release()
            self.shm.close()
            self.shm = None
        _close_fds(self._fds)

    def _new_file(self, res: dict[str, Any], append: bool, read_ahead: bool = True) -> FileCore:
        core = FileCore(self.buffer, self.info.get("block_size") or 4096, res["slot"],
                        res["size"], res["rights"], append=append)
        core.read_ahead = read_ahead
        return core

    def _encode(self, step: Send | SendData) -> tuple[int, bytes]:
        if isinstance(step, SendData):
            return self.proto.data_request(step.op, step.slot, step.offset, step.length,
                                           step.buf)
        return self.proto.request(step.op, step.args)

    @staticmethod
    def _reclaim_done_args(request: ReclaimRequest | int,
                           released: int | None) -> dict[str, Any]:
        ticket = request.ticket if isinstance(request, ReclaimRequest) else int(request)
        return {"ticket": ticket, "released": released}


# -- the synchronous client ----------------------------------------------------------------

class Client(_Base):
    """A synchronous direct-access client. See the module docstring.

    One thread uses a client at a time (as with a file object); a subscribed client's
    callbacks run in its reader thread."""

    def __init__(self, mountpoint: str, sock_path: str, *, shm_size: int = DEFAULT_SHM,
                 spin: float = SPIN_SECONDS, pace: bool = True) -> None:
        super().__init__(mountpoint)
        #: whether a small read polls for its reply before sleeping (hybridwait.py)
        self.hybrid = HybridWait(spin)
        #: when the replies to queued data requests are due: a wait for one (a read
        #: piece, the oldest pipelined writes) sleeps on a timer, then polls, before it
        #: sleeps in recv (hybridwait.py); pace=False or spin=0 turns that off
        self.clock: ReplyClock | None = ReplyClock(spin) if spin and pace else None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        #: set once subscribed: the background thread that reads the socket from then on
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._callback: Callable[[Notification], None] | None = None
        #: what each kind of notification is handed to (subscribe, on_reclaim)
        self._handlers: dict[str, Callable[[Notification], None]] = {}
        #: requests of two threads (the application's, a callback in the reader's)
        #: must not interleave their frames
        self._send_lock = threading.Lock()
        #: a lone small read's request frame and reply, built and read in place
        #: (`_small_read`: no objects per read but the reply's few ints)
        self._req = bytearray(_DATA_FRAME.size)
        self._rep = bytearray(RECV_BYTES)
        self._repview = memoryview(self._rep)
        try:
            self.sock.connect(sock_path)
            self._check_hello(self.call("hello", version=VERSION))
            if shm_size:  # 0: a control-only client (administration, `sluice run`)
                self._map_shm(self.run(self._attach_plan(shm_size)))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _attach_plan(size: int) -> Plan:
        return (yield Wait((yield Send("attach", {"size": size}))))

    @classmethod
    def connect(cls, mountpoint: str | os.PathLike[str], *, shm_size: int = DEFAULT_SHM,
                spin: float = SPIN_SECONDS, pace: bool = True) -> Client:
        """Connect to the daemon of the volume mounted at `mountpoint`. `spin`: the
        seconds a small read may poll for its reply before sleeping (0: never poll;
        hybridwait.py says when polling is switched off by itself). `pace`: whether
        waits behind the client's own queue (a read stream's next piece, a full write
        window) are paced: a timer, then polling, then recv (hybridwait.py)."""
        return cls(os.fspath(mountpoint), control_socket(mountpoint), shm_size=shm_size,
                   spin=spin, pace=pace)

    # -- the driver ------------------------------------------------------------------

    def run(self, plan: Plan) -> Any:
        """Run a clientcore plan to its end: send what it sends, wait for what it waits
        for, throw the errors replies carry into it."""
        value: Any = None
        exc: BaseException | None = None
        while True:
            try:
                step = plan.throw(exc) if exc is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            exc = None
            try:
                if isinstance(step, Wait):
                    value = self._wait(step.rid)
                elif isinstance(step, Ready):
                    self._wait_ready(step.rid)
                    value = None
                else:
                    value = self._send_step(step)
            except (SluiceError, OSError) as e:
                exc = e

    def _send_step(self, step: Send | SendData) -> int:
        """Encode and send one request; its request id."""
        with self._send_lock:
            rid, data = self._encode(step)
            self._sendall(data)
        if self.clock is not None and isinstance(step, SendData):
            # its kind: the operation and the size rounded up to a power of two
            self.clock.sent(rid, (step.op, step.length.bit_length()), time.perf_counter())
        return rid

    def _data_call(self, step: SendData) -> Any:
        """Send one data request and wait for its reply: `_send_step` and `_wait` in
        one, for the 4 KiB read's short path (no plan, and without a reader thread the
        reply is taken straight from the socket: no bookkeeping per frame)."""
        proto = self.proto
        rid, data = proto.data_request(step.op, step.slot, step.offset, step.length,
                                       step.buf)
        if self._reader is not None:
            with self._send_lock:
                self._sendall(data)
            return self._wait(rid)
        self._sendall(data)
        sock = self.sock
        spin = self.hybrid.budget()
        if spin:  # poll for a while before sleeping (hybridwait.py says when it pays)
            t_end = time.perf_counter() + spin
            while True:
                try:
                    got = sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter() < t_end:
                        continue
                    self.hybrid.polled(False)
                    break
                try:
                    r = proto.receive_data_reply(got, rid)
                except BaseException:
                    self.hybrid.polled(False)  # a broken stream: no reply caught
                    raise
                if r is not None:
                    self.hybrid.polled(True)
                    return r
                if proto.has_reply(rid):
                    # A hit only for this request's whole reply (an error reply too),
                    # not for the end of the stream or the daemon refusing it.
                    self.hybrid.polled(not proto.closed and proto.failure is None)
                    return proto.reply(rid)
                self.hybrid.polled(False)
                break  # (part of the reply, or something before it: sleep for the rest)
        while True:
            r = proto.receive_data_reply(sock.recv(RECV_BYTES), rid)
            if r is not None:
                return r
            if proto.has_reply(rid):
                return proto.reply(rid)

    def _small_read(self, slot: int, pos: int, n: int) -> int:
        """A lone small read's round trip (`File.readinto` of a 4 KiB random read): the
        bytes read, now at the shared buffer's start. `_data_call` without its objects:
        the frame is packed into a buffer kept for it, the reply read into another and
        taken apart in place when it is the one DATA_OK frame that answers it (the
        common case); anything else (a notification, a pipelined write's reply before
        it, an error) goes through the protocol as in `_data_call`. The client's own
        Python per read adds straight to the round trip, where a FUSE reader pays one
        `preadv` (docs/BENCHMARKS.md, "Direct 4 KiB requests: the client's side")."""
        proto = self.proto
        if self._reader is not None or proto.closed or proto.failure is not None:
            r = self._data_call(SendData(READ, slot, pos, n, 0))
            got: int = r.n
            return got
        rid = next(proto._rids) & 0xFFFFFFFF
        req = self._req
        _DATA_FRAME.pack_into(req, 0, _DATA_FRAME.size - 4, VERSION, DATA, rid, READ, slot, pos,
                              n, 0)
        proto.outstanding.add(rid)
        sock = self.sock
        try:
            sock.sendall(req)
        except (BrokenPipeError, ConnectionResetError):
            pass  # (what the daemon said before it closed is read below, as in _sendall)
        rep, hybrid = self._rep, self.hybrid
        spin = hybrid.budget()
        if spin:  # poll for a while before sleeping (hybridwait.py says when it pays)
            now = time.perf_counter
            t_end = now() + spin
            while True:
                try:
                    k = sock.recv_into(rep, RECV_BYTES, _MSG_DONTWAIT)
                except BlockingIOError:
                    if now() < t_end:
                        continue
                    hybrid.polled(False)
                    break
                if k == _DATA_OK_SIZE and not proto._decoder.pending:
                    t = _DATA_OK_FRAME.unpack_from(rep)
                    if t[3] == rid and t[2] == DATA_OK and t[1] == VERSION and \
                            t[0] == _DATA_OK_SIZE - 4:
                        proto.outstanding.discard(rid)
                        hybrid.polled(True)
                        got = t[4]
                        return got
                try:
                    proto.receive(bytes(self._repview[:k]))
                except BaseException:
                    hybrid.polled(False)  # a broken stream: no reply caught
                    raise
                if proto.has_reply(rid):
                    # A hit only for this request's whole reply (an error reply too),
                    # not for the end of the stream or the daemon refusing it.
                    hybrid.polled(not proto.closed and proto.failure is None)
                    got = proto.reply(rid).n
                    return got
                hybrid.polled(False)
                break  # (part of the reply, or something before it: sleep for the rest)
        while True:
            k = sock.recv_into(rep, RECV_BYTES)
            if k == _DATA_OK_SIZE and not proto._decoder.pending:
                t = _DATA_OK_FRAME.unpack_from(rep)
                if t[3] == rid and t[2] == DATA_OK and t[1] == VERSION and \
                        t[0] == _DATA_OK_SIZE - 4:
                    proto.outstanding.discard(rid)
                    got = t[4]
                    return got
            proto.receive(bytes(self._repview[:k]))
            if proto.has_reply(rid):
                got = proto.reply(rid).n
                return got

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed the connection; what it said first (a refusal, say)
            # is still there to read, and reading it ends in ConnectionError.
            pass

    def _wait(self, rid: int) -> Any:
        self._wait_ready(rid, done=True)
        return self.proto.reply(rid)

    def _wait_ready(self, rid: int, *, done: bool = False) -> None:
        """Wait until the reply to `rid` is in (see clientcore.Ready), not taking it;
        `done`: the reply will be taken at once (the pacing clock learns the wait)."""
        proto = self.proto
        if self._reader is None:
            if self.clock is not None:
                self._paced(rid)
                if done:
                    self.clock.done(rid)
            while not proto.has_reply(rid):
                self._recv_once()
        elif threading.current_thread() is self._reader:
            # A callback's own request (advise from on_reclaim): the reader thread is
            # here, so it reads for itself; notifications wait for the callback's end.
            while not proto.has_reply(rid):
                self._pump()
        else:
            with self._cond:
                while not proto.has_reply(rid):
                    self._cond.wait()

    def _paced(self, rid: int) -> None:
        """Wait for the reply to `rid` as the clock says (hybridwait.py, ReplyClock):
        sleep on a timer for most of the time the daemon needs for the requests ahead
        of it, then poll the socket, then (late) sleep in recv. Returns once the reply
        is in, or at once when the clock cannot tell (a request ahead of an unknown
        kind) and the caller's recv loop waits as before."""
        proto, clock = self.proto, self.clock
        assert clock is not None
        if proto.has_reply(rid) or self.shm is None:
            return
        now = time.perf_counter
        ahead = proto.unanswered(rid)
        t0 = now()
        plan = clock.plan(ahead, t0)
        if plan is None:
            # Learn: wait in recv and take the arrival as it comes (exact).
            while not proto.has_reply(rid):
                self._recv_once()
            clock.arrived(ahead, now(), True)
            return
        sleep_until, poll_until = plan
        clock.paced += 1
        slept = sleep_until > t0
        if slept:
            time.sleep(sleep_until - t0)
        self._recv_ready()
        if proto.has_reply(rid):
            # There when the sleep ended: it came at some time during the sleep (the
            # clock then shrinks its estimate); without a sleep, it came just now.
            clock.early += 1
            clock.arrived(ahead, now(), not slept)
            return
        polled = poll_until > sleep_until
        if polled:
            # A timer wakes the client late on a busy machine: poll for the planned
            # window, but never less than MIN_POLL after waking (a poll window that was
            # over before the client ran again would count as a failed poll).
            poll_until = max(poll_until, now() + MIN_POLL)
        while now() < poll_until:
            if self._recv_ready(once=True) and proto.has_reply(rid):
                if proto.closed or proto.failure is not None:
                    clock.poll.polled(False)  # the end of the stream: no reply caught
                    return
                clock.caught += 1
                clock.poll.polled(True)
                clock.arrived(ahead, now(), True)
                return
        if polled:
            clock.poll.polled(False)
        clock.late += 1
        while not proto.has_reply(rid):
            self._recv_once()
        clock.arrived(ahead, now(), True)

    def _recv_ready(self, once: bool = False) -> bool:
        """Take what the socket holds now, without waiting (once: one read); whether
        it held anything."""
        got = False
        while True:
            try:
                data = self.sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return got
            got = True
            n = self.proto.receive(data)
            if n and (self._handlers or self._callback is not None):
                self._deliver()
            if not data or once:
                return got

    def _recv_once(self) -> int:
        """One read from the socket into the protocol (the calling thread's); returns the
        notifications it brought. Descriptors come only with the `attach` reply."""
        if self.shm is None:
            data, anc, _flags, _addr = self.sock.recvmsg(RECV_BYTES, _ANCBUFSIZE)
            if anc:
                _collect_fds(anc, self._fds)
        else:
            data = self.sock.recv(RECV_BYTES)
        n = self.proto.receive(data)
        if n and (self._handlers or self._callback is not None):
            self._deliver()
        return n

    def _pump(self) -> int:
        """The reader thread's one read: into the protocol, under the lock, waking the
        callers waiting for replies. Returns the notifications it brought (0 and the
        protocol closed at the end of the stream)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except OSError:
            data = b""
        with self._cond:
            try:
                n = self.proto.receive(data)
            except ProtocolError as exc:
                self.proto.failure = exc
                self.proto.closed = True
                n = 0
            self._cond.notify_all()
        return n if not self.proto.closed else 0

    def _read_loop(self) -> None:
        """The reader thread: read, hand replies to the waiting caller, run callbacks."""
        try:
            while not self.proto.closed:
                self._pump()
                if self.proto.notifications:
                    self._deliver()
        finally:
            with self._cond:
                self.proto.closed = True
                self._cond.notify_all()

    def _deliver(self) -> None:
        while self.proto.notifications:
            note = self.proto.notifications.popleft()
            cb = self._handlers.get(note.kind, self._callback)
            if cb is None:
                continue
            try:
                cb(note)
            except Exception:  # noqa: BLE001 - the application's bug must not stop delivery
                log.exception("notification callback failed on %s", note.kind)

    # -- operations ------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (raises the typed error it carries).
        A paged reply is fetched whole: every page, merged."""
        result: dict[str, Any] = self.run(call(op, **args))
        return result

    def subscribe(self, kinds: Collection[str], callback: Callable[[Notification], None]) -> None:
        """Receive the notifications of `kinds` the server pushes to this connection:
        `callback(note)` runs in a background reader thread as each arrives. Replaces
        an earlier `subscribe`; an `on_reclaim` callback stays unless `kinds` names
        "reclaim"."""
        self._callback = callback
        keep = {k: h for k, h in self._handlers.items() if k == "reclaim" and k not in kinds}
        self._handlers = {**{k: callback for k in kinds}, **keep}
        self._subscribe()

    def on_reclaim(self, callback: Callable[[ReclaimRequest], None] | None) -> None:
        """Call `callback(request)` whenever the pager asks this client's principal to
        release `request.frames` cache frames within `request.within` seconds (None:
        stop). It runs in the background reader thread, on time even while the
        application computes; it should answer quickly — `file.advise(...,
        dontneed=True)` of the ranges it gives up, then `reclaim_done(request)` —
        and leave data reads and writes to the application's thread. What is not
        released by the deadline the pager takes by policy."""
        if callback is None:
            self._handlers.pop("reclaim", None)
        else:
            def handle(note: Notification) -> None:
                callback(ReclaimRequest.from_note(note, time.monotonic()))
            self._handlers["reclaim"] = handle
        self._subscribe()

    def reclaim_done(self, request: ReclaimRequest | int, released: int | None = None) -> bool:
        """Tell the pager this client released what it will for `request` (or its
        ticket): the pager settles it now, taking what is missing by policy, rather
        than at the deadline. `released` is the client's own count, for the log.
        Returns whether the request was still pending."""
        reply = self.call("reclaim_done", **self._reclaim_done_args(request, released))
        return bool(reply.get("pending"))

    def _subscribe(self) -> None:
        self.call("subscribe", kinds=sorted(self._handlers))
        if self._reader is None and self._handlers:
            self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                            name="sluice-client-reader")
            self._reader.start()

    def open(self, path: str | os.PathLike[str], mode: str = "r", *, perms: int = 0o644,
             read_ahead: bool = True) -> File:
        """Open `path` (relative to the mount, or absolute inside it). `read_ahead`:
        sequential reads ask for the data after them too (see docs/dev/protocol.md,
        "Read-ahead and coherence"); False makes every read fetch its data when called."""
        res = self.call("open", path=self._relpath(path), flags=flags_for(mode), mode=perms)
        return File(self, self._new_file(res, "a" in mode, read_ahead))

    def register(self, principal: str) -> dict[str, Any]:
        """Attach this process (and the programs it execs and starts) to `principal`."""
        return self.call("register", principal=principal)

    def whoami(self) -> dict[str, Any]:
        return self.call("whoami")

    def notice(self, text: str, principal: str | None = None) -> int:
        """Send `text` to every client subscribed to "notice" (or those connected as
        `principal`); root or the volume's owner only. Returns how many got it."""
        n: int = self.call("notice", text=text, principal=principal)["sent"]
        return n

    def start_trace(self) -> None:
        """Have the pager log every block access until stop_trace() (root or the
        volume's owner; one trace at a time; it ends if this client disconnects)."""
        self.call("trace_start")

    def stop_trace(self) -> tuple[dict[str, Any], int]:
        """End the trace: (its size and whether it was cut short, a descriptor of the
        trace file, positioned at its start; the caller closes it)."""
        _close_fds(self._fds)
        try:
            reply = self.call("trace_stop")
        except BaseException:
            _close_fds(self._fds)
            raise
        fds, self._fds = self._fds, []
        if len(fds) != 1:
            _close_fds(fds)
            raise ProtocolError("trace_stop: expected one descriptor with the reply")
        return reply, fds[0]

    def close(self) -> None:
        if self._reader is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._reader.join()
            self._reader = None
        self._unmap_shm()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class File:
    """A file opened through the direct path (from `Client.open`)."""

    def __init__(self, client: Client, core: FileCore) -> None:
        self.client = client
        self.core = core

    @property
    def slot(self) -> int:
        return self.core.slot

    @property
    def rights(self) -> int:
        return self.core.rights

    @property
    def pos(self) -> int:
        return self.core.pos

    @pos.setter
    def pos(self, value: int) -> None:
        self.core.pos = value

    @property
    def closed(self) -> bool:
        return self.core.closed

    def readinto(self, buf: Any, offset: int | None = None) -> int:
        """Read into `buf` (at `offset`, or the position); returns the bytes read."""
        mv = memoryview(buf).cast("B")
        core = self.core
        pos = core.small_read_pos(len(mv), offset)
        if pos >= 0:  # the plan's first step, without the plan (4 KiB reads)
            return core.small_read_done(mv, offset, self.client._small_read(core.slot, pos,
                                                                            len(mv)))
        n: int = self.client.run(core.readinto_plan(mv, offset))
        return n

    def pread(self, n: int, offset: int) -> bytes | bytearray:
        data: bytes | bytearray = self.client.run(self.core.pread_plan(n, offset))
        return data

    def read(self, n: int = -1) -> bytes | bytearray:
        data: bytes | bytearray = self.client.run(self.core.read_plan(n))
        return data

    def pwrite(self, data: Any, offset: int) -> int:
        n: int = self.client.run(self.core.pwrite_plan(data, offset))
        return n

    def write(self, data: Any) -> int:
        n: int = self.client.run(self.core.write_plan(data))
        return n

    def commit(self) -> int:
        """Make the written range part of the file (size, mtime); returns the size."""
        n: int = self.client.run(self.core.commit_plan())
        return n

    def truncate(self, size: int | None = None) -> int:
        n: int = self.client.run(self.core.truncate_plan(size))
        return n

    def fsync(self) -> None:
        self.client.run(self.core.fsync_plan())

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        n: int = self.client.run(self.core.seek_plan(offset, whence))
        return n

    def tell(self) -> int:
        return self.core.pos

    def size(self) -> int:
        n: int = self.client.run(self.core.size_plan())
        return n

    def stat(self) -> dict[str, Any]:
        return self.client.call("stat", slot=self.slot)

    def advise(self, offset: int, length: int, *, priority: int | None = None,
               discardable: bool | None = None, willneed: bool = False,
               dontneed: bool = False) -> None:
        """Pager hints for bytes [offset, offset + length) of the file, for this client's
        principal: `priority` orders its own pages (0 normal, higher kept longer),
        `discardable` marks them droppable without write-back (needs write access),
        `willneed` reads them in now, `dontneed` lets them go now."""
        self.client.call("advise", slot=self.slot, offset=offset, length=length,
                         priority=priority, discardable=discardable, willneed=willneed,
                         dontneed=dontneed)

    def mint(self, rights: int) -> File:
        """A second handle on the same grant with fewer rights (kernelshim.Rights)."""
        res = self.client.call("mint", slot=self.slot, rights=int(rights))
        return File(self.client, self.client._new_file(
            {"slot": res["slot"], "size": self.core._size_hint, "rights": res["rights"]},
            False))

    def revoke(self) -> None:
        """Revoke this grant and every grant minted from it."""
        self.client.call("revoke", slot=self.slot)

    def close(self) -> None:
        self.client.run(self.core.close_plan())

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the trio client -------------------------------------------------------------------

class AsyncClient(_Base):
    """The trio flavour of `Client`: the same operations, awaited.

        async with await AsyncClient.connect(mountpoint) as c:
            f = await c.open("x", "w")
            await f.write(b"data")
            await f.close()

    Several tasks may use one client at once: their requests are in flight together.
    Whichever task waits reads the socket for all (one at a time), so notifications
    arrive while any task waits for a reply or iterates `notifications()`."""

    def __init__(self, mountpoint: str) -> None:
        super().__init__(mountpoint)
        import trio
        self._trio = trio
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._send_lock = trio.Lock()
        #: the shared buffer is one: data operations of several tasks take turns on it
        #: (their requests are pipelined within each turn)
        self._buffer_lock = trio.Lock()
        self._reading = False
        #: set (and replaced) after every read: tasks waiting for another's read
        self._progress = trio.Event()

    @classmethod
    async def connect(cls, mountpoint: str | os.PathLike[str], *, shm_size: int = DEFAULT_SHM,
                      sock_path: str | None = None) -> AsyncClient:
        """Connect to the volume mounted at `mountpoint` (through `sock_path` if given:
        a daemon's control socket, found from the mount otherwise)."""
        import trio
        path = sock_path or await trio.to_thread.run_sync(control_socket, mountpoint)
        self = cls(os.fspath(mountpoint))
        try:
            await self.sock.connect(path)
            self._check_hello(await self.call("hello", version=VERSION))
            if shm_size:
                self._map_shm(await self.run(Client._attach_plan(shm_size)))
        except BaseException:
            self._unmap_shm()
            self.sock.close()
            raise
        return self

    async def run(self, plan: Plan) -> Any:
        """As `Client.run`, awaited."""
        value: Any = None
        exc: BaseException | None = None
        sent: set[int] = set()  # this plan's requests not yet waited for
        while True:
            try:
                step = plan.throw(exc) if exc is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            exc = None
            try:
                if isinstance(step, Wait):
                    sent.discard(step.rid)
                    value = await self._wait(step.rid)
                elif isinstance(step, Ready):
                    while not self.proto.has_reply(step.rid):
                        await self._read_some()
                    value = None
                else:
                    rid, data = self._encode(step)
                    sent.add(rid)
                    await self._sendall(data)
                    value = rid
            except (SluiceError, OSError) as e:
                exc = e
            except BaseException:
                # Cancelled. The requests of this plan (not other tasks') may still be
                # served into or out of the shared buffer: wait for their replies,
                # shielded and bounded, before the buffer can be reused; a daemon that
                # does not answer in time costs the connection.
                if isinstance(step, Wait):
                    sent.add(step.rid)
                plan.close()
                sent.update(self.buffer.take_lost())
                with self._trio.move_on_after(DRAIN_SECONDS) as cs:
                    cs.shield = True
                    for rid in sorted(sent):
                        try:
                            await self._wait(rid)
                        except (SluiceError, OSError):
                            pass
                if cs.cancelled_caught:
                    self.sock.close()
                raise

    async def run_buffered(self, plan: Plan) -> Any:
        """Run a plan that uses the shared buffer, in its turn."""
        async with self._buffer_lock:
            return await self.run(plan)

    async def _sendall(self, data: bytes) -> None:
        async with self._send_lock:  # frames of two tasks must not interleave
            try:
                sent = 0
                while sent < len(data):
                    sent += await self.sock.send(data[sent:] if sent else data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed by the daemon: read what it said first (as Client._sendall)

    async def _read_some(self) -> None:
        """Read once if no other task is reading, else wait until that task read."""
        if self._reading:
            await self._progress.wait()
            return
        self._reading = True
        try:
            data, anc, _f, _a = await self.sock.recvmsg(RECV_BYTES, _ANCBUFSIZE)
            if anc:
                _collect_fds(anc, self._fds)
            self.proto.receive(data)
        finally:
            self._reading = False
            ev, self._progress = self._progress, self._trio.Event()
            ev.set()

    async def _wait(self, rid: int) -> Any:
        while not self.proto.has_reply(rid):
            await self._read_some()
        return self.proto.reply(rid)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.run(call(op, **args))
        return result

    async def notifications(self, kinds: Collection[str]) -> AsyncIterator[Notification]:
        """Subscribe to `kinds` and yield each notification the server pushes."""
        await self.call("subscribe", kinds=sorted(kinds))
        while True:
            while not self.proto.notifications:
                if self.proto.closed:
                    return
                await self._read_some()
            yield self.proto.notifications.popleft()

    def reclaims(self) -> ReclaimStream:
        """The pager's reclaim requests for this client's principal, as an async
        iterator: each asks to release `req.frames` frames within `req.within`
        seconds. Answer with `advise(..., dontneed=True)` of the ranges given up and,
        optionally, `await client.reclaim_done(req)`.

            async with client.reclaims() as requests:   # subscribed from here on
                ...                                     # (read the working set)
                async for req in requests:
                    await f.advise(..., dontneed=True)
                    await client.reclaim_done(req)

        `async for req in client.reclaims()` alone subscribes when the loop starts.
        This replaces the connection's other subscriptions (`notifications`); leaving
        the `async with` unsubscribes. Requests arrive while some task of this client
        waits on the socket (the iterator, or a reply): a task that computes without
        a checkpoint delays them, as it delays everything in trio."""
        return ReclaimStream(self)

    async def reclaim_done(self, request: ReclaimRequest | int,
                           released: int | None = None) -> bool:
        """As Client.reclaim_done."""
        reply = await self.call("reclaim_done", **self._reclaim_done_args(request, released))
        return bool(reply.get("pending"))

    async def open(self, path: str | os.PathLike[str], mode: str = "r", *,
                   perms: int = 0o644, read_ahead: bool = True) -> AsyncFile:
        res = await self.call("open", path=self._relpath(path), flags=flags_for(mode),
                              mode=perms)
        return AsyncFile(self, self._new_file(res, "a" in mode, read_ahead))

    async def register(self, principal: str) -> dict[str, Any]:
        return await self.call("register", principal=principal)

    async def aclose(self) -> None:
        self._unmap_shm()
        self.sock.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ReclaimStream:
    """`AsyncClient.reclaims()`: an async iterator of ReclaimRequest, and an async
    context manager that subscribes on entry and unsubscribes on exit."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._subscribed = False

    async def _subscribe(self) -> None:
        if not self._subscribed:
            await self._client.call("subscribe", kinds=["reclaim"])
            self._subscribed = True

    async def __aenter__(self) -> ReclaimStream:
        await self._subscribe()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._subscribed and not self._client.proto.closed:
            self._subscribed = False
            try:
                await self._client.call("subscribe", kinds=[])
            except (SluiceError, OSError):
                pass  # the connection is gone: so is the subscription

    def __aiter__(self) -> ReclaimStream:
        return self

    async def __anext__(self) -> ReclaimRequest:
        await self._subscribe()
        c = self._client
        while True:
            while not c.proto.notifications:
                if c.proto.closed:
                    raise StopAsyncIteration
                await c._read_some()
            note = c.proto.notifications.popleft()
            if note.kind == "reclaim":
                return ReclaimRequest.from_note(note, time.monotonic())


class AsyncFile:
    """A file opened through the direct path by an AsyncClient."""

    def __init__(self, client: AsyncClient, core: FileCore) -> None:
        self.client = client
        self.core = core

    @property
    def slot(self) -> int:
        return self.core.slot

    @property
    def pos(self) -> int:
        return self.core.pos

    async def readinto(self, buf: Any, offset: int | None = None) -> int:
        n: int = await self.client.run_buffered(self.core.readinto_plan(buf, offset))
        return n

    async def pread(self, n: int, offset: int) -> bytes:
        return bytes(await self.client.run_buffered(self.core.pread_plan(n, offset)))

    async def read(self, n: int = -1) -> bytes:
        return bytes(await self.client.run_buffered(self.core.read_plan(n)))

    async def pwrite(self, data: Any, offset: int) -> int:
        n: int = await self.client.run_buffered(self.core.pwrite_plan(data, offset))
        return n

    async def write(self, data: Any) -> int:
        n: int = await self.client.run_buffered(self.core.write_plan(data))
        return n

    async def commit(self) -> int:
        n: int = await self.client.run_buffered(self.core.commit_plan())
        return n

    async def truncate(self, size: int | None = None) -> int:
        n: int = await self.client.run_buffered(self.core.truncate_plan(size))
        return n

    async def fsync(self) -> None:
        await self.client.run_buffered(self.core.fsync_plan())

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        n: int = await self.client.run_buffered(self.core.seek_plan(offset, whence))
        return n

    async def size(self) -> int:
        n: int = await self.client.run_buffered(self.core.size_plan())
        return n

    async def stat(self) -> dict[str, Any]:
        return await self.client.call("stat", slot=self.slot)

    async def advise(self, offset: int, length: int, *, priority: int | None = None,
                     discardable: bool | None = None, willneed: bool = False,
                     dontneed: bool = False) -> None:
        """As File.advise."""
        await self.client.call("advise", slot=self.slot, offset=offset, length=length,
                               priority=priority, discardable=discardable,
                               willneed=willneed, dontneed=dontneed)

    async def close(self) -> None:
        await self.client.run_buffered(self.core.close_plan())

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
