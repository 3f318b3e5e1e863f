"""The daemon's garbage collector (fs/gcwatch.py): the start-up heap frozen out of full
collections, cycles made later still collected, and the SLUICE_GC_LOG lab log.

Unit tests of the two pieces, then a mounted daemon: it freezes its start-up heap,
logs every collection when asked, and under connection churn (each connection leaves
reference cycles behind) it keeps collecting, with its resident memory flat.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import struct
import weakref
from pathlib import Path

import pytest

from fs.gcwatch import GcLog, freeze_start_up_heap
from kernelshim.client import CONTROL_XATTR


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    """A two-object reference cycle nobody refers to, known by a weak reference."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def unfrozen():
    """Thaw whatever a test froze (the test process's heap back in the generations)."""
    yield
    gc.unfreeze()


def test_freeze_moves_the_live_heap_out_and_later_cycles_are_still_collected(unfrozen) -> None:
    before = _cycle()  # garbage at the freeze: collected by it, not frozen
    kept = _Node()
    frozen = freeze_start_up_heap()
    assert before() is None
    assert frozen == gc.get_freeze_count() > 1000
    assert all(o is not kept for o in gc.get_objects(generation=2))  # frozen: in none
    after = _cycle()
    assert after() is not None
    gc.collect()
    assert after() is None, "a cycle made after the freeze must still be collected"
    assert gc.isenabled()


def test_gc_log_writes_a_line_per_collection(tmp_path: Path) -> None:
    path = tmp_path / "gc.log"
    lg = GcLog.open(str(path))
    try:
        ref = _cycle()
        gc.collect(1)
    finally:
        lg.close()
    assert lg._callback not in gc.callbacks
    assert ref() is None
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert rows, "no collection logged"
    start, gen, wall, cpu, collected = rows[-1][:5]
    assert int(gen) == 1 and int(collected) >= 2
    assert 0 <= float(wall) < 5 and 0 <= float(cpu) < 5 and float(start) > 0
    assert len(rows[-1]) == 8
    assert os.stat(path).st_mode & 0o777 == 0o600
    n = len(rows)
    gc.collect(0)  # closed: nothing more
    assert len(path.read_text().splitlines()) == n


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _frame(rid: int, payload: dict) -> bytes:
    # The control protocol's request frame (kernelshim/protocol.py: version 2, REQUEST)
    body = struct.pack(">BBI", 2, 1, rid) + json.dumps(payload).encode()
    return struct.pack(">I", len(body)) + body


def _replies(s: socket.socket, n: int) -> None:
    """Read `n` reply frames (length-prefixed) off `s`."""
    buf = b""
    while n:
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            data = s.recv(65536)
            assert data, "the daemon hung up"
            buf += data
        buf = buf[4 + struct.unpack(">I", buf[:4])[0]:]
        n -= 1


def _churn(sock_path: str, rounds: int, held: int = 50) -> None:
    """`rounds` times: `held` connections that say hello and open a file, all open at
    once (the daemon's objects for them outlive a generation-0 collection), then all
    hung up."""
    data = _frame(1, {"op": "hello"}) + _frame(2, {"op": "open", "path": "f", "flags": 0})
    for _ in range(rounds):
        socks = []
        for _ in range(held):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock_path)
            s.sendall(data)
            socks.append(s)
        for s in socks:
            _replies(s, 2)
            s.close()


def test_daemon_freezes_its_start_up_heap_and_keeps_collecting(
        volume: Path, mount_factory, tmp_path: Path, monkeypatch) -> None:
    gc_log = tmp_path / "daemon-gc.log"
    monkeypatch.setenv("SLUICE_GC_LOG", str(gc_log))
    m = mount_factory(volume)
    assert m.proc is not None
    (m.path / "f").write_bytes(b"x" * 4096)
    frozen = re.search(r"garbage collector: froze (\d+) objects", m.log.read_text())
    assert frozen, m.log.read_text()[-2000:]
    # the modules, the volume's tables and services: tens of thousands of objects
    assert int(frozen.group(1)) > 10_000
    rows = [line.split("\t") for line in gc_log.read_text().splitlines()]
    assert any(r[1] == "2" for r in rows), "the freeze's full collection was not logged"
    n_start = len(rows)

    sock_path = os.getxattr(m.path, CONTROL_XATTR).decode()
    _churn(sock_path, 6)  # warm: the daemon's per-connection caches, malloc arenas
    rss0 = _rss_kib(m.proc.pid)
    _churn(sock_path, 30)
    rss1 = _rss_kib(m.proc.pid)
    rows = [line.split("\t") for line in gc_log.read_text().splitlines()][n_start:]
    assert rows, "no collection during 1,800 connections"
    # 1,500 more connections leave the resident set where it was (a leak of even one
    # 4 KiB page each would be 6 MiB).
    print(f"\ndaemon: {frozen.group(1)} objects frozen; {len(rows)} collections during "
          f"1,800 connections (by generation {[sum(r[1] == g for r in rows) for g in '012']}, "
          f"{sum(int(r[4]) for r in rows)} objects freed); RSS {rss0} -> {rss1} KiB")
    assert rss1 - rss0 < 3 * 1024, (rss0, rss1)
    assert m.daemon_alive
