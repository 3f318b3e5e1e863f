"""The client library's sans-IO core: everything the sync and the trio clients share.

Two parts, neither of which touches a socket:

- `ClientProtocol`: the connection's state machine. `request()` / `data_request()`
  return the bytes to send and the request id; `receive()` takes what the socket gave
  and sorts the frames into replies (by request id, any order) and notifications.
  `reply(rid)` hands over a reply once it is there, raising the typed error an ERROR
  reply carries.
- `FileCore`: a file's bookkeeping (position, size last learnt, the uncommitted range,
  the write layouts held) and its operations written once as *plans*: generators that
  yield `Send`/`SendData` steps (the driver sends, and answers with the request id) and
  `Wait` steps (the driver waits for that reply, and answers with it or throws the
  error into the plan). `client.File` runs a plan with calls, `client.AsyncFile` with
  awaits; that is the whole difference between them.

It imports no trio, numpy or daemon module (see `rooterror`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import errno as _errno
import itertools
import os
import sys
from typing import Any, Generator, Union

from . import errors as _errors
from .protocol import (_DATA_OK_FRAME, APPEND, DATA_OK, ERROR, OK, OLD_VERSION, PUSH, READ,
                       REQUEST, VERSION, WRITE, WRITE_ALLOC, DataReply, DataRequest, Decoder,
                       Message, OldVersion, ProtocolError, ReplyTooLarge, brief, encode,
                       encode_data)
from .rooterror import SluiceError

#: bytes asked for per read request (sequential reads keep several in flight)
READ_CHUNK = 1 << 20
#: reads are split into requests of at least this size, so the daemon fills one piece
#: of the shared buffer while the client copies another out
READ_PIECE = 256 << 10
#: requests a read keeps in flight at most (without read-ahead)
READ_DEPTH = 4
#: bytes sequential reads ask for past their end at most
READ_AHEAD = 4 << 20
#: request size of a sequential stream of reads up to this size (eight reads' worth,
#: at least READ_PIECE): 1 MiB reads cost half a request each, and two pieces fit in
#: the read-ahead window, which is two pieces; larger reads are one request each (up
#: to READ_AHEAD)
SEQ_PIECE = READ_AHEAD // 2
#: write layouts are asked for in chunks of at least this many bytes
LAYOUT_CHUNK = 4 << 20
#: write layouts asked for again when a commit sealed the blocks under a write
SEALED_RETRIES = 8
#: writes of at most this many bytes are pipelined: sent without waiting for their
#: reply, which is read later (docs/dev/protocol.md, "Pipelined writes")
PIPE_WRITE_MAX = 64 << 10
#: pipelined writes in flight at most (per connection), and the bytes at the end of the
#: shared buffer they go through (at most a quarter of the buffer)
WRITE_WINDOW = 32
WRITE_RING = 256 << 10
#: pipelined writes waited for at once, at most, when the window or the ring is full
REAP_BATCH = WRITE_WINDOW // 4
#: a shared buffer smaller than this pipelines no writes
PIPE_MIN_SHM = 1 << 20
#: pages of one paged reply at most (a listing of 32 rows a page)
MAX_PAGES = 1 << 16
#: notifications kept for a client that does not take them; older ones are dropped
#: (counted in `ClientProtocol.dropped_notifications`)
MAX_NOTIFICATIONS = 1024

#: kernelshim.grants.Rights.WRITE (not imported: the client stays light)
_WRITE_RIGHT = 2

_DATA_OK_SIZE = _DATA_OK_FRAME.size
_DATA_OK_HEAD = _DATA_OK_FRAME.pack(_DATA_OK_SIZE - 4, VERSION, DATA_OK, 0, 0, 0, 0)[:6]

# -- errors ------------------------------------------------------------------------------

_LIGHT_TYPES: dict[str, type[BaseException]] = {
    c.__name__: c for c in (
        _errors.GrantRevoked, _errors.RightsError, _errors.NotAllocated, _errors.Sealed,
        _errors.BadRequest, ProtocolError, ReplyTooLarge, _errors.QuotaExceeded,
        _errors.TooManyObjects, _errors.PrincipalError, _errors.NoSuchPrincipal,
        _errors.PrincipalExists, _errors.NotAllowed)}


def remote_error(p: dict[str, Any]) -> BaseException:
    """The exception an ERROR payload stands for: kernelshim's typed errors by name,
    otherwise an OSError with the errno (FileNotFoundError, PermissionError, ...)."""
    name = str(p.get("error", "RemoteError"))
    msg = str(p.get("message", ""))
    code = p.get("errno") if isinstance(p.get("errno"), int) else _errno.EIO
    cls = _LIGHT_TYPES.get(name)
    if cls is not None:
        return cls(msg)
    if name == "BadSlot":
        return OSError(_errno.EBADF, msg)
    return OSError(code, msg)


# -- the connection ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Notification:
    """A message the server pushed: `kind` ("reclaim", "revoked", ...) and its fields."""

    kind: str
    payload: dict[str, Any]
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReclaimRequest:
    """A "reclaim" notification: the pager asks this client's principal to release
    `frames` cache frames within `within` seconds of when the daemon sent it
    (`deadline`: the same moment on this process's `time.monotonic()` clock, reckoned
    from when the notification was read). Answer with `advise(..., dontneed=True)` of
    ranges of your choice and, optionally, `reclaim_done(request)`."""

    ticket: int
    frames: int
    within: float
    deadline: float

    @classmethod
    def from_note(cls, note: Notification, now: float) -> ReclaimRequest:
        """The request a "reclaim" notification carries, read at `now` (monotonic)."""
        p = note.payload
        ticket, frames, within = p.get("ticket"), p.get("frames"), p.get("within")
        if not (isinstance(ticket, int) and isinstance(frames, int)
                and isinstance(within, (int, float)) and not isinstance(within, bool)):
            raise ProtocolError(f"malformed reclaim notification {brief(p)}")
        return cls(ticket, frames, float(within), now + float(within))


class ClientProtocol:
    """The client side of one connection, without I/O (see the module docstring)."""

    def __init__(self) -> None:
        self._rids = itertools.count(1)
        self._decoder = Decoder()
        self._replies: dict[int, Message | DataReply] = {}
        #: request ids sent and not answered yet
        self.outstanding: set[int] = set()
        #: replies to drop when they come (requests abandoned by a failed plan)
        self._abandoned: set[int] = set()
        self.notifications: collections.deque[Notification] = collections.deque()
        self.dropped_notifications = 0
        #: an ERROR with request id 0: the server refused the stream (or the connection)
        self.failure: BaseException | None = None
        self.closed = False

    def request(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid = next(self._rids) & 0xFFFFFFFF
        data = encode(REQUEST, rid, {"op": op, **args})
        self.outstanding.add(rid)
        return rid, data

    def data_request(self, op: int, slot: int, offset: int, length: int,
                     buf: int) -> tuple[int, bytes]:
        rid = next(self._rids) & 0xFFFFFFFF
        data = encode_data(rid, op, slot, offset, length, buf)
        self.outstanding.add(rid)
        return rid, data

    def receive(self, data: bytes) -> int:
        """Take bytes from the socket (b"" at its end). Returns how many notifications
        they brought."""
        if not data:
            self.closed = True
            return 0
        if len(data) == _DATA_OK_SIZE and not self._decoder.pending and \
                data[:6] == _DATA_OK_HEAD:
            # One DATA_OK frame, the reply to a data request: no decoder needed.
            r = DataReply._make(_DATA_OK_FRAME.unpack(data)[3:])
            if r.request_id in self.outstanding and r.request_id not in self._abandoned:
                self._replies[r.request_id] = r
                return 0
        pushed = 0
        for m in self._decoder.feed(data):
            if isinstance(m, OldVersion):
                raise ProtocolError(
                    f"the sluice daemon speaks protocol version {OLD_VERSION} and this client "
                    f"library version {VERSION}: the daemon is older than the library "
                    "(unmount and mount the volume with this sluice)")
            if isinstance(m, ProtocolError):
                raise m
            if isinstance(m, DataRequest):
                raise ProtocolError("the server sent a data request")
            rid = m.request_id
            if isinstance(m, Message) and m.kind == PUSH:
                kind = m.payload.get("kind")
                if len(self.notifications) >= MAX_NOTIFICATIONS:
                    self.notifications.popleft()
                    self.dropped_notifications += 1
                self.notifications.append(Notification(str(kind), m.payload, rid))
                pushed += 1
            elif isinstance(m, Message) and m.kind == ERROR and rid == 0:
                self.failure = remote_error(m.payload)
            elif rid in self._abandoned:
                self._abandoned.discard(rid)
                self.outstanding.discard(rid)
            elif rid in self.outstanding:
                self._replies[rid] = m
            else:
                raise ProtocolError(f"reply to request {rid}, which is not outstanding")
        return pushed

    def receive_data_reply(self, data: bytes, rid: int) -> DataReply | None:
        """`receive(data)`, and if `data` was exactly the DATA_OK frame answering `rid`,
        that reply (taken: `reply(rid)` is not needed); else None."""
        if len(data) == _DATA_OK_SIZE and data[:6] == _DATA_OK_HEAD and \
                not self._decoder.pending:
            t = _DATA_OK_FRAME.unpack(data)
            if t[3] == rid and rid in self.outstanding:
                self.outstanding.discard(rid)
                return DataReply(rid, t[4], t[5], t[6])
        self.receive(data)
        return None

    def has_reply(self, rid: int) -> bool:
        """Whether `reply(rid)` would return or raise without more input."""
        return (rid in self._replies or rid not in self.outstanding
                or self.failure is not None or self.closed)

    def reply(self, rid: int) -> Any:
        """The reply to `rid` (a dict, or a DataReply), or raise its error. Only after
        `has_reply(rid)`."""
        m = self._replies.pop(rid, None)
        if m is None:
            if rid not in self.outstanding:
                raise ProtocolError(f"request {rid} is not outstanding")
            if self.failure is not None:
                raise self.failure
            raise ConnectionError("the sluice daemon closed the connection")
        self.outstanding.discard(rid)
        if isinstance(m, DataReply):
            return m
        if m.kind == ERROR:
            raise remote_error(m.payload)
        if m.kind != OK and m.kind != DATA_OK:
            raise ProtocolError(f"unexpected message kind {m.kind}")
        return m.payload

    def unanswered(self, upto: int) -> list[int]:
        """The requests sent up to `upto` (inclusive) whose replies are not in yet,
        oldest first: what the daemon still has to serve before it answers `upto`."""
        return sorted(r for r in self.outstanding
                      if r <= upto and r not in self._replies and r not in self._abandoned)

    def abandon(self, rid: int) -> None:
        """Drop the reply to `rid` whenever it comes."""
        if self._replies.pop(rid, None) is not None or rid not in self.outstanding:
            self.outstanding.discard(rid)
        else:
            self._abandoned.add(rid)


# -- plans -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Send a control request; the driver answers with its request id."""

    op: str
    args: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class SendData:
    """Send a data request; the driver answers with its request id."""

    op: int
    slot: int
    offset: int
    length: int
    buf: int


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """Wait for the reply to `rid`; the driver answers with it or throws its error."""

    rid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """Wait until the reply to `rid` is in, without taking it (nor raising its error):
    the replies to the requests before it are in too, since the daemon answers a
    connection's requests in order. The driver answers with None."""

    rid: int


Step = Union[Send, SendData, Wait, Ready]
Plan = Generator[Step, Any, Any]


def call(op: str, **args: Any) -> Plan:
    """One request, its reply; a paged reply is fetched whole (every page, merged)."""
    reply = yield Wait((yield Send(op, args)))
    cursor = _next_cursor(reply, 0)
    for _ in range(MAX_PAGES):
        if cursor is None:
            break
        page = yield Wait((yield Send(op, {**args, "cursor": cursor})))
        cursor = _next_cursor(page, cursor)
        _merge_page(reply, page)
    return reply


def _merge_page(into: dict[str, Any], page: dict[str, Any]) -> None:
    """Add a later page of a paged reply to the first: lists are concatenated, mappings
    merged (recursively), anything else is the first page's."""
    for k, v in page.items():
        cur = into.get(k)
        if isinstance(cur, list) and isinstance(v, list):
            cur.extend(v)
        elif isinstance(cur, dict) and isinstance(v, dict):
            _merge_page(cur, v)
        elif k not in into:
            into[k] = v


def _next_cursor(reply: dict[str, Any], prev: int) -> int | None:
    """Take the cursor of the next page out of `reply` (None: it was the last)."""
    nxt = reply.pop("next_cursor", None)
    if nxt is None:
        return None
    if not isinstance(nxt, int) or nxt <= prev:
        raise ProtocolError(f"bad next_cursor {nxt!r} after {prev}")
    return nxt


def flags_for(mode: str) -> int:
    m = mode.replace("b", "")
    table = {"r": os.O_RDONLY, "r+": os.O_RDWR, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
             "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL}
    if m not in table:
        raise ValueError(f"invalid mode {mode!r}")
    return table[m]


def _chunk(off: int, left: int, room: int, bs: int) -> int:
    """Bytes of the next write request at `off`: at most `room`, and ending on a block
    boundary unless it is the last (two pieces never share a block)."""
    if left <= room:
        return left
    n = room - (off + room) % bs
    return n if n > 0 else room


def _needs_commit(dirty: tuple[int, int] | None, offset: int, n: int, bs: int) -> bool:
    """Whether a write of `n` bytes at `offset` covers part of a block that an
    uncommitted write touched. A daemon before 2026-12-01 merged such a block with
    zeros, losing the first write (hostile-probe round 2, F6); today's kernel merges
    it with what the grant wrote, and the client still commits first, for the old."""
    if dirty is None or n <= 0:
        return False
    lo, hi = dirty[0] // bs, -(-dirty[1] // bs)
    head, tail = offset // bs, (offset + n - 1) // bs
    return bool(offset % bs and lo <= head < hi) or bool((offset + n) % bs and lo <= tail < hi)


_INF = float("inf")


def _covered(layout: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one range of `layout` (sorted, disjoint, merged)."""
    i = bisect.bisect_right(layout, (lo, _INF)) - 1
    return i >= 0 and hi <= layout[i][1]


def _add_range(layout: list[tuple[int, int]], lo: int, hi: int) -> None:
    """Put [lo, hi) into `layout`, merging it with the ranges it overlaps or touches:
    the list stays sorted and short, and `_covered` is a binary search."""
    i = bisect.bisect_left(layout, (lo, lo))
    if i and layout[i - 1][1] >= lo:
        i -= 1
        lo, hi = layout[i][0], max(hi, layout[i][1])
    j = i
    while j < len(layout) and layout[j][0] <= hi:
        hi = max(hi, layout[j][1])
        j += 1
    layout[i:j] = [(lo, hi)]


def _drain(inflight: collections.deque[tuple[int, int, int, int]]) -> Plan:
    """Wait for the requests still in flight (their errors dropped)."""
    while inflight:
        rid = inflight.popleft()[0]
        try:
            yield Wait(rid)
        except (SluiceError, OSError):
            pass


@dataclasses.dataclass(slots=True)
class _Piece:
    """A read request in flight (or answered, `got` bytes, not yet all consumed)."""

    rid: int
    off: int
    length: int
    at: int
    got: int | None = None


class _ReadStream:
    """A file's read pieces in flight, in file order and contiguous, in a ring of
    equal slots of the shared buffer."""

    def __init__(self) -> None:
        self.pieces: collections.deque[_Piece] = collections.deque()
        self.piece = READ_PIECE
        self.slots = 1
        self._k = 0
        #: file offset of the next piece to ask for
        self.next_off = 0
        #: where a sequential read would start (-1: nowhere yet)
        self.next_use = -1

    def start(self, pos: int, total: int, room: int, sequential: bool) -> None:
        """Choose the piece size for reads like this one: when sequential, several
        reads' worth (up to SEQ_PIECE: fewer requests, and read-ahead does the
        overlapping), else parts of the read."""
        if sequential:
            # Eight reads' worth, in whole READ_PIECEs (so pieces keep the stream's
            # block alignment), at most SEQ_PIECE: small sequential reads do not make
            # the daemon read megabytes ahead of a reader that may stop.
            # Reads larger than that are asked for one piece each, up to READ_AHEAD: a
            # 4 MiB read is one request, not two (a request costs the daemon a reply
            # and the client a wake-up); two slots of the buffer still overlap the
            # daemon's filling of one piece with the client's copy of the other.
            piece = max(min(SEQ_PIECE, max(READ_PIECE, 8 * total)), min(total, READ_AHEAD))
            piece = -(-piece // READ_PIECE) * READ_PIECE
            cap = room // 4 if piece <= SEQ_PIECE else room // 2
        else:
            piece = max(READ_PIECE, -(-total // READ_DEPTH))
            cap = room // READ_DEPTH
        self.piece = max(1, min(piece, cap, room))
        self.slots = max(1, room // self.piece)
        self._k = 0
        self.next_off = pos

    def take_slot(self) -> int:
        at = (self._k % self.slots) * self.piece
        self._k += 1
        return at


@dataclasses.dataclass(slots=True)
class _Pending:
    """A pipelined write in flight: its request, its part of the ring, its file."""

    rid: int
    at: int
    n: int
    core: FileCore


class SharedBuffer:
    """The connection's shared buffer, and who holds parts of it between calls: a
    file's read-ahead (a plan of another file that needs the buffer drops it first),
    and the pipelined writes in flight, in a ring at the buffer's end.

    The ring is a FIFO: the daemon answers a connection's requests in order, so the
    oldest write's reply frees the oldest part. Small reads use the buffer's start,
    outside the ring; every plan that uses the rest of the buffer (large reads and
    writes, appends) first waits for the pipelined writes (`drain`)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.holder: FileCore | None = None
        #: requests in flight of a plan that was closed half-way (the driver waits)
        self._lost: list[int] = []
        size = len(view)
        self.ring = min(WRITE_RING, size // 4) if size >= PIPE_MIN_SHM else 0
        self.ring_base = size - self.ring
        #: pipelined writes in flight, oldest first
        self.pending: collections.deque[_Pending] = collections.deque()
        self._tail = 0  # where the next write goes, relative to ring_base

    def _fit(self, n: int) -> int | None:
        """A part of the ring for `n` bytes (relative), or None while it is full."""
        if not self.pending:
            return 0 if n <= self.ring else None
        head, tail = self.pending[0].at - self.ring_base, self._tail
        if tail > head:  # in use: [head, tail); free: [tail, ring) and [0, head)
            if tail + n <= self.ring:
                return tail
            return 0 if n <= head else None
        return tail if tail + n <= head else None  # wrapped: free is [tail, head)

    def ring_alloc(self, n: int) -> Plan:
        """Room in the ring for a write of `n` bytes (at most `ring`): its buffer
        offset. Waits for the oldest writes while the window or the ring is full."""
        while True:
            at = self._fit(n) if len(self.pending) < WRITE_WINDOW else None
            if at is not None:
                self._tail = at + n
                return self.ring_base + at
            # Full: wait for a quarter of what is in flight at once, at most REAP_BATCH
            # writes (the daemon still has the rest to serve meanwhile), so that the
            # client wakes once per batch and sends the next writes together
            # (kernelshim/hybridwait.py).
            k = min(REAP_BATCH, max(1, len(self.pending) // 4))
            if k > 1:
                yield Ready(self.pending[k - 1].rid)
            for _ in range(k):
                yield from self.reap_one()

    def reap_one(self) -> Plan:
        """Wait for the oldest pipelined write's reply; an error goes to its file (raised
        by that file's next call)."""
        p = self.pending.popleft()
        try:
            yield Wait(p.rid)
        except GeneratorExit:
            self._lost.append(p.rid)  # the cancelled driver waits for it
            raise
        except (SluiceError, OSError) as exc:
            if p.core._error is None:
                p.core._error = exc
            if isinstance(exc, _errors.GrantRevoked):
                p.core._dirty = None  # a revoked grant commits nothing (see _commit)

    def drain(self) -> Plan:
        """Wait for every pipelined write in flight (every file's: they share the ring)."""
        while self.pending:
            yield from self.reap_one()

    def take_lost(self) -> list[int]:
        lost, self._lost = self._lost, []
        return lost

    def claim(self, core: FileCore) -> Plan:
        if not len(self.view):
            raise ValueError("the client has no shared buffer (connected with shm_size=0)")
        holder = self.holder
        if holder is not None and holder is not core:
            yield from holder._drop_stream()
        self.holder = core


class FileCore:
    """A direct-path file without I/O: state, and every operation as a plan.

    `shm` is the connection's shared buffer (a memoryview), `block_size` the
    volume's. The drivers (client.File, client.AsyncFile) run the plans."""

    def __init__(self, buffer: SharedBuffer, block_size: int, slot: int, size: int,
                 rights: int, *, append: bool) -> None:
        self.buffer = buffer
        self.shm = buffer.view
        self.bs = block_size
        #: whether sequential reads read ahead (see readinto_plan)
        self.read_ahead = True
        self._stream = _ReadStream()
        self.slot = slot
        self.rights = rights
        self.pos = size if append else 0
        self.append = append
        self._size_hint = size
        self._dirty: tuple[int, int] | None = None
        self._layout: list[tuple[int, int]] = []  # ranges known to be allocated
        #: the first error of a pipelined write of this file, raised by its next call
        self._error: BaseException | None = None
        self.closed = False

    def _raise_error(self, keep: bool = False) -> None:
        """Raise the error a pipelined write of this file got. Only fsync and close
        clear it (as Linux reports a write-back error at the next fsync or close); a
        later write or commit raises it too, but keeps it for them, so an fsync after
        a failed pipelined write never returns success. Reads do not raise it."""
        err = self._error
        if err is not None:
            if not keep:
                self._error = None
            raise err

    # -- reading ---------------------------------------------------------------------

    def readinto_plan(self, buf: Any, offset: int | None) -> Plan:
        """Read into `buf` at `offset` (None: the position, which advances); the bytes
        read.

        The read is cut into pieces, several in flight, each into its own slot of the
        shared buffer: the daemon fills one while this process copies another out. When
        reads are sequential (this one starts where the last ended), pieces past the
        end of the read are asked for too (read-ahead, at most READ_AHEAD bytes), so
        the next read finds its data waiting. Read-ahead data is dropped by any write,
        truncate or append through this client, by a read elsewhere, and at the end of
        the file; see docs/dev/protocol.md for what it means for coherence."""
        mv = memoryview(buf).cast("B")
        pos = self.pos if offset is None else offset
        total = len(mv)
        st = self._stream
        small = self.small_read(total, offset)
        if small is not None:
            return self.small_read_done(mv, offset, (yield Wait((yield small))).n)
        yield from self.buffer.claim(self)
        if self.buffer.pending:  # pieces may go anywhere in the buffer, the ring too
            yield from self.buffer.drain()
        if not total:
            return 0
        sequential = pos == st.next_use and self.read_ahead
        if st.pieces and not (sequential and st.pieces[0].off <= pos
                              < st.pieces[0].off + st.pieces[0].length):
            yield from self._drop_stream()
            sequential = False
        if not st.pieces:
            st.start(pos, total, len(self.shm), sequential)
        end = pos + total
        ahead = min(READ_AHEAD, 2 * st.piece) if sequential else 0
        limit = st.slots if sequential else min(st.slots, READ_DEPTH)
        done = 0
        eof = False
        try:
            while done < total and not eof:
                # Ask for what the read needs, and whole pieces that end at most
                # `ahead` past it: the read-ahead window (docs/dev/protocol.md) is exact.
                while len(st.pieces) < limit and (
                        st.next_off < end or st.next_off + st.piece <= end + ahead):
                    n = st.piece if sequential else min(st.piece, end - st.next_off)
                    at = st.take_slot()
                    rid = yield SendData(READ, self.slot, st.next_off, n, at)
                    st.pieces.append(_Piece(rid, st.next_off, n, at))
                    st.next_off += n
                p = st.pieces[0]
                if p.got is None:
                    p.got = -1  # waited for: a failure must not wait for it again
                    p.got = (yield Wait(p.rid)).n
                skip = pos + done - p.off
                k = min(p.got - skip, total - done)
                if k > 0:
                    mv[done:done + k] = self.shm[p.at + skip:p.at + skip + k]
                    done += k
                if p.got < p.length:
                    eof = skip + max(k, 0) >= p.got  # a short piece, consumed: the end
                if eof or skip + max(k, 0) >= p.length:
                    st.pieces.popleft()
        except GeneratorExit:
            # Closed by a cancelled driver: hand it the pieces still unanswered.
            self.buffer._lost.extend(p.rid for p in st.pieces if p.got is None)
            st.pieces.clear()
            st.next_use = -1
            raise
        except BaseException:
            # Let the other pieces finish before their slots are reused (their replies
            # are waited for, their errors dropped).
            yield from self._drop_stream()
            raise
        if eof:
            yield from self._drop_stream()  # the file may grow: ask again next time
        st.next_use = pos + done
        if offset is None:
            self.pos += done
        return done

    def small_read(self, nbytes: int, offset: int | None) -> SendData | None:
        """The one request of a small read that continues no stream (the common random
        read), into the buffer's start; None if the read needs readinto_plan. A driver
        may send it, wait for its reply and call small_read_done itself: the same as
        running readinto_plan, without the plan's bookkeeping."""
        pos = self.small_read_pos(nbytes, offset)
        return SendData(READ, self.slot, pos, nbytes, 0) if pos >= 0 else None

    def small_read_pos(self, nbytes: int, offset: int | None) -> int:
        """`small_read`'s file offset, without the step object (the sync client's short
        path builds the frame itself); -1 when the read needs readinto_plan."""
        pos = self.pos if offset is None else offset
        st = self._stream
        if 0 < nbytes <= READ_PIECE and nbytes <= len(self.shm) - self.buffer.ring \
                and not st.pieces and (pos != st.next_use or not self.read_ahead) \
                and self.buffer.holder is self and self._error is None:
            return pos
        return -1

    def small_read_done(self, mv: memoryview, offset: int | None, got: int) -> int:
        mv[:got] = self.shm[:got]
        pos = self.pos if offset is None else offset
        self._stream.next_use = pos + got
        if offset is None:
            self.pos += got
        return got

    def _drop_stream(self) -> Plan:
        """Forget the read-ahead: wait for the pieces still in flight."""
        st = self._stream
        st.next_use = -1  # first: a drop cut short leaves no sequential stream behind
        while st.pieces:
            p = st.pieces.popleft()
            if p.got is None:
                try:
                    yield Wait(p.rid)
                except (SluiceError, OSError):
                    pass

    # -- writing ---------------------------------------------------------------------

    def pwrite_plan(self, data: Any, offset: int) -> Plan:
        """Write `data` at `offset`. A small write (at most PIPE_WRITE_MAX) is pipelined:
        copied into the ring and sent, and the call returns without waiting for the
        reply; an error it gets is raised by the file's next call (commit, fsync and
        close do their work for what did land, then raise it). Larger writes wait."""
        yield from self.buffer.claim(self)
        yield from self._drop_stream()
        self._raise_error(keep=True)
        mv = memoryview(data).cast("B")
        if 0 < len(mv) <= min(PIPE_WRITE_MAX, self.buffer.ring) and self.rights & _WRITE_RIGHT:
            return (yield from self._pipe_write(mv, offset))
        if self.buffer.pending:
            yield from self.buffer.drain()
            self._raise_error(keep=True)
        if _needs_commit(self._dirty, offset, len(mv), self.bs):
            yield from self.commit_plan()
        # Two halves of the shared buffer: the next piece is copied in while the daemon
        # writes the last one (when the write needs more than one request).
        # Each piece but the last ends on a block boundary (see _chunk), so two pieces
        # in flight never share a block.
        half = len(self.shm) // 2 // self.bs * self.bs
        if half < self.bs or len(mv) <= half:
            half = len(self.shm)
        halves = len(self.shm) // half
        inflight: collections.deque[tuple[int, int, int, int]] = collections.deque()
        done = k = 0
        try:
            while done < len(mv) or inflight:
                if done < len(mv) and len(inflight) < halves:
                    off = offset + done
                    n = _chunk(off, len(mv) - done, half, self.bs)
                    want = self._layout_wanted(off, n)
                    if want is not None:
                        lo, hi = want
                        yield from call("layout_get", slot=self.slot, offset=lo,
                                        length=hi - lo)
                        _add_range(self._layout, lo, hi)
                    at = (k % halves) * half
                    self.shm[at:at + n] = mv[done:done + n]
                    inflight.append(((yield SendData(WRITE, self.slot, off, n, at)), off, n, at))
                    done += n
                    k += 1
                    continue
                rid, off, n, at = inflight.popleft()
                try:
                    yield Wait(rid)
                except _errors.NotAllocated:  # (Sealed is one)
                    # A hole inside the file (no layout asked for, see _layout_wanted),
                    # or blocks a commit sealed (older servers): ask for a layout, then
                    # write the piece again (its part of the buffer still holds it).
                    # The periodic commit can seal the new blocks too before the write
                    # lands: try a few times.
                    for attempt in range(SEALED_RETRIES):
                        yield from call("layout_get", slot=self.slot, offset=off, length=n)
                        try:
                            yield Wait((yield SendData(WRITE, self.slot, off, n, at)))
                            break
                        except _errors.NotAllocated:
                            if attempt == SEALED_RETRIES - 1:
                                raise
        except GeneratorExit:
            raise
        except BaseException:
            yield from _drain(inflight)
            raise
        self._wrote(offset, len(mv))
        return len(mv)

    def _pipe_write(self, mv: memoryview, offset: int) -> Plan:
        """A pipelined write (see pwrite_plan). The daemon serves a connection's requests
        in order, so every later request of this client (a read of the same bytes, a
        commit, an fsync) comes after it; a hole it meets is allocated by the daemon
        (the write never needs a reply to go on)."""
        n = len(mv)
        if _needs_commit(self._dirty, offset, n, self.bs):
            yield from self.commit_plan()
        want = self._layout_wanted(offset, n)
        if want is not None:
            lo, hi = want
            yield from call("layout_get", slot=self.slot, offset=lo, length=hi - lo)
            _add_range(self._layout, lo, hi)
        buf = self.buffer
        at = yield from buf.ring_alloc(n)
        self.shm[at:at + n] = mv
        rid = yield SendData(WRITE_ALLOC, self.slot, offset, n, at)
        buf.pending.append(_Pending(rid, at, n, self))
        self._wrote(offset, n)
        return n

    def write_plan(self, data: Any) -> Plan:
        if self.append:
            return (yield from self._append_plan(data))
        n = yield from self.pwrite_plan(data, self.pos)
        self.pos += n
        return n

    def _append_plan(self, data: Any) -> Plan:
        """O_APPEND: the server writes each buffer-sized piece at the end of the file and
        commits it under the file's lock (atomic against every other appender)."""
        yield from self.buffer.claim(self)
        yield from self._drop_stream()
        yield from self.commit_plan()  # (waits for the pipelined writes too)
        mv = memoryview(data).cast("B")
        done = 0
        while True:
            n = min(len(mv) - done, len(self.shm))
            self.shm[:n] = mv[done:done + n]
            res = yield Wait((yield SendData(APPEND, self.slot, 0, n, 0)))
            self._size_hint = res.size
            self.pos = res.offset + n
            done += n
            if done >= len(mv):
                return done

    def _layout_wanted(self, off: int, n: int) -> tuple[int, int] | None:
        """The range to ask a write layout for before writing `n` bytes at `off`, or None
        if the layouts held cover the write. Past the end of the file (appends) the
        layout runs ahead by LAYOUT_CHUNK; inside it, it is the write's own range, since
        a layout over committed data copies it to fresh blocks (copy-on-write)."""
        if _covered(self._layout, off, off + n):
            return None
        if off + n <= self._size_hint:
            # Inside the file: the server relocates committed blocks under the write
            # itself (one request, one device write); a hole answers NotAllocated, and
            # the write asks for a layout then (pwrite_plan).
            return None
        return off, off + max(n, LAYOUT_CHUNK)

    def _wrote(self, offset: int, n: int) -> None:
        """Widen the dirty range by the `n` bytes just written at `offset`."""
        if n:
            lo, hi = offset, offset + n
            if self._dirty:
                lo, hi = min(lo, self._dirty[0]), max(hi, self._dirty[1])
            self._dirty = (lo, hi)

    def commit_plan(self) -> Plan:
        """Make the written range part of the file (size, mtime); returns the size.
        Waits for the pipelined writes first; what they wrote is committed, then the
        error one of them got is raised."""
        if self.buffer.pending:
            yield from self.buffer.drain()
        size = yield from self._reporting(self._commit())
        self._raise_error(keep=True)
        return size

    def _reporting(self, plan: Plan) -> Plan:
        """Run `plan`; if it fails, its error is what this call reports, and the
        pipelined writes' error is dropped (one error per call, as fsync(2) has one
        errno)."""
        try:
            return (yield from plan)
        except (SluiceError, OSError):
            self._error = None
            raise

    def _commit(self) -> Plan:
        if self._dirty is None:
            return self._size_hint
        lo, hi = self._dirty
        try:
            res = yield from call("commit", slot=self.slot, offset=lo, length=hi - lo)
        except _errors.GrantRevoked:
            # Nothing written through a revoked grant can be committed, ever: forget it
            # (and the pipelined writes' errors, which that one supersedes).
            self._dirty = self._error = None
            raise
        self._size_hint = res["size"]
        self._dirty = None
        return self._size_hint

    def truncate_plan(self, size: int | None) -> Plan:
        yield from self._drop_stream()
        yield from self.commit_plan()
        to = self.pos if size is None else size
        res = yield from call("truncate", slot=self.slot, size=to)
        self._size_hint = res["size"]
        self._layout = [(a, min(b, to)) for a, b in self._layout if a < to]
        return self._size_hint

    def fsync_plan(self) -> Plan:
        """Commit, then make the file durable: when this returns, every write of the file
        that returned before it is durable, or this raises the error one of them got
        (after making the others durable)."""
        if self.buffer.pending:
            yield from self.buffer.drain()
        yield from self._reporting(self._commit())
        yield from self._reporting(call("fsync", slot=self.slot))
        self._raise_error()

    def read_plan(self, n: int) -> Plan:
        if n < 0:
            n = max(0, (yield from self.size_plan()) - self.pos)
        buf = bytearray(n)
        got = yield from self.readinto_plan(buf, None)
        del buf[got:]
        return bytes(buf) if got < 1 << 16 else buf  # large reads: no extra copy

    def pread_plan(self, n: int, offset: int) -> Plan:
        buf = bytearray(n)
        got = yield from self.readinto_plan(buf, offset)
        del buf[got:]
        return bytes(buf) if got < 1 << 16 else buf

    def size_plan(self) -> Plan:
        if self._dirty is not None or self._error is not None:
            yield from self.commit_plan()
        return int((yield from call("stat", slot=self.slot))["size"])

    def seek_plan(self, offset: int, whence: int) -> Plan:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self.pos + offset
        elif whence == os.SEEK_END:
            pos = (yield from self.size_plan()) + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(_errno.EINVAL, "negative seek position")
        self.pos = pos
        return pos

    def close_plan(self) -> Plan:
        if self.closed:
            return None
        yield from self._drop_stream()
        if self.buffer.holder is self:
            self.buffer.holder = None
        try:
            if self.buffer.pending:
                yield from self.buffer.drain()
            if self._dirty is not None:
                yield from self._reporting(self._commit())
        finally:
            self.closed = True
            try:
                yield from call("close", slot=self.slot)
            except (ConnectionError, OSError):
                pass
        self._raise_error()  # closed all the same, as close(2) after a write-back error
        return None


def light_import_check() -> list[str]:
    """The heavy modules this process has loaded (for tests and `python -X importtime`
    checks: a client-only process should list none)."""
    heavy = ("numpy", "xxhash", "trio", "pyfuse3", "blockdev.device", "pager",
             "kernelshim.kernel", "kernelshim.principals", "kernelshim.server")
    return sorted(m for m in heavy if m in sys.modules)
