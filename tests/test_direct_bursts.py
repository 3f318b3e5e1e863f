"""Bursts of pipelined direct overwrites relocated together (issue 7; docs/BENCHMARKS.md,
"Stop 17: direct6").

A direct client's pipelined whole-block writes over committed (sealed) blocks, in one
step that has the quantum to itself, are relocated as one: one allocation, one kernel
call (`Kernel.write_relocated`, taking the blocks by value), the map changed per write
and saved once, their replies in one send.

- Component tests (a real volume, `FileSystem` called directly): a burst leaves exactly
  what the writes one by one would (data, map, freed blocks) and writes device blocks
  that continue each other in one pager write; a burst that is not entirely over
  committed blocks does nothing; a burst whose device write fails exposes nothing,
  keeps no block, and its writes then succeed one by one.
- The shim server in this process over a real kernel with a stub metadata service: a
  pipelined burst is handed over as bursts (each request answered), and when the
  burst fails every request is served alone and only the one that fails alone gets an
  error; a step without the quantum to itself (a short budget) makes no burst.
- Mounted: a direct client's pipelined overwrites go in bursts (`shim_stats`), the file
  reads the model, also after an fsync and a SIGKILL of the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from blockdev import DeviceError
from kernelshim import ROOT_PRINCIPAL, WRITTEN, BlockDevice, ExtentMap, Kernel, Rights
from kernelshim.client import Client
from kernelshim.errors import QuotaExceeded
from kernelshim.grants import Grant
from kernelshim.principals import PrincipalTable
from kernelshim import server as server_mod
from kernelshim.protocol import WRITE, DataRequest
from kernelshim.server import ShimServer

from test_filesystem import CALLER, Volume, fill, write_file

BS = 4096


@pytest.fixture
async def vol(tmp_path: Path):
    v = Volume(tmp_path / "vol", size=512 * BS)
    await v.open()
    yield v
    await v.close()


def segments(fs: Any, ino: int, nblocks: int) -> list[tuple[int, int, int, int]]:
    emap = fs._extents(fs.inode(ino))
    return [(s.file_block, s.dev_block, s.count, s.state) for s in emap.segments(0, nblocks)]


async def committed_file(vol: Volume, nblocks: int) -> tuple[int, Grant, bytearray]:
    fs = vol.fs
    assert fs is not None
    data = bytearray(fill(1, nblocks * BS))
    ino = await write_file(fs, b"f", bytes(data))
    await fs.sync()  # every block committed: sealed
    return ino, fs.grant_direct(fs.inode(ino), True, True, CALLER), data


async def read_back(fs: Any, grant: Grant, n: int) -> bytes:
    return bytes(await fs.kernel.read(grant, 0, n))


async def test_a_burst_is_relocated_as_its_writes_one_by_one(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = vol.fs
    assert fs is not None
    nblocks = 16
    ino, grant, model = await committed_file(vol, nblocks)
    before = segments(fs, ino, nblocks)
    calls: list[tuple[int, int, int]] = []
    real_write = fs.kernel.pager.write

    async def counting_write(block, data, **kw):  # type: ignore[no-untyped-def]
        calls.append((int(block), len(data) // BS, kw["fblock"]))
        return await real_write(block, data, **kw)

    monkeypatch.setattr(fs.kernel.pager, "write", counting_write)
    # out of file order; 7 and 8 continue each other, 11+2 is a two-block write
    writes = [(5, fill(5, BS)), (2, fill(2, BS)), (7, fill(7, BS)), (8, fill(8, BS)),
              (11, fill(11, 2 * BS))]
    ok = await fs.write_relocating_many(
        grant, [(fb * BS, memoryview(bytearray(d))) for fb, d in writes])
    assert ok
    for fb, d in writes:
        model[fb * BS:fb * BS + len(d)] = d
    assert await read_back(fs, grant, len(model)) == bytes(model)
    after = segments(fs, ino, nblocks)
    old = {fb + k: dev + k for fb, dev, n, _st in before for k in range(n)}
    new = {}
    for fb, dev, n, st in after:
        for k in range(n):
            new[fb + k] = (dev + k, st)
    written = {fb + k for fb, d in writes for k in range(len(d) // BS)}
    for fb in range(nblocks):
        if fb in written:  # relocated: a new device block, FRESH, the old one freed later
            assert new[fb][0] != old[fb] and new[fb][1] != WRITTEN, fb
        else:
            assert new[fb] == (old[fb], WRITTEN), fb
    pending = {d + k for d, c in fs.alloc._pending for k in range(c)}
    assert {old[fb] for fb in written} <= pending
    # one pager write per run of device blocks whose file blocks continue too: 7 and 8
    # (and 11+2) each one write, 5 and 2 one each
    assert sorted(c[2] for c in calls) == [2, 5, 7, 11]
    assert {c[2]: c[1] for c in calls} == {2: 1, 5: 1, 7: 2, 11: 2}
    # committed: the file reads exactly the model, also after a commit
    await fs.layout_commit(grant, 0, len(model))
    await fs.sync()
    h = fs.open(ino, os.O_RDONLY, CALLER)
    assert await fs.read(h.fh, 0, len(model)) == bytes(model)
    await fs.release(h.fh)
    await fs.close_direct(grant)


async def test_a_burst_not_all_over_committed_blocks_does_nothing(vol: Volume) -> None:
    fs = vol.fs
    assert fs is not None
    nblocks = 8
    ino, grant, model = await committed_file(vol, nblocks)
    await fs.write_relocating(grant, 3 * BS, memoryview(bytearray(fill(3, BS))))  # fresh now
    model[3 * BS:4 * BS] = fill(3, BS)
    before = segments(fs, ino, nblocks)
    free = fs.alloc.free, fs.alloc.kept_blocks
    for writes in ([(1 * BS, fill(9, BS)), (3 * BS, fill(9, BS))],  # 3 is fresh
                   [(1 * BS, fill(9, BS)), (5 * BS + 1, fill(9, BS))],  # not whole blocks
                   [(1 * BS, fill(9, BS)), (nblocks * BS, fill(9, BS))]):  # past the map
        assert not await fs.write_relocating_many(
            grant, [(o, memoryview(bytearray(d))) for o, d in writes])
        assert segments(fs, ino, nblocks) == before
        assert (fs.alloc.free, fs.alloc.kept_blocks) == free
    assert await read_back(fs, grant, len(model)) == bytes(model)
    await fs.close_direct(grant)


async def test_a_burst_whose_device_write_fails_exposes_nothing(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from the device in the middle of a burst: the burst fails as a whole before
    any map change (the new blocks go back to the relocations' pool, nothing is noted
    written in the grant), so the writes can then be served one by one."""
    fs = vol.fs
    assert fs is not None
    nblocks = 8
    ino, grant, model = await committed_file(vol, nblocks)
    before = segments(fs, ino, nblocks)
    space = fs.alloc.free + fs.alloc.kept_blocks
    real_write = fs.kernel.pager.write
    n = 0

    async def failing_write(block, data, **kw):  # type: ignore[no-untyped-def]
        nonlocal n
        n += 1
        if n == 2:
            raise DeviceError("injected EIO")
        return await real_write(block, data, **kw)

    monkeypatch.setattr(fs.kernel.pager, "write", failing_write)
    writes = [(6, fill(6, BS)), (1, fill(1, BS)), (4, fill(4, BS))]
    with pytest.raises(DeviceError):
        await fs.write_relocating_many(
            grant, [(fb * BS, memoryview(bytearray(d))) for fb, d in writes])
    assert segments(fs, ino, nblocks) == before
    assert fs.alloc.free + fs.alloc.kept_blocks == space  # no block lost
    assert not grant.written  # nothing to commit
    assert await read_back(fs, grant, len(model)) == bytes(model)
    monkeypatch.setattr(fs.kernel.pager, "write", real_write)
    for fb, d in writes:  # one by one, as the shim then serves them
        await fs.write_relocating(grant, fb * BS, memoryview(bytearray(d)))
        model[fb * BS:(fb + 1) * BS] = d
    assert await read_back(fs, grant, len(model)) == bytes(model)
    await fs.close_direct(grant)


async def test_a_burst_under_write_back_stays_in_the_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of direct6, B1: under write-back, one by one each write of at most
    BURST_BYTES (16 blocks) goes into dirty frames; a burst whose new blocks continue
    each other made one pager write of them all (48 blocks here), past BYPASS_BLOCKS:
    a stream that went around the pool (a device write or a write-behind of the joined
    `bytes`), outside the dirtier's bound and leaving nothing cached. A run joined in
    one pager write stops at BYPASS_BLOCKS."""
    from pager import BYPASS_BLOCKS
    real_open = Kernel.open
    monkeypatch.setattr(Kernel, "open", classmethod(
        lambda cls, d, **kw: real_open(d, **{**kw, "writeback": True})))
    v = Volume(tmp_path / "vol", size=512 * BS)
    fs = await v.open()
    try:
        assert fs.kernel.pager.writeback
        nblocks = 48
        ino, grant, model = await committed_file(v, nblocks)
        calls: list[int] = []
        real_write = fs.kernel.pager.write

        async def counting_write(block, data, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(data) // BS)
            return await real_write(block, data, **kw)

        monkeypatch.setattr(fs.kernel.pager, "write", counting_write)
        writes = [(fb, fill(fb + 50, 16 * BS)) for fb in (0, 16, 32)]
        assert await fs.write_relocating_many(
            grant, [(fb * BS, memoryview(bytearray(d))) for fb, d in writes])
        for fb, d in writes:
            model[fb * BS:fb * BS + len(d)] = d
        assert calls and max(calls) <= BYPASS_BLOCKS, calls
        new = [s for s in fs._extents(fs.inode(ino)).segments(0, nblocks)]
        where = fs.kernel.pager._where
        assert all(s.dev_block + k in where for s in new for k in range(s.count))
        assert await read_back(fs, grant, len(model)) == bytes(model)
        await fs.close_direct(grant)
    finally:
        await v.close()


async def test_a_burst_is_paced_per_write_while_in_debt(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of direct6, B4: while a principal owes write-back a barrier expedited past
    its I/O limit, each request that dirties frames is paced on its own
    (`Kernel.repay_limit`: its cost at the limit, at least LIMIT_DEBT_MIN_WAIT, 1 ms).
    A burst paced once for all its bytes: eight 4 KiB writes at 20 MB/s waited
    max(1 ms, 1.6 ms), not 8 x max(1 ms, 0.2 ms) — a tenant in debt dirtied five times
    faster in bursts. Each write of a burst is paced as it would be alone."""
    fs = vol.fs
    assert fs is not None
    ino, grant, _model = await committed_file(vol, 8)
    paced: list[tuple[int, int, int | None]] = []

    async def pace(principal, nbytes, offset=None, **kw):  # type: ignore[no-untyped-def]
        paced.append((int(principal), nbytes, offset))  # (the burst's `ios`: see below)

    monkeypatch.setattr(fs.kernel, "repay_limit", pace)
    assert await fs.write_relocating_many(
        grant, [(fb * BS, memoryview(bytearray(fill(fb, BS)))) for fb in (1, 3, 4)])
    alone: list[tuple[int, int, int | None]] = []
    for fb in (1, 3, 4):
        n = len(paced)
        await fs.write_relocating(grant, fb * BS, memoryview(bytearray(fill(fb, BS))))
        alone.extend(paced[n:])
    assert paced[:3] == alone
    await fs.close_direct(grant)


async def test_places_are_priced_at_what_the_device_does(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe 20, F2-F4: a write-through request takes its place at its writer's I/O
    limits before the lock, priced at what it will make the device do. A direct
    append was priced at its bytes (32 one-byte appends: 16x an 8 KiB/s limit in a
    burst), a write layout's copy at its writes only (2x), a hole punched across a
    block boundary at one block (its two partial blocks' writes: 2-4x). Each is priced
    at its blocks now: the append at those it spans from the size seen, the copy read
    and written, the punch at each partly covered block."""
    from fs.space import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    fs = vol.fs
    assert fs is not None
    ino, grant, _model = await committed_file(vol, 8)
    priced: list[tuple[int, int, float]] = []
    real = fs.kernel.repay_limit

    async def pace(principal, nbytes, offset=None, *,  # type: ignore[no-untyped-def]
                   ios=1.0, **kw):
        priced.append((nbytes if offset is None else -1, offset or 0, ios))
        await real(principal, nbytes, offset, ios=ios, **kw)

    monkeypatch.setattr(fs.kernel, "repay_limit", pace)
    await fs.append_direct(grant, memoryview(b"x"))
    # the kernel prices it at the block it spans from the offset given: the size
    assert priced[-1][1] == 8 * BS
    await fs.layout_get(grant, 0, 3 * BS)  # three sealed blocks, one run: read, written
    assert priced[-1] == (2 * 3 * BS, 0, 2)
    h = fs.open(ino, os.O_RDWR, CALLER)
    try:
        await fs.fallocate(h.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * BS - 100, 200)
        assert priced[-1] == (2 * BS, 0, 2)
        await fs.fallocate(h.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * BS, 2 * BS)
        assert priced[-1] == (0, 0, 1)  # whole blocks: nothing written (review of 5422135, F3)
        await fs.fallocate(h.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * BS - 10, 20)
        assert priced[-1] == (0, 0, 1)  # inside the hole just punched: nothing either
        await fs.fallocate(h.fh, 0, 20 * BS, BS)  # grows the file: its partial last block
        assert priced[-1] == (BS, 0, 1)
    finally:
        await fs.release(h.fh)
    await fs.close_direct(grant)


async def test_a_layouts_place_is_priced_at_the_copy_it_makes(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 5422135, F1-F2: a write layout copies at most LAYOUT_COW_RUNS sealed runs
    a call, each in pieces of COPY_BLOCKS (a read and a write each), but its place was
    priced at every sealed run of the range and two requests a run: runs past the cap
    were paid for and left sealed, and paid again by the next call (5.5x over ten calls
    with the cap at 4; a 16 s wait for a 2 s copy at 1 MB/s)."""
    import fs.layouts as layouts
    from fs.space import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    fs = vol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", bytes(fill(1, 12 * BS)))
    h = fs.open(ino, os.O_RDWR, CALLER)
    try:  # sealed runs [0, 3), [4, 7), [8, 12)
        for b in (3, 7):
            await fs.fallocate(h.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b * BS, BS)
    finally:
        await fs.release(h.fh)
    await fs.sync()
    grant = fs.grant_direct(fs.inode(ino), True, True, CALLER)
    monkeypatch.setattr(layouts, "LAYOUT_COW_RUNS", 2)
    monkeypatch.setattr(layouts, "COPY_BLOCKS", 2)
    priced: list[tuple[int, float]] = []
    real = fs.kernel.repay_limit

    async def pace(principal, nbytes, offset=None, *,  # type: ignore[no-untyped-def]
                   ios=1.0, **kw):
        priced.append((nbytes, ios))
        await real(principal, nbytes, offset, ios=ios, **kw)

    monkeypatch.setattr(fs.kernel, "repay_limit", pace)
    await fs.layout_get(grant, 0, 12 * BS)
    # the first two runs, 3 blocks each, read and written in pieces of 2 blocks
    assert priced == [(2 * 6 * BS, 2 * (2 + 2))]
    await fs.layout_get(grant, 0, 12 * BS)  # the third run, left by the first call
    assert priced[-1] == (2 * 4 * BS, 2 * 2)
    await fs.close_direct(grant)


# -- the shim server's side ---------------------------------------------------------------

BLOCKS = 64


class _Service:
    """A one-file metadata service whose BLOCKS blocks (at device block 8) are all
    committed, so every whole-block write is a relocation; it records them."""

    def __init__(self, kernel: Kernel, *, burst_error: BaseException | None = None,
                 fail_at: int | None = None) -> None:
        self.kernel = kernel
        self.bursts: list[list[int]] = []
        self.alone: list[int] = []
        self.burst_error = burst_error
        self.fail_at = fail_at

    async def open_path(self, path: str, flags: int, mode: int, creds: Any,
                        principal: Any) -> Grant:
        return self.kernel.grant(inode=2, generation=1,
                                 extents=ExtentMap([(0, 8, BLOCKS, WRITTEN)]),
                                 rights=Rights.RW, principal=ROOT_PRINCIPAL, charge=False)

    def size_of(self, grant: Grant) -> int:
        return BLOCKS * BS

    async def before_direct_change(self, grant: Grant) -> None:
        pass  # (no host kernel caching the file here)

    def stat_of(self, grant: Grant) -> dict[str, Any]:
        return {"size": BLOCKS * BS}

    async def write_relocating_many(self, grant: Grant,
                                    writes: list[tuple[int, memoryview]]) -> bool:
        self.bursts.append([o for o, _d in writes])
        if self.burst_error is not None:
            raise self.burst_error
        return True

    async def write_relocating(self, grant: Grant, offset: int, data: memoryview) -> int:
        self.alone.append(offset)
        if offset == self.fail_at:
            raise QuotaExceeded("injected: over the bank's limit")
        return len(data)

    async def layout_commit(self, grant: Grant, offset: int, length: int) -> int:
        grant.take_written(offset, offset + length)
        return BLOCKS * BS

    async def close(self, grant: Grant) -> None:
        pass


@pytest.fixture
def kernel(tmp_path: Path):
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=128 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=16 * BS)
    yield k
    k.close()


async def _pipelined(tmp_path: Path, service: _Service, offsets: list[int],
                     servers: list[ShimServer] | None = None) -> BaseException | None:
    """Pipeline 4 KiB writes at `offsets` through a real client while the event loop is
    held (so that the server reads them together, as from a client in a process of its
    own that keeps the socket full), then a read, served after them, and a close: the
    error a write got, which one of them reports (None: none)."""
    srv = ShimServer(service.kernel, PrincipalTable(None), service,  # type: ignore[arg-type]
                     tmp_path / "c.sock")
    if servers is not None:
        servers.append(srv)
    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)

        def burst() -> BaseException | None:
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                held.set()
                release.wait(5.0)

            holder = threading.Thread(
                target=lambda: trio.from_thread.run_sync(hold, trio_token=token))
            with Client(str(tmp_path), str(tmp_path / "c.sock")) as c:
                f = c.open("f")
                buf = bytearray(BS)
                assert f.readinto(buf, 0) == BS  # the buffer and the grant in place
                holder.start()
                held.wait()
                for off in offsets:
                    assert f.pwrite(fill(off // BS, BS), off) == BS  # pipelined
                release.set()
                holder.join()
                try:
                    f.readinto(buf, 0)
                    f.close()  # (reports a pipelined write's error, if the read did not)
                except Exception as exc:  # noqa: BLE001 - what the test looks at
                    return exc
                return None

        got = await trio.to_thread.run_sync(burst)
        nursery.cancel_scope.cancel()
    return got


ORDER = [k * 7 % BLOCKS * BS for k in range(24)]


async def test_pipelined_overwrites_go_as_bursts_each_answered(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelshim import connection as connection_mod
    monkeypatch.setattr(connection_mod, "HOG_SECONDS", 5.0)  # a starved test keeps its quantum
    service = _Service(kernel)
    assert await _pipelined(tmp_path, service, ORDER) is None
    served = [o for b in service.bursts for o in b]
    assert sorted(served + service.alone) == sorted(ORDER)  # each once
    assert service.bursts and all(2 <= len(b) <= server_mod.BURST_WRITES
                                  for b in service.bursts)
    assert len(served) == len(ORDER)  # all read at once: all in bursts
    # in order: bursts and lone writes interleave as the requests came
    order = {o: i for i, o in enumerate(ORDER)}
    for b in service.bursts:
        assert [order[o] for o in b] == list(range(order[b[0]], order[b[0]] + len(b)))


async def test_a_burst_counts_each_request_in_the_principal_statistics(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of direct6, B2: the principal's service and wait histograms
    (`principal_stats`) count every request, also those served in a burst (a burst of 8
    recorded one sample, eight requests' time, so a principal's request count fell and
    its percentiles rose with bursts)."""
    from kernelshim import connection as connection_mod
    monkeypatch.setattr(connection_mod, "HOG_SECONDS", 5.0)
    counts = []
    for most in (server_mod.BURST_WRITES, 1):  # bursts, then none (one by one)
        monkeypatch.setattr(server_mod, "BURST_WRITES", most)
        service = _Service(kernel)
        servers: list[ShimServer] = []
        sock = tmp_path / f"run-{most}"
        sock.mkdir()
        assert await _pipelined(sock, service, ORDER, servers) is None
        assert bool(service.bursts) == (most > 1)
        shares = servers[0].turns.shares.values()
        counts.append((sum(sh.service.n for sh in shares), sum(sh.waited.n for sh in shares)))
    assert counts[0] == counts[1]


async def test_no_burst_of_large_writes_after_a_hang_up(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of direct6, B3: one by one, a pipelined DATA request larger than
    HANGUP_LOOK_BYTES looks for a hang-up before it is served (review of direct4, H1),
    so a client that pipelined 32 KiB writes and hung up has at most its first one
    served; a burst took up to BURST_WRITES of them without a look. A burst's writes
    are at most HANGUP_LOOK_BYTES now (those look once a step one by one too)."""
    from kernelshim import connection as connection_mod
    monkeypatch.setattr(connection_mod, "HOG_SECONDS", 5.0)
    service = _Service(kernel)
    srv = ShimServer(kernel, PrincipalTable(None), service,  # type: ignore[arg-type]
                     tmp_path / "c.sock")
    token = trio.lowlevel.current_trio_token()
    n = 32 << 10
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)

        def pipeline_and_hang_up() -> None:
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                held.set()
                release.wait(5.0)

            holder = threading.Thread(
                target=lambda: trio.from_thread.run_sync(hold, trio_token=token))
            c = Client(str(tmp_path), str(tmp_path / "c.sock"))
            f = c.open("f")
            buf = bytearray(BS)
            assert f.readinto(buf, 0) == BS
            holder.start()
            held.wait()
            for k in range(6):
                assert f.pwrite(fill(k, n), k * n) == n  # pipelined
            c.sock.shutdown(socket.SHUT_RDWR)  # hung up, replies unread
            release.set()
            holder.join()
            c.close()

        await trio.to_thread.run_sync(pipeline_and_hang_up)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    served = [o for b in service.bursts for o in b] + service.alone
    assert len(served) <= 1, (service.bursts, service.alone)


async def test_a_failed_burst_is_served_one_by_one_with_each_own_error(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The burst fails as a whole (here EDQUOT): its requests are then served one by
    one, in order, and only the one that fails alone gets an error (the client reports
    it with its next call, as for any pipelined write)."""
    from kernelshim import connection as connection_mod
    monkeypatch.setattr(connection_mod, "HOG_SECONDS", 5.0)
    service = _Service(kernel, burst_error=QuotaExceeded("the whole burst"),
                       fail_at=ORDER[5])
    err = await _pipelined(tmp_path, service, ORDER)
    assert service.bursts  # bursts were tried
    assert service.alone == ORDER  # and every write then served alone, in order
    assert err is not None and getattr(err, "errno", None) == errno.EDQUOT
    assert "injected" in str(err)  # the lone write's own error, not the burst's


async def test_no_burst_without_the_quantum(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step without room for two writes in its quantum (principals competing: the
    turn) serves the writes one by one, as before."""
    from kernelshim import connection as connection_mod
    monkeypatch.setattr(connection_mod, "HOG_SECONDS", connection_mod.TURN_SECONDS)
    service = _Service(kernel)
    assert await _pipelined(tmp_path, service, ORDER) is None
    assert not service.bursts
    assert service.alone == ORDER


def test_a_burst_stops_at_the_first_request_that_cannot_join() -> None:
    """`_burst_of`: the same grant's whole-block writes on distinct committed blocks, at
    most BURST_WRITES and what the budget has room for."""
    class _Grant:  # only `extents` and `revoked` are looked at
        extents = ExtentMap([(0, 8, 32, WRITTEN), (40, 100, 8, WRITTEN)])  # hole at 32..39
        revoked = False

    g = _Grant()

    class _Conn:
        slots = {1: g}

    class _Kernel:
        block_size = BS

    srv = ShimServer.__new__(ShimServer)
    srv.kernel = _Kernel()  # type: ignore[assignment]

    def w(off: int, n: int = BS, slot: int = 1, op: int = WRITE) -> DataRequest:
        return DataRequest(request_id=off, op=op, slot=slot, offset=off, length=n, buf=0)

    def burst(msgs: list[Any], budget: float = 1.0) -> list[int] | None:
        b = srv._burst_of(_Conn(), msgs, 0, budget)  # type: ignore[arg-type]
        return None if b is None else [m.offset // BS for m in b]

    assert burst([w(0), w(BS), w(5 * BS, 2 * BS)]) == [0, 1, 5]
    assert burst([w(k * BS) for k in range(20)]) == list(range(server_mod.BURST_WRITES))
    assert burst([w(k * BS) for k in range(20)], 3.5 * server_mod.BURST_WRITE_SECONDS) \
        == [0, 1, 2]
    assert burst([w(0), w(BS), w(0)]) == [0, 1]  # the same block again: a later burst
    assert burst([w(0), w(BS), w(2 * BS, slot=2)]) == [0, 1]  # another grant
    assert burst([w(0), w(BS), w(2 * BS + 1)]) == [0, 1]  # not whole blocks
    assert burst([w(0), w(31 * BS, 2 * BS)]) is None  # into the hole
    assert burst([w(0), w(BS, server_mod.BURST_BYTES + BS)]) is None  # too large
    assert burst([w(0)]) is None  # one request is no burst


# -- mounted ------------------------------------------------------------------------------

def test_mounted_bursts_keep_every_write_and_survive_a_killed_daemon(
        volume: Path, mount_factory: Any) -> None:
    """Through a real mount: a direct client's pipelined 4 KiB overwrites of a
    committed file are relocated in bursts (the daemon counts them), the file reads
    exactly the model through the mount after the commit, and after an fsync and a
    SIGKILL of the daemon right after it, the remounted file still does."""
    m = mount_factory(volume)
    size = 1 << 20
    rng = random.Random(17)
    model = bytearray(rng.randbytes(size))
    (m.path / "b").write_bytes(model)
    with Client.connect(m.path) as c:
        c.call("shim_stats", reset=True)
        f = c.open("b", "r+")
        f.fsync()  # a commit: the file's blocks are sealed now
        for _ in range(3):  # a few rounds: each a commit, so each overwrites sealed blocks
            for _ in range(256):
                off = rng.randrange(0, size // BS) * BS
                data = rng.randbytes(BS)
                assert f.pwrite(data, off) == BS
                model[off:off + BS] = data
            f.commit()
            f.fsync()
            loop = c.call("shim_stats")["loop"]
            if loop["burst_writes"]:
                break
        assert loop["bursts"] > 0 and loop["burst_writes"] >= 2 * loop["bursts"], loop
        assert (m.path / "b").read_bytes() == model
        m.kill()
    m.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if int(json.loads((volume / "mount.json").read_text())["pid"]) == m.proc.pid:
                break
        except (OSError, ValueError):
            pass
        assert m.daemon_alive and time.monotonic() < deadline
        time.sleep(0.02)
    assert (m.path / "b").read_bytes() == model
