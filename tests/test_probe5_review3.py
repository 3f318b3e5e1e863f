"""Review of branch probe5fix (the items the fifth hostile-tenant probe left open:
docs/RELIABILITY.md, "The items the fifth probe left, fixed", its review table). Each
test fails on the branch before the review's fix of it.

All in process on trio's autojump clock, except where said.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kernelshim import FRESH, ExtentMap, Kernel, Rights
from probe5_util import BS, P, make_kernel, node, tree


@pytest.mark.trio
async def test_v1_partial_writes_into_anothers_dirty_frames_keep_the_dirty_bound(
        tmp_path: Path, autojump_clock) -> None:
    """P(1), limited to 8 KiB/s (a dirty bound of 4 frames), writes 16 bytes into each
    of 16 blocks of a shared file that the unlimited P(2) has dirtied. Each partial
    write of a resident FRESH block goes straight into its frame
    (`write_within_nowait`) and makes P(1) the frame's dirtier: P(1)'s dirty count
    must stay within its bound all the same (branch: 16 frames, 4 times the bound, all
    expedited at the next commit and repaid as a debt of 8 s)."""
    kernel = make_kernel(tmp_path)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=8192), node(2)))
        emap = ExtentMap([(0, 100, 16, FRESH)])
        g1 = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.RW,
                          principal=P(1))
        g2 = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.RW,
                          principal=P(2))
        for i in range(16):
            await kernel.write(g2, i * BS, bytes([i + 1]) * BS)
        pager = kernel.pager
        assert pager.statistics().per_principal[P(2)].dirty == 16
        most = 0
        for i in range(16):
            await kernel.write(g1, i * BS + 100, b"p" * 16)
            most = max(most, pager.statistics().per_principal[P(1)].dirty)
        assert most <= 4, most
        for i in range(16):  # the data is whole: P(2)'s block with P(1)'s 16 bytes in it
            got = bytes(await kernel.read(g2, i * BS, BS))
            assert got == bytes([i + 1]) * 100 + b"p" * 16 + bytes([i + 1]) * (BS - 116), i
    finally:
        kernel.close()


@pytest.mark.trio
async def test_v2_a_limited_tenants_write_behind_is_inside_its_dirty_bound(
        tmp_path: Path, autojump_clock) -> None:
    """P(1), limited to 64 KiB/s (a dirty bound of 2 s: 32 blocks), streams 8 writes of
    256 KiB (each bypasses the pool: BYPASS_BLOCKS). Written behind, they were all
    acknowledged at once (WRITE_BEHIND_BYTES is 16 MiB a principal), and the next
    commit expedited the 2 MiB past the limit: a debt of 32 s, where L2 promises a few
    seconds. Write-behind counts against the dirty bound: past it the writer writes
    through at its limit (about 30 s for the 2 MiB), and what is on its way never
    exceeds the bound."""
    kernel = make_kernel(tmp_path)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=64 << 10)))
        g1 = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 256, 512, FRESH)]),
                          rights=Rights.RW, principal=P(1))
        pager = kernel.pager
        async with trio.open_nursery() as n:
            await n.start(pager.run)
            t0 = trio.current_time()
            most = 0
            for i in range(8):
                await kernel.write(g1, i * (256 << 10), bytes([i + 1]) * (256 << 10))
                behind = getattr(pager, "_behind_blocks", {}).get(1, 0)
                if not hasattr(pager, "_behind_blocks"):  # (the branch: bytes held)
                    behind = pager._behind.get(1, 0) // BS
                most = max(most, behind + pager.statistics().per_principal[P(1)].dirty)
            took = trio.current_time() - t0
            assert most <= 32 and took > 20, (most, took)
            async with kernel.barrier():
                pass
            for i in range(8):
                got = bytes(await kernel.read(g1, i * (256 << 10), 256 << 10))
                assert got == bytes([i + 1]) * (256 << 10), i
            n.cancel_scope.cancel()
    finally:
        kernel.close()


@pytest.mark.trio
async def test_v3_a_limited_tenants_discardable_writes_do_not_rescan_the_pool(
        tmp_path: Path, autojump_clock, monkeypatch) -> None:
    """P(1), limited to 4 KiB/s (a dirty bound of 2 frames), writes 1 MiB into a
    discardable file under `hinted`. Its discardable frames are never written back by
    the pager (R7), nor expedited by a commit, so the bound has nothing to write: on
    the branch every block past the bound called `_throttle` (several whole-pool numpy
    passes) which returned at once, without a checkpoint — ~40 ms of the event loop
    per 1 MiB write with a 64 MiB pool (`/tmp` measurement in the review), held from
    every other tenant. A discardable block is not held to the L2 bound (its dirty
    share still applies)."""
    kernel = make_kernel(tmp_path, frames=1024)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=4096)))
        kernel.set_file_hints(7, discardable=True)
        g1 = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 256, 512, FRESH)]),
                          rights=Rights.RW, principal=P(1))
        pager = kernel.pager
        calls = 0
        real = pager._throttle

        async def counting(p: int) -> None:
            nonlocal calls
            calls += 1
            await real(p)

        monkeypatch.setattr(pager, "_throttle", counting)
        await kernel.write(g1, 0, b"d" * (1 << 20))
        assert pager.statistics().per_principal[P(1)].dirty == 256
        assert calls <= 2, calls
        assert bytes(await kernel.read(g1, (1 << 20) - BS, BS)) == b"d" * BS
    finally:
        kernel.close()


@pytest.mark.trio
async def test_v5_a_limited_tenants_discardable_dirty_frames_leave_its_bound_alone(
        tmp_path: Path, autojump_clock) -> None:
    """P(1), limited to 8 KiB/s (a dirty bound of 4 frames), has 4 dirty frames of a
    discardable file under `hinted` — frames no commit expedites — then writes 4
    blocks of an ordinary file. The bound counted the discardable frames, so each of
    those blocks past the first was written back on its own, at the limit, before the
    next (branch: 3 blocks written, in 1 s); it counts only what a commit would
    expedite, so the 4 blocks stay dirty at once. The bound still holds for them: the
    fifth block writes the first 4 back (one run) before it is dirtied."""
    kernel = make_kernel(tmp_path)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=8192)))
        kernel.set_file_hints(7, discardable=True)
        gd = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 100, 16, FRESH)]),
                          rights=Rights.RW, principal=P(1))
        g = kernel.grant(inode=8, generation=1, extents=ExtentMap([(0, 200, 16, FRESH)]),
                         rights=Rights.RW, principal=P(1))
        pager = kernel.pager

        def written() -> int:
            st = {s.principal: s for s in kernel.device.statistics().per_principal}
            return st[P(1)].bytes_written if P(1) in st else 0

        for i in range(4):
            await kernel.write(gd, i * BS, b"d" * BS)
        assert pager.statistics().per_principal[P(1)].dirty == 4
        t0 = trio.current_time()
        for i in range(4):
            await kernel.write(g, i * BS, bytes([i + 1]) * BS)
        took = trio.current_time() - t0
        assert (written(), took) == (0, 0.0)
        assert pager.statistics().per_principal[P(1)].dirty == 8
        for i in range(4, 6):
            await kernel.write(g, i * BS, bytes([i + 1]) * BS)
        assert written() == 4 * BS  # (the fifth block's throttle: one run of 4)
        assert pager.statistics().per_principal[P(1)].dirty == 4 + 2
        for i in range(6):
            assert bytes(await kernel.read(g, i * BS, BS)) == bytes([i + 1]) * BS
        assert bytes(await kernel.read(gd, 3 * BS, BS)) == b"d" * BS
    finally:
        kernel.close()


async def test_v4_a_failure_during_a_commits_flush_fails_that_commit(
        tmp_path: Path, monkeypatch) -> None:
    """The volume fails (`FileSystem.fail`: here a setxattr whose transaction SQLite
    lost to a full host, or the mount flags) while a commit's barrier flushes the
    device: `fail` rolls the open transaction back — the fsync'd file's new inode,
    name and extents with it — and sets `Metadata.failed` ("nothing is committed after
    a failure"). The commit then went on past its barrier: it committed what was left,
    counted itself durable and the fsync returned 0 for a file that no durable state
    holds (crash rule 1). It must fail (EIO) and commit nothing."""
    import os

    from fs import volume
    from fs.errors import WriteFailed
    from fs.filesystem import FileSystem, ROOT_INODE
    from fs.metadata import Metadata
    from test_filesystem import CALLER, Volume

    v = Volume(tmp_path / "vol", size=1024 * BS)
    v.kernel = Kernel.open(v.path, cache_bytes=64 * BS)
    v.md = Metadata(v.path / volume.DB)
    v.fs = fs = await FileSystem.load(v.md, v.kernel)
    try:
        h, _ino = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CALLER)
        await fs.write(h.fh, 0, b"x" * BS)
        real = v.kernel.device.flush

        async def failing_meanwhile(**kw) -> None:
            await real(**kw)
            fs.fail("a failure while the commit's barrier flushed (test)")

        monkeypatch.setattr(v.kernel.device, "flush", failing_meanwhile)
        seq = fs._durable_seq
        with pytest.raises(WriteFailed):
            await fs.fsync(h.fh, False)
        assert fs._durable_seq == seq
        monkeypatch.setattr(v.kernel.device, "flush", real)
    finally:
        v.md.close()
        v.kernel.close()
        v.fs = None


@pytest.mark.trio
async def test_v6_an_aging_task_writes_only_its_own_dirtiers_frames(
        tmp_path: Path, autojump_clock) -> None:
    """P(1), limited to 1 KiB/s (4 s a block), and P(2), limited to 8 KiB/s, dirty 8 scattered
    blocks each at t=0 (their dirty bounds raised out of the way). At t=5 each one's
    aging task starts (L3). At t=5.2, while P(2)'s task waits for its second request,
    P(1) writes into one of P(2)'s later dirty frames and so becomes its dirtier. On
    the branch P(2)'s task wrote that frame when it came to it — on P(1)'s bank,
    behind P(1)'s own aged frames (up to 4 s a block) — and P(2)'s remaining frames waited there
    too: L3's hold again. An aging task writes only frames its dirtier still dirtied;
    the taken-over frame goes with P(1)'s aging."""
    kernel = make_kernel(tmp_path)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=1024), node(2, io_limit_bps=8192)))
        kernel.pager.dirty_limit_seconds = 1000.0  # (the L2 bound out of the way)
        g1 = kernel.grant(inode=7, generation=1,
                          extents=ExtentMap([(i, 10 + 2 * i, 1, FRESH) for i in range(8)]),
                          rights=Rights.RW, principal=P(1))
        g2 = kernel.grant(inode=8, generation=1,
                          extents=ExtentMap([(i, 100 + 2 * i, 1, FRESH) for i in range(8)]),
                          rights=Rights.RW, principal=P(2))
        # P(1)'s view of P(2)'s file (a file both may write)
        g12 = kernel.grant(inode=8, generation=1, extents=g2.extents, rights=Rights.RW,
                           principal=P(1))
        pager = kernel.pager
        async with trio.open_nursery() as n:
            await n.start(pager.run)
            t0 = trio.current_time()
            for i in range(8):
                await kernel.write(g1, i * BS, bytes([i + 1]) * BS)
                await kernel.write(g2, i * BS, bytes([i + 11]) * BS)
            await trio.sleep_until(t0 + 5.2)
            assert 0 < pager.statistics().per_principal[P(2)].dirty < 8
            await kernel.write(g12, 3 * BS, b"t" * BS)  # (P(2)'s frame, not yet written)
            await trio.sleep_until(t0 + 10.0)
            # P(2)'s 7 frames went at its own limit (2 a second from t=5)
            assert pager.statistics().per_principal[P(2)].dirty == 0
            await trio.sleep_until(t0 + 45.0)
            assert pager.statistics().per_principal[P(1)].dirty == 0
            assert bytes(await kernel.read(g2, 3 * BS, BS)) == b"t" * BS
            n.cancel_scope.cancel()
    finally:
        kernel.close()
