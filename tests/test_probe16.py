"""Hostile probe 16 (stop 25): what one tenant's requests make the daemon hold, and who
pays for it. Each test fails on the code before its fix (docs/RELIABILITY.md, "stop 25")."""

from __future__ import annotations

import contextlib
import os
import socket as socket_mod
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import sluice
from shim_util import USER_PY, pubmnt, user_popen, user_run  # noqa: F401 (fixture)
from fs.service import DirectService
from kernelshim import connection as conn_mod
from kernelshim import granttable
from kernelshim.connection import Connection
from kernelshim.principals import Banks, TooManyObjects
from kernelshim.protocol import WRITE, DataRequest
from kernelshim.server import ShimServer
from kernelshim.service import Credentials
from test_filesystem import CALLER, ROOT, Volume
from test_hostile import _reap, served, setup_pub, usage

# -- F3: tenants within their own banks filling the global caps ----------------------------

_HOLD_CONNECTIONS = """
import sys
from kernelshim.client import Client
held = []
while True:
    try:
        held.append(Client.connect(sys.argv[1], shm_size=0))
    except Exception as exc:
        print("held", len(held), type(exc).__name__, flush=True)
        break
sys.stdin.readline()
"""

_HOLD_SHM = """
import sys
from kernelshim.client import Client
held = []
while True:
    try:
        held.append(Client.connect(sys.argv[1], shm_size=64 << 20))
    except Exception as exc:
        print("held", len(held), type(exc).__name__, exc, flush=True)
        break
sys.stdin.readline()
"""

_SECOND_SESSION = """
import sys
from kernelshim.client import Client
with Client.connect(sys.argv[1]) as a:
    try:
        Client.connect(sys.argv[1])
    except Exception as exc:
        print("second", type(exc).__name__, exc, flush=True)
    else:
        print("second ok")
"""


@contextlib.contextmanager
def _holder(mnt: Path, code: str, bank: str, amount: str) -> Iterator[list[str]]:
    """uid 1000, its `bank` raised to `amount`, holding what `code` takes until refused
    (its line "held N ERROR ..." split); at the end it is killed and everything it held
    is seen released."""
    setup_pub(mnt)
    sluice("principal", "add", str(mnt), "uid-1000", "--owner", "1000", check=False)
    sluice("principal", "set", str(mnt), "uid-1000", f"--{bank}", amount)
    p = user_popen(code.replace("sys.argv[1]", repr(str(mnt))), 1000)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("held "), (line, p.stderr.read() if p.poll() is not None
                                          else "")
        yield line.split()
    finally:
        _reap(p)
    deadline = time.monotonic() + 10
    while usage(mnt)["uid-1000"][bank]:
        assert time.monotonic() < deadline, usage(mnt)["uid-1000"]
        time.sleep(0.1)


@pytest.mark.mounted
def test_a_tenant_filling_the_connection_cap_leaves_others_their_first_connections(
        pubmnt: Path) -> None:
    """Probe 16, F3: eight tenants holding their default 64 connections each (or one
    whose bank root raised) filled the 480 connections the daemon serves for tenants,
    and every other tenant's `sluice stats`, `run` and direct client were refused:
    "the rest are kept for root". Each tenant's first TENANT_CONNECTIONS connections
    are now its own whatever the cap (its bank still decides); beyond them the cap
    holds, and root's reserve is still root's."""
    mnt = pubmnt
    with _holder(mnt, _HOLD_CONNECTIONS, "connections", "1000") as words:
        held = int(words[1])
        # its four of the floor, and the cap's 480 for tenants
        assert held == conn_mod.MAX_CONNECTIONS - conn_mod.ROOT_CONNECTIONS + \
            conn_mod.TENANT_CONNECTIONS, words
        assert words[2] == "TooManyObjects"
        assert usage(mnt)["uid-1000"]["connections"] == held
        served(mnt, 1002)  # stats, principal ls, sluice run, a direct client
        served(mnt)
        # the victim's floor is four connections at once: a fifth is refused
        code = f"""
from kernelshim.client import Client
cs = []
try:
    for _ in range(8):
        cs.append(Client.connect({str(mnt)!r}, shm_size=0))
except Exception as exc:
    print(len(cs), type(exc).__name__, exc)
"""
        r = user_run([USER_PY, "-c", code], 1002)
        n, err, *msg = r.stdout.split(maxsplit=2)
        assert (int(n), err) == (conn_mod.TENANT_CONNECTIONS, "TooManyObjects"), r.stdout
        assert "kept for root" in msg[0], msg


@pytest.mark.mounted
def test_a_tenant_filling_the_shared_memory_budget_leaves_others_their_first_buffer(
        pubmnt: Path) -> None:
    """Probe 16, F3: four tenants attaching their default 256 MiB of buffers each used
    up the 896 MiB the daemon attaches for tenants, and every other tenant's direct
    client failed at connect ("shared memory budget exhausted"). Each tenant's first
    TENANT_SHM bytes (a default client's buffer) are now its own whatever the budget;
    beyond them the budget holds."""
    mnt = pubmnt
    with _holder(mnt, _HOLD_SHM, "shm", "4G") as words:
        assert words[2] == "TooManyObjects" and "budget exhausted" in " ".join(words), words
        pooled = conn_mod.MAX_SHM_TOTAL - conn_mod.ROOT_SHM
        assert usage(mnt)["uid-1000"]["shm"] == int(words[1]) * (64 << 20) >= pooled
        served(mnt, 1002)  # its direct client: an 8 MiB buffer
        # a second buffer at once is beyond its floor, and the budget is full
        r = user_run([USER_PY, "-c", _SECOND_SESSION, str(mnt)], 1002)
        assert r.stdout.startswith("second TooManyObjects"), (r.stdout, r.stderr)
        assert "budget exhausted" in r.stdout
        served(mnt)  # root's reserve


# -- F2: the daemon's log, grown by any local user -----------------------------------------

def test_log_limiter_lets_a_burst_then_one_line_an_interval_per_key() -> None:
    """Each key logs BURST lines at once, then one every INTERVAL seconds; the line
    after a pause says how many were left out; keys do not share a budget, and the
    limiter keeps at most MAX_KEYS of them."""
    import logging
    from kernelshim import loglimit as ll
    now = [0.0]
    lim = ll.LogLimiter(clock=lambda: now[0])
    assert [lim.allow("uid 1") for _ in range(ll.BURST)] == [0] * ll.BURST
    assert [lim.allow("uid 1") for _ in range(5)] == [None] * 5
    assert lim.allow("uid 2") == 0  # another tenant's lines are its own
    now[0] += ll.INTERVAL / 2
    assert lim.allow("uid 1") is None
    now[0] += ll.INTERVAL / 2
    assert lim.allow("uid 1") == 6  # the five and the one above
    assert lim.allow("uid 1") is None
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_probe16.loglimit")
    logger.addHandler(Keep())
    logger.propagate = False
    now[0] += ll.INTERVAL
    assert lim.log(logger, logging.WARNING, "uid 1", "closing %s", "x")
    assert records[-1].getMessage() == "closing x (1 more lines for uid 1 left out)"
    assert not lim.log(logger, logging.WARNING, "uid 1", "closing %s", "y")
    for k in range(ll.MAX_KEYS + 10):
        lim.allow(k)
    assert len(lim._keys) == ll.MAX_KEYS


_LOG_FLOOD = """
import socket, sys
n = 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        s.sendall(b"\\xff" * 16)
        s.recv(4096)
    except OSError:
        pass
    finally:
        s.close()
    n += 1
print(n)
"""


@pytest.mark.mounted
def test_a_tenant_cannot_grow_the_daemons_log_without_bound(pubmnt: Path, tmp_path: Path
                                                            ) -> None:
    """Probe 16, F2: connecting, sending a bad frame length and hanging up wrote one
    line to the volume's sluice.log per connection (33 KB a second from one process,
    charged to nobody, on the host filesystem beside the backing store). Now a tenant's
    lines are rate-limited: 400 such connections add at most a burst of lines."""
    from kernelshim import loglimit as ll
    from test_hostile import control_path
    mnt = pubmnt
    setup_pub(mnt)
    log = tmp_path / "pub-daemon.log"  # (the fixture's daemon logs there)
    before = log.stat().st_size if log.exists() else 0
    r = user_run([USER_PY, "-c", _LOG_FLOOD, control_path(mnt), "400"], 1000)
    assert r.returncode == 0 and r.stdout.strip() == "400", r.stderr
    served(mnt, 1002)  # the daemon serves others
    text = log.read_text()[before:] if log.exists() else ""
    lines = [ln for ln in text.splitlines() if "closing shim connection" in ln]
    assert 1 <= len(lines) <= ll.BURST + 1, len(lines)


# -- F5: a direct client's uncommitted written ranges --------------------------------------

@pytest.fixture
async def vol4k(tmp_path: Path):
    """An open volume of 4,096 blocks (the FileSystem in this process)."""
    v = Volume(tmp_path / "vol", size=4096 * 4096)
    await v.open()
    yield v
    await v.close()


async def test_a_principals_uncommitted_written_ranges_are_bounded(
        vol4k: Volume, tmp_path: Path, monkeypatch) -> None:
    """Probe 16, F5: each grant keeps its uncommitted written ranges (~150 bytes of the
    daemon's memory each), up to the blocks written through it, and a principal may
    hold 4,096 grants on the same blocks: no bank bounded them. Now all of one
    principal's grants together hold at most PENDING_RANGES: a direct write beyond
    that gets TooManyObjects (the client must commit) — another principal's writes
    go on; a commit, or a revoke, gives the count back."""
    BS = 4096
    limit = 64
    monkeypatch.setattr(granttable, "PENDING_RANGES", limit)
    fs = vol4k.fs
    grants = []
    for name in (b"a", b"b"):
        h, node = fs.create(ROOT, name, 0o644, os.O_RDWR, CALLER)
        await fs.release(h.fh)
        g = fs.grant_direct(node, True, True, CALLER)
        await fs.layout_get(g, 0, 256 * BS)
        grants.append(g)
    a, b = grants
    for i in range(40):  # scattered one-byte writes: one range each
        await fs.kernel.write(a, 2 * i * BS, b"x")
    for i in range(limit - 40):
        await fs.kernel.write(b, 2 * i * BS, b"y")
    meter = a._written.meter
    assert meter is b._written.meter and meter.n == limit
    server = ShimServer(fs.kernel, fs.principals, DirectService(fs), tmp_path / "s.sock")
    s1, s2 = socket_mod.socketpair()
    conn = Connection(Credentials(os.getpid(), 0, 0), fs.principals.by_id(a.principal),
                      s1, shm_view=memoryview(bytearray(BS)))
    with pytest.raises(TooManyObjects, match="uncommitted written ranges"):
        await server._write(conn, a, 200 * BS, 1, 0)
    # another principal's grant is not held back
    other = fs.principals.add("other", owner_uid=0, banks=Banks(), caller_uid=0)
    c = fs.kernel.grant(inode=a.inode, generation=a.generation, extents=a.extents,
                        rights=a.rights, principal=other.id, charge=False)
    await fs.kernel.write(c, 201 * BS, b"z")
    fs.kernel.release(c)
    # a commit gives its ranges back; so does a revoke
    await fs.layout_commit(a, 0, 256 * BS)
    assert meter.n == limit - 40
    await server._write(conn, a, 200 * BS, 1, 0)
    assert meter.n == limit - 39
    fs.kernel.release(b)
    assert meter.n == 1 and b._written.meter is None
    # a tenant's child principals share its meter (review of stop 25, 3)
    kid = fs.principals.add("kid", parent="other", owner_uid=0, banks=Banks(),
                            caller_uid=0)
    k = fs.kernel.grant(inode=a.inode, generation=a.generation, extents=a.extents,
                        rights=a.rights, principal=kid.id, charge=False)
    o = fs.kernel.grant(inode=a.inode, generation=a.generation, extents=a.extents,
                        rights=a.rights, principal=other.id, charge=False)
    assert k._written.meter is o._written.meter is not meter
    fs.kernel.release(k)
    fs.kernel.release(o)
    s1.close()
    s2.close()
    await fs.close_direct(a)


async def test_a_commit_in_parts_that_a_revoke_meets_commits_every_range(tmp_path: Path
                                                                        ) -> None:
    """Review of stop 25, 13: a revoke (a chmod, an unlink) between two parts of a
    direct commit of more than COMMIT_STEP ranges dropped the grant's pending ranges,
    and the commit answered success having committed only the parts before. The
    ranges stay (they leave the tenant's meter): the commit takes them all."""
    import trio
    from fs.layouts import COMMIT_STEP
    from test_filesystem import read_file
    BS = 4096
    v = Volume(tmp_path / "vol", size=8192 * BS)
    fs = await v.open()
    try:
        h, node = fs.create(ROOT, b"f", 0o666, os.O_RDWR, CALLER)
        await fs.release(h.fh)
        g = fs.grant_direct(node, True, True, CALLER)
        n = 3 * COMMIT_STEP
        await fs.layout_get(g, 0, 2 * n * BS)
        for i in range(n):
            await fs.kernel.write(g, 2 * i * BS, bytes([i % 251 + 1]) * BS)
        meter = g._written.meter
        result: dict = {}

        async def commit() -> None:
            result["size"] = await fs.layout_commit(g, 0, 2 * n * BS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            while meter.n > n - COMMIT_STEP:  # the first part is taken
                await trio.lowlevel.checkpoint()
            fs.kernel.revoke_nowait(g)  # what chmod's and unlink's _revoke_direct do
        assert meter.n == 0
        assert result["size"] == (2 * n - 1) * BS
        want = b"".join((bytes([b // 2 % 251 + 1]) if b % 2 == 0 else b"\0") * BS
                        for b in range(2 * n - 1))
        assert await read_file(fs, node.id) == want
    finally:
        await v.close()


async def test_a_burst_of_pipelined_overwrites_meets_the_pending_bound(
        vol4k: Volume, tmp_path: Path, monkeypatch) -> None:
    """Review of stop 25, 4: only a single write checked the tenant's pending ranges; a
    burst of pipelined whole-block overwrites (`ShimServer._write_burst`) went on
    noting ranges past PENDING_RANGES. At the bound the burst is refused whole (the
    requests are then served one by one, each getting the error)."""
    BS = 4096
    limit = 16
    monkeypatch.setattr(granttable, "PENDING_RANGES", limit)
    fs = vol4k.fs
    h, node = fs.create(ROOT, b"f", 0o644, os.O_RDWR, CALLER)
    await fs.write(h.fh, 0, b"a" * (128 * BS))
    await fs.release(h.fh)
    await fs.sync()
    g = fs.grant_direct(node, True, True, CALLER)
    assert g.extents.sealed_runs(0, 128) == [(0, 128)]
    server = ShimServer(fs.kernel, fs.principals, DirectService(fs), tmp_path / "s.sock")
    s1, s2 = socket_mod.socketpair()
    s1.setblocking(False)
    conn = Connection(Credentials(os.getpid(), 0, 0), fs.principals.by_id(g.principal),
                      s1, shm_view=memoryview(bytearray(BS)))
    conn.slots[1] = g
    meter = g._written.meter
    for i in range(limit):  # scattered single-block overwrites, one at a time
        await server._write(conn, g, 2 * i * BS, BS, 0)
    assert meter.n == limit
    with pytest.raises(TooManyObjects):
        await server._write(conn, g, 2 * limit * BS, BS, 0)
    burst = [DataRequest(k, WRITE, 1, (2 * limit + 2 * k) * BS, BS, 0) for k in range(8)]
    assert not await server._write_burst(conn, burst)
    assert meter.n == limit
    s1.close()
    s2.close()
    await fs.close_direct(g)
