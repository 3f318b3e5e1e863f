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
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fs.dataio import SEEK_EXTENTS_PER_STEP
from fs.errors import InvalidArgument
from fs.namespace import RENAME_EXCHANGE
from test_filesystem import CALLER, ROOT, Volume

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


async def test_seek_over_many_extents_gives_the_loop_back(bigvol: Volume) -> None:
    """F1. SEEK_HOLE from the start of a file of 3,000 one-block extents with no hole
    before its end: the answer is the end of the file, found a bounded number of
    extents a step, other tasks running in between (before: one step for them all)."""
    fs = bigvol.fs
    n = 3000
    fh, node = await _fragmented(fs, b"f", n)
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
        assert await fs.seek(fh, 0, os.SEEK_HOLE) == n * BS
        ran = others - start
        assert await fs.seek(fh, 5 * BS + 3, os.SEEK_DATA) == 5 * BS + 3
        done = True
    assert ran >= n // SEEK_EXTENTS_PER_STEP - 1, ran
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
