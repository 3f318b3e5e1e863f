"""FUSE requests in the shim's fair turns (kernelshim/connection.py, `FairTurns.serves`):
a program through the mount waits for each reply as a direct client does, so a FUSE
request's step counts as its tenant's step: beside another tenant's direct client they
compete (the short quantum, the parked backlogged steps, the hold), and a direct step
that used its quantum gives queued FUSE requests one batch, not eight. Before, FUSE
requests took no part: a flood of another tenant's direct requests ran whole steps of
up to HOG_SECONDS ahead of them (docs/BENCHMARKS.md, "Stop 30": bench_hostile's victim
through the mount, p99 4x quiet). (A queued FUSE request does not cut a step short, as
a quiet direct client's does: whose it is, the kernel does not say, and a flooding
tenant's cut every step of a pipelining client to one request: hostile probe 25, F1.)
On trio's MockClock with a real ShimServer, and through a real mount; the end-to-end
figure is the benchmark's."""

from __future__ import annotations

import math
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shim_util import pubmnt, user_popen  # noqa: F401 - the fixture
from test_fairturns_side import _handshake, _replies
from test_hostile import kernel  # noqa: F401 - the fixture

from kernelshim.client import Client
from kernelshim.connection import FairTurns, Share


def _serves(turns: FairTurns, principal: Any) -> None:
    # (getattr: on the code before, the tests fail on their assertions)
    getattr(turns, "serves", lambda p: None)(principal)


async def _step(turns: FairTurns, sh: Share | None, principal: Any = None) -> None:
    """One step: a turn of `sh`'s (a direct client's request), or a FUSE request of
    `principal` (`serves`), then the loop given back (the step ends)."""
    if sh is not None:
        await turns.take(sh)
    else:
        _serves(turns, principal)
    await trio.lowlevel.cancel_shielded_checkpoint()


async def test_fuse_requests_compete_with_another_tenants_steps_only(
        mock_clock: trio.testing.MockClock) -> None:
    """Principals compete (the short quantum) when a FUSE request's step and another
    tenant's shim step share a batch of the loop, whichever comes first; not when two
    tenants' FUSE requests do (the kernel's queue and the fair intake order those), nor
    a tenant's FUSE request beside its own shim step."""
    turns = FairTurns(lambda conn: None)
    a, b, c = turns.share(1), turns.share(2), turns.share(3)
    tenants = {"a": a, "b": b, "c": c}
    turns.turn_of = lambda p: tenants[p]  # type: ignore[method-assign]
    trio.lowlevel.add_instrument(turns)
    try:
        async def batch(*steps: tuple[Share | None, Any]) -> bool:
            """Run the steps in one batch; whether principals compete after it."""
            turns.contended_until = -math.inf
            async with trio.open_nursery() as nursery:
                for sh, p in steps:
                    nursery.start_soon(_step, turns, sh, p)
            return trio.current_time() < turns.contended_until

        assert not await batch((None, "a"), (None, "b"))  # two tenants' FUSE requests
        assert not await batch((a, None), (None, "a"))  # one tenant's both ways
        assert await batch((None, "a"), (b, None))  # FUSE first, then a shim step
        assert await batch((b, None), (None, "a"))  # and the other way round
        assert await batch((None, "a"), (None, "c"), (a, None))  # c's beside a's step
        assert await batch((a, None), (b, None))  # (as before: two shim tenants)
    finally:
        trio.lowlevel.remove_instrument(turns)
        turns.close()


#: a tenant's direct client that pipelines 64 small requests at a time and reads the
#: replies as fast as they come, without end (bench_hostile's flood, stats only)
_FLOOD = """
import socket, sys
from kernelshim.protocol import REQUEST, Decoder, encode
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
d = Decoder()
def replies(n):
    got = 0
    while got < n:
        data = s.recv(1 << 20)
        if not data:
            raise EOFError
        got += len(d.feed(data))
s.sendall(encode(REQUEST, 1, {"op": "hello"})
          + encode(REQUEST, 2, {"op": "open", "path": "pub/shared", "flags": 0}))
replies(2)
print("flooding", flush=True)
batch = b"".join(encode(REQUEST, 0, {"op": "stat", "slot": 1}) for _ in range(64))
while True:
    s.sendall(batch)
    replies(64)
"""


@pytest.mark.mounted
@pytest.mark.exclusive
def test_through_the_mount_a_program_makes_a_direct_flood_take_turns(pubmnt: Path) -> None:
    """The daemon wires it up (fs/mount.py): a tenant floods the control socket with
    pipelined requests while root's program stats and reads a file through the mount
    (O_DIRECT, checking what it reads) for 2 s. They compete: the flood's backlogged
    steps park (`parked`) and wait while the loop is held for the program's next
    request (`held`). Before, FUSE requests took no part in the turns: the flood, the
    only direct client, competed only with root's calls for the counts (held 1, parked
    264 for 1,287 pairs in 2 s; now 5,487 and 3,292 for 5,325)."""
    from test_hostile import _reap, _shim_stats, control_path, setup_pub

    mnt = pubmnt
    setup_pub(mnt)
    data = os.urandom(100_000)
    (mnt / "pub" / "shared").write_bytes(data)
    os.chmod(mnt / "pub" / "shared", 0o666)
    flood = user_popen(_FLOOD.replace("sys.argv[1]", repr(control_path(mnt))), 1000)
    try:
        assert flood.stdout.readline().strip() == "flooding", \
            flood.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.2)
        _shim_stats(mnt)  # (resets the daemon's counts)
        fd = os.open(mnt / "pub" / "shared", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            end = time.monotonic() + 2.0
            n = 0
            while time.monotonic() < end:
                assert os.stat(mnt / "pub" / "shared").st_size == len(data)
                off = (n * 4096) % 98304
                assert os.preadv(fd, [buf], off) == 4096
                assert buf[:] == data[off:off + 4096]
                n += 1
        finally:
            os.close(fd)
        with Client.connect(mnt, shm_size=0) as c:
            loop = c.call("shim_stats")["loop"]
        assert flood.poll() is None, flood.stderr.read()  # type: ignore[union-attr]
    finally:
        _reap(flood)
    print(f"{n} stat + read pairs through the mount; loop {loop}")
    assert n > 100
    assert loop["parked"] >= n // 10 and loop["held"] >= n // 4, loop


async def test_a_step_that_used_its_quantum_gives_way_once_to_queued_fuse_requests(
        kernel: Any, tmp_path: Any, mock_clock: trio.testing.MockClock) -> None:  # noqa: F811
    """A real ShimServer whose FUSE queue always holds requests (a tenant flooding the
    mount: `metadata_pending` always true) and a direct client pipelining 200 requests
    of TURN_SECONDS / 2 each, principals competing: each step that used its quantum
    gives the loop back for one batch (the FUSE requests are the poll's wake-ups, run
    first in it), not for eight (the rounds `_yield_if_hogging` makes while requests
    are queued: before, the flood of the mount held every such step for eight batches
    of its own requests, docs/BENCHMARKS.md "Stop 30")."""
    from kernelshim.connection import TURN_SECONDS
    from kernelshim.principals import PrincipalTable
    from kernelshim.protocol import REQUEST, encode
    from kernelshim.server import ShimServer
    from test_hostile import _Stats

    path = tmp_path / "c.sock"
    srv = ShimServer(kernel, PrincipalTable(None), _Stats(), path,  # type: ignore[arg-type]
                     metadata_pending=lambda: True)
    turns = srv.turns
    handle = srv._handle
    served: list[int] = []  # the batch of each request served

    async def slow_handle(conn: Any, m: Any) -> None:
        mock_clock.jump(TURN_SECONDS / 2)
        served.append(turns._batch)
        await handle(conn, m)

    srv._handle = slow_handle  # type: ignore[method-assign]
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    n = 200
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            await _handshake(client, path)
            turns.contended_until = math.inf  # principals compete
            served.clear()
            client.sendall(b"".join(encode(REQUEST, i, {"op": "hello"})
                                    for i in range(2, n + 2)))
            await _replies(client, n)
            nursery.cancel_scope.cancel()
    finally:
        turns.close()
        client.close()
    steps = len(set(served))
    batches = served[-1] - served[0] + 1
    print(f"{n} requests in {steps} steps over {batches} batches")
    assert len(served) == n
    assert steps >= n // 4  # (a quantum: two or three requests)
    assert batches <= 2 * steps, (steps, batches)  # (before: 8 batches a step)
