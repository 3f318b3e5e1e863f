"""The tenth hostile probe's findings (docs/RELIABILITY.md, "Stop 22: probes 9 and 10"):
one tenant's FUSE request that did work in proportion to a file's extents, or a
directory's depth, in one step of the daemon's loop held every other tenant's requests
for that long. Each is a regression test that fails on the code before its fix.

- F1: SEEK_DATA/SEEK_HOLE built the segment list of the whole rest of the file (0.2 s
  at 50,000 extents); now at most SEEK_EXTENTS_PER_STEP extents a step.
- F2: every directory rename walked up from the new parent, to 10,000 ancestors, in one
  step (84 ms when their inodes were not cached); and answered "not inside" past
  10,000, so a directory could be moved into its own subtree. Now only a rename
  between two directories walks, to the root, giving the loop back on the way.
- F3: a truncate or an unlink of a file of 50,000 extents unmapped them all in one step
  (0.1-0.2 s); now EXTENTS_PER_STEP extents a step, from the end of the file, the size
  saved first (a commit between two parts, and a crash after it, show the new state).
  A punch or a zeroed range of many extents is cut in parts the same way (ZERO_RANGE
  since stop 23, its replacement blocks allocated before the first part).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from fs.dataio import SEEK_EXTENTS_PER_STEP
from fs.errors import InvalidArgument
from fs.namespace import RENAME_EXCHANGE
from fs.space import EXTENTS_PER_STEP
from test_filesystem import CALLER, ROOT, Volume, read_file

BS = 4096


@pytest.fixture
async def bigvol(tmp_path: Path):
    v = Volume(tmp_path / "vol", size=16384 * BS)
    await v.open()
    yield v
    await v.close()


async def _fragmented(fs, name: bytes, n: int) -> tuple[int, object]:
    """A file of `n` one-block extents that never merge: written last block first, so
    that each file block's device block precedes its left neighbour's."""
    h, node = fs.create(ROOT, name, 0o644, os.O_RDWR, CALLER)
    for b in reversed(range(n)):
        assert await fs.write(h.fh, b * BS, bytes([b % 251 + 1]) * BS) == BS
    assert len(fs._extents(node)) == n
    return h.fh, node


async def _steps_of_others(fn) -> int:
    """Run `fn()` beside a task that counts its own steps: how many it had meanwhile."""
    others = 0
    done = False

    async def other() -> None:
        nonlocal others
        while not done:
            await trio.lowlevel.checkpoint()
            others += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        start = others
        try:
            await fn()
        finally:
            ran = others - start
            done = True
    return ran


async def test_seek_over_many_extents_gives_the_loop_back(bigvol: Volume) -> None:
    """F1. SEEK_HOLE from the start of a file of 3,000 one-block extents with no hole
    before its end: the answer is the end of the file, found a bounded number of
    extents a step, other tasks running in between (before: one step for them all)."""
    fs = bigvol.fs
    n = 3000
    fh, node = await _fragmented(fs, b"f", n)

    async def seek_hole() -> None:
        assert await fs.seek(fh, 0, os.SEEK_HOLE) == n * BS

    ran = await _steps_of_others(seek_hole)
    assert ran >= n // SEEK_EXTENTS_PER_STEP - 1, ran
    assert await fs.seek(fh, 5 * BS + 3, os.SEEK_DATA) == 5 * BS + 3
    # and after a hole punched near the end, and UNWRITTEN blocks there
    await fs.fallocate(fh, 0x01 | 0x02, (n - 10) * BS, 2 * BS)  # KEEP_SIZE|PUNCH_HOLE
    assert await fs.seek(fh, 0, os.SEEK_HOLE) == (n - 10) * BS
    assert await fs.seek(fh, (n - 10) * BS, os.SEEK_DATA) == (n - 8) * BS
    await fs.release(fh)


async def _chain(fs, depth: int) -> tuple[int, int]:
    """Directories d/d/d/... `depth` deep under the root: (the top's, the deepest's)."""
    cur = top = ROOT
    for i in range(depth):
        cur = fs.mkdir(cur, b"d", 0o755, CALLER).id
        if i == 0:
            top = cur
    return top, cur


async def test_a_directory_cannot_move_into_its_subtree_however_deep(bigvol: Volume) -> None:
    """F2. The walk stopped at 10,000 parents and said "not inside": the top of a chain
    10,010 deep could be renamed into its deepest directory, a loop cut off from the
    root. Both a plain rename and an exchange are refused, and the tree is unchanged."""
    fs = bigvol.fs
    top, deepest = await _chain(fs, 10_010)
    with pytest.raises(InvalidArgument):
        await fs.rename(ROOT, b"d", deepest, b"x", 0)
    x = fs.mkdir(deepest, b"x", 0o755, CALLER).id
    with pytest.raises(InvalidArgument):
        await fs.rename(ROOT, b"d", deepest, b"x", RENAME_EXCHANGE)
    assert fs.lookup(ROOT, b"d").id == top and fs.lookup(deepest, b"x").id == x
    assert fs.inode(top).parent == ROOT
    # a directory from elsewhere still goes there, and back
    a = fs.mkdir(ROOT, b"a", 0o755, CALLER).id
    ran = await _steps_of_others(lambda: fs.rename(ROOT, b"a", deepest, b"a", 0))
    assert fs.inode(a).parent == deepest and ran >= 3, ran  # (the walk gave the loop back)
    await fs.rename(deepest, b"a", ROOT, b"a", 0)
    assert fs.inode(a).parent == ROOT


async def test_a_rename_inside_one_directory_walks_nothing(bigvol: Volume,
                                                           monkeypatch) -> None:
    """F2. A directory renamed within its parent changes no parent: no walk up the
    tree (before: one to the root, or 10,000 parents, for each such rename)."""
    fs = bigvol.fs
    _top, deepest = await _chain(fs, 3000)
    fs.mkdir(deepest, b"a", 0o755, CALLER)
    walks = []
    real = type(fs)._is_ancestor

    async def counted(self, anc: int, ino: int) -> bool:
        walks.append((anc, ino))
        return await real(self, anc, ino)

    monkeypatch.setattr(type(fs), "_is_ancestor", counted)
    for i in range(5):
        await fs.rename(deepest, b"a" if i % 2 == 0 else b"b", deepest,
                        b"b" if i % 2 == 0 else b"a", 0)
    assert walks == []
    assert [n for _c, n, _node in fs.readdir(deepest, 0, 10)][2:] == [b"b"]


def _content(n: int) -> bytes:
    return b"".join(bytes([b % 251 + 1]) * BS for b in range(n))


async def test_a_truncate_of_many_extents_gives_the_loop_back(bigvol: Volume) -> None:
    """F3. A truncate of a file of 3,000 extents to a partial block: other tasks run
    between its parts; the file holds its first bytes and zeros after growth; its
    blocks and space are given back; fsck finds the volume clean."""
    fs = bigvol.fs
    n = 3000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.sync()
    p = fs.principal(CALLER.principal)
    used = p.usage.space
    size = 7 * BS + 100
    ran = await _steps_of_others(lambda: fs.truncate(node, size, principal=CALLER.principal))
    assert ran >= n // EXTENTS_PER_STEP - 1, ran
    assert node.size == size and node.blocks == 8 and len(fs._extents(node)) == 8
    assert await read_file(fs, node.id) == _content(n)[:size]
    await fs.truncate(node, 9 * BS, principal=CALLER.principal)
    assert await read_file(fs, node.id) == _content(n)[:size] + bytes(9 * BS - size)
    await fs.release(fh)
    assert used - p.usage.space == (n - 8) * BS  # (8 blocks kept; the growth: a hole)
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_an_unlink_of_many_extents_gives_the_loop_back(bigvol: Volume) -> None:
    """F3. The last name of a file of 3,000 extents removed: other tasks run between
    the parts of its unmapping; every block is free again; fsck is clean."""
    fs = bigvol.fs
    p = fs.principal(CALLER.principal)
    used = p.usage.space
    n = 3000
    fh, _node = await _fragmented(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    ran = await _steps_of_others(lambda: fs.unlink(ROOT, b"f"))
    assert ran >= n // EXTENTS_PER_STEP - 1, ran
    assert p.usage.space == used
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def _open_copy(path: Path):
    """Mount (in process) the copy of a volume taken at a simulated crash: (its Volume,
    its FileSystem). The caller closes it."""
    v = Volume.__new__(Volume)
    v.path, v.profile, v.fs = path, None, None
    return v, await v.open()


async def test_a_commit_between_a_truncates_parts_keeps_the_new_state(
        bigvol: Volume, tmp_path: Path, monkeypatch) -> None:
    """F3. A commit (made durable) while a truncate of many extents is between two of
    its parts, and a crash then (the volume's files copied as they are): the copy
    mounts with the new size, the kept bytes, no block past the end, and fsck clean."""
    fs = bigvol.fs
    n = 1000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    size = 5 * BS + 77
    parts = 0
    real = type(fs)._release_unmapped
    crash = tmp_path / "crash"

    async def release(self, freed, revoked, **kw):
        nonlocal parts
        await real(self, freed, revoked, **kw)
        parts += 1
        if parts == 3:  # the size and three parts saved, the rest not yet
            await self.commit(durable=True)
            shutil.copytree(bigvol.path, crash, ignore=shutil.ignore_patterns("lock"))

    monkeypatch.setattr(type(fs), "_release_unmapped", release)
    await fs.truncate(node, size, principal=CALLER.principal)
    monkeypatch.setattr(type(fs), "_release_unmapped", real)
    assert parts > 3
    # fsck before the mount, as a user of a crashed volume is told to run it: the
    # blocks past the end are a note (the volume was not unmounted), not errors
    from fs import volume as volume_mod
    volume_mod.write_mount_state(crash, mountpoint="/gone", pid=2**22)
    early = Volume.__new__(Volume)
    early.path = crash
    report = await early.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines
    assert any("past its end of file" in line and "truncate cut short" in line
               for line in report.lines), report.lines
    volume_mod.clear_mount_state(crash)
    v, fs2 = await _open_copy(crash)
    try:
        node2 = fs2.lookup(ROOT, b"f")
        assert node2.size == size
        assert fs2._extents(node2).end_block() <= 6  # (dropped by the mount)
        assert await read_file(fs2, node2.id) == _content(n)[:size]
    finally:
        await v.close()
    report = await v.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


@pytest.mark.parametrize("mode", ["punch", "zero"])
async def test_a_punch_of_many_extents_gives_the_loop_back(bigvol: Volume, mode: str) -> None:
    """F3. PUNCH_HOLE (KEEP_SIZE) over most of a file of 3,000 extents: other tasks run
    between its parts; the range reads as zeros, the rest as written; the space comes
    back; fsck is clean. ZERO_RANGE is cut the same way (it was one step: ~0.25 s at
    20,000 extents), gives the same contents and keeps the space allocated."""
    from fs.space import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    fs = bigvol.fs
    n = 3000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.sync()
    p = fs.principal(CALLER.principal)
    used = p.usage.space
    lo, hi = 10 * BS + 5, (n - 10) * BS - 7
    flags = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE if mode == "punch" else \
        FALLOC_FL_ZERO_RANGE
    ran = await _steps_of_others(lambda: fs.fallocate(fh, flags, lo, hi - lo))
    assert ran >= n // EXTENTS_PER_STEP - 2, ran
    want = bytearray(_content(n))
    want[lo:hi] = bytes(hi - lo)
    assert await read_file(fs, node.id) == bytes(want)
    whole = (n - 11) - 11  # blocks wholly inside the range
    assert used - p.usage.space == (whole * BS if mode == "punch" else 0)
    await fs.release(fh)
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_an_inode_being_freed_cannot_be_opened_again(bigvol: Volume,
                                                           monkeypatch) -> None:
    """F3's review. While an unlink's parts free a file of many extents, the kernel may
    still hold the inode (an O_PATH descriptor reopened through /proc, a file handle)
    and send an OPEN for it: refused (ENOENT), not a handle writing into a file whose
    row is going; and fsck is clean after."""
    from fs.errors import NotFound
    fs = bigvol.fs
    n = 1000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    real = type(fs)._release_unmapped
    tried = []

    async def release(self, freed, revoked, **kw):
        await real(self, freed, revoked, **kw)
        if not tried:
            with pytest.raises(NotFound):
                self.open(node.id, os.O_RDWR, CALLER)
            tried.append(True)

    monkeypatch.setattr(type(fs), "_release_unmapped", release)
    await fs.unlink(ROOT, b"f")
    monkeypatch.setattr(type(fs), "_release_unmapped", real)
    assert tried
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def _sparse(fs, name: bytes, n: int) -> tuple[int, object]:
    """A file of `n` blocks whose even blocks hold data (one-block extents that never
    merge) and whose odd ones are holes: n // 2 holes among n // 2 extents."""
    h, node = fs.create(ROOT, name, 0o644, os.O_RDWR, CALLER)
    for b in reversed(range(0, n, 2)):
        assert await fs.write(h.fh, b * BS, bytes([b % 251 + 1]) * BS) == BS
    return h.fh, node


def _sparse_content(n: int) -> bytes:
    return b"".join((bytes([b % 251 + 1]) if b % 2 == 0 else b"\0") * BS for b in range(n))


@pytest.mark.parametrize("keep_size", [False, True])
async def test_a_fallocate_over_many_holes_gives_the_loop_back(bigvol: Volume,
                                                               keep_size: bool) -> None:
    """Stop 23. fallocate (mode 0, KEEP_SIZE) over a sparse file of 3,000 blocks, 1,500
    of them holes, and past its end: the holes were found, allocated and merged into
    the map in one step (~0.12 s at 10,000 holes). Now counted, then mapped, a bounded
    number of extents a step; the contents are unchanged, the holes read as zeros and
    are charged, the size grows (mode 0) or not, fsck is clean."""
    fs = bigvol.fs
    n = 3000
    fh, node = await _sparse(fs, b"f", n)
    size = node.size
    await fs.sync()
    p = fs.principal(CALLER.principal)
    used = p.usage.space
    extra = 10  # blocks past the end
    mode = 0x01 if keep_size else 0
    ran = await _steps_of_others(lambda: fs.fallocate(fh, mode, 0, (n + extra) * BS))
    assert ran >= (n // 2) // (EXTENTS_PER_STEP // 2) - 1, ran
    assert p.usage.space - used == (n // 2 + extra) * BS  # the holes and the tail
    assert node.size == (size if keep_size else (n + extra) * BS)
    want = _sparse_content(n)[:size] + (b"" if keep_size else bytes(node.size - size))
    assert await read_file(fs, node.id) == want
    # the holes are allocated (UNWRITTEN): still holes to SEEK_DATA, and a write there
    # allocates nothing more
    assert await fs.seek(fh, BS, os.SEEK_DATA) == 2 * BS
    assert await fs.write(fh, 3 * BS, b"x" * BS) == BS
    assert p.usage.space - used == (n // 2 + extra) * BS
    await fs.release(fh)
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_a_commit_between_a_fallocates_parts_keeps_the_old_contents(
        bigvol: Volume, tmp_path: Path, monkeypatch) -> None:
    """Stop 23. A durable commit while a growing fallocate over many holes is between
    two of its parts, and a crash then (the volume's files copied as they are): the
    copy mounts with the old size and contents (the reservations made so far read as
    zeros, as the holes did; none is left past the end), and fsck is clean."""
    fs = bigvol.fs
    n = 1000
    fh, node = await _sparse(fs, b"f", n)
    size = node.size
    await fs.sync()
    crash = tmp_path / "crash"
    saves = 0
    real = type(fs)._save_extents

    def save(self, nd):
        nonlocal saves
        real(self, nd)
        if nd is node:
            saves += 1

    async def allocate_in_parts(self, *a, **kw):
        monkeypatch.setattr(type(fs), "_save_extents", save)
        await real_parts(self, *a, **kw)

    real_parts = type(fs)._allocate_in_parts
    real_checkpoint = trio.lowlevel.checkpoint

    async def checkpoint():
        await real_checkpoint()
        if saves == 3 and not crash.exists():  # three parts saved, the rest not yet
            await fs.commit(durable=True)
            shutil.copytree(bigvol.path, crash, ignore=shutil.ignore_patterns("lock"))

    monkeypatch.setattr(type(fs), "_allocate_in_parts", allocate_in_parts)
    monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint)
    await fs.fallocate(fh, 0, 0, (n + 20) * BS)
    monkeypatch.undo()
    assert crash.exists() and node.size == (n + 20) * BS
    await fs.release(fh)
    v, fs2 = await _open_copy(crash)
    try:
        node2 = fs2.lookup(ROOT, b"f")
        assert node2.size == size
        assert fs2._extents(node2).end_block() <= n
        assert await read_file(fs2, node2.id) == _sparse_content(n)[:size]
    finally:
        await v.close()
    report = await v.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_a_truncates_parts_do_not_scan_other_files_handles(bigvol: Volume) -> None:
    """Stop 23 (the review of probe 10's fixes). Each part of a truncate of many
    extents gave the open handles of the file fresh grants by scanning every open
    handle of the volume: another tenant's 2,000 open files cost every part. Now only
    the file's own handles are visited (the volume's table is never walked), and they
    still get fresh grants that read the truncated file."""
    fs = bigvol.fs
    n = 1000
    fh, node = await _fragmented(fs, b"f", n)
    readers = [fs.open(node.id, os.O_RDONLY, CALLER).fh for _ in range(3)]
    other, _onode = fs.create(ROOT, b"other", 0o644, os.O_RDWR, CALLER)
    others = [fs.open(_onode.id, os.O_RDONLY, CALLER).fh for _ in range(2000)]
    before = {k: fs.handle(k).grant for k in others}

    class NoWalk(dict):
        def values(self):
            raise AssertionError("every open handle of the volume walked")
        __iter__ = items = values  # type: ignore[assignment]

    fs._handles = NoWalk(fs._handles)
    try:
        ran = await _steps_of_others(lambda: fs.truncate(node, 3 * BS + 1,
                                                         principal=CALLER.principal))
    finally:
        fs._handles = dict(fs._handles.copy())
    assert ran >= n // EXTENTS_PER_STEP - 1, ran
    for k in readers:
        h = fs.handle(k)
        assert not h.grant.revoked
        assert bytes(await fs.read(k, 0, 4 * BS)) == _content(n)[:3 * BS + 1]
    assert all(fs.handle(k).grant is before[k] for k in others)
    for k in [fh, *readers, other.fh, *others]:
        await fs.release(k)
