"""Parked FUSE requests (issue 6, issue 9): a request waiting for its principal's
admission gives its pyfuse3 worker back, within a per-principal bound.

Unit tests drive `Admission` on a real principal tree under trio's MockClock, with a
recorder in place of `pyfuse3.release_worker`. The mounted test makes a tenant's reads
block at the device (a fault plan delays every device request by ten minutes) with
more of its threads stuck than the daemon has workers, and checks that another uid's
`stat`, `ls` and `cat` are answered while every one of those reads is still pending.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from conftest import child_result, in_child, make_volume, run_as, sluice
from fs.operations import PARKED_OVERHEAD, Admission
from kernelshim.principals import Banks, PrincipalError, PrincipalTable


def _tree() -> PrincipalTable:
    t = PrincipalTable(None)
    t.add("alice", owner_uid=1000, banks=Banks(), caller_uid=0)
    t.add("alice-batch", parent="alice", owner_uid=1000, banks=Banks(), caller_uid=1000)
    t.add("bob", owner_uid=1001, banks=Banks(), caller_uid=0)
    return t


class Releases:
    """Stands in for pyfuse3.release_worker: counts the workers given back."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bool:
        self.count += 1
        return True


async def _outcome(adm: Admission, who, fn, *args, **kw) -> str:
    try:
        await adm.run(who, fn, *args, **kw)
    except pyfuse3.FUSEError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


async def test_waiting_requests_are_parked_within_the_bound(autojump_clock) -> None:
    t = _tree()
    rel = Releases()
    adm = Admission(2, parked_requests=3, parked_bytes=1 << 20, release_worker=rel)
    alice, batch, bob = t.get("alice"), t.get("alice-batch"), t.get("bob")
    gate = trio.Event()
    out: list[str] = []

    async def blocked() -> None:
        await gate.wait()

    async def one(who) -> None:
        out.append(await _outcome(adm, who, blocked))

    async with trio.open_nursery() as nursery:
        for who in (alice, batch, alice, batch, alice, batch):
            nursery.start_soon(one, who)  # one at a time: trio runs new tasks in any order
            await trio.testing.wait_all_tasks_blocked()
        # Two run, three are parked (charged to alice: batch is hers), one is refused.
        assert out == ["EAGAIN"]
        assert rel.count == 3
        assert adm.parked(alice) == (3, 3 * PARKED_OVERHEAD)
        assert adm.parked(batch) == (1, PARKED_OVERHEAD)
        assert adm.refused == 1
        # Another tenant is neither held nor refused: it runs at once.
        assert await _outcome(adm, bob, trio.sleep, 0) == "ok"
        assert rel.count == 3
        gate.set()
    assert sorted(out) == ["EAGAIN"] + ["ok"] * 5
    assert adm.parked(alice) == adm.parked(batch) == (0, 0)


async def test_payload_bytes_count_and_release_is_never_refused(autojump_clock) -> None:
    t = _tree()
    rel = Releases()
    adm = Admission(1, parked_requests=10, parked_bytes=3 * PARKED_OVERHEAD + 100,
                    release_worker=rel)
    bob = t.get("bob")
    gate = trio.Event()
    out: dict[str, str] = {}

    async def blocked() -> None:
        await gate.wait()

    async def one(name: str, **kw) -> None:
        out[name] = await _outcome(adm, bob, blocked, **kw)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "running")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(functools.partial(one, "write-100", payload=100))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(functools.partial(one, "write-1", payload=1))
        await trio.testing.wait_all_tasks_blocked()
        assert out == {}  # both parked: 2 overheads and 101 bytes fit
        nursery.start_soon(functools.partial(one, "stat"))
        await trio.testing.wait_all_tasks_blocked()
        assert out == {"stat": "EAGAIN"}  # a third overhead would pass the byte bound
        nursery.start_soon(functools.partial(one, "release", must=True))
        await trio.testing.wait_all_tasks_blocked()
        # Not refused: it waits holding its worker (no release of the worker).
        assert "release" not in out and rel.count == 2
        assert adm.parked(bob) == (2, 2 * PARKED_OVERHEAD + 101)
        gate.set()
    assert out == {"stat": "EAGAIN", "running": "ok", "write-100": "ok", "write-1": "ok",
                   "release": "ok"}
    assert adm.parked(bob) == (0, 0)


async def test_cancelled_parked_requests_give_their_charge_back(autojump_clock) -> None:
    t = _tree()
    adm = Admission(1, parked_requests=4, release_worker=Releases())
    alice = t.get("alice-batch")
    with trio.move_on_after(1):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(adm.run, alice, trio.sleep_forever)
    assert adm.parked(alice) == adm.parked(t.get("alice")) == (0, 0)
    assert adm.limiter(alice).borrowed_tokens == 0


async def test_the_bounds_are_the_principals_banks_read_live(autojump_clock) -> None:
    """Each level's bound is the tightest of its banks, its ancestors' (root's
    included) and the mount's; `set` on the table takes effect for the next request,
    and another principal's bound is its own."""
    t = _tree()
    adm = Admission(1, release_worker=Releases())  # the mount's ceilings: 65536, 1 GiB
    alice, batch, bob = t.get("alice"), t.get("alice-batch"), t.get("bob")
    assert adm.bounds(batch) == adm.bounds(bob) == (4096, 64 << 20)  # the defaults
    with pytest.raises(PrincipalError, match="child 'alice-batch' has parked 4096, more "
                       "than 3"):
        t.set("alice", 0, parked=3)  # children first: a child's bank never exceeds its parent's
    t.set("alice-batch", 1000, parked=3, parked_bytes=2 * PARKED_OVERHEAD)  # alice's owner
    t.set("alice", 0, parked=3)
    assert adm.bounds(alice) == (3, 64 << 20)
    assert adm.bounds(batch) == (3, 2 * PARKED_OVERHEAD)
    gate = trio.Event()
    out: list[tuple[str, str]] = []

    async def blocked() -> None:
        await gate.wait()

    async def one(who) -> None:
        out.append((who.name, await _outcome(adm, who, blocked)))

    async with trio.open_nursery() as nursery:
        for who in [batch] * 4 + [alice] * 2 + [bob] * 6:
            nursery.start_soon(one, who)
            await trio.testing.wait_all_tasks_blocked()
        # batch: 1 runs, 2 parked (its byte bound), the 4th refused; alice's cap of one
        # running request is held by batch's (hierarchical tokens), so hers park: one
        # fits under her 3, the next is refused. Bob parks 5 under his own 4096.
        assert sorted(out) == [("alice", "EAGAIN"), ("alice-batch", "EAGAIN")]
        assert adm.parked(alice) == (3, 3 * PARKED_OVERHEAD)
        assert adm.parked(batch) == (2, 2 * PARKED_OVERHEAD)
        assert adm.parked(bob) == (5, 5 * PARKED_OVERHEAD)
        assert bob.usage.parked == 5 and t.root.usage.parked == 0  # root: its own only
        # Root lowers bob's bank on the live table: his next request is refused.
        t.set("bob", 0, parked=5)
        nursery.start_soon(one, bob)
        await trio.testing.wait_all_tasks_blocked()
        assert out[-1] == ("bob", "EAGAIN")
        gate.set()
    assert sorted(out).count(("bob", "ok")) == 6
    assert adm.parked(alice) == adm.parked(bob) == (0, 0)
    # Root's banks are ceilings for everyone (a child above is refused; a uid's default
    # principal, made with the defaults, is bound by them too), though root's usage
    # counts only its own requests.
    with pytest.raises(PrincipalError, match="child 'alice' has parked 3, more than 2"):
        t.set("root", 0, parked=2)
    t2 = PrincipalTable(None)
    t2.set("root", 0, parked=2)
    assert adm.bounds(t2.default_for_uid(1234)) == (2, 64 << 20)
    # ... and the mount's value caps them all.
    assert Admission(1, parked_requests=1, release_worker=Releases()).bounds(alice) == \
        (1, 64 << 20)


# -- through the mount -----------------------------------------------------------------------

A_UID, B_UID, C_UID = 60011, 60012, 60013
CHUNK = 4096
WORKERS, RUNNING, PARKED, REFUSED = 8, 2, 16, 5
THREADS = RUNNING + PARKED + REFUSED  # far more than the daemon's workers


def _start_readers(fd: int, threads: int, started: int
                   ) -> tuple[list[threading.Thread], list[str]]:
    """Start `threads` threads, thread i reading chunk i of `fd` (filled with byte i);
    each appends "ok", "wrong data" or its errno's name to the list returned. A byte
    on pipe `started` once they all run."""
    out: list[str] = []

    def reader(i: int) -> None:
        try:
            data = os.pread(fd, CHUNK, i * CHUNK)
            out.append("ok" if data == bytes([i]) * CHUNK else "wrong data")
        except OSError as exc:
            out.append(errno.errorcode.get(exc.errno, str(exc.errno)))

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    os.write(started, b"s")
    return ts, out


def _stuck_reads(path: str, started: int) -> dict:
    """THREADS threads of one uid read distinct chunks of one open file at once; a byte
    on pipe `started` once they all run."""
    fd = os.open(path, os.O_RDONLY)
    other = os.open(os.path.join(os.path.dirname(path), "small"), os.O_RDONLY)
    ts, out = _start_readers(fd, THREADS, started)
    # Once the refused threads have their EAGAIN, A's parking is full: a close(2) of
    # another file must still succeed (files are opened with noflush, and a FLUSH is
    # not admitted at all: its error would be close's, never retried).
    deadline = time.monotonic() + 120
    while out.count("EAGAIN") < REFUSED and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.close(other)
        closed = "ok"
    except OSError as exc:
        closed = errno.errorcode.get(exc.errno, str(exc.errno))
    for th in ts:
        th.join()
    os.close(fd)
    return {"results": out, "close": closed}


@pytest.mark.mounted
def test_a_tenant_stuck_beyond_the_worker_pool_leaves_the_daemon_to_others(
        tmp_path: Path, public_mount, monkeypatch) -> None:
    volume = make_volume(tmp_path / "vol", "1G")
    m = public_mount(volume)
    with open(m.path / "big", "wb") as f:
        for i in range(THREADS):
            f.write(bytes([i]) * CHUNK)
    (m.path / "small").write_bytes(b"s" * 100)
    (m.path / "empty").write_bytes(b"")
    m.stop()
    # Every device request now takes ten minutes, and the daemon has 8 workers: A's
    # reads miss the (cold) cache, 2 run and wait at the device, 16 are parked, and the
    # last 5 find A's parking full. Without parking the first 8 would hold every worker.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"latency_rate": 1.0, "latency_s": 600.0}))
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(plan))
    # (principal_requests RUNNING + 1: one token stays for namespace requests, so
    # RUNNING of A's reads run)
    monkeypatch.setenv("SLUICE_FUSE_WORKERS", f"max_tasks={WORKERS},principal_requests="
                                              f"{RUNNING + 1},parked_requests={PARKED}")
    m = public_mount(volume)
    mp = m.path
    started_r, started_w = os.pipe()
    a_pid, a_r = in_child(A_UID, lambda: _stuck_reads(str(mp / "big"), started_w))
    os.close(started_w)
    tasks = Path(f"/proc/{a_pid}/task")
    try:
        assert os.read(started_r, 1) == b"s"
        os.close(started_r)
        # A's threads that were refused have returned: then the daemon has read all of
        # A's requests (refusals come after the running and parked ones), and the
        # others are stuck in the kernel waiting for its answers.
        deadline = time.monotonic() + 120
        while len(list(tasks.iterdir())) != 1 + RUNNING + PARKED:
            assert time.monotonic() < deadline, len(list(tasks.iterdir()))
            time.sleep(0.05)
        # Tenant B's programs are answered although A has 18 requests in the daemon.
        st = run_as(B_UID, B_UID, ["stat", "-c", "%s %U", str(mp / "small")], timeout=120)
        ls = run_as(B_UID, B_UID, ["ls", str(mp)], timeout=120)
        cat = run_as(B_UID, B_UID, ["cat", str(mp / "empty")], timeout=120)
        assert (st.returncode, st.stdout) == (0, "100 root\n"), st
        assert (ls.returncode, ls.stdout.split()) == (0, ["big", "empty", "small"]), ls
        assert (cat.returncode, cat.stdout) == (0, ""), cat
        # ... while every one of A's admitted and parked reads is still unanswered.
        assert len(list(tasks.iterdir())) == 1 + RUNNING + PARKED
    finally:
        # SIGKILL the daemon (its device waits would last ten minutes): the kernel then
        # fails A's outstanding reads with ECONNABORTED.
        m.kill()
        a = child_result(a_pid, a_r)
    got = a["results"]
    assert sorted(got) == ["EAGAIN"] * REFUSED + ["ECONNABORTED"] * (RUNNING + PARKED), got
    assert a["close"] == "ok", a
    log = (tmp_path / "daemon.log").read_text()
    assert "lab setting SLUICE_FUSE_WORKERS" in log


def _reads(path: str, threads: int, started: int) -> dict:
    """`threads` threads of one uid read distinct chunks of one open file at once; a
    byte on pipe `started` once they all run."""
    fd = os.open(path, os.O_RDONLY)
    ts, out = _start_readers(fd, threads, started)
    for th in ts:
        th.join()
    os.close(fd)
    return {"results": out}


def _show(mnt: Path, name: str) -> dict:
    return json.loads(sluice("principal", "show", str(mnt), name, "--json").stdout)


@pytest.mark.mounted
def test_root_lowers_one_tenants_parking_and_only_that_tenant_is_refused(
        tmp_path: Path, public_mount, monkeypatch) -> None:
    """Root sets uid A's `parked` bank to 4 with `sluice principal set` (kept across a
    remount, shown by `principal show`); with every device request stuck, A's reads
    beyond 2 running and 4 parked get EAGAIN while uid B, at the default bank, parks
    all of its 8, and a third uid's `stat` is answered."""
    a_threads, b_threads, a_parked = 11, 8, 4
    volume = make_volume(tmp_path / "vol", "1G")
    m = public_mount(volume)
    mp = m.path
    for name, n in (("big-a", a_threads), ("big-b", b_threads)):
        with open(mp / name, "wb") as f:
            for i in range(n):
                f.write(bytes([i]) * CHUNK)
    (mp / "small").write_bytes(b"s" * 100)
    a_name = f"uid-{A_UID}"
    # A's default principal exists once A has asked something; root lowers its bank.
    assert run_as(A_UID, A_UID, ["stat", str(mp / "small")], timeout=60).returncode == 0
    sluice("principal", "set", str(mp), a_name, "--parked", str(a_parked),
           "--parked-bytes", "1M")
    text = sluice("principal", "show", str(mp), a_name).stdout
    assert [ln.split()[:4] for ln in text.splitlines() if ln.split()[0].startswith("parked")] \
        == [["parked", "0", "/", "4"], ["parked_bytes", "0B", "/", "1.0MiB"]], text
    m.stop()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"latency_rate": 1.0, "latency_s": 600.0}))
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(plan))
    monkeypatch.setenv("SLUICE_FUSE_WORKERS", f"max_tasks={WORKERS},principal_requests="
                                              f"{RUNNING + 1}")  # (as above)
    m = public_mount(volume)
    mp = m.path
    # Kept across the remount (principals.json), like every bank.
    shown = _show(mp, a_name)
    assert (shown["banks"]["parked"], shown["banks"]["parked_bytes"]) == (a_parked, 1 << 20)
    assert (shown["usage"]["parked"], shown["usage"]["parked_bytes"]) == (0, 0)
    procs = {}
    for uid, name, n in ((A_UID, "big-a", a_threads), (B_UID, "big-b", b_threads)):
        started_r, started_w = os.pipe()
        procs[uid] = in_child(uid, functools.partial(_reads, str(mp / name), n, started_w))
        os.close(started_w)
        assert os.read(started_r, 1) == b"s"
        os.close(started_r)
    try:
        # A's refused threads have returned; every other thread of A and B is stuck.
        want = {A_UID: 1 + RUNNING + a_parked, B_UID: 1 + b_threads}
        deadline = time.monotonic() + 120
        while True:
            now = {uid: len(list(Path(f"/proc/{pid}/task").iterdir()))
                   for uid, (pid, _) in procs.items()}
            if now == want:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        a, b = _show(mp, a_name)["usage"], _show(mp, f"uid-{B_UID}")
        assert a["parked"] == a_parked
        assert b["banks"]["parked"] == 4096  # the default
        assert b["usage"]["parked"] == b_threads - RUNNING
        # A third tenant is answered (B's own further requests would wait behind B's
        # two running reads: its admission cap).
        st = run_as(C_UID, C_UID, ["stat", "-c", "%s", str(mp / "small")], timeout=120)
        assert (st.returncode, st.stdout) == (0, "100\n"), st
    finally:
        m.kill()  # the device waits would last ten minutes: reads get ECONNABORTED
        got = {uid: child_result(pid, r)["results"] for uid, (pid, r) in procs.items()}
    refused = a_threads - RUNNING - a_parked
    assert sorted(got[A_UID]) == (["EAGAIN"] * refused
                                  + ["ECONNABORTED"] * (RUNNING + a_parked)), got
    assert got[B_UID] == ["ECONNABORTED"] * b_threads, got
