"""Hybrid waiting for a small read's reply (kernelshim/hybridwait.py): the policy that
switches polling off when it does not pay, and real reads through a mounted volume
with polling on and off — same bytes, same errors, polls counted. Paced waits behind
a queue of the client's own requests (`ReplyClock`): the prediction and the learning
with given times, then streams of large reads and of pipelined writes through a
mounted volume, sync and trio, with the contents and the errors checked.

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
from kernelshim.client import AsyncClient, Client
from kernelshim.clientcore import WRITE_WINDOW
from kernelshim.hybridwait import (GAIN_DOWN, GAIN_UP, MAX_KINDS, MAX_POLL, MAX_RISE,
                                   MAX_SLEEP, MAX_SKIP, MAX_TRACKED, MIN_POLL, MIN_SKIP,
                                   SHRINK, SLEEP_SHARE, SPIN_SECONDS, HybridWait,
                                   ReplyClock)

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


# -- paced waits: the clock -------------------------------------------------------------------

W = ("write", 13)  # a kind: the operation and the size class
R = ("read", 23)


def test_an_unknown_kind_is_waited_for_in_recv_and_then_paced() -> None:
    c = ReplyClock()
    c.sent(1, W, 0.0)
    assert c.plan([1], 0.0) is None  # nothing learnt yet: sleep in recv
    c.arrived([1], 250e-6, True)  # ... and learn from the reply's arrival
    assert c.cost[W] == pytest.approx(250e-6) and c.last == 250e-6
    c.done(1)
    c.sent(2, W, 300e-6)  # sent after the last reply: served from when it was sent
    sleep_until, poll_until = c.plan([2], 400e-6)
    due = 300e-6 + 250e-6
    assert sleep_until == pytest.approx(400e-6 + SLEEP_SHARE * (due - 400e-6))
    assert poll_until - sleep_until == pytest.approx(MIN_POLL)  # at least MIN_POLL


def test_requests_ahead_are_served_one_after_the_other() -> None:
    c = ReplyClock()
    c.cost[W] = 0.5e-3
    c.last = 0.0
    for rid in range(1, 9):
        c.sent(rid, W, 0.0)
    # the 8th reply: eight writes of 0.5 ms each after the last reply (at 0)
    sleep_until, poll_until = c.plan(list(range(1, 9)), 0.0)
    assert sleep_until == pytest.approx(SLEEP_SHARE * 4e-3)
    assert poll_until - sleep_until == pytest.approx(min(MAX_POLL, (1 - SLEEP_SHARE) * 4e-3))
    c.arrived(list(range(1, 9)), 3e-3, True)  # they were cheaper: learnt at once
    assert c.cost[W] == pytest.approx(0.5e-3 + GAIN_DOWN * (0.375e-3 - 0.5e-3))
    c.cost[W] = 1e-3
    c.sent(9, W, 7e-3)
    c.last = 0.0
    c.arrived([9], 7e-3 + 50e-3, True)  # a stall (a commit): counted as twice the cost
    assert c.cost[W] == pytest.approx(1e-3 + GAIN_UP * (MAX_RISE - 1) * 1e-3)


def test_a_reply_found_after_the_sleep_shrinks_the_estimate() -> None:
    c = ReplyClock()
    c.cost[R] = 2e-3
    c.sent(5, R, 0.0)
    c.arrived([5], 1.5e-3, False)  # it came at or before 1.5 ms: sleep less next time
    assert c.cost[R] == pytest.approx(2e-3 * SHRINK)
    assert c.last == 1.5e-3


def test_mixed_kinds_teach_nothing_and_unknown_ones_are_not_paced() -> None:
    c = ReplyClock()
    c.cost[W] = 1e-3
    c.sent(1, W, 0.0)
    c.sent(2, R, 0.0)
    assert c.plan([1, 2], 0.0) is None  # the read's cost is not known
    c.cost[R] = 3e-3
    assert c.plan([1, 2], 0.0) is not None
    c.arrived([1, 2], 1.0, True)  # which one took the time? neither estimate moves
    assert (c.cost[W], c.cost[R]) == (1e-3, 3e-3)
    assert c.plan([7], 0.0) is None  # a request it never saw sent (a control request)
    assert c.plan([], 0.0) is None


def test_sleeps_are_capped_and_polling_switches_itself_off() -> None:
    c = ReplyClock()
    c.cost[R] = 1.0  # a second per request: the sleep is capped all the same
    c.sent(1, R, 0.0)
    sleep_until, _ = c.plan([1], 0.0)
    assert sleep_until == MAX_SLEEP
    c.cost[R] = 1e-3
    c.poll.polled(False)
    c.poll.polled(False)  # two failed polls: the next MIN_SKIP waits sleep, no poll
    for _ in range(MIN_SKIP):
        sleep_until, poll_until = c.plan([1], 0.0)
        assert poll_until == sleep_until > 0
    sleep_until, poll_until = c.plan([1], 0.0)  # then polling is tried again
    assert poll_until - sleep_until == pytest.approx(MIN_POLL)
    assert ReplyClock(0).plan([1], 0.0) is None  # (spin 0: the client makes no clock)


def test_the_clock_holds_a_bounded_amount() -> None:
    c = ReplyClock()
    for rid in range(MAX_TRACKED + 100):
        c.sent(rid, ("k", rid), 0.0)
    assert len(c._sent) == MAX_TRACKED
    for rid in range(MAX_KINDS + 10):
        c.arrived([rid], 1.0, True)
    assert len(c.cost) == MAX_KINDS
    c.forget()
    assert not c._sent


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


# -- paced waits through a mounted volume ------------------------------------------------------

@pytest.mark.mounted
def test_paced_stream_of_large_reads(mnt: Path) -> None:
    """4 MiB sequential reads wait for their next piece as the clock says (after the
    first, learnt in recv): the same bytes as without pacing (spin=0 or pace=False:
    no clock)."""
    data = os.urandom(24 << 20)
    (mnt / "big").write_bytes(data)
    for spin, pace in ((SPIN_SECONDS, True), (0.0, True), (SPIN_SECONDS, False)):
        with Client.connect(mnt, spin=spin, pace=pace) as c:
            buf = bytearray(4 << 20)
            with c.open("big", "r") as f:
                for rnd in range(2):
                    off = 0
                    while n := f.readinto(buf, off):
                        assert buf[:n] == data[off:off + n], (rnd, off)
                        off += n
                    assert off == len(data)
            if spin and pace:
                assert c.clock is not None and c.clock.paced > 0
                assert c.clock.paced == c.clock.early + c.clock.caught + c.clock.late
            else:
                assert c.clock is None


@pytest.mark.mounted
def test_paced_full_write_window(mnt: Path) -> None:
    """Pipelined 4 KiB overwrites, many more than the window: a full window is waited
    for a batch at a time, paced once the cost of a write is learnt; what lands is
    exactly what was written, and a write error inside a batch still comes with the
    file's next call."""
    size = 8 << 20
    base = os.urandom(size)
    (mnt / "w").write_bytes(base)
    rng = random.Random(3)
    model = bytearray(base)
    with Client.connect(mnt) as c:
        assert c.clock is not None
        f = c.open("w", "r+")
        for _ in range(20 * WRITE_WINDOW):
            off = rng.randrange(size // BS) * BS
            chunk = rng.randbytes(BS)
            assert f.pwrite(chunk, off) == BS
            model[off:off + BS] = chunk
        f.commit()
        assert c.clock.paced > 0
        assert (mnt / "w").read_bytes() == model
        # A grant revoked behind the client's back (a truncate through the mount)
        # while a window of writes is in flight: the error comes with the next call.
        with pytest.raises(GrantRevoked):  # a later write raises it, and keeps it ...
            for i in range(4 * WRITE_WINDOW):
                f.pwrite(b"x" * BS, (i % 64) * BS)
                if i == WRITE_WINDOW:
                    os.truncate(mnt / "w", BS)
        with pytest.raises(GrantRevoked):  # ... for fsync, which clears it
            f.fsync()
        f.close()
    # (a write over committed blocks is relocated by the daemon and shows through the
    # mount at once; the ones after the revocation never landed)
    assert (mnt / "w").read_bytes() in (model[:BS], b"x" * BS)


@pytest.mark.mounted
async def test_trio_client_full_write_window(mnt: Path) -> None:
    """The trio client waits for a batch of a full window too (the Ready step), without
    pacing: the writes land in order."""
    size = 1 << 20
    (mnt / "t").write_bytes(bytes(size))
    model = bytearray(size)
    rng = random.Random(5)
    c = await AsyncClient.connect(mnt)
    async with c:
        f = await c.open("t", "r+")
        for i in range(4 * WRITE_WINDOW):
            off = rng.randrange(size // BS) * BS
            chunk = bytes([i % 251 + 1]) * BS
            assert await f.pwrite(chunk, off) == BS
            model[off:off + BS] = chunk
        await f.close()
    assert (mnt / "t").read_bytes() == model
