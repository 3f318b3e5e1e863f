"""Hostile probe 13 (stop 24): durability in the configurations the crash harness
exercises least. Component tests of the crash cleanup's list of discardable files
(docs/dev/invariants.md, crash rule 4 / R7), and the unmount's exit status.

- F1: a read-only mount served the files the list names as committed (their blocks
  never had the data: zeros, or a kept block's previous owner's bytes). They now read
  as empty, size 0, through the mount and the direct path, without writing anything.
- F2: `remount -o rw` ran the cleanup with the timer commit running: a commit in the
  middle saved a list of only the file being emptied, and a crash then left the others
  whole-sized, unmarked and holding what their blocks held.
- F3: `sluice umount` of a mount whose daemon died before saving said nothing, exit 0.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import sluice
from fs import volume
from fs.commit import UNFLUSHED_KEY
from fs.filesystem import FileSystem
from fs.metadata import Metadata
from fs.service import DirectService
from kernelshim import Kernel
from test_filesystem import BS, CALLER, fill, read_file, write_file


async def _volume_with_listed_files(path: Path, n: int) -> list[int]:
    """A volume whose last commit lists `n` files of data as not on the device."""
    volume.mkfs(path, size=256 * BS)
    kernel = Kernel.open(path, cache_bytes=64 * BS)
    md = Metadata(path / volume.DB)
    fs = await FileSystem.load(md, kernel)
    inos = [await write_file(fs, b"c%d" % i, fill(i, 3 * BS)) for i in range(n)]
    await fs.sync()
    md.set_meta(UNFLUSHED_KEY, json.dumps(inos))  # as a crash would find it
    md.close()
    kernel.close()
    return inos


async def _open(path: Path, *, read_only: bool) -> FileSystem:
    kernel = Kernel.open(path, cache_bytes=64 * BS)
    md = Metadata(path / volume.DB, read_only=read_only)
    return await FileSystem.load(md, kernel, read_only=read_only)


async def _close(fs: FileSystem) -> None:
    if fs.read_only is None:
        await fs.sync()
    fs.md.close()
    fs.kernel.close()


async def test_a_read_only_mount_serves_listed_files_empty(tmp_path: Path) -> None:
    """F1: what the recovery would leave (empty), in memory only: the mount's reads and
    getattr, and the direct path's size and stat, all say empty; nothing is written."""
    inos = await _volume_with_listed_files(tmp_path / "vol", 2)
    before = (tmp_path / "vol" / volume.DB).read_bytes()
    fs = await _open(tmp_path / "vol", read_only=True)
    service = DirectService(fs)
    try:
        for ino in inos:
            assert ino in fs.discarded
            assert await read_file(fs, ino) == b""
            assert fs.getxattr(ino, b"user.sluice.discarded") == b"1"  # (not stored)
            assert b"user.sluice.discarded" in fs.listxattr(ino)
            g = fs.grant_direct(fs.inode(ino), True, False, CALLER)
            try:
                assert service.size_of(g) == 0 and service.stat_of(g)["size"] == 0
                assert service.stat_of(g)["blocks"] == 0
            finally:
                fs.kernel.release(g)
    finally:
        await _close(fs)
    assert (tmp_path / "vol" / volume.DB).read_bytes() == before
    # the read-write mount empties and marks them, as before
    fs = await _open(tmp_path / "vol", read_only=False)
    try:
        for ino in inos:
            assert fs.inode(ino).size == 0 and ino not in fs.discarded
            assert fs.getxattr(ino, b"user.sluice.discarded") == b"1"
    finally:
        await _close(fs)


async def test_a_commit_during_the_remounts_cleanup_keeps_the_files_not_yet_emptied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F2: mounted read-only, then read-write: the cleanup empties the listed files
    one by one with the timer commit running. A commit after the first one must still
    list the others (a crash then empties them at the next mount), and they read as
    empty meanwhile."""
    inos = await _volume_with_listed_files(tmp_path / "vol", 3)
    fs = await _open(tmp_path / "vol", read_only=True)
    saved: list[list[int]] = []
    empty = FileSystem._empty_locked

    async def empty_then_commit(self: FileSystem, node, *, mark: bool) -> None:
        await empty(self, node, mark=mark)
        self._save_unflushed()  # a timer commit between two files
        saved.append(json.loads(self.md.meta(UNFLUSHED_KEY)))
        assert all(i in self.discarded for i in inos if i > node.id)
    monkeypatch.setattr(FileSystem, "_empty_locked", empty_then_commit)
    try:
        await fs.set_writable()
    finally:
        await _close(fs)
    assert saved[0] == inos[1:] and saved[1] == inos[2:], saved




@pytest.mark.mounted
def test_umount_of_a_mount_whose_daemon_died_says_so(volume: Path, mount_factory) -> None:
    """F3: the daemon killed before the unmount (a dead mount): `sluice umount` removes
    the dead mount and says, exit 1, that what the daemon had not committed is lost
    and the next mount recovers the volume — not exit 0 as for a clean unmount."""
    m = mount_factory(volume)
    (m.path / "f").write_bytes(b"not fsync'd")
    m.kill()
    r = sluice("umount", str(m.path), check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "died" in lines[0] and "next mount" in lines[0], r.stderr
    from conftest import is_mounted
    assert not is_mounted(m.path)
    # a clean unmount still says nothing, exit 0; so does one of a read-only mount of
    # the crashed volume (which leaves the dead daemon's mount.json in place)
    for extra in (["--read-only"], []):
        m.start(*extra)
        r = sluice("umount", str(m.path), check=False)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
        assert m.proc is not None and m.proc.wait(timeout=60) == 0
