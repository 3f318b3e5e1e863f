"""The tenth hostile probe's findings (docs/RELIABILITY.md, "Stop 22: probes 9 and 10"):
one tenant's FUSE request that did work in proportion to a file's extents, or a
directory's depth, in one step of the daemon's loop held every other tenant's requests
for that long. Each is a regression test that fails on the code before its fix.

- F1: SEEK_DATA/SEEK_HOLE built the segment list of the whole rest of the file (0.2 s
  at 50,000 extents); now at most SEEK_EXTENTS_PER_STEP extents a step.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fs.dataio import SEEK_EXTENTS_PER_STEP
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
