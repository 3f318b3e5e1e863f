"""Cooperative reclaim through a real mount (issue 8): a direct client subscribes to
its principal's reclaim requests (`Client.on_reclaim`, `AsyncClient.reclaims()`), is
asked to release N frames when its principal is over its share, and answers with
dontneed of ranges it chooses; one that ignores the request loses frames by policy at
the deadline, and nobody else's pages move. And advice acts on the adviser's own
pages only: a tenant's dontneed on a shared file leaves another tenant's frames.

Clients run as principals with `sluice run` (their connections act for them). The
pressure is a ceiling lowered under a principal's working set (`sluice principal
set --cache-max`), so each test knows exactly how many frames are asked for. Every
check reads counters and residency from `sluice stats --json` between steps, never a
duration: where the daemon's deadline matters, the test waits for the counter that
says the request was settled.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, sluice

pytestmark = pytest.mark.mounted

BS = 4096
KiB = 1 << 10
MiB = 1 << 20
#: the working set of the client under test, and the ceiling lowered under it
NBLOCKS = 600
CEILING = 512  # frames: --cache-max 2M

#: A direct client as a principal: reads blocks 0..argv[3] of "a" into the pool (32
#: blocks a request: not a stream, so nothing bypasses the pool), subscribes to
#: reclaim, says "ready", then computes in a pure-Python loop until a request came
#: (the callback runs meanwhile, in the client's reader thread). argv[2]: "comply"
#: (gives up its *last* blocks — the pager's policy would take the oldest — with
#: dontneed, then reclaim_done) or "ignore". Then serves "read LO HI" lines: reads those
#: blocks, prints their sha256.
SYNC_CLIENT = textwrap.dedent("""
    import hashlib, json, sys, threading, time
    from kernelshim.client import Client
    mnt, mode, nblocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    BS, PIECE = 4096, 32

    def read(f, lo, hi):
        return b"".join(f.pread(min(PIECE, hi - i) * BS, i * BS) for i in range(lo, hi, PIECE))

    c = Client.connect(mnt)
    f = c.open("a", read_ahead=False)
    held = list(range(nblocks))
    got = []
    asked = threading.Event()

    def on_reclaim(req):
        entry = {"ticket": req.ticket, "frames": req.frames, "within": req.within,
                 "thread": threading.current_thread().name}
        if mode == "comply":
            give, held[-req.frames:] = held[-req.frames:], []
            f.advise(give[0] * BS, len(give) * BS, dontneed=True)
            c.reclaim_done(req, released=len(give))
            entry["released"] = [give[0], give[-1] + 1]
        got.append(entry)
        asked.set()

    c.on_reclaim(on_reclaim)
    read(f, 0, nblocks)
    print("ready", flush=True)
    spins, limit = 0, time.monotonic() + 600  # (a safety net, not a measurement)
    while not asked.is_set() and time.monotonic() < limit:
        spins += 1
    print(json.dumps({"requests": got, "spins": spins}), flush=True)
    for line in sys.stdin:
        if line.strip() == "report":
            print(json.dumps({"requests": got}), flush=True)
            continue
        _, lo, hi = line.split()
        print(hashlib.sha256(read(f, int(lo), int(hi))).hexdigest(), flush=True)
    f.close()
    c.close()
""")

#: The same, with the trio client and its iterator: subscribed (`async with`) before
#: it reads its working set, it answers the first request by dropping its last blocks.
TRIO_CLIENT = textwrap.dedent("""
    import json, sys, trio
    from kernelshim.client import AsyncClient
    mnt, nblocks = sys.argv[1], int(sys.argv[2])
    BS, PIECE = 4096, 32

    async def main():
        async with await AsyncClient.connect(mnt) as c:
            f = await c.open("a", read_ahead=False)
            async with c.reclaims() as requests:
                for i in range(0, nblocks, PIECE):
                    await f.pread(min(PIECE, nblocks - i) * BS, i * BS)
                print("ready", flush=True)
                async for req in requests:
                    lo = nblocks - req.frames
                    await f.advise(lo * BS, req.frames * BS, dontneed=True)
                    pending = await c.reclaim_done(req)
                    print(json.dumps({"ticket": req.ticket, "frames": req.frames,
                                      "within": req.within, "released": [lo, nblocks],
                                      "pending": pending}), flush=True)
                    break
            await trio.to_thread.run_sync(sys.stdin.readline)
            await f.close()

    trio.run(main)
""")


def cache(mnt: Path) -> dict[str, dict]:
    """`sluice stats --json`'s "cache": principal name -> the pager's account of it."""
    return json.loads(sluice("stats", str(mnt), "--json").stdout)["cache"]


def run(mnt: Path, principal: str, *cmd: str) -> str:
    r = subprocess.run([*SLUICE, "run", str(mnt), "--principal", principal, "--", *cmd],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, f"{cmd} as {principal} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def start(mnt: Path, principal: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen([*SLUICE, "run", str(mnt), "--principal", principal, "--", *cmd],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=REPO)


def line(proc: subprocess.Popen) -> str:
    out = proc.stdout.readline()
    if not out:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"the client ended early:\n{err}")
    return out.strip()


def finish(proc: subprocess.Popen) -> None:
    """Close the client's stdin (it then closes its connection and exits); kill it if
    it does not, by its pid."""
    try:
        _out, err = proc.communicate(timeout=60)  # (closes stdin first, and the pipes)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(mnt: Path, pred, what: str, limit: float = 120.0) -> dict[str, dict]:
    """Poll `sluice stats` until `pred(cache)` holds (a daemon deadline is involved;
    the limit is a safety net for a stuck daemon, not a measurement)."""
    end = time.monotonic() + limit
    while True:
        c = cache(mnt)
        if pred(c):
            return c
        assert time.monotonic() < end, f"never saw {what}: {c}"
        time.sleep(0.1)



def write_file(path: Path, nblocks: int, seed: int) -> bytes:
    data = b"".join(bytes([(seed + i) % 251]) * (BS - 4) + i.to_bytes(4, "little")
                    for i in range(nblocks))
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def setup(volume: Path, mount_factory):
    """A 4 MiB pool (1024 frames); file "a" (600 blocks) for A, "b" (100 blocks) for
    B; principals A and B without banks; mounted again so that the pool starts cold."""
    m = mount_factory(volume, "--cache-size", "4M")
    a = write_file(m.path / "a", NBLOCKS, 1)
    b = write_file(m.path / "b", 100, 2)
    sluice("principal", "add", str(m.path), "A")
    sluice("principal", "add", str(m.path), "B")
    m.stop()
    m.start("--cache-size", "4M")
    return m.path, a, b


#: reads a file through the mount in 128 KiB preads (32 blocks: into the pool, not
#: past it as a stream); prints the sha256 of its contents
MOUNT_READER = textwrap.dedent("""
    import hashlib, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    n, out = os.fstat(fd).st_size, []
    for off in range(0, n, 128 << 10):
        out.append(os.pread(fd, 128 << 10, off))
    print(hashlib.sha256(b"".join(out)).hexdigest())
""")


def b_reads(mnt: Path, b: bytes) -> None:
    got = run(mnt, "B", sys.executable, "-c", MOUNT_READER, str(mnt / "b")).strip()
    assert got == sha(b)


def test_a_complying_client_chooses_what_it_releases(setup) -> None:
    """A holds 600 frames; its ceiling drops to 512. Its callback is called in the
    client's reader thread while the main thread computes, drops A's *last* 88 blocks
    and says done: the request counts as answered, A keeps exactly the blocks it
    chose (its first 512 read back as hits, the 88 it gave up from the device), and
    B's frames do not move."""
    mnt, a, b = setup
    b_reads(mnt, b)
    client = start(mnt, "A", sys.executable, "-c", SYNC_CLIENT, str(mnt), "comply",
                   str(NBLOCKS))
    try:
        assert line(client) == "ready"
        before = cache(mnt)
        assert before["A"]["frames"] == NBLOCKS and before["B"]["frames"] == 100
        sluice("principal", "set", str(mnt), "A", "--cache-max", "2M")
        report = json.loads(line(client))
        (req,) = report["requests"]
        assert req["frames"] == NBLOCKS - CEILING
        assert req["thread"] == "sluice-client-reader" and report["spins"] > 0
        assert 0 < req["within"] <= 2.0  # the pager's grace, as seconds from the push
        assert req["released"] == [CEILING, NBLOCKS]
        after = wait_for(mnt, lambda c: c["A"]["reclaim_answered"] == 1, "the answer")
        assert (after["A"]["reclaim_sent"], after["A"]["reclaim_missed"]) == (1, 0)
        assert after["A"]["frames"] == CEILING
        assert after["A"]["evictions"] == before["A"]["evictions"]  # none by policy
        assert after["B"]["frames"] == 100 and after["B"]["reclaim_sent"] == 0
        # A kept what it chose: blocks 0..511 are hits, 512..599 come from the device
        h0, m0 = after["A"]["hits"], after["A"]["misses"]
        client.stdin.write(f"read 0 {CEILING}\n")
        assert line(client) == sha(a[:CEILING * BS])
        c1 = cache(mnt)["A"]
        assert (c1["hits"] - h0, c1["misses"] - m0) == (CEILING, 0)
        client.stdin.write(f"read {CEILING} {NBLOCKS}\n")
        assert line(client) == sha(a[CEILING * BS:])
        c2 = cache(mnt)["A"]
        assert c2["misses"] - c1["misses"] == NBLOCKS - CEILING
        assert c2["frames"] <= CEILING
    finally:
        finish(client)


def test_a_client_that_ignores_loses_frames_by_policy(setup) -> None:
    """A subscribes and never answers. At the deadline the pager takes the 88 frames
    itself (reclaim_missed), by policy, from A only; B reads its file meanwhile, from
    its own frames, none of which move. After A disconnects, a lowered ceiling is
    enforced at once: no subscriber is left to ask."""
    mnt, a, b = setup
    b_reads(mnt, b)
    client = start(mnt, "A", sys.executable, "-c", SYNC_CLIENT, str(mnt), "ignore",
                   str(NBLOCKS))
    try:
        assert line(client) == "ready"
        before = cache(mnt)
        sluice("principal", "set", str(mnt), "A", "--cache-max", "2M")
        (req,) = json.loads(line(client))["requests"]
        assert req["frames"] == NBLOCKS - CEILING
        # Another principal cannot answer for A: reclaim_done answers the caller's own
        # principal's request, and B has none (A's ends as missed either way, whether
        # or not its deadline passed before B's answer arrived).
        answer = ("import sys; from kernelshim.client import Client\n"
                  "with Client.connect(sys.argv[1], shm_size=0) as c:\n"
                  "    print(c.reclaim_done(int(sys.argv[2])))")
        assert run(mnt, "B", sys.executable, "-c", answer, str(mnt),
                   str(req["ticket"])).strip() == "False"
        b_reads(mnt, b)  # while A's request is pending or after: B's frames serve B
        after = wait_for(mnt, lambda c: c["A"]["reclaim_missed"] == 1, "the missed deadline")
        assert (after["A"]["reclaim_sent"], after["A"]["reclaim_answered"]) == (1, 0)
        assert after["A"]["frames"] == CEILING
        assert after["A"]["evictions"] - before["A"]["evictions"] == NBLOCKS - CEILING
        assert after["B"]["frames"] == 100
        assert after["B"]["misses"] == before["B"]["misses"]
        assert after["B"]["hits"] == before["B"]["hits"] + 100
        assert after["B"]["evictions"] == 0 and after["B"]["reclaim_sent"] == 0
        client.stdin.write(f"read 0 {NBLOCKS}\n")  # A's data is intact either way
        assert line(client) == sha(a)
    finally:
        finish(client)
    # The subscription ended with the connection: the next ceiling is enforced at once.
    sluice("principal", "set", str(mnt), "A", "--cache-max", "1M")
    c = wait_for(mnt, lambda c: c["A"]["frames"] <= 256, "A at its new ceiling")
    assert c["A"]["reclaim_sent"] == 1


def test_pool_pressure_asks_the_subscriber_for_its_part(volume: Path, mount_factory) -> None:
    """No ceiling this time: A holds 600 frames of the 1024, B streams 500 blocks in
    128 KiB reads. Free frames run short, and the shortfall is shared out: B (no
    subscriber) is reclaimed at once, A is asked for its part and answers every
    request in time. How many requests that takes depends on how B's reads and the
    pager's task interleave, so the test checks that the counts agree: every request
    A's client saw was sent, and answered, none missed."""
    m = mount_factory(volume, "--cache-size", "4M")
    mnt = m.path
    a = write_file(mnt / "a", NBLOCKS, 1)
    big = write_file(mnt / "big", 500, 3)
    sluice("principal", "add", str(mnt), "A")
    sluice("principal", "add", str(mnt), "B")
    m.stop()
    m.start("--cache-size", "4M")
    client = start(mnt, "A", sys.executable, "-c", SYNC_CLIENT, str(mnt), "comply",
                   str(NBLOCKS))
    try:
        assert line(client) == "ready"
        got = run(mnt, "B", sys.executable, "-c", MOUNT_READER, str(mnt / "big")).strip()
        assert got == sha(big)
        report = json.loads(line(client))  # the client computed until the first request
        assert report["requests"] and report["requests"][0]["frames"] > 0
        c = wait_for(mnt, lambda c: c["A"]["reclaim_sent"] ==
                     c["A"]["reclaim_answered"] + c["A"]["reclaim_missed"],
                     "every request settled")
        assert c["A"]["reclaim_sent"] >= 1 and c["A"]["reclaim_missed"] == 0
        assert c["B"]["reclaim_sent"] == 0  # no subscriber: reclaimed by policy
        client.stdin.write("report\n")
        seen = json.loads(line(client))["requests"]
        assert len(seen) == c["A"]["reclaim_sent"]
        assert len({r["ticket"] for r in seen}) == len(seen)
        released = sum(r["released"][1] - r["released"][0] for r in seen)
        assert released == sum(r["frames"] for r in seen)
        assert c["A"]["frames"] <= NBLOCKS - released
        client.stdin.write(f"read 0 {NBLOCKS}\n")  # and A's data is intact
        assert line(client) == sha(a)
    finally:
        finish(client)


def test_the_trio_clients_iterator(setup) -> None:
    """The trio client's `async with client.reclaims()`: the request arrives while
    the client waits in the iterator; it drops its last blocks and is counted as
    answered."""
    mnt, a, _b = setup
    client = start(mnt, "A", sys.executable, "-c", TRIO_CLIENT, str(mnt), str(NBLOCKS))
    try:
        assert line(client) == "ready"
        assert cache(mnt)["A"]["frames"] == NBLOCKS
        sluice("principal", "set", str(mnt), "A", "--cache-max", "2M")
        got = json.loads(line(client))
        assert got["frames"] == NBLOCKS - CEILING and got["released"] == [CEILING, NBLOCKS]
        assert 0 < got["within"] <= 2.0
        c = wait_for(mnt, lambda c: c["A"]["reclaim_answered"] == 1, "the answer")
        assert (c["A"]["reclaim_sent"], c["A"]["reclaim_missed"]) == (1, 0)
        assert c["A"]["frames"] == CEILING
        # Out of the `async with`, the connection (still open) is unsubscribed: the
        # next ceiling is enforced by policy at once, nobody is asked.
        sluice("principal", "set", str(mnt), "A", "--cache-max", "1M")
        c = wait_for(mnt, lambda c: c["A"]["frames"] <= 256, "A at its new ceiling")
        assert c["A"]["reclaim_sent"] == 1
    finally:
        finish(client)


def test_reclaim_notifications_are_checked() -> None:
    """The client library's view of a "reclaim" notification (sans-IO): its fields,
    a deadline on the client's clock, and a clear error for a malformed one."""
    from kernelshim.clientcore import Notification, ReclaimRequest
    from kernelshim.protocol import ProtocolError
    note = Notification("reclaim", {"kind": "reclaim", "ticket": 7, "frames": 88,
                                     "within": 1.5}, 3)
    assert ReclaimRequest.from_note(note, 100.0) == ReclaimRequest(7, 88, 1.5, 101.5)
    for bad in ({"ticket": "7", "frames": 88, "within": 1.5},
                {"ticket": 7, "frames": None, "within": 1.5},
                {"ticket": 7, "frames": 88, "within": True}, {}):
        with pytest.raises(ProtocolError, match="malformed reclaim notification"):
            ReclaimRequest.from_note(Notification("reclaim", bad, 1), 0.0)


def test_a_tenants_dontneed_leaves_anothers_frames(setup) -> None:
    """A and B read the same file; A brought the blocks in, so they are charged to A.
    B's dontneed (and priority) of the whole file through a direct client changes
    nothing of A's: A's frames stay resident and A reads them back as hits."""
    mnt, a, _b = setup
    reader = textwrap.dedent("""
        import hashlib, sys
        from kernelshim.client import Client
        mnt, n = sys.argv[1], int(sys.argv[2])
        with Client.connect(mnt) as c, c.open("a", read_ahead=False) as f:
            data = b"".join(f.pread(32 * 4096, i * 4096) for i in range(0, n, 32))
            if sys.argv[3:] == ["drop"]:
                f.advise(0, n * 4096, dontneed=True, priority=-100)
        print(hashlib.sha256(data).hexdigest())
    """)
    n = 256
    want = sha(a[:n * BS])
    assert run(mnt, "A", sys.executable, "-c", reader, str(mnt), str(n)).strip() == want
    c0 = cache(mnt)
    assert c0["A"]["frames"] == n
    assert run(mnt, "B", sys.executable, "-c", reader, str(mnt), str(n), "drop").strip() == want
    c1 = cache(mnt)
    assert c1["A"]["frames"] == n and c1["A"]["evictions"] == 0
    assert c1["B"]["frames"] == 0
    assert c1["B"]["hits"] - c0.get("B", {"hits": 0})["hits"] >= n  # B read A's frames
    # A reads its blocks again: all from the pool
    assert run(mnt, "A", sys.executable, "-c", reader, str(mnt), str(n)).strip() == want
    c2 = cache(mnt)
    assert (c2["A"]["hits"] - c1["A"]["hits"], c2["A"]["misses"] - c1["A"]["misses"]) == (n, 0)
