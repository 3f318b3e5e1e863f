"""The sixth hostile probe's findings (docs/RELIABILITY.md, "Stop 17: probe 6"), each a
regression test that fails on the code before its fix: real mounts, real programs.

- W1: two writers of one shared file, each writing its own bytes of one block that no
  commit had made written yet: the second writer's partial write merged the block with
  zeros (the merge read the device only for the *same* grant's uncommitted writes), so
  the first writer's acknowledged write was lost — after its commit and fsync returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernelshim.client import Client
from kernelshim.clientcore import PIPE_MIN_SHM

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
