"""A lone small request's short paths on both sides of the direct protocol.

- The daemon: a connection task that served its request polls its socket for the next
  one in the loop's place (`ShimServer._poll_next`), only when the loop would go idle,
  and gives way at once to any other descriptor's event (another connection, FUSE).
- The sync client: a 4 KiB read packs its frame and reads its reply in place
  (`Client._small_read`); a reply that is not the lone DATA_OK it expects (an error, a
  notification ahead of it) goes through the protocol as before.

The server runs in this process over a real kernel and device (tests/test_push.py's
one-file service); the clients run in threads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio

from kernelshim import GrantRevoked, Kernel
from kernelshim.client import Client
from test_push import DATA, _serve, kernel  # noqa: F401 - the fixture

WINDOW = 0.5  # long, so that a poll that did not give way would show


class FakeIdle:
    """The loop's idle poll as `_poll_next` sees it: always willing to poll for
    WINDOW; `ready()` is the loop's real epoll probe (or a forced answer)."""

    def __init__(self, ready: object = None) -> None:
        from fs.idlepoll import epoll_ready_probe
        probe = epoll_ready_probe()
        assert probe is not None
        self._probe = probe
        self.forced = ready
        self.hits = self.misses = self.asked = self.gave_way = 0
        self.spun = 0.0

    def window_now(self) -> float:
        self.asked += 1
        return WINDOW

    def ready(self) -> bool:
        return bool(self.forced) if self.forced is not None else self._probe()

    def spent(self, *, now: float) -> None:
        self.gave_way += 1  # (a poll another descriptor's event ended)
        self.spun += trio.current_time() - now

    def polled(self, hit: bool, *, now: float) -> None:
        self.spun += trio.current_time() - now
        if hit:
            self.hits += 1
        else:
            self.misses += 1


async def test_a_connection_polls_for_its_next_small_read(kernel: Kernel,  # noqa: F811
                                                         tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        idle = srv.idle_poll = FakeIdle()  # type: ignore[assignment]

        def reads() -> list[bytes]:
            with Client(str(tmp_path), path) as c, c.open("f") as f:
                out = []
                for k in range(40):
                    buf = bytearray(4096)
                    assert f.readinto(buf, (k % 2) * 4096) == 4096
                    out.append(bytes(buf))
                    time.sleep(0.001)  # the task finds its socket empty: it polls
                return out

        got = await trio.to_thread.run_sync(reads)
        assert got == [DATA[(k % 2) * 4096:(k % 2 + 1) * 4096] for k in range(40)]
        # the task polled after its replies, and caught most next reads by polling
        assert idle.asked >= 30
        assert idle.hits >= 20
        nursery.cancel_scope.cancel()


async def test_a_polling_connection_gives_way_to_another(kernel: Kernel,  # noqa: F811
                                                        tmp_path: Path) -> None:
    """While one client's task polls for its next request (its client is thinking), a
    second client's request is served at once, not after the poll's window."""
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        idle = srv.idle_poll = FakeIdle()  # type: ignore[assignment]
        first_read = threading.Event()
        done = threading.Event()

        def slow_client() -> None:
            with Client(str(tmp_path), path) as c, c.open("f") as f:
                buf = bytearray(4096)
                f.readinto(buf, 0)
                first_read.set()
                done.wait(10)  # thinking: its task polls meanwhile

        def quick_client() -> float:
            first_read.wait(10)
            time.sleep(0.05)  # (the slow client's task is polling by now)
            with Client(str(tmp_path), path) as c, c.open("f") as f:
                buf = bytearray(4096)
                t0 = time.perf_counter()
                for _ in range(5):
                    f.readinto(buf, 4096)
                dt = time.perf_counter() - t0
                assert bytes(buf) == DATA[4096:]
                return dt

        nursery.start_soon(trio.to_thread.run_sync, slow_client)
        try:
            dt = await trio.to_thread.run_sync(quick_client)
        finally:
            done.set()
        # five round trips, each well under one poll window
        assert dt < WINDOW
        assert idle.asked >= 1
        nursery.cancel_scope.cancel()


async def test_no_poll_while_something_else_is_ready(kernel: Kernel,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """An event of another descriptor ends the poll at once, counted as neither a hit
    nor a miss; reads still work."""
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        idle = srv.idle_poll = FakeIdle(ready=True)  # type: ignore[assignment]

        def reads() -> float:
            with Client(str(tmp_path), path) as c, c.open("f") as f:
                buf = bytearray(4096)
                t0 = time.perf_counter()
                for _ in range(10):
                    f.readinto(buf, 0)
                    time.sleep(0.001)  # the next request comes after the task gave up
                assert bytes(buf) == DATA[:4096]
                return time.perf_counter() - t0

        assert await trio.to_thread.run_sync(reads) < WINDOW
        # No poll ran out its window (no miss), and at least five ended on the other
        # descriptor, neither hit nor miss. A request already in the socket at the
        # poll's first look is taken as a hit, rightly: the 1 ms sleep does not keep
        # the next request after the poll's start on a host whose vCPU stalls (it
        # failed 1 time in 6 so on the code of stop 24).
        assert idle.misses == 0 and idle.asked - idle.hits >= 5, (idle.asked, idle.hits)
        # ... and each of those polls is reported as time spent polling (`spent`:
        # shim_stats' idle_spun_ms, which bench_hostile takes out of a victim's demand)
        assert idle.gave_way >= 5, (idle.asked, idle.hits, idle.gave_way)
        nursery.cancel_scope.cancel()


async def test_small_reads_take_errors_and_the_end_of_a_file(kernel: Kernel,  # noqa: F811
                                                             tmp_path: Path) -> None:
    """The client's short path: a short read at the end of the file, a read past it,
    and an error reply (a revoked grant) come back as from the plan."""
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        srv.idle_poll = FakeIdle()  # type: ignore[assignment]

        def reads() -> None:
            for spin in (0.0, 250e-6):  # sleeping in recv, and polling for the reply
                with Client(str(tmp_path), path, spin=spin) as c, c.open("f", "r+") as f:
                    buf = bytearray(4096)
                    assert f.readinto(buf, len(DATA) - 100) == 100
                    assert bytes(buf[:100]) == DATA[-100:]
                    assert f.readinto(buf, len(DATA) + 4096) == 0
                    g = f.mint(1)  # read only
                    assert g.readinto(buf, 0) == 4096
                    g.revoke()
                    with pytest.raises(GrantRevoked):
                        g.readinto(buf, 4096)
                    assert f.readinto(buf, 4096) == 4096 and bytes(buf) == DATA[4096:]
                    assert c.proto.outstanding == set()

        await trio.to_thread.run_sync(reads)
        nursery.cancel_scope.cancel()



async def test_replies_held_for_the_step_go_out_before_the_poll(kernel: Kernel,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """While principals compete a step gathers its replies until it ends (FairTurns
    cork); a task that polls for its client's next request sends them first: held,
    the reply waited for the whole window and the client could not send the request
    the poll waited for (bench_hostile: the victim's step 0.3 ms for a 0.03 ms op)."""
    import math
    async with trio.open_nursery() as nursery:
        srv, _service, path = await _serve(kernel, tmp_path, nursery)
        idle = srv.idle_poll = FakeIdle()  # type: ignore[assignment]
        srv.turns.contended_until = math.inf  # principals compete: replies are corked

        def reads() -> float:
            with Client(str(tmp_path), path) as c, c.open("f") as f:
                buf = bytearray(4096)
                t0 = time.perf_counter()
                for k in range(10):
                    assert f.readinto(buf, (k % 2) * 4096) == 4096
                    assert bytes(buf) == DATA[(k % 2) * 4096:(k % 2 + 1) * 4096]
                return time.perf_counter() - t0

        dt = await trio.to_thread.run_sync(reads)
        assert dt < WINDOW, dt  # each reply held for a window: 10 windows
        # and polls caught next reads (not every one: the client is a thread of this
        # process, and on a loaded machine it may come after a poll has given up)
        assert idle.hits >= 1
        nursery.cancel_scope.cancel()


async def test_a_reply_the_socket_did_not_take_whole_is_not_held_by_a_poll(
        kernel: Kernel, tmp_path: Path) -> None:  # noqa: F811
    """Review V3: `_poll_next` uncorked its replies only once it had decided to poll.
    With a task runnable it returned first and left them corked; and when the socket
    took only part (the writer has the rest: `wake_writer`) it polled for the whole
    window, the runnable writer waiting behind it. Now the replies go out first, and
    a connection with output left in its send queue does not poll."""
    import collections
    import socket
    import types
    async with trio.open_nursery() as nursery:
        srv, _service, _path = await _serve(kernel, tmp_path, nursery)
        idle = srv.idle_poll = FakeIdle()  # type: ignore[assignment]
        a, b = socket.socketpair()
        a.setblocking(False)
        uncorked: list[object] = []

        def partial_send(conn: object) -> None:  # the socket took part of the reply
            uncorked.append(conn)

        srv.turns._uncork = partial_send  # type: ignore[method-assign]
        try:
            conn = types.SimpleNamespace(corked=True, sock=a, sendq=collections.deque(
                [(memoryview(b"rest of the reply"), [])]))
            await trio.sleep(0.01)  # (the server's tasks wait: nothing runnable)
            t0 = time.perf_counter()
            assert srv._poll_next(conn) is None  # type: ignore[arg-type]
            assert time.perf_counter() - t0 < WINDOW / 2  # no window's poll
            assert uncorked == [conn] and not conn.corked
            assert idle.misses == idle.hits == 0
            # a task runnable: no poll, but the replies go out all the same
            conn.corked, conn.sendq = True, collections.deque()
            nursery.start_soon(trio.sleep, 0)
            assert srv._poll_next(conn) is None  # type: ignore[arg-type]
            assert uncorked == [conn, conn] and not conn.corked
        finally:
            a.close()
            b.close()
        nursery.cancel_scope.cancel()
