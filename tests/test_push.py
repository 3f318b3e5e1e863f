"""Server push: notifications reach a sync client (a callback, run by its reader thread)
and a trio client (an async iterator) while they have requests in flight; a client
that does not read is disconnected, never buffered for; and the client library
imports without numpy or the daemon's modules.

The server runs in this process over a real kernel and device, with a metadata
service whose fsync waits for the test: so a request is provably in flight when the
notification is pushed.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conftest import REPO
from kernelshim import FRESH, ROOT_PRINCIPAL, BlockDevice, ExtentMap, Kernel, Rights
from kernelshim import server as server_mod
from kernelshim.client import AsyncClient, Client
from kernelshim.clientcore import Notification
from kernelshim.grants import Grant
from kernelshim.principals import PrincipalTable
from kernelshim.protocol import OK, PUSH, REQUEST, Decoder, Message, encode
from kernelshim.server import ShimServer

BS = 4096
DATA = bytes(range(256)) * 32  # two blocks


class _Service:
    """A one-file metadata service: every open grants the same two blocks; fsync
    waits until the test sets `release`."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.fsync_started = trio.Event()
        self.release = trio.Event()

    async def open_path(self, path: str, flags: int, mode: int, creds: Any,
                        principal: Any) -> Grant:
        return self.kernel.grant(inode=2, generation=1, extents=ExtentMap([(0, 5, 2, FRESH)]),
                                 rights=Rights.RW, principal=ROOT_PRINCIPAL, charge=False)

    def size_of(self, grant: Grant) -> int:
        return len(DATA)

    def stat_of(self, grant: Grant) -> dict[str, Any]:
        return {"size": len(DATA)}

    async def fsync(self, grant: Grant) -> None:
        self.fsync_started.set()
        await self.release.wait()

    async def close(self, grant: Grant) -> None:
        pass

    def statistics(self, *, names: Any = None) -> dict[str, Any]:
        return {}

    def statistics_parts(self, *, names: Any = None, context: Any = (),
                         by_kind: bool = True) -> Any:
        return iter(())


@pytest.fixture
def kernel(tmp_path: Path):
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=64 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=16 * BS)
    yield k
    k.close()


async def _serve(kernel: Kernel, tmp_path: Path, nursery: trio.Nursery
                 ) -> tuple[ShimServer, _Service, str]:
    path = tmp_path / "c.sock"
    service = _Service(kernel)
    srv = ShimServer(kernel, PrincipalTable(None), service, path)  # type: ignore[arg-type]
    await nursery.start(srv.run)
    # the file's data, written through a grant as a client would
    g = await service.open_path("f", 0, 0, None, None)
    await kernel.write(g, 0, DATA)
    kernel.release(g)
    return srv, service, str(path)


async def test_push_reaches_sync_and_trio_clients_with_requests_in_flight(
        kernel: Kernel, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        srv, service, path = await _serve(kernel, tmp_path, nursery)

        # -- the sync client: fsync in flight in its thread, callback from its reader
        got = threading.Event()
        notes: list[Notification] = []

        def on_note(note: Notification) -> None:
            notes.append(note)
            got.set()

        c = await trio.to_thread.run_sync(lambda: Client(str(tmp_path), path))
        f = await trio.to_thread.run_sync(lambda: c.open("f", "r+"))
        await trio.to_thread.run_sync(c.subscribe, ["reclaim"], on_note)
        assert await trio.to_thread.run_sync(lambda: f.pread(len(DATA), 0)) == DATA
        fsync_returned = threading.Event()

        def fsync() -> None:
            f.fsync()
            fsync_returned.set()

        fsync_done = trio.Event()

        async def run_fsync() -> None:
            await trio.to_thread.run_sync(fsync)
            fsync_done.set()

        nursery.start_soon(run_fsync)
        await service.fsync_started.wait()
        root = srv.principals.root
        assert srv.push(root.id, "reclaim", {"frames": 7, "within": 0.5, "ticket": 1}) == 1
        assert srv.push(root.id, "revoked", {"slot": 1}) == 0  # not subscribed to that kind
        await trio.to_thread.run_sync(got.wait)
        assert not fsync_returned.is_set()  # delivered while the fsync was in flight
        assert [(n.kind, n.payload["frames"], n.payload["ticket"]) for n in notes] == \
            [("reclaim", 7, 1)]
        service.release.set()
        await fsync_done.wait()
        # the connection still works, through the reader thread now
        assert await trio.to_thread.run_sync(lambda: f.pread(100, 4000)) == DATA[4000:4100]
        await trio.to_thread.run_sync(f.close)
        await trio.to_thread.run_sync(c.close)

        # -- the trio client: fsync and a read in flight, notifications iterated
        service.fsync_started = trio.Event()
        service.release = trio.Event()
        ac = await AsyncClient.connect(tmp_path, sock_path=path)
        af = await ac.open("f", "r+")
        received: list[Notification] = []
        subscribed = trio.Event()
        first = trio.Event()

        async def listen() -> None:
            async for note in ac.notifications(["reclaim", "revoked"]):
                received.append(note)
                first.set()

        results: dict[str, Any] = {}

        async def fsync_then_flag() -> None:
            await af.fsync()
            results["fsync"] = True

        async def read_behind() -> None:
            await service.fsync_started.wait()
            results["read"] = await af.pread(len(DATA), 0)

        async with trio.open_nursery() as inner:
            inner.start_soon(listen)
            # subscribed once the server answered the subscribe request
            while not any(c_.subscribed for c_ in srv._conns):
                await trio.sleep(0)
            subscribed.set()
            inner.start_soon(fsync_then_flag)
            inner.start_soon(read_behind)
            await service.fsync_started.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert ac.proto.outstanding  # the fsync and the read are in flight
            assert srv.push(root, "revoked", {"slot": af.slot, "inode": 2}) == 1
            await first.wait()
            assert "fsync" not in results and "read" not in results
            assert received[0].kind == "revoked" and received[0].payload["slot"] == af.slot
            service.release.set()
            while len(results) < 2:
                await trio.sleep(0)
            assert results["read"] == DATA
            inner.cancel_scope.cancel()
        await af.close()
        await ac.aclose()
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_is_disconnected(
        kernel: Kernel, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """Pushes to a subscribed client that never reads fill its socket, then its send
    queue: at MAX_SEND_QUEUE bytes it is closed. One that stops reading with little
    queued is closed after SEND_STALL_SECONDS. Nothing is buffered without end, and the
    server and its other clients keep going."""
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        root = srv.principals.root

        async def subscribed() -> trio.socket.SocketType:
            s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await s.connect(path)
            await s.send(encode(REQUEST, 1, {"op": "subscribe", "kinds": ["notice"]}))
            d = Decoder()
            while not (out := d.feed(await s.recv(4096))):
                pass
            assert isinstance(out[0], Message) and out[0].kind == OK
            return s

        flood = await subscribed()
        (conn,) = srv._conns
        text = "x" * 8000
        pushed = 0
        while conn.doomed is None:
            assert srv.push(root.id, "notice", {"text": text}) == 1
            pushed += 1
            assert conn.queued <= server_mod.MAX_SEND_QUEUE + 9000
            assert pushed < 10_000
        await trio.testing.wait_all_tasks_blocked()
        assert srv.connections == 0 and not srv._conns
        assert srv.push(root.id, "notice", {"text": "after"}) == 0
        # The flooded client reads what the socket held, then the end of the stream.
        total = 0
        while (chunk := await flood.recv(1 << 16)):
            total += len(chunk)
        assert 0 < total < server_mod.MAX_SEND_QUEUE
        flood.close()

        # Stalled: a little queued, never read: closed after SEND_STALL_SECONDS.
        stalled = await subscribed()
        (conn,) = srv._conns
        while not conn.sendq:
            srv.push(root.id, "notice", {"text": text})
        assert conn.queued < server_mod.SEND_HIGH_WATER
        mock_clock.jump(server_mod.SEND_STALL_SECONDS - 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.doomed is None
        mock_clock.jump(0.2)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.doomed is not None and srv.connections == 0
        stalled.close()

        # A reading client is served as before.
        ac = await AsyncClient.connect(tmp_path, sock_path=path)
        assert (await ac.call("whoami"))["principal"] == "root"
        await ac.aclose()
        nursery.cancel_scope.cancel()


def test_push_frames_offline() -> None:
    """A PUSH frame decodes on the client as a notification, between replies."""
    from kernelshim.clientcore import ClientProtocol
    p = ClientProtocol()
    rid, _ = p.request("stat", {"slot": 1})
    p.receive(encode(PUSH, 1, {"kind": "reclaim", "frames": 3}) + encode(OK, rid, {"size": 5}))
    assert p.has_reply(rid) and p.reply(rid) == {"size": 5}
    (note,) = p.notifications
    assert note == Notification("reclaim", {"kind": "reclaim", "frames": 3}, 1)


@pytest.mark.parametrize("first", ["client", "daemon"])
def test_client_imports_light(first: str) -> None:
    """`import kernelshim.client` loads no numpy, xxhash, trio, pyfuse3, device, pager,
    kernel or server module; and whichever is imported first, the client's typed
    errors are the daemon's classes (one SluiceError in the process)."""
    code = """
import json, sys
import kernelshim.client
from kernelshim.clientcore import light_import_check
print(json.dumps(light_import_check()))
"""
    if first == "daemon":
        code = "import blockdev, kernelshim.kernel\n" + code + """
import blockdev, kernelshim.errors, kernelshim.protocol
assert kernelshim.errors.SluiceError is blockdev.SluiceError
assert issubclass(kernelshim.protocol.ProtocolError, blockdev.SluiceError)
"""
    else:
        code += """
import blockdev, kernelshim.errors, kernelshim.kernel
assert kernelshim.errors.SluiceError is blockdev.SluiceError
assert issubclass(kernelshim.errors.GrantRevoked, blockdev.SluiceError)
from kernelshim import Kernel, GrantRevoked
assert GrantRevoked is kernelshim.errors.GrantRevoked
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    heavy = json.loads(out.stdout.splitlines()[0])
    if first == "client":
        assert heavy == []
    else:
        assert "numpy" in heavy  # the check itself sees them when they are there


def test_typed_errors_need_no_daemon_modules() -> None:
    """A tenant's program on the system Python (no trio, numpy: the documented way for
    other uids) gets EDQUOT, EMFILE, EPERM... as the typed errors, not a
    ModuleNotFoundError from loading the daemon's modules (hostile probe 3, F5)."""
    code = """
import errno, json, sys
from kernelshim.clientcore import remote_error
from kernelshim.clientcore import light_import_check
out = {}
for name in ("QuotaExceeded", "TooManyObjects", "PrincipalError", "NoSuchPrincipal",
             "PrincipalExists", "NotAllowed"):
    e = remote_error({"error": name, "message": "m", "errno": 0})
    out[name] = [type(e).__name__, e.errno]
print(json.dumps([out, light_import_check()]))
"""
    # /usr/bin/python3 has none of the venv's packages: only the repository on the path
    out = subprocess.run(["/usr/bin/python3", "-c", code], cwd=REPO, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    errs, heavy = json.loads(out.stdout)
    assert errs == {"QuotaExceeded": ["QuotaExceeded", errno.EDQUOT],
                    "TooManyObjects": ["TooManyObjects", errno.EMFILE],
                    "PrincipalError": ["PrincipalError", errno.EINVAL],
                    "NoSuchPrincipal": ["NoSuchPrincipal", errno.ENOENT],
                    "PrincipalExists": ["PrincipalExists", errno.EEXIST],
                    "NotAllowed": ["NotAllowed", errno.EPERM]}
    assert heavy == []
    # and they are the daemon's classes
    from kernelshim import errors, principals
    assert principals.QuotaExceeded is errors.QuotaExceeded


def test_a_client_newer_than_its_daemon_says_so() -> None:
    """The answer of a version 1 daemon (an ERROR frame of version 1) makes the client
    raise a ProtocolError that names the cause, not a decoding error."""
    from kernelshim.clientcore import ClientProtocol
    from kernelshim.protocol import ERROR, ProtocolError
    p = ClientProtocol()
    p.request("hello", {})
    old = encode(ERROR, 0, {"error": "ProtocolError", "errno": 71,
                            "message": "protocol version 2 not supported (this is 1)"},
                 version=1)
    with pytest.raises(ProtocolError, match="daemon is older than the library"):
        p.receive(old)


def test_a_read_cut_short_leaves_no_stale_stream_offline() -> None:
    """A read plan closed half-way (a cancelled trio call) while it drops another
    stream's read-ahead leaves a state from which every later read, sequential or not,
    returns the file's bytes. A fake daemon serves reads from `data` into the buffer."""
    import mmap as _mmap

    from kernelshim.clientcore import (ClientProtocol, FileCore, SendData, SharedBuffer,
                                       Wait)
    from kernelshim.protocol import DataRequest, Decoder, encode_data_ok
    data = os.urandom(3 << 20)
    shm = memoryview(_mmap.mmap(-1, 1 << 20))
    core = FileCore(SharedBuffer(shm), 4096, 1, len(data), 1, append=False)
    proto = ClientProtocol()
    queue: list[bytes] = []

    def serve() -> None:  # the daemon: answer every request sent so far, in order
        for frame in queue:
            (r,) = Decoder().feed(frame)
            assert isinstance(r, DataRequest)
            got = data[r.offset:r.offset + r.length]
            shm[r.buf:r.buf + len(got)] = got
            proto.receive(encode_data_ok(r.request_id, len(got)))
        queue.clear()

    def step(plan, value=None):
        s = plan.send(value)
        if isinstance(s, SendData):
            rid, frame = proto.data_request(s.op, s.slot, s.offset, s.length, s.buf)
            queue.append(frame)
            return s, rid
        return s, None

    def run(plan):
        value = None
        try:
            while True:
                s, rid = step(plan, value)
                if isinstance(s, Wait):
                    serve()
                    value = proto.reply(s.rid)
                else:
                    value = rid
        except StopIteration as stop:
            return stop.value

    buf = bytearray(100_000)
    assert run(core.readinto_plan(buf, 0)) == len(buf)
    assert run(core.readinto_plan(buf, 100_000)) == len(buf)  # sequential: reads ahead
    assert buf == data[100_000:200_000] and core._stream.pieces
    # A read elsewhere drops the read-ahead; it is cut short at its first wait.
    plan = core.readinto_plan(bytearray(5000), 2 << 20)
    value = None
    while True:
        s, rid = step(plan, value)
        if isinstance(s, Wait):
            break
        value = rid
    plan.close()
    serve()  # the cancelled call's driver waits for what it was waiting for, and lost
    for rid in [s.rid, *core.buffer.take_lost()]:
        proto.reply(rid)
    # Whatever the buffer held is fair game now (another file's reads use it too).
    shm[:] = b"\xee" * len(shm)
    for off in (200_000, 300_000, 7):
        got = bytearray(150_000)
        assert run(core.readinto_plan(got, off)) == len(got)
        assert got == data[off:off + len(got)], off
