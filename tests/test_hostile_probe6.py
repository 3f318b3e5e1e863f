"""The sixth hostile probe's findings (docs/RELIABILITY.md, "Stop 17: probe 6"), each a
regression test that fails on the code before its fix: real mounts, real programs.

- W1: two writers of one shared file, each writing its own bytes of one block that no
  commit had made written yet: the second writer's partial write merged the block with
  zeros (the merge read the device only for the *same* grant's uncommitted writes), so
  the first writer's acknowledged write was lost — after its commit and fsync returned.
- W2: two writers merging the same block at the same time (pipelined direct writes of
  two clients; a direct client and the mount): each read the block before the other
  wrote it, and the one written last erased the other's bytes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kernelshim import grants as grants_mod
from kernelshim.client import Client
from kernelshim.extents import ExtentMap
from kernelshim.grants import Grant, PENDING_EXACT
from kernelshim.clientcore import PIPE_MIN_SHM
from kernelshim.ranges import RangeList

pytestmark = pytest.mark.mounted

BS = 4096


@pytest.mark.parametrize("second", ["direct", "mount"])
def test_another_writers_partial_write_keeps_a_direct_clients_uncommitted_bytes(
        mnt: Path, second: str) -> None:
    """W1. Direct client X writes bytes 100..199 of a new block and does not commit yet;
    then another writer — a second direct client, or a write through the mount — writes
    bytes 300..399 of the same block; then X commits and fsyncs. Both writes must be in
    the file. (Before: the second write merged the unwritten block with zeros, as X's
    bytes were another grant's: X's fsync returned and its bytes read as zeros.)"""
    (mnt / "shared").write_bytes(b"")
    # (clients whose writes are not pipelined: each pwrite returns once the daemon
    # has done it, so the second writer's write comes after the first's, never beside)
    small = PIPE_MIN_SHM // 2
    with Client.connect(mnt, shm_size=small) as cx, \
            Client.connect(mnt, shm_size=small) as cy:
        fx = cx.open("shared", "r+")
        fy = cy.open("shared", "r+")
        assert fx.pwrite(b"X" * 100, 100) == 100
        if second == "direct":
            assert fy.pwrite(b"Y" * 100, 300) == 100
            fy.commit()
        else:
            fd = os.open(mnt / "shared", os.O_WRONLY)
            try:
                assert os.pwrite(fd, b"Y" * 100, 300) == 100
            finally:
                os.close(fd)
        fx.fsync()
        # and a third partial write into the block, through X, after both
        assert fx.pwrite(b"Z" * 10, BS - 10) == 10
        fx.fsync()
        fy.close()
        fx.close()
    got = (mnt / "shared").read_bytes()
    expect = bytearray(BS)
    expect[100:200] = b"X" * 100
    expect[300:400] = b"Y" * 100
    expect[BS - 10:] = b"Z" * 10
    assert got == bytes(expect), (got[100:110], got[300:310], len(got))


#: a direct client writing every other 16-byte record of `shared` (pipelined writes)
_RECORDS = r"""
import sys
from kernelshim import grants as grants_mod
from kernelshim.client import Client
from kernelshim.extents import ExtentMap
from kernelshim.grants import Grant, PENDING_EXACT
mp, who, rnd, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with Client.connect(mp) as c:
    f = c.open("shared", "r+")
    for k in range(n):
        rec = 2 * k + who
        f.pwrite(b"%c%07d-%06d\n" % (65 + who, rnd, rec), rec * 16)
    f.fsync()
    f.close()
"""


def test_two_writers_merging_one_block_at_once_both_stay(mnt: Path) -> None:
    """W2. Two direct clients, in two processes at the same time, write the even and
    the odd 16-byte records of the same blocks (pipelined: several writes of each in
    the daemon at once), then fsync: every record must be there — in a range of holes
    laid out by the writes themselves, then again over the same (now written) blocks.
    The file is sized first: no commit grows it (the growing file is W3's test,
    tests/test_shared_writers.py). (Before: each round lost records, 2 to 30 of
    8,192.)"""
    n = 2048  # records per writer: 8 blocks of 256 records
    size = 2 * n * 16
    (mnt / "shared").write_bytes(b"")
    os.truncate(mnt / "shared", size)
    for rnd in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", _RECORDS, str(mnt), str(who),
                                   str(rnd), str(n)], cwd=REPO) for who in (0, 1)]
        for p in procs:
            assert p.wait(timeout=120) == 0
        got = (mnt / "shared").read_bytes()
        assert len(got) == size
        lost = [r for r in range(2 * n)
                if got[r * 16:r * 16 + 16] != b"%c%07d-%06d\n" % (65 + r % 2, rnd, r)]
        assert not lost, f"round {rnd}: {len(lost)} records lost, the first {lost[:5]}"


def test_wrote_in_of_a_block_does_not_merge_every_noted_range(monkeypatch) -> None:
    """P1. The merge of a partly written unwritten block asks `wrote_in` of that
    block; past PENDING_EXACT ranges that merged every noted range in first (a pass
    over all of the grant's ranges): per write, so a client's pipelined partial writes
    cost the shared loop O(ranges) each (2.6 ms a write at 20,000 ranges, against
    0.15 ms). Since probe 11's F4 the ranges are kept in chunks (`RangeList`) and no
    question or note passes over all of them; the answers are those of the merged
    ranges."""
    settles = 0
    real_flat, real_build = RangeList.flat, RangeList._build

    def counting_flat(self: RangeList) -> list[list[int]]:
        nonlocal settles
        settles += 1
        return real_flat(self)

    def counting_build(self: RangeList, flat: list[list[int]]) -> None:
        nonlocal settles
        settles += len(flat) > 1
        real_build(self, flat)

    monkeypatch.setattr(RangeList, "flat", counting_flat)
    monkeypatch.setattr(RangeList, "_build", counting_build)
    g = Grant(1, 1, ExtentMap(), grants_mod.Rights.RW, 0)
    rnd = random.Random(6)
    blocks = list(range(3 * PENDING_EXACT))
    rnd.shuffle(blocks)
    for b in blocks[:PENDING_EXACT + 10]:  # (past PENDING_EXACT: noted from here)
        g.note_written(b * BS + 100, b * BS + 200, BS)
    settles = 0
    asked = 0
    for b in blocks[PENDING_EXACT + 10:PENDING_EXACT + 500]:
        # the merge of block b asks first, then the write is noted
        assert not g.wrote_in(b * BS, (b + 1) * BS)
        g.note_written(b * BS + 5, b * BS + 50, BS)
        assert g.wrote_in(b * BS, (b + 1) * BS)
        asked += 2
    assert settles == 0, f"{settles} passes over every range for {asked} questions"
    # the same answers as the merged ranges give
    noted_blocks = {b for b in blocks[:PENDING_EXACT + 500]}
    for b in rnd.sample(range(3 * PENDING_EXACT), 200):
        assert g.wrote_in(b * BS, (b + 1) * BS) == (b in noted_blocks)
    assert g.wrote_in(blocks[0] * BS + 150, blocks[0] * BS + 151)  # (exact: merges)
    assert not g.wrote_in(blocks[0] * BS + 300, blocks[0] * BS + 400)
