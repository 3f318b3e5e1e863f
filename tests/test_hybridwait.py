"""Hybrid waiting for a small read's reply (kernelshim/hybridwait.py): the policy that
switches polling off when it does not pay, and real reads through a mounted volume
with polling on and off — same bytes, same errors, polls counted.

No timed assertions: whether a poll catches its reply depends on the machine, so the
mounted tests check contents, errors and that the polling path ran, not its speed
(scripts/bench_direct.py measures that).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kernelshim import GrantRevoked
from kernelshim.client import Client
from kernelshim.hybridwait import MAX_SKIP, MIN_SKIP, SPIN_SECONDS, HybridWait

BS = 4096


# -- the policy ----------------------------------------------------------------------------

def test_polls_until_two_failures_in_a_row() -> None:
    h = HybridWait()
    assert h.budget() == SPIN_SECONDS
    h.polled(False)  # one late reply alone changes nothing
    assert h.budget() == SPIN_SECONDS
    h.polled(True)
    assert h.budget() == SPIN_SECONDS
    h.polled(False)
    assert h.budget() == SPIN_SECONDS
    h.polled(False)  # the second in a row: MIN_SKIP waits sleep at once
    assert [h.budget() for _ in range(MIN_SKIP)] == [0.0] * MIN_SKIP
    assert h.budget() == SPIN_SECONDS
    assert (h.polls, h.hits) == (4, 1)


def test_backoff_doubles_to_its_cap_and_halves_on_success() -> None:
    h = HybridWait()
    h.polled(False)
    skips = []
    for _ in range(14):  # a machine where polling never pays
        h.polled(False)
        n = 0
        while h.budget() == 0.0:
            n += 1
        skips.append(n)
    assert skips[:4] == [MIN_SKIP, 2 * MIN_SKIP, 4 * MIN_SKIP, 8 * MIN_SKIP]
    assert max(skips) == MAX_SKIP and skips[-1] == MAX_SKIP
    h.polled(True)  # one success: polling on again, the next backoff half as long
    assert h.budget() == SPIN_SECONDS
    h.polled(False)
    h.polled(False)
    n = 0
    while h.budget() == 0.0:
        n += 1
    assert n == MAX_SKIP // 2


def test_spin_zero_never_polls_and_bad_values_are_refused() -> None:
    h = HybridWait(0)
    assert all(h.budget() == 0.0 for _ in range(100))
    for bad in (-1e-6, 0.5):
        with pytest.raises(ValueError, match="spin must be between"):
            HybridWait(bad)


# -- through a mounted volume ------------------------------------------------------------------

def _random_reads(c: Client, name: str, expect: bytes, n: int) -> None:
    rnd = random.Random(7)
    buf = bytearray(BS)
    with c.open(name, "r") as f:
        for _ in range(n):
            off = rnd.randrange(len(expect) // BS) * BS
            assert f.readinto(buf, off) == BS
            assert buf == expect[off:off + BS], off


@pytest.mark.mounted
@pytest.mark.parametrize("spin", [0.0, SPIN_SECONDS, 0.005])
def test_small_reads_with_and_without_polling(mnt: Path, spin: float) -> None:
    data = os.urandom(2 << 20)
    (mnt / "f").write_bytes(data)
    with Client.connect(mnt, spin=spin) as c:
        _random_reads(c, "f", data, 300)
        if spin:
            # The polling path ran (whether each poll caught its reply depends on the
            # machine); with a 5 ms budget nearly every reply comes while polling.
            assert c.hybrid.polls > 0
        else:
            assert c.hybrid.polls == 0
        # Reads that are not small random ones (a stream, a large read) are unchanged.
        with c.open("f", "r") as f:
            assert f.read() == data


@pytest.mark.mounted
def test_an_error_reply_while_polling(mnt: Path) -> None:
    """A reply that is an error (here: the grant revoked by a truncate through the
    mount) raises as without polling, and the client goes on working."""
    data = os.urandom(1 << 20)
    (mnt / "g").write_bytes(data)
    with Client.connect(mnt, spin=0.005) as c:
        f = c.open("g", "r")
        buf = bytearray(BS)
        for off in (8 * BS, 20 * BS, 3 * BS):  # (the first read of a file takes the plan)
            assert f.readinto(buf, off) == BS and buf == data[off:off + BS]
        assert c.hybrid.polls >= 1
        os.truncate(mnt / "g", BS)  # revokes f's grant
        # Whether a poll catches its reply depends on the machine's load: read again
        # (each read a new request, each answered by the same error) until one does.
        for _ in range(20):
            polls, hits = c.hybrid.polls, c.hybrid.hits
            c.hybrid.skip = 0  # poll for this one whatever the earlier polls found
            with pytest.raises(GrantRevoked):
                f.readinto(buf, 8 * BS)
            assert c.hybrid.polls == polls + 1  # the read polled
            if c.hybrid.hits == hits + 1:
                break  # the error reply was caught by the poll, and raised as above
        else:
            pytest.fail("no error reply came while polling in 20 reads of 5 ms polls")
        f.close()
        with c.open("g", "r") as g:
            for _ in range(2):  # (the first read of a file takes the plan)
                c.hybrid.skip = 0
                assert g.readinto(buf, 0) == BS and buf == data[:BS]
        assert c.hybrid.polls > polls + 1


@pytest.mark.mounted
def test_a_closed_connection_while_polling(mnt: Path) -> None:
    """The daemon closing the connection (here: after a frame it cannot delimit) ends
    a polling read with the daemon's error, as a sleeping one, and later calls fail at
    once instead of waiting."""
    data = os.urandom(256 << 10)
    (mnt / "h").write_bytes(data)
    with Client.connect(mnt, spin=0.005) as c:
        f = c.open("h", "r")
        buf = bytearray(BS)
        for off in (0, 2 * BS):
            assert f.readinto(buf, off) == BS and buf == data[off:off + BS]
        assert c.hybrid.polls >= 1
        c.sock.sendall(b"\xff" * 64)  # not a frame: the daemon answers an error, closes
        polls, hits = c.hybrid.polls, c.hybrid.hits
        c.hybrid.skip = 0  # this read polls, whatever the earlier polls found
        with pytest.raises(OSError, match="frame length") as info:
            f.readinto(buf, BS)
        assert info.value.errno == errno.EPROTO
        # It polled, and whatever the poll got (the daemon's refusal, the end of the
        # stream, or nothing yet) was no reply to it: not a hit.
        assert (c.hybrid.polls, c.hybrid.hits) == (polls + 1, hits)
        with pytest.raises(OSError):  # and nothing waits for a reply that cannot come
            f.readinto(buf, BS)


@pytest.mark.mounted
@pytest.mark.slow
def test_bench_direct_wait_runs(tmp_path: Path) -> None:
    """scripts/bench_direct_wait.py, one short round: its table has the three systems,
    the direct rounds read through the client (polls counted only with polling on)."""
    r = subprocess.run([sys.executable, "scripts/bench_direct_wait.py", "--rounds", "1",
                        "--size-mb", "16", "--seconds", "0.3"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines()
            if line.startswith("| 1 |")]
    assert [row[1].strip() for row in rows] == ["fuse", "off", "on"], r.stdout
    assert all(float(row[2]) > 0 for row in rows), r.stdout
    assert rows[1][5].strip() == "0" and int(rows[2][5]) > 0, r.stdout
    assert "geometric mean" in r.stdout
