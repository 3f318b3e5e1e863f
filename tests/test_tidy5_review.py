"""Review of branch tidy5, R2 (docs/RELIABILITY.md): a limited tenant that clears
the discardable hint over the frames it dirtied while they were discardable. The
clear converts them at once (ordinary dirty data), but those over the tenant's dirty
bound are debt-paced: no commit expedites them past its limit; they are written at
its own limit (its background write-back, its next requests, an fsync of the file),
and nobody else waits for that (docs/dev/invariants.md, "Debt-paced frames").

In process on trio's autojump clock on a device that keeps limits (probe5_util), and
through a real mount (the `user.sluice.discardable` xattr).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
import trio

from blockdev import BlockNo
from blockdev.types import ROOT_PRINCIPAL
from conftest import sluice
from kernelshim import FRESH, ExtentMap, Kernel, Rights
from probe5_util import BS, MiB, P, make_kernel, node, tree

#: 4 blocks/s: a dirty bound (DIRTY_LIMIT_SECONDS, 2 s) of 8 frames
LIMIT = 4 * BS
BOUND = 8


def _inline_host_flushes(kernel: Kernel) -> None:
    """The host's fdatasync runs in a thread, and while the loop waits for it the
    autojump clock jumps to the next timer — here P(1)'s limit tag, up to a second
    away — so a commit would seem to wait for P(1). Run it inline: the mock clock
    then measures the model's time only."""
    for backing in (kernel.device.data, kernel.device.checksums.backing):
        sync = backing.flush_sync

        async def flush(sync=sync) -> None:
            sync()
        backing.flush = flush  # type: ignore[method-assign]


def _setup(tmp_path: Path) -> tuple[Kernel, object, object]:
    """P(1) at LIMIT, P(2) unlimited; P(1) has dirtied 40 blocks of the discardable
    file 7 (held by its dirty share, 64 of the 128 frames: not by its bound)."""
    kernel = make_kernel(tmp_path, blocks=256, frames=128)
    _inline_host_flushes(kernel)
    kernel.configure_banks(tree(node(1, io_limit_bps=LIMIT), node(2)))
    g1 = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 10, 40, FRESH)]),
                      rights=Rights.RW, principal=P(1))
    g2 = kernel.grant(inode=8, generation=1, extents=ExtentMap([(0, 100, 16, FRESH)]),
                      rights=Rights.RW, principal=P(2))
    return kernel, g1, g2


async def _dirty_40(kernel: Kernel, g1) -> None:
    kernel.set_file_hints(7, discardable=True)
    for i in range(40):
        await kernel.write(g1, i * BS, bytes([i + 1]) * BS)
    assert kernel.pager.statistics().per_principal[P(1)].dirty == 40


def _expeditable(kernel: Kernel) -> int:
    a = kernel.pager._acct_of(1)
    return a.dirty - a.disc_dirty - getattr(a, "paced", 0)  # (none before the fix)


def _spy_expedited(kernel: Kernel, monkeypatch) -> list[tuple[int, int]]:
    """(first device block, blocks) of every device write a barrier expedited past
    its principal's limit (flushes are not writes: not listed)."""
    import blockdev.scheduler as bsched
    last: dict[object, tuple[int, int]] = {}
    out: list[tuple[int, int]] = []
    write = kernel.device.write

    async def spy_write(block, data, **kw):
        last[trio.lowlevel.current_task()] = (int(block), len(data) // BS)
        return await write(block, data, **kw)
    kernel.device.write = spy_write  # type: ignore[method-assign]
    expedited_write = bsched.expedited_write

    def spy(root, *, barriers=True):
        req = expedited_write(root, barriers=barriers)
        if req is not None and req.write:
            # (no task yet: chosen as it arrived, in the task that made it)
            out.append(last[req.task or trio.lowlevel.current_task()])
        return req
    monkeypatch.setattr(bsched, "expedited_write", spy)
    return out


def _of_file_7(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(b, n) for b, n in runs if b < 50 and b + n > 10]


def _p1(kernel: Kernel):
    return {s.principal: s for s in kernel.device.statistics().per_principal}[P(1)]


@pytest.mark.trio
async def test_a_commit_after_the_clear_expedites_only_the_bound(
        tmp_path: Path, autojump_clock, monkeypatch) -> None:
    """The clear returns at once and leaves P(1) with no more frames a commit may
    expedite than its bound (before: 40, 5x the bound, a debt of 10 s). P(2)'s
    writes and commits do not wait for P(1)'s debt, before or during P(1)'s fsync;
    the commit writes the 8 within the bound (expedited: P(1) owes 2 s) and still
    lists file 7 as unflushed. The fsync of file 7 writes the other 32 at P(1)'s
    limit, never expedited — not by the commits P(2) makes while it waits either:
    the run goes when P(1)'s limit tag allows (after the 2 s), and what it costs
    (8 s) P(1) owes after, as for any request at its limit: 10 s of its limit for
    40 frames, all of it. Then the data is on the device and the next commit no
    longer lists the file."""
    kernel, g1, g2 = _setup(tmp_path)
    sched = kernel.device.scheduler
    expedited = _spy_expedited(kernel, monkeypatch)
    try:
        await _dirty_40(kernel, g1)
        t0 = trio.current_time()
        kernel.set_file_hints(7, discardable=False)
        assert trio.current_time() == t0
        assert _expeditable(kernel) <= BOUND, _expeditable(kernel)
        for i in range(4):
            await kernel.write(g2, i * BS, b"b" * BS)
        t1 = trio.current_time()
        async with kernel.barrier(principal=P(2), file=8, durable=True):
            pass
        assert trio.current_time() - t1 < 0.5
        assert sched.limit_debt(P(1)) <= BOUND / 4 + 0.1, sched.limit_debt(P(1))
        assert 7 in kernel.unflushed_files  # (a crash now empties it: rule 4, R7)
        assert kernel.pager._acct_of(1).dirty == 32
        # (one run, the 8 within the bound: its limit tag let it go at once, and it
        # advanced the tag by 2 s)
        assert (_p1(kernel).writes, _p1(kernel).expedited) == (1, 0)

        async def fsync_7() -> None:
            t = trio.current_time()
            assert await kernel.writeback_file(7, principal=P(1))
            async with kernel.barrier(principal=P(1), file=7, durable=True):
                pass
            took.append(trio.current_time() - t)

        took: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync_7)
            for k in range(3):  # P(2) meanwhile: writes and commits at once
                await trio.sleep(0.5)
                t2 = trio.current_time()
                await kernel.write(g2, (4 + k) * BS, b"c" * BS)
                async with kernel.barrier(principal=P(2), file=8, durable=True):
                    pass
                assert trio.current_time() - t2 < 0.1, k
                # (P(1)'s paced run still waits for its limit: not expedited)
                assert kernel.pager._acct_of(1).paced == 32, k
        # (two: the device flushes of P(1)'s own fsync, past its limit as every
        # fsync's flush is — not writes: its barrier's, since file 7 leaves the
        # unflushed list and its paced frames were written outside any barrier
        # (review of pager7, P1), and the file's own)
        assert (_p1(kernel).writes, _p1(kernel).expedited) == (2, 2)
        assert expedited == []
        assert 1.9 <= took[0] <= 2.5, took
        assert 9.5 <= took[0] + sched.limit_debt(P(1)) <= 10.5, (
            took, sched.limit_debt(P(1)))
        assert kernel.pager._acct_of(1).dirty == 0
        assert _p1(kernel).bytes_written == 40 * BS
        for i in range(40):
            got = await kernel.device.read(BlockNo(10 + i), 1, principal=ROOT_PRINCIPAL)
            assert bytes(got) == bytes([i + 1]) * BS, i
        async with kernel.barrier(durable=True):
            pass
        assert 7 not in kernel.unflushed_files
        assert not kernel.may_be_unflushed(7)
    finally:
        kernel.close()


@pytest.mark.trio
async def test_the_tenants_next_writes_pay_the_debt_at_its_limit(
        tmp_path: Path, autojump_clock, monkeypatch) -> None:
    """Over its bound by the paced frames, P(1)'s next writes of another file wait
    as for any over-bound dirty data: each request writes back its own size of its
    oldest paced frames at its limit (`repay_limit` -> `Pager.pay_paced`), never the
    whole debt in one request; its own background write-back (aging) writes the
    rest at its limit too. P(2) meanwhile writes at once."""
    kernel, g1, g2 = _setup(tmp_path)
    expedited = _spy_expedited(kernel, monkeypatch)
    g3 = kernel.grant(inode=9, generation=1, extents=ExtentMap([(0, 150, 16, FRESH)]),
                      rights=Rights.RW, principal=P(1))
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        a = kernel.pager._acct_of(1)
        assert a.paced == 32
        t0 = trio.current_time()
        for i in range(8):
            t = trio.current_time()
            await kernel.repay_limit(P(1), BS)
            await kernel.write(g3, i * BS, b"n" * BS)
            # (never the debt: its own frame's cost, 0.25 s, after its own requests
            # ahead — at most the bound's 2 s, which the in-write throttle wrote)
            assert trio.current_time() - t < 2.5, i
            assert _expeditable(kernel) <= BOUND
        assert a.paced == 32 - 8
        # written meanwhile, at P(1)'s limit: the 8 paced frames and the 8 frames
        # within the bound that the first new block found there (16 frames: 4 s)
        assert _p1(kernel).bytes_written == 16 * BS
        assert 3.5 <= trio.current_time() - t0 <= 4.6, trio.current_time() - t0
        t = trio.current_time()
        await kernel.repay_limit(P(2), BS)
        await kernel.write(g2, 0, b"b" * BS)
        assert trio.current_time() - t < 0.1
        # the background write-back: aged, at P(1)'s limit, never expedited
        async with trio.open_nursery() as nursery:
            await nursery.start(kernel.pager.run)
            while a.paced:
                t = trio.current_time()
                async with kernel.barrier(principal=P(2), file=8, durable=True):
                    pass
                assert trio.current_time() - t < 0.5
                await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
        # P(1)'s write-backs of file 7 went at its limit, none past it (the commits
        # may expedite its frames of file 9: within its bound)
        assert _of_file_7(expedited) == [], expedited
    finally:
        kernel.close()


# -- through a real mount: the user.sluice.discardable xattr ---------------------------

#: as the tenant: write argv[2] MiB to a new file argv[1] marked discardable (64 KiB
#: writes: they stay in the pool), remove the mark and print how long that took; then,
#: on a line on stdin, fsync the file and print how long that took
CLEARER = textwrap.dedent("""
    import os, sys, time
    path, mib = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.setxattr(path, "user.sluice.discardable", b"1")
    buf = bytes(range(256)) * 256
    for i in range(mib * 16):
        os.pwrite(fd, buf, i * 65536)
    t = time.monotonic()
    os.removexattr(path, "user.sluice.discardable")
    print("CLEARED", time.monotonic() - t, flush=True)
    sys.stdin.readline()
    t = time.monotonic()
    os.fsync(fd)
    print("FSYNCED", time.monotonic() - t, flush=True)
""")


@pytest.mark.mounted
def test_removing_the_xattr_leaves_the_debt_to_the_tenant(volume: Path,
                                                          tmp_path: Path) -> None:
    """Through a mount with write-back: a tenant limited to 1 MB/s (bound: 2 s, 2 MB)
    writes 8 MiB to a file marked `user.sluice.discardable` and removes the mark. The
    removexattr returns at once; root's write + fsync right after does not wait for
    the tenant, and its commit writes back only what is within the tenant's bound
    (before the fix: all 8 MiB, expedited past its limit); the tenant's own fsync
    then writes the rest at its limit (seconds), and the file reads back whole."""
    from shim_util import UID, public_mount, user_popen

    with public_mount(volume, tmp_path / "daemon.log", "--writeback", "--cache-size",
                      "64M", prefix="sluice-t5-") as mnt:
        (mnt / "u").mkdir()
        os.chown(mnt / "u", UID, UID)
        sluice("principal", "add", str(mnt), f"uid-{UID}", "--owner", str(UID),
               "--io-limit", "1MB/s")

        def written() -> int:
            io = json.loads(sluice("stats", str(mnt), "--json").stdout)["io"]
            return io.get(f"uid-{UID}", {}).get("write_bytes", 0)

        path = mnt / "u" / "cache"
        before = written()  # (a discardable file's writes make no device write)
        p = user_popen(f"import sys; sys.argv[1:] = {[str(path), '8']!r}\n" + CLEARER,
                       UID)
        assert p.stdin is not None and p.stdout is not None
        try:
            line = p.stdout.readline().split()
            assert line[:1] == ["CLEARED"], line
            assert float(line[1]) < 0.5, line
            fd = os.open(mnt / "root-file", os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                os.pwrite(fd, b"r" * 4096, 0)
                t = time.monotonic()
                os.fsync(fd)
                took = time.monotonic() - t
            finally:
                os.close(fd)
            after = written()
            assert took < 2.0, took
            # within its bound (2 MB), and what its own background write-back made
            # at 1 MB/s meanwhile (none for the first 2 s: the bound's write-back
            # advanced its limit tags that far); before the fix the first commit
            # after the clear (the timer's, or this fsync's) wrote all 8 MiB
            assert after - before < 5 * MiB, (before, after)
            out, err = p.communicate("\n", timeout=120)
            line = out.split()
            assert p.returncode == 0 and line[:1] == ["FSYNCED"], (out, err)
            # its own fsync: the rest, at its own limit
            assert 1.0 < float(line[1]) < 30.0, line
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert written() >= 8 * MiB - 64 * 1024
        data = (mnt / "u" / "cache").read_bytes()
        assert data == bytes(range(256)) * 256 * 16 * 8
