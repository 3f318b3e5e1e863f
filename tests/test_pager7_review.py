"""Review of branch pager7 (docs/RELIABILITY.md, "Review of pager7"): the
debt-paced frames of tidy5's R2 — frames a limited tenant dirtied while they were
discardable, over its dirty bound when it cleared the hint, written at its own limit
outside every barrier (docs/dev/invariants.md, "Debt-paced frames").

In process on trio's autojump clock on a device that keeps limits (probe5_util), as
tests/test_tidy5_review.py, whose set-up these tests share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kernelshim import FRESH, ExtentMap, Rights
from probe5_util import BS, P
from test_tidy5_review import _dirty_40, _setup


@pytest.mark.trio
async def test_paced_frames_written_between_barriers_are_flushed_before_the_file_leaves_the_list(
        tmp_path: Path, autojump_clock) -> None:
    """P1 (critical): a commit lists file 7 as unflushed while its debt-paced frames
    are dirty; P(1)'s background write-back then writes them, outside any barrier.
    A device write the kernel did not note: the next barrier, with nothing written
    through the kernel since, made no device flush, yet took the file off the
    unflushed list (so an fsync of it became an empty one, and a commit saved a list
    without it) while its data sat in the device's volatile cache — a power loss
    then left the file neither whole nor empty (crash rule 4)."""
    kernel, g1, _g2 = _setup(tmp_path)
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        assert kernel.pager._acct_of(1).paced == 32
        async with kernel.barrier(durable=True):
            pass
        assert 7 in kernel.unflushed_files
        assert kernel.device.unflushed_bytes == 0
        # P(1)'s aging writes the paced frames at its limit, outside any barrier
        async with trio.open_nursery() as nursery:
            await nursery.start(kernel.pager.run)
            while kernel.pager._acct_of(1).paced:
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert kernel.pager._acct_of(1).dirty == 0
        assert kernel.device.unflushed_bytes > 0  # (on their way to the platter)
        assert kernel.may_be_unflushed(7)
        async with kernel.barrier(durable=True):
            pass
        # either still listed (a crash empties it) or flushed: never neither
        assert 7 in kernel.unflushed_files or kernel.device.unflushed_bytes == 0, (
            kernel.unflushed_files, kernel.device.unflushed_bytes)
        if kernel.device.unflushed_bytes:
            assert kernel.may_be_unflushed(7)
        async with kernel.barrier(durable=True):
            pass
        assert kernel.device.unflushed_bytes == 0 or 7 in kernel.unflushed_files
    finally:
        kernel.close()


@pytest.mark.trio
async def test_a_commit_does_not_wait_for_a_writer_held_behind_its_paced_write_back(
        tmp_path: Path, autojump_clock) -> None:
    """P2 (medium): a write at its writer's dirty share whose only dirty frames are
    discardable or debt-paced waited in the in-write throttle for its frames under
    write-back — debt-paced ones among them, queued at the writer's limit and never
    expedited. A barrier waits for every write in flight, so every tenant's commit
    waited for the limited tenant's paced run (here 2 s; up to its dirty share)."""
    from probe5_util import make_kernel, node, tree
    from test_tidy5_review import LIMIT, _inline_host_flushes
    kernel = make_kernel(tmp_path, blocks=256, frames=128)
    _inline_host_flushes(kernel)
    kernel.configure_banks(tree(node(1, io_limit_bps=LIMIT), node(2)))
    g1 = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 10, 56, FRESH)]),
                      rights=Rights.RW, principal=P(1))
    g2 = kernel.grant(inode=8, generation=1, extents=ExtentMap([(0, 100, 16, FRESH)]),
                      rights=Rights.RW, principal=P(2))
    g3 = kernel.grant(inode=9, generation=1, extents=ExtentMap([(0, 150, 20, FRESH)]),
                      rights=Rights.RW, principal=P(1))
    share = kernel.pager._dirty_limit(1)
    assert share == 64
    try:
        kernel.set_file_hints(7, discardable=True)
        kernel.set_file_hints(9, discardable=True)
        for i in range(56):
            await kernel.write(g1, i * BS, bytes([i + 1]) * BS)
        kernel.set_file_hints(7, discardable=False)
        a = kernel.pager._acct_of(1)
        assert a.paced == 48
        async with kernel.barrier(principal=P(2), file=8, durable=True):
            pass  # (the 8 within the bound: expedited, P(1) owes 2 s)
        assert a.dirty == 48
        took: list[float] = []
        async with trio.open_nursery() as nursery:
            # P(1)'s fsync of file 7 (or its aging): the paced runs, at its limit
            nursery.start_soon(kernel.pager.write_back_paced, 7)
            await trio.sleep(0.1)

            async def p1_writes() -> None:
                for i in range(17):  # discardable: past its dirty share, no write-back
                    await kernel.write(g3, i * BS, b"d" * BS)
            nursery.start_soon(p1_writes)
            await trio.sleep(0.1)
            t = trio.current_time()
            await kernel.write(g2, 0, b"b" * BS)
            async with kernel.barrier(principal=P(2), file=8, durable=True):
                pass
            took.append(trio.current_time() - t)
        assert took[0] < 0.5, took
    finally:
        kernel.close()


@pytest.mark.trio
async def test_a_hint_set_and_cleared_again_keeps_a_paced_run_under_way_paced(
        tmp_path: Path, autojump_clock) -> None:
    """P3 (medium): the discardable hint set again while debt-paced frames were
    under write-back (queued at their dirtier's limit, never expedited) took their
    paced flag, and cleared again at once left those within the bound ordinary:
    the next barrier's flush then waited for that run at the tenant's limit — any
    tenant's commit held by the tenant's pace, on a hostile tenant's say (two
    setxattr calls)."""
    kernel, g1, g2 = _setup(tmp_path)
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        async with kernel.barrier(principal=P(2), file=8, durable=True):
            pass  # (the 8 within the bound: expedited, P(1) owes 2 s)
        a = kernel.pager._acct_of(1)
        assert a.paced == 32
        took: list[float] = []
        async with trio.open_nursery() as nursery:
            # P(1)'s fsync of file 7 (or its aging): one paced run, at its limit
            nursery.start_soon(kernel.pager.write_back_paced, 7)
            await trio.sleep(0.1)
            assert a.dirty == 32  # (under write-back, waiting for P(1)'s limit tag)
            kernel.set_file_hints(7, discardable=True)
            kernel.set_file_hints(7, discardable=False)
            t = trio.current_time()
            await kernel.write(g2, 0, b"b" * BS)
            async with kernel.barrier(principal=P(2), file=8, durable=True):
                pass
            took.append(trio.current_time() - t)
            assert 7 in kernel.unflushed_files  # (still on its way: a crash empties it)
        assert took[0] < 0.5, took
        assert a.dirty == a.paced == 0
    finally:
        kernel.close()


@pytest.mark.trio
async def test_an_fsync_of_a_paced_file_ends_while_its_blocks_are_rewritten(
        tmp_path: Path, autojump_clock) -> None:
    """P4 (medium): the fsync's paced pass (`write_back_paced`) looped until the
    file had no paced frame, and a frame rewritten during its write-back stays
    paced: a writer rewriting one block of the file (a direct client, an mmap: no
    host lock keeps them out during an fsync) kept the fsync waiting for as long as
    it wrote, one write-back at the dirtier's limit after another."""
    kernel, g1, _g2 = _setup(tmp_path)
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        async with kernel.barrier(durable=True):
            pass
        assert kernel.pager._acct_of(1).paced == 32
        took: list[float] = []
        async with trio.open_nursery() as nursery:
            async def fsync_7() -> None:
                t = trio.current_time()
                await kernel.writeback_file(7, principal=P(1))
                took.append(trio.current_time() - t)

            async def rewrite() -> None:
                for k in range(600):  # 60 s of one block's rewrites, 10 a second
                    await kernel.write(g1, 39 * BS, bytes([k % 256]) * BS)
                    await trio.sleep(0.1)
            nursery.start_soon(rewrite)
            nursery.start_soon(fsync_7)
        # (the 32 frames at 4 blocks/s after the bound's 2 s: 10 s; the rewritten
        # block once more, at most)
        assert took and took[0] < 20, took
    finally:
        kernel.close()


@pytest.mark.trio
async def test_the_final_sync_writes_paced_frames_without_their_pace(
        tmp_path: Path, autojump_clock) -> None:
    """P5 (medium): an unmount's final sync (shielded from cancellation) wrote each
    file's debt-paced frames at their dirtier's limit: up to its dirty share at a
    small limit — here 8 s for 32 frames, minutes for a real pool — during which
    SIGTERM and the unmount waited. It writes them in its barrier now, expedited
    (`writeback_file(..., pace=False)`, which `FileSystem.sync(final=True)` uses)."""
    kernel, g1, _g2 = _setup(tmp_path)
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        async with kernel.barrier(durable=True):
            pass
        assert kernel.pager._acct_of(1).paced == 32
        t = trio.current_time()
        assert await kernel.writeback_file(7, pace=False)
        assert trio.current_time() - t < 0.5
        assert kernel.pager._acct_of(1).dirty == 0
    finally:
        kernel.close()


@pytest.mark.trio
async def test_the_final_sync_asks_for_no_pace(tmp_path: Path, monkeypatch) -> None:
    """P5's wiring: `FileSystem.sync(final=True)` writes each file a barrier leaves
    out with `pace=False` (a plain fsync keeps the pace: test_tidy5_review.py)."""
    from test_filesystem import Volume
    vol = Volume(tmp_path / "vol", size=256 * BS)
    await vol.open()
    try:
        fs = vol.fs
        assert fs is not None
        calls: list[tuple[int, dict]] = []

        async def writeback_file(ino, **kw):
            calls.append((ino, kw))
            return False
        monkeypatch.setattr(fs.kernel, "dirty_discardable_files", lambda: {42})
        monkeypatch.setattr(fs.kernel, "writeback_file", writeback_file)
        await fs.sync(final=True)
        assert calls == [(42, {"pace": False})]
    finally:
        await vol.close()


@pytest.mark.trio
async def test_paced_frames_left_to_an_fsyncs_barrier_are_expedited(
        tmp_path: Path, autojump_clock, monkeypatch) -> None:
    """P6 (medium): paced frames the fsync's paced pass leaves (rewritten during
    their write-back, or paced by a hint cleared meanwhile) are written inside the
    fsync's barrier, with every writer held — but their runs were made
    `never_expedited()` there too, so the barrier waited for them at the tenant's
    limit: here 32 frames, 8 s of every tenant's writes held."""
    kernel, g1, g2 = _setup(tmp_path)
    try:
        await _dirty_40(kernel, g1)
        kernel.set_file_hints(7, discardable=False)
        async with kernel.barrier(durable=True):
            pass
        assert kernel.pager._acct_of(1).paced == 32

        async def nothing(file: int) -> None:
            pass  # (as if every paced frame were rewritten during the paced pass)
        monkeypatch.setattr(kernel.pager, "write_back_paced", nothing)
        took: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: kernel.writeback_file(7, principal=P(1)))
            await trio.sleep(0.01)
            t = trio.current_time()
            await kernel.write(g2, 0, b"b" * BS)  # (held while the barrier runs)
            took.append(trio.current_time() - t)
        assert took[0] < 0.5, took
        assert kernel.pager._acct_of(1).dirty == 0
    finally:
        kernel.close()
