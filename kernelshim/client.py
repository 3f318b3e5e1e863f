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
through a shared memory buffer (the socket carries only small requests). Writing past
the allocated blocks asks for a write layout first (pNFS style); `commit()` (also done
by `close()` and `fsync()`) makes the written range part of the file: extents become
written, size and mtime update. Errors arrive typed: GrantRevoked, RightsError,
QuotaExceeded, ... (kernelshim's classes) or OSError subclasses by errno.

Open modes mean what they mean for `open(2)` through the mount: "w" truncates, "x"
fails with FileExistsError on an existing file, and "a" appends each write at the end
of the file atomically (up to the shared buffer's size per write), also against
processes appending through the mount. `call` fetches every page of a paged reply
(`principal_ls`, `stats`) and returns them merged.
"""

from __future__ import annotations

import array
import bisect
import errno as _errno
import itertools
import mmap
import os
import socket
from typing import Any

from blockdev import SluiceError

from . import errors as _errors
from . import principals as _principals
from .protocol import (ERROR, MAX_FRAME, OK, REQUEST, Decoder, Message, ProtocolError,
                       ReplyTooLarge, encode)

CONTROL_XATTR = "user.sluice.control"
DEFAULT_SHM = 8 << 20
#: bytes asked for per read request (two are kept in flight)
READ_CHUNK = 1 << 20
#: write layouts are asked for in chunks of at least this many bytes
LAYOUT_CHUNK = 4 << 20

_REMOTE_TYPES: dict[str, type[BaseException]] = {
    c.__name__: c for c in (
        _errors.GrantRevoked, _errors.RightsError, _errors.NotAllocated, _errors.Sealed,
        _errors.BadRequest,
        ProtocolError, ReplyTooLarge, _principals.QuotaExceeded, _principals.TooManyObjects,
        _principals.PrincipalError, _principals.NoSuchPrincipal, _principals.PrincipalExists,
        _principals.NotAllowed)}


class RemoteError(SluiceError):
    """An error the server reported that has no class of its own here."""


def _raise_remote(p: dict[str, Any]) -> None:
    name = str(p.get("error", "RemoteError"))
    msg = str(p.get("message", ""))
    code = p.get("errno") if isinstance(p.get("errno"), int) else _errno.EIO
    cls = _REMOTE_TYPES.get(name)
    if cls is not None:
        raise cls(msg)
    if name in ("BadSlot",):
        raise OSError(_errno.EBADF, msg)
    raise OSError(code, msg)


#: pages of one paged reply at most (a listing of 32 rows a page)
MAX_PAGES = 1 << 16


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


def control_socket(mountpoint: str | os.PathLike[str]) -> str:
    """The control socket of the volume mounted at `mountpoint`."""
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as exc:
        raise OSError(exc.errno, f"{mountpoint} is not a mounted sluice volume "
                                 f"({os.strerror(exc.errno or 0)})") from None


def _flags_for(mode: str) -> int:
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
    boundary unless it is the last. The kernel merges a partial block of an unwritten
    (uncommitted) extent with zeros, so no block may be written partially twice
    between commits."""
    if left <= room:
        return left
    n = room - (off + room) % bs
    return n if n > 0 else room


def _needs_commit(dirty: tuple[int, int] | None, offset: int, n: int, bs: int) -> bool:
    """Whether a write of `n` bytes at `offset` covers part of a block that an
    uncommitted write touched (its merge would read that block as zeros)."""
    if dirty is None or n <= 0:
        return False
    lo, hi = dirty[0] // bs, -(-dirty[1] // bs)
    head, tail = offset // bs, (offset + n - 1) // bs
    return bool(offset % bs and lo <= head < hi) or bool((offset + n) % bs and lo <= tail < hi)


def _covered(layout: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one range of `layout` (sorted, disjoint, merged)."""
    i = bisect.bisect_right(layout, (lo, _INF)) - 1
    return i >= 0 and hi <= layout[i][1]


def _add_range(layout: list[tuple[int, int]], lo: int, hi: int) -> None:
    """Put [lo, hi) into `layout`, merging it with the ranges it overlaps or touches:
    the list stays sorted and short, and `_covered` is a binary search (random writes
    used to append a range per layout request and scan them all on every write)."""
    i = bisect.bisect_left(layout, (lo, lo))
    if i and layout[i - 1][1] >= lo:
        i -= 1
        lo, hi = layout[i][0], max(hi, layout[i][1])
    j = i
    while j < len(layout) and layout[j][0] <= hi:
        hi = max(hi, layout[j][1])
        j += 1
    layout[i:j] = [(lo, hi)]


_INF = float("inf")

#: recvmsg's ancillary buffer: room for up to 4 descriptors passed with SCM_RIGHTS
_ANCBUFSIZE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _collect_fds(data: bytes, anc: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    """After one recvmsg (`data`, ancillary `anc`): add the descriptors it passed
    (SCM_RIGHTS) to `fds`; at the end of the stream (no data) close them all and raise
    ConnectionError."""
    fdarr = array.array("i")
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fdarr.frombytes(cdata[:len(cdata) - len(cdata) % fdarr.itemsize])
    fds.extend(fdarr)
    if not data:
        _close_fds(fds)
        raise ConnectionError("the sluice daemon closed the connection")


class _Base:
    """State shared by the sync and trio clients."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self._rids = itertools.count(1)
        self._decoder = Decoder()
        self._pending: list[Message] = []
        self.shm: mmap.mmap | None = None
        self.shmview: memoryview = memoryview(b"")
        self.info: dict[str, Any] = {}

    def _relpath(self, path: str | os.PathLike[str]) -> str:
        p = os.fspath(path)
        if os.path.isabs(p):
            ap = os.path.abspath(p)
            if ap != self.mountpoint and not ap.startswith(self.mountpoint + os.sep):
                raise ValueError(f"{p} is not inside {self.mountpoint}")
            p = os.path.relpath(ap, self.mountpoint)
        return p

    def _take_reply(self, rid: int) -> dict[str, Any] | None:
        for m in self._pending:
            if m.request_id == rid or (m.kind == ERROR and m.request_id == 0):
                self._pending.remove(m)
                if m.kind == ERROR:
                    _raise_remote(m.payload)
                if m.kind != OK:
                    raise ProtocolError(f"unexpected message kind {m.kind}")
                return m.payload
        return None

    def _feed(self, data: bytes) -> None:
        for m in self._decoder.feed(data):
            if isinstance(m, ProtocolError):
                raise m
            self._pending.append(m)

    def _received(self, data: bytes, anc: list[tuple[int, int, bytes]], fds: list[int]) -> None:
        """Take in what one recvmsg returned: descriptors into `fds`, data to the decoder."""
        _collect_fds(data, anc, fds)
        self._feed(data)

    def _map_shm(self, res: dict[str, Any], fds: list[int]) -> None:
        """Map the shared buffer passed by the `attach` reply `res`; closes `fds`."""
        try:
            self.shm = mmap.mmap(fds[0], res["size"])
            self.shmview = memoryview(self.shm)
        finally:
            _close_fds(fds)

    def _unmap_shm(self) -> None:
        if self.shm is not None:
            self.shmview.release()
            self.shm.close()
            self.shm = None


class Client(_Base):
    """A synchronous direct-access client. See the module docstring."""

    def __init__(self, mountpoint: str, sock_path: str, *, shm_size: int = DEFAULT_SHM) -> None:
        super().__init__(mountpoint)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(sock_path)
            self.info = self.call("hello")
            if shm_size:  # 0: a control-only client (administration, `sluice run`)
                self._map_shm(*self._call_fds("attach", size=shm_size))
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def connect(cls, mountpoint: str | os.PathLike[str], *, shm_size: int = DEFAULT_SHM) -> Client:
        return cls(os.fspath(mountpoint), control_socket(mountpoint), shm_size=shm_size)

    def _send(self, op: str, **args: Any) -> int:
        rid = next(self._rids)
        try:
            self.sock.sendall(encode(REQUEST, rid, {"op": op, **args}))
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed the connection; what it said first (a refusal, say)
            # is still there to read, and reading it ends in ConnectionError.
            pass
        return rid

    def _wait(self, rid: int) -> dict[str, Any]:
        reply, fds = self._wait_fds(rid)
        _close_fds(fds)
        return reply

    def _call_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        return self._wait_fds(self._send(op, **args))

    def _wait_fds(self, rid: int) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        while True:
            reply = self._take_reply(rid)
            if reply is not None:
                return reply, fds
            data, anc, _flags, _addr = self.sock.recvmsg(MAX_FRAME + 8, _ANCBUFSIZE)
            self._received(data, anc, fds)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (raises the typed error it carries).
        A paged reply is fetched whole: every page, merged."""
        reply, fds = self._call_fds(op, **args)
        _close_fds(fds)
        cursor = _next_cursor(reply, 0)
        for _ in range(MAX_PAGES):
            if cursor is None:
                break
            page, fds = self._call_fds(op, **{**args, "cursor": cursor})
            _close_fds(fds)
            cursor = _next_cursor(page, cursor)
            _merge_page(reply, page)
        return reply

    def open(self, path: str | os.PathLike[str], mode: str = "r", *, perms: int = 0o644) -> File:
        res = self.call("open", path=self._relpath(path), flags=_flags_for(mode), mode=perms)
        return File(self, res["slot"], res["size"], res["rights"], append="a" in mode)

    def register(self, principal: str) -> dict[str, Any]:
        """Attach this process (and the programs it execs and starts) to `principal`."""
        return self.call("register", principal=principal)

    def whoami(self) -> dict[str, Any]:
        return self.call("whoami")

    def start_trace(self) -> None:
        """Have the pager log every block access until stop_trace() (root or the
        volume's owner; one trace at a time; it ends if this client disconnects)."""
        self.call("trace_start")

    def stop_trace(self) -> tuple[dict[str, Any], int]:
        """End the trace: (its size and whether it was cut short, a descriptor of the
        trace file, positioned at its start; the caller closes it)."""
        reply, fds = self._call_fds("trace_stop")
        if len(fds) != 1:
            _close_fds(fds)
            raise ProtocolError("trace_stop: expected one descriptor with the reply")
        return reply, fds[0]

    def close(self) -> None:
        self._unmap_shm()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FileState:
    """The bookkeeping `File` and `AsyncFile` share, without I/O: the position, the size
    last learnt, the uncommitted (dirty) range and the write layouts held. The requests
    to the server stay in the two classes (called, or awaited)."""

    def __init__(self, slot: int, size: int, rights: int, *, append: bool) -> None:
        self.slot = slot
        self.rights = rights
        self.pos = size if append else 0
        self.append = append
        self._size_hint = size
        self._dirty: tuple[int, int] | None = None
        self._layout: list[tuple[int, int]] = []  # ranges known to be allocated
        self.closed = False

    def _allocated(self, lo: int, hi: int) -> bool:
        return _covered(self._layout, lo, hi)

    def _layout_wanted(self, off: int, n: int) -> tuple[int, int] | None:
        """The range to ask a write layout for before writing `n` bytes at `off`, or None
        if the layouts held cover the write. Past the end of the file (appends) the
        layout runs ahead by LAYOUT_CHUNK; inside it, it is the write's own range, since
        a layout over committed data copies it to fresh blocks (copy-on-write)."""
        if self._allocated(off, off + n):
            return None
        if off + n <= self._size_hint:
            return off, off + n
        return off, off + max(n, LAYOUT_CHUNK)

    def _layout_granted(self, lo: int, hi: int) -> None:
        _add_range(self._layout, lo, hi)

    def _wrote(self, offset: int, n: int) -> None:
        """Widen the dirty range by the `n` bytes just written at `offset`."""
        if n:
            lo, hi = offset, offset + n
            if self._dirty:
                lo, hi = min(lo, self._dirty[0]), max(hi, self._dirty[1])
            self._dirty = (lo, hi)

    def _committed(self, size: int) -> int:
        """The server committed the dirty range and reported `size`."""
        self._size_hint = size
        self._dirty = None
        return size

    def _truncated(self, to: int, size: int) -> int:
        """The server truncated the file to `to` and reported `size`: drop the layouts
        past `to`."""
        self._size_hint = size
        self._layout = [(a, min(b, to)) for a, b in self._layout if a < to]
        return size

    def _seek_from(self, offset: int, whence: int) -> int | None:
        """The position SEEK_SET or SEEK_CUR gives (None for another `whence`)."""
        if whence == os.SEEK_SET:
            return offset
        if whence == os.SEEK_CUR:
            return self.pos + offset
        return None


def _block_size(c: _Base) -> int:
    return c.info.get("block_size") or 4096


class File(_FileState):
    """A file opened through the direct path (from `Client.open`)."""

    def __init__(self, client: Client, slot: int, size: int, rights: int, *, append: bool) -> None:
        super().__init__(slot, size, rights, append=append)
        self.client = client

    # -- reading ---------------------------------------------------------------------

    def pread(self, n: int, offset: int) -> bytes | bytearray:
        buf = bytearray(n)
        got = self.readinto(buf, offset)
        del buf[got:]
        return bytes(buf) if got < 1 << 16 else buf  # large reads: no extra copy

    def read(self, n: int = -1) -> bytes | bytearray:
        if n < 0:
            n = max(0, self.size() - self.pos)
        data = self.pread(n, self.pos)
        self.pos += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview, offset: int | None = None) -> int:
        """Read into `buf` (at `offset`, or the position); returns the bytes read."""
        c = self.client
        assert c.shm is not None
        mv = memoryview(buf).cast("B")
        pos = self.pos if offset is None else offset
        total = len(mv)
        # Two requests in flight, each into its own half of the shared buffer: the
        # server fills one half while this process copies the other out.
        half = len(c.shm) // 2
        chunk = min(half, max(READ_CHUNK, -(-total // 2)))
        inflight: list[tuple[int, int, int, int]] = []  # (rid, dst, want, shm offset)
        issued = done = 0
        k = 0
        eof = False
        while True:
            while not eof and issued < total and len(inflight) < 2:
                want = min(chunk, total - issued)
                shm_off = (k % 2) * half
                rid = c._send("read", slot=self.slot, offset=pos + issued, length=want,
                              buf=shm_off)
                inflight.append((rid, issued, want, shm_off))
                issued += want
                k += 1
            if not inflight:
                break
            rid, dst, want, shm_off = inflight.pop(0)
            got = c._wait(rid)["n"]
            if not eof:
                mv[dst:dst + got] = c.shmview[shm_off:shm_off + got]
                done += got
                if got < want:
                    eof = True  # later replies (already asked for) are past the end
        if offset is None:
            self.pos += done
        return done

    # -- writing ---------------------------------------------------------------------

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        c = self.client
        assert c.shm is not None
        mv = memoryview(data).cast("B")
        chunk = len(c.shm)
        bs = _block_size(c)
        if _needs_commit(self._dirty, offset, len(mv), bs):
            self.commit()
        done = 0
        while done < len(mv):
            off = offset + done
            n = _chunk(off, len(mv) - done, chunk, bs)
            want = self._layout_wanted(off, n)
            if want is not None:
                lo, hi = want
                c.call("layout_get", slot=self.slot, offset=lo, length=hi - lo)
                self._layout_granted(lo, hi)
            c.shmview[:n] = mv[done:done + n]
            try:
                c.call("write", slot=self.slot, offset=off, length=n, buf=0)
            except _errors.Sealed:
                # A commit sealed blocks of the layout held: ask again (the server
                # relocates them), then write.
                c.call("layout_get", slot=self.slot, offset=off, length=n)
                c.call("write", slot=self.slot, offset=off, length=n, buf=0)
            done += n
        self._wrote(offset, len(mv))
        return len(mv)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.append:
            return self._append(data)
        n = self.pwrite(data, self.pos)
        self.pos += n
        return n

    def _append(self, data: bytes | bytearray | memoryview) -> int:
        """O_APPEND: the server writes each buffer-sized piece at the end of the file and
        commits it under the file's lock (atomic against every other appender)."""
        c = self.client
        assert c.shm is not None
        self.commit()
        mv = memoryview(data).cast("B")
        done = 0
        while True:
            n = min(len(mv) - done, len(c.shm))
            c.shmview[:n] = mv[done:done + n]
            res = c.call("append", slot=self.slot, length=n, buf=0)
            self._size_hint = res["size"]
            self.pos = res["offset"] + n
            done += n
            if done >= len(mv):
                return done

    def commit(self) -> int:
        """Make the written range part of the file (size, mtime); returns the size."""
        if self._dirty is None:
            return self._size_hint
        lo, hi = self._dirty
        return self._committed(self.client.call("commit", slot=self.slot, offset=lo,
                                                length=hi - lo)["size"])

    def truncate(self, size: int | None = None) -> int:
        self.commit()
        size = self.pos if size is None else size
        return self._truncated(size, self.client.call("truncate", slot=self.slot,
                                                      size=size)["size"])

    def fsync(self) -> None:
        self.commit()
        self.client.call("fsync", slot=self.slot)

    # -- the rest --------------------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._seek_from(offset, whence)
        if pos is None:
            if whence != os.SEEK_END:
                raise ValueError(f"bad whence {whence}")
            pos = self.size() + offset
        self.pos = pos
        if self.pos < 0:
            self.pos = 0
            raise OSError(_errno.EINVAL, "negative seek position")
        return self.pos

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        if self._dirty is not None:
            self.commit()
        return int(self.stat()["size"])

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
        return File(self.client, res["slot"], self._size_hint, res["rights"], append=False)

    def revoke(self) -> None:
        """Revoke this grant and every grant minted from it."""
        self.client.call("revoke", slot=self.slot)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._dirty is not None:
                self.commit()
        finally:
            self.closed = True
            try:
                self.client.call("close", slot=self.slot)
            except (ConnectionError, OSError):
                pass

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The trio flavour of `Client`: the same operations, awaited.

        async with await AsyncClient.connect(mountpoint) as c:
            f = await c.open("x", "w")
            await f.write(b"data")
            await f.close()
    """

    def __init__(self, mountpoint: str) -> None:
        super().__init__(mountpoint)
        import trio
        self._trio = trio
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = trio.Lock()

    @classmethod
    async def connect(cls, mountpoint: str | os.PathLike[str], *,
                      shm_size: int = DEFAULT_SHM) -> AsyncClient:
        import trio
        path = await trio.to_thread.run_sync(control_socket, mountpoint)
        self = cls(os.fspath(mountpoint))
        try:
            await self.sock.connect(path)
            self.info = await self.call("hello")
            if shm_size:
                self._map_shm(*await self._call_fds("attach", size=shm_size))
        except BaseException:
            self.sock.close()
            raise
        return self

    async def _call_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        # One request at a time per connection: replies are matched in order.
        async with self._lock:
            rid = next(self._rids)
            data = encode(REQUEST, rid, {"op": op, **args})
            sent = 0
            try:
                while sent < len(data):
                    sent += await self.sock.send(data[sent:])
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed by the daemon: read what it said first (as Client._send)
            fds: list[int] = []
            while True:
                reply = self._take_reply(rid)
                if reply is not None:
                    return reply, fds
                chunk, anc, _f, _a = await self.sock.recvmsg(MAX_FRAME + 8, _ANCBUFSIZE)
                self._received(chunk, anc, fds)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        reply, fds = await self._call_fds(op, **args)
        _close_fds(fds)
        cursor = _next_cursor(reply, 0)
        for _ in range(MAX_PAGES):
            if cursor is None:
                break
            page, fds = await self._call_fds(op, **{**args, "cursor": cursor})
            _close_fds(fds)
            cursor = _next_cursor(page, cursor)
            _merge_page(reply, page)
        return reply

    async def open(self, path: str | os.PathLike[str], mode: str = "r", *,
                   perms: int = 0o644) -> AsyncFile:
        res = await self.call("open", path=self._relpath(path), flags=_flags_for(mode),
                              mode=perms)
        return AsyncFile(self, res["slot"], res["size"], res["rights"], append="a" in mode)

    async def register(self, principal: str) -> dict[str, Any]:
        return await self.call("register", principal=principal)

    async def aclose(self) -> None:
        self._unmap_shm()
        self.sock.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncFile(_FileState):
    """A file opened through the direct path by an AsyncClient."""

    def __init__(self, client: AsyncClient, slot: int, size: int, rights: int, *,
                 append: bool) -> None:
        super().__init__(slot, size, rights, append=append)
        self.client = client

    async def pread(self, n: int, offset: int) -> bytes:
        c = self.client
        assert c.shm is not None
        out = bytearray()
        while n > 0:
            want = min(n, len(c.shm))
            got = (await c.call("read", slot=self.slot, offset=offset, length=want,
                                buf=0))["n"]
            out += c.shmview[:got]
            if got < want:
                break
            n -= got
            offset += got
        return bytes(out)

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(0, await self.size() - self.pos)
        data = await self.pread(n, self.pos)
        self.pos += len(data)
        return data

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        c = self.client
        assert c.shm is not None
        mv = memoryview(data).cast("B")
        bs = _block_size(c)
        if _needs_commit(self._dirty, offset, len(mv), bs):
            await self.commit()
        done = 0
        while done < len(mv):
            off = offset + done
            n = _chunk(off, len(mv) - done, len(c.shm), bs)
            want = self._layout_wanted(off, n)
            if want is not None:
                lo, hi = want
                await c.call("layout_get", slot=self.slot, offset=lo, length=hi - lo)
                self._layout_granted(lo, hi)
            c.shmview[:n] = mv[done:done + n]
            try:
                await c.call("write", slot=self.slot, offset=off, length=n, buf=0)
            except _errors.Sealed:
                # A commit sealed blocks of the layout held: ask again (the server
                # relocates them), then write.
                await c.call("layout_get", slot=self.slot, offset=off, length=n)
                await c.call("write", slot=self.slot, offset=off, length=n, buf=0)
            done += n
        self._wrote(offset, len(mv))
        return len(mv)

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.append:
            return await self._append(data)
        n = await self.pwrite(data, self.pos)
        self.pos += n
        return n

    async def _append(self, data: bytes | bytearray | memoryview) -> int:
        """As File._append."""
        c = self.client
        assert c.shm is not None
        await self.commit()
        mv = memoryview(data).cast("B")
        done = 0
        while True:
            n = min(len(mv) - done, len(c.shm))
            c.shmview[:n] = mv[done:done + n]
            res = await c.call("append", slot=self.slot, length=n, buf=0)
            self._size_hint = res["size"]
            self.pos = res["offset"] + n
            done += n
            if done >= len(mv):
                return done

    async def commit(self) -> int:
        if self._dirty is None:
            return self._size_hint
        lo, hi = self._dirty
        return self._committed((await self.client.call("commit", slot=self.slot, offset=lo,
                                                       length=hi - lo))["size"])

    async def truncate(self, size: int | None = None) -> int:
        await self.commit()
        size = self.pos if size is None else size
        return self._truncated(size, (await self.client.call("truncate", slot=self.slot,
                                                             size=size))["size"])

    async def fsync(self) -> None:
        await self.commit()
        await self.client.call("fsync", slot=self.slot)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._seek_from(offset, whence)
        if pos is None:
            raise ValueError("AsyncFile.seek supports SEEK_SET and SEEK_CUR; use size()")
        self.pos = pos
        return self.pos

    async def size(self) -> int:
        if self._dirty is not None:
            await self.commit()
        return int((await self.stat())["size"])

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
        if self.closed:
            return
        try:
            if self._dirty is not None:
                await self.commit()
        finally:
            self.closed = True
            try:
                await self.client.call("close", slot=self.slot)
            except (ConnectionError, OSError):
                pass

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
