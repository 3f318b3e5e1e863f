"""Hostile tenants of the direct path (issue 6, the hostile-user probe of 2026-12-01):
no uid can stop the daemon, corrupt what it stores for itself, or make it hold or do
unbounded work for one request.

Mounted tests attack a real daemon from an unprivileged uid (setpriv, as
tests/test_hostile.py does); the `pubmnt` fixture checks that the daemon is alive and
logged no traceback afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from blockdev import PrincipalId
from conftest import sluice
from kernelshim import FRESH, UNWRITTEN, BlockDevice, ExtentMap, Kernel, Rights
from kernelshim.grants import PENDING_EXACT
from kernelshim.ranges import CHUNK
from test_ranges import Flat
from kernelshim.kernel import ADVISE_STEP
from shim_util import pubmnt, user_python  # noqa: F401 (fixture)
from test_hostile import _reap, served, setup_pub


# -- #1: the shared buffer's memfd is sealed ----------------------------------------------

@pytest.mark.mounted
def test_a_client_cannot_shrink_the_shared_buffer(pubmnt: Path) -> None:
    """The memfd behind the shared buffer travels to the client; shrinking it made the
    daemon's next touch of its mapping a SIGBUS (the daemon died for every tenant). It
    is sealed against shrinking and growing, and the seals are sealed."""
    mnt = pubmnt
    setup_pub(mnt)
    out = user_python(f"""
import errno, fcntl, os
import kernelshim.client as kc
kept = []
orig = kc._Base._map_shm
def keep_fd(self, res):
    kept.append(os.dup(self._fds[0]))
    return orig(self, res)
kc._Base._map_shm = keep_fd
c = kc.Client.connect({str(mnt)!r}, shm_size=1 << 20)
fd = kept[0]
seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
tried = []
for how in ("shrink", "grow", "unseal"):
    try:
        if how == "shrink":
            os.ftruncate(fd, 0)
        elif how == "grow":
            os.ftruncate(fd, 4 << 20)
        else:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        tried.append(how + ":done")
    except OSError as e:
        tried.append(how + ":" + errno.errorcode[e.errno])
# The daemon still reads into and writes from the buffer (it used to die here).
with c.open("pub/shm1000", "w") as f:
    f.write(b"s" * 65536)
with c.open("pub/shm1000") as f:
    back = f.read()
print(seals, os.fstat(fd).st_size, *tried, back == b"s" * 65536)
""", 1000).split()
    want = fcntl_seals()
    assert int(out[0]) & want == want, out
    assert out[1:] == [str(1 << 20), "shrink:EPERM", "grow:EPERM", "unseal:EPERM", "True"]
    served(mnt)


def fcntl_seals() -> int:
    import fcntl
    return fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# -- #12: the daemon checksums exactly what it stores -------------------------------------

def _checksum_errors(mnt: Path) -> int:
    return json.loads(sluice("stats", str(mnt), "--json").stdout)["device"]["checksum_errors"]


@pytest.mark.mounted
def test_a_changing_shared_buffer_stores_no_bad_checksum(pubmnt: Path) -> None:
    """A client that keeps changing its shared buffer while the daemon writes from it
    gets some mix of its bytes stored — never a block whose checksum does not match
    it (the daemon checksummed one reading of the buffer and stored another: the
    file read as a bad medium, and the device's error count rose for every tenant)."""
    mnt = pubmnt
    setup_pub(mnt)
    before = _checksum_errors(mnt)
    out = user_python(f"""
import os, threading
from kernelshim.client import Client
mnt = {str(mnt)!r}
c = Client.connect(mnt, shm_size=8 << 20)
stop = False
def scribble():
    v = memoryview(c.shm)
    i = 0
    while not stop:  # a byte in every page, a new value each time
        v[(i * 4097) % (4 << 20)] = i & 0xFF
        i += 1
    v.release()
th = threading.Thread(target=scribble)
th.start()
try:
    with c.open("pub/toctou", "w") as f:
        for k in range(20):
            f.pwrite(b"\\x11" * (4 << 20), k * (4 << 20))
        f.fsync()
finally:
    stop = True
    th.join()
c.close()
bad = 0
fd = os.open(os.path.join(mnt, "pub/toctou"), os.O_RDONLY)
for off in range(0, 80 << 20, 1 << 20):
    try:
        os.pread(fd, 1 << 20, off)
    except OSError:
        bad += 1
os.close(fd)
print(bad)
""", 1000)
    assert out.split() == ["0"], out
    assert _checksum_errors(mnt) == before
    served(mnt)


# -- #7: pending written ranges are bounded by the blocks written --------------------------

async def test_pending_one_byte_writes_coalesce_per_block(tmp_path: Path) -> None:
    """Pipelined one-byte writes at every other offset, never committed, kept one
    [start, end) per write in the grant (80 MiB of daemon memory for 600k writes,
    charged to nobody, and a commit that stalled the daemon for seconds). Past
    PENDING_EXACT ranges they coalesce per block: never more ranges than blocks."""
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=64 * 4096, block_size=4096)
    k = Kernel.open(d, cache_bytes=16 * 4096)
    try:
        nblocks = 16
        g = k.grant(inode=7, generation=1, extents=ExtentMap([(0, 1, nblocks, UNWRITTEN)]),
                    rights=Rights.RW, principal=PrincipalId(1))
        writes = nblocks * 4096 // 2
        for i in range(writes):
            await k.write(g, 2 * i, b"x")
        assert writes > PENDING_EXACT
        assert len(g.written) <= PENDING_EXACT + nblocks
        # Every byte written is still pending, the first PENDING_EXACT exactly.
        assert g.written[:3] == [[0, 1], [2, 3], [4, 5]]
        assert g.written[-1][1] == 2 * (writes - 1) + 1
        taken = g.take_written(0, nblocks * 4096)
        covered = {b for s, e in taken for b in range(s, e)}
        assert all(2 * i in covered for i in range(writes))
        assert g.written == []
    finally:
        k.close()


@pytest.mark.parametrize("seed", range(2))
def test_noted_ranges_merge_as_the_sorted_insert_did(seed: int) -> None:
    """A grant keeps its written ranges in chunks (`RangeList`: a sorted insert each
    into one list of ten thousand ranges was the most of a direct 4 KiB write's
    bookkeeping, docs/BENCHMARKS.md "Stop 16", and merging them in one pass later was
    one step of the loop that grew with the grant, probe 11 F4). Read after every
    write, the ranges are exactly the sorted insert's; read after many, they cover
    every written byte and nothing of a block no write touched, the first ranges stay
    exact, and there are never more than PENDING_EXACT plus the blocks written."""
    import random
    from kernelshim.grants import Grant
    bs = 4096
    nblocks = 3 * PENDING_EXACT
    for read_each in (True, False):
        rnd = random.Random(seed)
        g = Grant(inode=1, generation=1, extents=ExtentMap(), rights=Rights.RW,
                  principal=PrincipalId(1))
        ref = Flat()  # (the flat sorted list the grant kept before)
        bytes_written: set[int] = set()
        blocks_touched: set[int] = set()
        for _n in range(3 * PENDING_EXACT):
            if rnd.random() < 0.7:
                b = rnd.randrange(nblocks)
                start, end = b * bs, (b + 1) * bs
            else:
                start = rnd.randrange(nblocks * bs - 64)
                end = start + rnd.randrange(1, 64)
            g.note_written(start, end, bs)
            ref.add(start, end, bs if len(ref.w) >= PENDING_EXACT else 1)
            bytes_written.update((start, end - 1))
            blocks_touched.update(range(start // bs, (end - 1) // bs + 1))
            if read_each:
                assert g.written == ref.w
            assert all(len(c) <= 2 * CHUNK for c in g._written._chunks)  # bounded
        w = g.written
        assert w[:3] == ref.w[:3]
        assert len(w) <= PENDING_EXACT + nblocks
        assert all(a[1] < b[0] for a, b in zip(w, w[1:]))  # sorted, apart
        assert all(any(s <= x < e for s, e in w[max(0, k - 1):k + 1])
                   for x in bytes_written
                   for k in [__import__("bisect").bisect_right(w, [x, 1 << 62])])
        assert all(b in blocks_touched for s, e in w for b in (s // bs, (e - 1) // bs))
        lo, hi = bs * nblocks // 3, bs * nblocks // 2
        taken = g.take_written(lo, hi)
        assert all(any(s <= x < e for s, e in taken) for x in bytes_written if lo <= x < hi)
        assert all(e <= lo or s >= hi for s, e in g.written)


@pytest.mark.mounted
def test_a_commit_of_many_pipelined_one_byte_writes(pubmnt: Path) -> None:
    """The attack through a real daemon: pipelined one-byte WRITE_ALLOC frames at every
    other offset, then one commit of all of them. The daemon answers everything, the
    commit gives the size the last byte makes, and the file reads back through the
    mount with each block's last byte written (a partial write to an unwritten block
    merges with zeros: the kernel's rule)."""
    mnt = pubmnt
    setup_pub(mnt)
    n = 3 * PENDING_EXACT
    out = user_python(f"""
import os
from kernelshim import protocol as P
from kernelshim.client import Client
c = Client.connect({str(mnt)!r}, shm_size=1 << 16)
c.shmview[0:1] = b"q"
slot = c.call("open", path="pub/ones", flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC,
              mode=0o644)["slot"]
s, dec = c.sock, P.Decoder()
sent = errs = 0
while sent < {n}:
    k = min(1000, {n} - sent)
    s.sendall(b"".join(P.encode_data(sent + i + 1, P.WRITE_ALLOC, slot, 2 * (sent + i), 1, 0)
                       for i in range(k)))
    got = 0
    while got < k:
        for m in dec.feed(s.recv(1 << 20)):
            got += 1
            errs += not isinstance(m, P.DataReply)
    sent += k
print(errs, c.call("commit", slot=slot, offset=0, length=1 << 40)["size"])
c.call("close", slot=slot)
""", 1000).split()
    size = 2 * (n - 1) + 1
    assert out == ["0", str(size)]
    data = (mnt / "pub/ones").read_bytes()
    assert len(data) == size
    for end in range(4096, size, 4096):  # the last byte written in each whole block
        assert data[end - 2:end] == b"q\0", end
    assert data[-1:] == b"q"
    served(mnt)


# -- #11: advise over a large range works in bounded steps ----------------------------------

async def test_advise_of_a_large_range_yields_and_scans_the_pool(tmp_path: Path) -> None:
    """`advise` looked up every block of its range in one step (25-35 ms for a 1 GiB
    file, other tenants waiting). It hands the pager ADVISE_STEP blocks at a time, the
    event loop given back between steps, and the pager finds a long range's frames
    from the pool, not block by block — with the same effect: the asker's resident
    frames of the range take the hint, or are dropped (dontneed); another
    principal's frames of the same blocks stay as they were."""
    nblocks = 4 * ADVISE_STEP + 7
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=(nblocks + 1) * 4096, block_size=4096)
    k = Kernel.open(d, cache_bytes=64 * 4096)
    me, other = PrincipalId(1), PrincipalId(2)
    try:
        emap = ExtentMap([(0, 1, nblocks, FRESH)])
        g = k.grant(inode=7, generation=1, extents=emap, rights=Rights.RW, principal=me)
        g2 = k.grant(inode=7, generation=1, extents=emap, rights=Rights.RW, principal=other)
        mine = [0, 5, ADVISE_STEP + 3, 3 * ADVISE_STEP, nblocks - 1]
        theirs = [9, 2 * ADVISE_STEP + 1]
        for fb in mine:
            await k.write(g, fb * 4096, b"m" * 4096)
        for fb in theirs:
            await k.write(g2, fb * 4096, b"t" * 4096)
        pager = k.pager
        frame = {fb: pager._where[1 + fb] for fb in mine + theirs}
        assert {int(pager._owner[frame[fb]]) for fb in mine} == {1}

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.lowlevel.checkpoint()
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            t0 = ticks
            await k.advise(g, 0, nblocks * 4096, priority=3)
            steps = ticks - t0
            assert [int(pager._prio[frame[fb]]) for fb in mine] == [3] * len(mine)
            assert [int(pager._prio[frame[fb]]) for fb in theirs] == [0] * len(theirs)
            # Any length may be asked for: past the file's last block there is no data,
            # and no step either.
            t0 = ticks
            await k.advise(g, 0, 1 << 50, priority=4)
            assert ticks - t0 <= 2 * (nblocks // ADVISE_STEP + 1)  # (not 2**38 / ADVISE_STEP)
            assert [int(pager._prio[frame[fb]]) for fb in mine] == [4] * len(mine)
            t0 = ticks
            await k.advise(g, 0, nblocks * 4096, dontneed=True)
            dsteps = ticks - t0
            nursery.cancel_scope.cancel()
        # Five steps, four yields (the ticker may miss one round): none in one step.
        assert steps >= 3 and dsteps >= 3, (steps, dsteps)
        assert [1 + fb in pager._where for fb in mine] == [False] * len(mine)
        assert [1 + fb in pager._where for fb in theirs] == [True] * len(theirs)
        assert bytes(await k.read(g, 5 * 4096, 4096)) == b"m" * 4096  # written back
    finally:
        k.close()


# -- #5: direct writes and truncates clear set-user-ID/set-group-ID ------------------------

def _setid_file(mnt: Path, name: str, mode: int = 0o6777) -> Path:
    p = mnt / "pub" / name
    p.write_bytes(b"#!/bin/sh\nid\n")
    os.chmod(p, mode)
    assert os.stat(p).st_mode & 0o7777 == mode
    return p


@pytest.mark.mounted
def test_direct_writes_and_truncates_clear_setid_bits(pubmnt: Path) -> None:
    """Through the mount a write or truncate by a non-root user clears set-user-ID and
    set-group-ID (with group execute); a direct client's write, append, truncate and
    commit kept them — a tenant could rewrite another's set-ID program and keep its
    bits. Root keeps them, as through the mount; set-group-ID without group execute
    (mandatory locking's mark) stays."""
    mnt = pubmnt
    setup_pub(mnt)
    files = {how: _setid_file(mnt, f"setid-{how}") for how in
             ("write", "truncate", "append", "rdonly")}
    nogx = _setid_file(mnt, "setid-nogx", 0o6767)
    rel = {how: f"pub/{p.name}" for how, p in files.items()}
    user_python(f"""
import os
from kernelshim.client import Client
with Client.connect({str(mnt)!r}) as c:
    with c.open({rel["write"]!r}, "r+") as f:
        f.pwrite(b"#!/bin/sh\\necho pwned\\n", 0)
    with c.open({rel["truncate"]!r}, "r+") as f:
        f.truncate(3)
    with c.open({rel["append"]!r}, "a") as f:
        f.write(b"echo more\\n")
    with c.open({rel["rdonly"]!r}) as f:
        f.read()
    with c.open("pub/setid-nogx", "r+") as f:
        f.pwrite(b"#", 0)
""", 1000)
    mode = {how: os.stat(p).st_mode & 0o7777 for how, p in files.items()}
    assert mode == {"write": 0o777, "truncate": 0o777, "append": 0o777, "rdonly": 0o6777}
    assert os.stat(nogx).st_mode & 0o7777 == 0o2767
    assert (mnt / rel["write"]).read_bytes() == b"#!/bin/sh\necho pwned\n"
    assert (mnt / rel["truncate"]).read_bytes() == b"#!/"

    # Bits set again while a client holds its write grant: its commit clears them.
    again = _setid_file(mnt, "setid-again", 0o777)
    p = user_python_popen(mnt)
    try:
        assert p.stdout.readline().strip() == "open"
        os.chmod(again, 0o6777)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done", p.stderr.read()
    finally:
        _reap(p)
    assert os.stat(again).st_mode & 0o7777 == 0o777
    assert again.read_bytes() == b"#!/bin/sh\nid\nX"

    # Root's direct writes keep them.
    root_file = _setid_file(mnt, "setid-root")
    from kernelshim.client import Client
    with Client.connect(mnt) as c:
        with c.open(f"pub/{root_file.name}", "r+") as f:
            f.pwrite(b"#", 0)
            f.truncate(5)
    assert os.stat(root_file).st_mode & 0o7777 == 0o6777
    served(mnt)


def user_python_popen(mnt: Path):
    from shim_util import user_popen
    return user_popen(f"""
import sys
from kernelshim.client import Client
with Client.connect({str(mnt)!r}) as c:
    with c.open("pub/setid-again", "r+") as f:
        print("open", flush=True)
        sys.stdin.readline()
        f.pwrite(b"X", 13)
        f.fsync()
        print("done", flush=True)
""", 1000)
