"""Per-principal admission of FUSE requests (issue 6): one tenant's slow or blocked
requests must not occupy every request worker of the daemon.

Unit tests drive `Admission` directly on a real principal tree; the mounted test runs
one uid with hundreds of threads reading a large file from a volume mounted with the
`hdd` profile, while another uid's `stat` and small read must still be answered
promptly.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import child_result, in_child, make_volume
from fs.operations import Admission
from kernelshim.principals import Banks, PrincipalTable


# -- Admission on its own ------------------------------------------------------------------

def _tree() -> PrincipalTable:
    t = PrincipalTable(None)
    t.add("alice", owner_uid=1000, banks=Banks(), caller_uid=0)
    t.add("alice-batch", parent="alice", owner_uid=1000, banks=Banks(), caller_uid=1000)
    t.add("bob", owner_uid=1001, banks=Banks(), caller_uid=0)
    return t


async def test_data_requests_leave_a_quarter_of_the_tokens_to_namespace_requests(
        autojump_clock) -> None:
    """A tenant whose data requests wait (its own I/O limit) holds at most 3/4 of its
    tokens with them: its namespace requests (a READDIR, during which the kernel holds
    the directory's lock) still run at once; and namespace requests may use them all.
    The child's data share counts at the parent too (one order: share, then tokens)."""
    from fs.operations import DATA, NAMESPACE
    t = _tree()
    adm = Admission(4, release_worker=lambda: True)
    assert adm.data_requests == 3
    gate = trio.Event()
    ran: list[str] = []

    async def handler(tag: str) -> None:
        ran.append(tag)
        if tag.startswith("data"):
            await gate.wait()

    async with trio.open_nursery() as n:
        for i in range(5):  # child and parent share the parent's 3 data tokens
            who = "alice-batch" if i % 2 else "alice"
            n.start_soon(functools.partial(adm.run, t.get(who), handler, f"data{i}",
                                           lane=DATA))
        await trio.testing.wait_all_tasks_blocked()
        assert len(ran) == 3 and all(r.startswith("data") for r in ran)  # the share
        for who in ("alice", "alice-batch"):
            await adm.run(t.get(who), handler, f"ns-{who}", lane=NAMESPACE)
        assert ran[3:] == ["ns-alice", "ns-alice-batch"]
        gate.set()
    assert sorted(ran) == ["data0", "data1", "data2", "data3", "data4", "ns-alice",
                           "ns-alice-batch"]
    assert adm.limiter(t.get("alice")).borrowed_tokens == 0
    assert adm.limiter(t.get("alice"), DATA).borrowed_tokens == 0


async def test_a_principal_runs_at_most_its_cap_and_others_are_not_held() -> None:
    t = _tree()
    adm = Admission(4)
    release = trio.Event()
    running = {"alice": 0, "bob": 0}
    peak = {"alice": 0, "bob": 0}

    async def handler(who: str) -> str:
        running[who] += 1
        peak[who] = max(peak[who], running[who])
        try:
            if who == "alice":
                await release.wait()
            return who
        finally:
            running[who] -= 1

    results: list[str] = []

    async def request(who: str) -> None:
        results.append(await adm.run(t.get(who), handler, who))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(request, "alice")
        await trio.testing.wait_all_tasks_blocked()
        assert running["alice"] == 4  # six more wait for admission
        with trio.fail_after(1):  # bob's requests run at once, alice's stay blocked
            for _ in range(6):
                await request("bob")
        assert results == ["bob"] * 6 and running["alice"] == 4
        release.set()
    assert results.count("alice") == 10 and peak["alice"] == 4


async def test_children_share_their_ancestors_cap() -> None:
    """A tenant cannot multiply its share by making child principals: a child's requests
    count against its parent (below root) too."""
    t = _tree()
    adm = Admission(3)
    gate = trio.Event()
    started = []

    async def handler(who: str) -> None:
        started.append(who)
        await gate.wait()

    async with trio.open_nursery() as nursery:
        for who in ("alice-batch", "alice-batch", "alice", "alice", "alice-batch"):
            nursery.start_soon(adm.run, t.get(who), handler, who)
            await trio.testing.wait_all_tasks_blocked()
        assert len(started) == 3  # alice's cap covers alice-batch's requests
        nursery.start_soon(adm.run, t.get("bob"), handler, "bob")
        await trio.testing.wait_all_tasks_blocked()
        assert started[-1] == "bob" and len(started) == 4
        gate.set()
    assert len(started) == 6


async def test_root_has_its_own_cap_and_tokens_come_back_on_cancel(autojump_clock) -> None:
    t = _tree()
    adm = Admission(2)
    with trio.move_on_after(0.01):  # cancelled while holding, and while waiting
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(adm.run, t.root, trio.sleep_forever)
                nursery.start_soon(adm.run, t.get("alice-batch"), trio.sleep_forever)
    for p in (t.root, t.get("alice"), t.get("alice-batch")):
        assert adm.limiter(p).borrowed_tokens == 0
    assert [lim.total_tokens for lim in adm.limiters(t.get("alice-batch"))] == [2, 2]
    assert adm.limiters(t.root) == [adm.limiter(t.root)]


# -- through the mount -----------------------------------------------------------------------

A_UID, B_UID = 60001, 60002
BIG = 64 << 20
CHUNK = 128 << 10


def _flood(path: str, threads: int, seconds: float) -> dict:
    """Many threads of one uid, each reading 128 KiB at random places, for `seconds`."""
    deadline = time.monotonic() + seconds
    done = [0] * threads
    errors: list[str] = []

    def reader(i: int) -> None:
        rng = random.Random(i)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                while time.monotonic() < deadline:
                    os.pread(fd, CHUNK, rng.randrange(BIG // CHUNK) * CHUNK)
                    done[i] += 1
            finally:
                os.close(fd)
        except OSError as exc:
            errors.append(repr(exc))

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"reads": sum(done), "errors": errors[:3]}


def _probe(mp: str) -> dict:
    """The other tenant: how long a stat, and an open and small read, take."""
    t0 = time.monotonic()
    os.stat(os.path.join(mp, "small"))
    t1 = time.monotonic()
    with open(os.path.join(mp, "small"), "rb") as f:
        data = f.read()
    t2 = time.monotonic()
    return {"stat_s": t1 - t0, "read_s": t2 - t1, "ok": data == b"s" * 4096}


@pytest.mark.mounted
@pytest.mark.slow
def test_a_flooding_tenant_leaves_workers_for_others(tmp_path: Path, public_mount) -> None:
    volume = make_volume(tmp_path / "vol", "1G")
    m = public_mount(volume)  # profile none: quick to fill
    with open(m.path / "big", "wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    (m.path / "small").write_bytes(b"s" * 4096)
    m.stop()
    # A slow disk and a small cache: every one of A's reads waits for the device.
    m = public_mount(volume, "--profile", "hdd", "--cache-size", "4M")
    mp = str(m.path)
    a_pid, a_r = in_child(A_UID, lambda: _flood(os.path.join(mp, "big"), 300, 6.0))
    try:
        time.sleep(2.0)  # A's threads are all blocked in reads by now
        b = child_result(*in_child(B_UID, lambda: _probe(mp)))
    finally:
        a = child_result(a_pid, a_r)
    assert a["errors"] == [] and a["reads"] > 0, a
    assert b["ok"], b
    print(f"tenant B under a 300-thread flood: stat {b['stat_s'] * 1e3:.0f} ms, "
          f"open+read {b['read_s'] * 1e3:.0f} ms; A read {a['reads']} chunks")
    assert b["stat_s"] < 1.0, b
    assert b["read_s"] < 1.5, b
