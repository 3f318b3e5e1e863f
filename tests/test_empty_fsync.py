"""Empty fsyncs (hostile-probe finding 14): an fsync of a file with nothing that is not
durable yet makes no device barrier and no durable commit; every change that an fsync
must make durable marks the inode (the metadata layer's change marks) or leaves data
the kernel knows is not flushed, and only a durable commit clears a mark.

- Component tests (a real volume, `FileSystem` called directly): the counters of
  barriers and durable commits around empty and non-empty fsyncs; which inodes each
  kind of change marks, through a non-durable (timer) commit; the three changes the
  backed-out ctime shortcut missed (fallocate inside the size, a clock step back, a
  relocating direct write); a failed durable commit keeps the marks; write-back mode
  (dirty discardable frames); the flush an fsync makes is charged to the asker.
- Mounted: the three review cases again, each followed by an fsync and a simulated
  power loss right after that fsync returned (the power-loss recorder of
  scripts/crashtest.py): the change is in the state that comes back.
"""

from __future__ import annotations

import ctypes
import io
import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from fs import dataio, space
from fs.errors import WriteFailed
from fs.filesystem import ROOT_INODE, FileSystem
from fs.inodes import Caller
from kernelshim import Kernel, PrincipalId
from test_filesystem import CALLER, Volume, fill, write_file

BS = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@pytest.fixture
async def evol(tmp_path: Path):
    v = Volume(tmp_path / "vol", size=512 * BS)
    await v.open()
    yield v
    await v.close()


@pytest.fixture
async def wbvol(tmp_path: Path):
    """A volume opened in write-back mode (a small pool of 64 frames)."""
    from fs.metadata import Metadata
    from fs import volume
    v = Volume(tmp_path / "vol", size=512 * BS)
    v.kernel = Kernel.open(v.path, cache_bytes=64 * BS, writeback=True)
    v.md = Metadata(v.path / volume.DB)
    v.fs = await FileSystem.load(v.md, v.kernel)
    yield v
    await v.close()


def counts(v: Volume) -> tuple[int, int]:
    """(barriers that flushed the device, durable commits) so far."""
    return v.kernel.barriers, v.md.durable_commits


async def test_fsync_of_an_unchanged_file_makes_no_barrier_and_no_durable_commit(
        evol: Volume) -> None:
    fs = evol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", fill(1, 3 * BS))
    h = fs.open(ino, os.O_RDWR, CALLER)
    before = counts(evol)
    await fs.fsync(h.fh, False)  # the file is new and written: the full path
    b1, d1 = counts(evol)
    assert b1 == before[0] + 1 and d1 == before[1] + 1
    # Nothing changed since: no barrier, no durable commit, however often.
    for _ in range(5):
        await fs.fsync(h.fh, False)
        await fs.fsync(h.fh, True)
    assert counts(evol) == (b1, d1)
    assert fs.empty_fsyncs == 10
    # The same for fsyncdir of an unchanged directory (and of the root the file's
    # name is in: the create was made durable by the file's fsync, as before).
    await fs.fsync_inode(ROOT_INODE, CALLER.principal)
    assert counts(evol) == (b1, d1)
    # Another file's change, not fsync'd: still no barrier or commit for this one.
    other = await write_file(fs, b"other", fill(2, BS))
    await fs.fsync(h.fh, False)
    assert counts(evol) == (b1, d1)
    assert fs.needs_sync(other) and fs.needs_sync(ROOT_INODE)
    # A change of this file: the full path again.
    await fs.write(h.fh, 10, b"changed")
    await fs.fsync(h.fh, False)
    assert counts(evol) == (b1 + 1, d1 + 1)
    assert not fs.needs_sync(ino) and not fs.needs_sync(other)  # commits are global
    await fs.release(h.fh)


async def test_fsyncs_waiting_for_a_commit_are_served_by_it(evol: Volume) -> None:
    """Probe 20, F1 (in part): fsyncs that queued behind a durable commit each made a
    commit of their own after it, although the one they waited for had made their
    changes durable already (a commit is global): eight tenants' fsyncs at once were
    eight barriers and eight WAL fsyncs in a row, and an fsync storm of several
    processes made another tenant's fdatasync wait for all of them. An fsync looks
    again once it has the commit lock (group commit): nothing left, nothing done."""
    fs = evol.fs
    assert fs is not None
    handles = []
    for i in range(8):
        ino = await write_file(fs, b"g%d" % i, fill(i + 1, BS))
        handles.append(fs.open(ino, os.O_RDWR, CALLER))
    for i, h in enumerate(handles):
        await fs.write(h.fh, 0, b"changed %d" % i)
    before = counts(evol)
    async with trio.open_nursery() as nursery:
        for h in handles:
            nursery.start_soon(fs.fsync, h.fh, True)
    b1, d1 = counts(evol)
    assert d1 - before[1] <= 2 and b1 - before[0] <= 2, (before, (b1, d1))
    assert not any(fs.needs_sync(h.inode.id) for h in handles)
    # A change made while a commit runs still gets a commit of its own.
    await fs.write(handles[0].fh, 0, b"again")
    assert fs.needs_sync(handles[0].inode.id)
    await fs.fsync(handles[0].fh, True)
    assert counts(evol)[1] == d1 + 1 and not fs.needs_sync(handles[0].inode.id)
    for h in handles:
        await fs.release(h.fh)


async def test_a_fresh_mount_makes_its_first_fsync_durable(evol: Volume) -> None:
    """A daemon killed before its last commit was durable leaves that commit (and its
    data) in the host's cache: nothing counts as durable until the first barrier and
    durable commit of the new mount."""
    fs = evol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", fill(1, BS))
    await evol.close()
    fs = await evol.open()
    assert fs.needs_sync(ino)
    h = fs.open(ino, os.O_RDONLY, CALLER)
    b, d = counts(evol)
    await fs.fsync(h.fh, False)
    # (the mount's own commit flushed the device: the barrier is done)
    assert counts(evol)[1] == d + 1 and evol.kernel.barriers >= 1
    assert not fs.needs_sync(ino)
    await fs.release(h.fh)


async def _durable(fs: FileSystem) -> None:
    await fs.sync()
    assert not fs.md.changed_since_durable(ROOT_INODE)


async def test_every_kind_of_change_marks_its_inodes_until_a_durable_commit(
        evol: Volume) -> None:
    fs = evol.fs
    assert fs is not None
    d1 = fs.mkdir(ROOT_INODE, b"d1", 0o755, CALLER).id
    d2 = fs.mkdir(ROOT_INODE, b"d2", 0o755, CALLER).id
    f = await write_file(fs, b"f", fill(1, 2 * BS), parent=d1)
    g = await write_file(fs, b"g", fill(2, 2 * BS), parent=d2)
    bystander = await write_file(fs, b"b", b"x")

    async def check(change, *marked: int) -> None:
        await _durable(fs)
        assert not any(fs.md.changed_since_durable(i) for i in (f, g, d1, d2, bystander))
        await change()
        # The timer's commit (not durable) keeps the marks.
        await fs.commit()
        got = {i for i in (f, g, d1, d2, bystander) if fs.md.changed_since_durable(i)}
        assert got == set(marked), change.__name__

    async def chmod() -> None:
        await fs.setattr(f, mode=0o600, caller=CALLER)

    async def truncate() -> None:
        await fs.truncate(fs.inode(f), 3 * BS + 5, principal=CALLER.principal)

    async def setx() -> None:
        fs.setxattr(f, b"user.k", b"v", 0)

    async def rmx() -> None:
        fs.removexattr(f, b"user.k")

    async def link() -> None:
        fs.link(f, d2, b"f2", CALLER)

    async def unlink() -> None:
        await fs.unlink(d2, b"f2")

    async def rename() -> None:
        await fs.rename(d1, b"f", d2, b"f", 0)

    async def rename_back_over() -> None:
        # over an existing name: the replaced file is marked too (its nlink)
        fs.link(g, d1, b"f", CALLER)
        await _durable(fs)
        await fs.rename(d2, b"f", d1, b"f", 0)

    async def exchange() -> None:
        from fs.filesystem import RENAME_EXCHANGE
        await fs.rename(d1, b"f", d2, b"g", RENAME_EXCHANGE)

    async def symlink() -> None:
        fs.symlink(d1, b"l", b"f", CALLER)

    await check(chmod, f)
    await check(truncate, f)
    await check(setx, f)
    await check(rmx, f)
    await check(link, f, d2)
    await check(unlink, f, d2)
    await check(rename, f, d1, d2)
    await check(rename_back_over, f, g, d1, d2)
    await check(exchange, f, g, d1, d2)
    await check(symlink, d1)


async def test_fallocate_inside_the_size_is_made_durable_by_fsync(evol: Volume) -> None:
    """Review case 1: fallocate mode 0 or KEEP_SIZE inside the size changed no ctime
    (it does since probe 21, F5, as file_modified does); the reservation must be in
    the durable commit of the next fsync, whatever the times say."""
    fs = evol.fs
    assert fs is not None
    for mode in (0, FALLOC_FL_KEEP_SIZE):
        h, node = fs.create(ROOT_INODE, b"sparse%d" % mode, 0o644, os.O_RDWR, CALLER)
        await fs.truncate(node, 16 * BS, principal=CALLER.principal)
        await fs.fsync(h.fh, False)
        ctime = node.ctime_ns
        await fs.commit()  # nothing left: a no-op commit
        await fs.fallocate(h.fh, mode, 4 * BS, 4 * BS)
        assert node.ctime_ns >= ctime
        await fs.commit()  # the timer's commit: not durable, the mark stays
        b, d = counts(evol)
        await fs.fsync(h.fh, False)
        assert counts(evol)[1] == d + 1, f"mode {mode}: no durable commit"
        await fs.release(h.fh)


async def test_a_clock_step_back_does_not_hide_a_change(evol: Volume, monkeypatch) -> None:
    """Review case 2: the marks do not read the clock. A write stamped long before the
    last durable fsync (the wall clock stepped back) is still made durable."""
    fs = evol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", fill(1, 2 * BS))
    h = fs.open(ino, os.O_RDWR, CALLER)
    await fs.fsync(h.fh, False)
    past = fs.inode(ino).ctime_ns - 3600 * 10**9
    monkeypatch.setattr(dataio, "now_ns", lambda: past)
    monkeypatch.setattr(space, "now_ns", lambda: past)
    await fs.write(h.fh, 2 * BS, b"after the step")  # (new blocks: nothing freed)
    await fs.commit()  # the barrier: the data is flushed, only the mark is left
    assert not evol.kernel.may_be_unflushed(ino)
    assert fs.inode(ino).ctime_ns == past
    b, d = counts(evol)
    await fs.fsync(h.fh, False)
    assert counts(evol)[1] == d + 1
    await fs.release(h.fh)


async def test_a_relocating_direct_write_is_made_durable_by_its_fsync(evol: Volume) -> None:
    """Review case 3: a direct client's write over sealed blocks is relocated by the
    server (`write_relocating`) with no ctime change; the direct fsync of the grant
    still makes it durable, also after a timer commit flushed its data."""
    fs = evol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", fill(1, 4 * BS))
    await fs.sync()
    node = fs.inode(ino)
    grant = fs.grant_direct(node, True, True, CALLER)
    ctime = node.ctime_ns
    await fs.write_relocating(grant, BS, memoryview(fill(9, BS)))
    assert node.ctime_ns == ctime
    assert evol.md.changed_since_durable(ino)  # marked, whatever the kernel says
    assert fs.needs_sync(ino)
    b, d = counts(evol)
    await fs.fsync_inode(ino, grant.principal)
    assert counts(evol)[1] == d + 1
    assert not fs.needs_sync(ino)
    # (a timer commit after a relocation is durable anyway: it freed the old blocks)
    b, d = counts(evol)
    await fs.fsync_inode(ino, grant.principal)  # nothing new: empty
    assert counts(evol) == (b, d)
    await fs.close_direct(grant)


async def test_a_failed_durable_commit_keeps_the_marks(evol: Volume, monkeypatch) -> None:
    """The WAL fsync of an fsync's commit fails after the marks were taken: they are
    put back, so the change still counts as not durable and the next fsync of the
    file takes the full path (it reports the failure, as before)."""
    fs = evol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", fill(1, BS))
    h1 = fs.open(ino, os.O_RDWR, CALLER)
    h2 = fs.open(ino, os.O_RDWR, CALLER)
    await fs.fsync(h1.fh, False)
    await fs.write(h1.fh, 0, b"changed")
    md = evol.md

    def failing() -> None:
        raise OSError(5, "fsync of the WAL failed (injected)")

    monkeypatch.setattr(md, "make_durable", failing)
    with pytest.raises(WriteFailed):
        await fs.fsync(h1.fh, False)
    assert md.changed_since_durable(ino)
    assert fs.needs_sync(ino)
    empty = fs.empty_fsyncs
    with pytest.raises(WriteFailed):  # the other open file hears of it once
        await fs.fsync(h2.fh, False)
    await fs.fsync(h2.fh, False)  # then the full path (nothing is committed any more)
    assert fs.empty_fsyncs == empty
    monkeypatch.undo()
    for h in (h1, h2):
        await fs.release(h.fh)


async def test_settling_marks_of_a_commit_that_was_not_durable(evol: Volume) -> None:
    md = evol.md
    md.settle_changes(md.take_changes(), durable=True)
    md.update_inode_later(5, {"mode": 0o644})
    taken = md.take_changes()
    assert md.changed_since_durable(5)  # still counts while its commit is on its way
    md.update_inode_later(6, {"mode": 0o644})
    md.settle_changes(taken, durable=False)
    assert md.changed_since_durable(5) and md.changed_since_durable(6)
    assert not md.changed_since_durable(7)
    md.set_meta("k", 1)  # no single inode owns it: everything counts
    assert md.changed_since_durable(7)
    md.rollback()
    md.settle_changes(md.take_changes(), durable=True)
    assert not md.changed_since_durable(5)


async def test_the_marks_are_bounded(evol: Volume, monkeypatch) -> None:
    """Past MAX_MARKED inodes the marks become one "everything" mark (memory stays
    bounded between two durable commits; every fsync then commits, as it must)."""
    from fs import metadata
    monkeypatch.setattr(metadata, "MAX_MARKED", 8)
    md = evol.md
    md.settle_changes(md.take_changes(), durable=True)
    for ino in range(100, 108):
        md.update_inode_later(ino, {"mode": 0o644})
    assert not md.changed_since_durable(99) and len(md._changed) == 8
    md.update_inode_later(108, {"mode": 0o644})
    assert md.changed_since_durable(99) and not md._changed
    md.rollback()
    md.settle_changes(md.take_changes(), durable=True)
    assert not md.changed_since_durable(99)


async def test_dirty_discardable_frames_are_not_an_empty_fsync(wbvol: Volume) -> None:
    """Write-back mode: a discardable file's dirty frames survive every barrier (R7),
    so its fsync is never skipped while it has any; once written back and committed,
    it is."""
    v = wbvol
    fs = v.fs
    assert fs is not None
    h, node = fs.create(ROOT_INODE, b"cache", 0o644, os.O_RDWR, CALLER)
    fs.setxattr(node.id, b"user.sluice.discardable", b"1", 0)
    await fs.write(h.fh, 0, fill(3, 2 * BS))
    await fs.sync()  # a commit: the discardable frames stay dirty
    assert v.kernel.pager.has_dirty(node.id)
    assert fs.needs_sync(node.id)
    await fs.fsync(h.fh, False)
    assert not v.kernel.pager.has_dirty(node.id)
    assert not fs.needs_sync(node.id)
    await fs.release(h.fh)


async def test_the_flush_of_an_fsync_is_charged_to_the_asker(evol: Volume) -> None:
    fs = evol.fs
    assert fs is not None
    from kernelshim.principals import Banks
    alice = fs.principals.add("alice", owner_uid=1000, banks=Banks(), caller_uid=0).id
    caller = Caller(CALLER.uid, CALLER.gid, CALLER.pid, 0o022, alice)

    def flushes() -> dict[int, int]:
        st = evol.kernel.device_statistics().per_principal
        return {int(s.principal): s.flushes for s in st}

    h, node = fs.create(ROOT_INODE, b"a", 0o644, os.O_RDWR, caller)
    await fs.write(h.fh, 0, fill(4, 2 * BS))
    await fs.sync()
    before = flushes()
    await fs.write(h.fh, 0, b"again")
    await fs.fsync(h.fh, False)
    after = flushes()
    assert after.get(alice, 0) == before.get(alice, 0) + 1
    assert after.get(0, 0) == before.get(0, 0)  # root paid nothing for it
    # An empty fsync: no flush at all.
    await fs.fsync(h.fh, False)
    assert flushes() == after
    await fs.release(h.fh)


async def test_metadata_only_fsyncs_go_at_the_askers_io_limit(evol: Volume) -> None:
    """Probe 20, F1: an fsync after a metadata-only change (chmod) makes a device flush
    charged to the asker, expedited past its I/O limit as every barrier's is; a write
    repays it at its next place, but a tenant that never writes data never did, and
    its chmod + fsync storm (366-636 a second) went at device speed whatever its
    limit. Such an fsync now takes a place of one block-sized request at the asker's
    limits and waits for it before its commit (at most FSYNC_REPAY_MAX_WAIT: the
    kernel holds the file's lock meanwhile). A principal with no limit waits for
    nothing."""
    from kernelshim.principals import Banks, Rate
    fs = evol.fs
    assert fs is not None

    async def chmod_fsyncs(name: str, uid: int, limit: str) -> float:
        """Seconds for 10 chmod + fsync by a new principal under `limit`."""
        who = fs.principals.add(name, owner_uid=uid, banks=Banks(io_limit=Rate.parse(limit)),
                                caller_uid=0).id
        caller = Caller(CALLER.uid, CALLER.gid, CALLER.pid, 0o022, who)
        h, node = fs.create(ROOT_INODE, name.encode(), 0o644, os.O_RDWR, caller)
        await fs.fsync(h.fh, False)
        t0 = time.monotonic()
        for i in range(10):
            await fs.setattr(node.id, mode=0o600 | (i & 1), caller=caller)
            await fs.fsync(h.fh, False)
        took = time.monotonic() - t0
        await fs.release(h.fh)
        return took

    took = await chmod_fsyncs("alice", 1000, "20iops")
    assert took >= 9 / 20 * 0.9, took  # 10 commits at 20 IOPS
    # A bytes/s limit alone prices each such commit as a block (probe 24, F2).
    took = await chmod_fsyncs("bob", 1001, "80KiB/s")
    assert took >= 9 / 20 * 0.9, took  # 10 blocks at 20 blocks a second
    # root (no limit) is not held
    hr, root_node = fs.create(ROOT_INODE, b"r", 0o644, os.O_RDWR, CALLER)
    t0 = time.monotonic()
    for i in range(10):
        await fs.setattr(root_node.id, mode=0o600 | (i & 1))
        await fs.fsync(hr.fh, False)
    assert time.monotonic() - t0 < 0.4
    await fs.release(hr.fh)


async def test_an_fsync_without_a_handle_writes_a_discardable_file_back(wbvol: Volume) -> None:
    """Review of the merge: a direct client's fsync (`fsync_inode`, as fs/service.py
    calls it; no FUSE handle) of a discardable file wrote none of its dirty frames back
    — a barrier leaves them out (R7) — so the durable commit listed the file as
    unflushed and a crash brought it back empty, fsync after fsync. It now writes them
    back first, as the FUSE fsync does. And once the volume has failed, it reports
    WriteFailed instead of success."""
    v = wbvol
    fs = v.fs
    assert fs is not None
    h, node = fs.create(ROOT_INODE, b"cache", 0o644, os.O_RDWR, CALLER)
    fs.setxattr(node.id, b"user.sluice.discardable", b"1", 0)
    await fs.write(h.fh, 0, fill(3, 2 * BS))
    await fs.sync()
    assert v.kernel.pager.has_dirty(node.id)
    await fs.fsync_inode(node.id, CALLER.principal)
    assert not v.kernel.pager.has_dirty(node.id)
    assert node.id not in fs._unflushed_saved
    assert not fs.needs_sync(node.id)
    await fs.release(h.fh)
    fs.fail("injected failure")
    with pytest.raises(WriteFailed):
        await fs.fsync_inode(ROOT_INODE, CALLER.principal)


async def test_a_retag_marks_its_inodes_and_waits_for_a_shared_durable_commit(
        evol: Volume) -> None:
    """Probe 3, F4: `move_principal` marks the re-tagged inodes, not "everything"
    (another file's fsync stays empty), and `wait_durable` makes one durable commit
    for every re-tag waiting; within FORCED_DURABLE_INTERVAL of the last one it made,
    it waits for someone else's (here an fsync's) instead of making another."""
    fs, md = evol.fs, evol.md
    assert fs is not None
    a = await write_file(fs, b"a", fill(1, BS))
    b = await write_file(fs, b"b", fill(2, BS))
    md._w("UPDATE inodes SET principal=7 WHERE id=?", (a,))
    await fs.sync()
    assert not md.changed_since_durable(a) and not md.changed_since_durable(b)
    md.move_principal(7, 0)
    assert md.changed_since_durable(a) and not md.changed_since_durable(b)
    assert not fs.needs_sync(b)
    n = md.durable_commits
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(lambda: fs.wait_durable(principal=PrincipalId(0)))
    assert md.durable_commits == n + 1
    assert not md.changed_since_durable(a)
    # Again at once: no commit of its own yet; an fsync's durable commit serves it.
    md._w("UPDATE inodes SET principal=9 WHERE id=?", (b,))
    md.move_principal(9, 0)
    done = trio.Event()

    async def retag_wait() -> None:
        await fs.wait_durable(principal=PrincipalId(0))
        done.set()

    n = md.durable_commits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retag_wait)
        await trio.sleep(0.1)
        assert not done.is_set() and md.durable_commits == n
        await fs.sync()
        await done.wait()
    assert md.durable_commits == n + 1
    assert md.db.execute("SELECT principal FROM inodes WHERE id=?", (b,)).fetchone() == (0,)


async def test_retag_waiters_hear_of_a_failed_durable_commit(evol: Volume,
                                                             monkeypatch) -> None:
    """The re-tag's durable commit fails: every re-tag waiting for it gets WriteFailed
    (none waits forever for a commit that will not come), and the marks stay."""
    fs, md = evol.fs, evol.md
    assert fs is not None
    a = await write_file(fs, b"a", fill(1, BS))
    md._w("UPDATE inodes SET principal=7 WHERE id=?", (a,))
    await fs.sync()
    md.move_principal(7, 0)

    def failing() -> None:
        raise OSError(5, "fsync of the WAL failed (injected)")

    monkeypatch.setattr(md, "make_durable", failing)
    failed = []

    async def retag_wait() -> None:
        with pytest.raises(WriteFailed):
            await fs.wait_durable(principal=PrincipalId(0))
        failed.append(1)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(retag_wait)
    assert len(failed) == 3
    assert md.changed_since_durable(a)
