"""Silent corruption of the backing store: a flipped byte in device.img must surface as
EIO on exactly the affected range (never as wrong data), leave other files and the
daemon unharmed, be named in the daemon's log, and be reported by fsck --verify-data.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import sluice

pytestmark = pytest.mark.mounted

BS = 4096


def device_block(volume: Path, ino: int, file_block: int) -> int:
    """The device block holding `file_block` of inode `ino`, from the extents table."""
    con = sqlite3.connect(f"file:{volume / 'meta.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT file_block, dev_block, count, state FROM extents "
                           "WHERE inode = ? AND file_block <= ? ORDER BY file_block DESC "
                           "LIMIT 1", (ino, file_block)).fetchall()
    finally:
        con.close()
    assert rows, f"inode {ino} has no extent at file block {file_block}"
    fb, dev, count, state = rows[0]
    assert fb <= file_block < fb + count and state == 1, rows
    return dev + file_block - fb


def flip_byte(volume: Path, dev_block: int, offset: int = 100) -> None:
    fd = os.open(volume / "device.img", os.O_RDWR)
    try:
        pos = dev_block * BS + offset
        (b,) = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b ^ 0x5A]), pos)
    finally:
        os.close(fd)


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def assert_eio(fn, *args) -> None:
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == errno.EIO, ei.value


@pytest.fixture
def corrupted(volume: Path, mount_factory):
    """Three files written and unmounted; then one byte of block 2 of `victim` flipped.
    Returns (volume, contents by name, the flipped device block)."""
    m = mount_factory(volume, name="first")
    contents = {"victim": os.urandom(8 * BS), "neighbour": os.urandom(8 * BS),
                "small": b"tiny\n"}
    for name, data in contents.items():
        (m.path / name).write_bytes(data)
    ino = os.stat(m.path / "victim").st_ino
    m.stop()
    dev = device_block(volume, ino, 2)
    flip_byte(volume, dev)
    return volume, contents, dev


def test_flipped_byte_reads_as_eio(corrupted, mount_factory) -> None:
    volume, contents, dev = corrupted
    m = mount_factory(volume)
    victim = m.path / "victim"
    # The whole file, and any range touching block 2, fails: never wrong data.
    assert_eio(victim.read_bytes)
    assert_eio(pread, victim, 2 * BS + 100, 1)
    assert_eio(pread, victim, BS, 3 * BS)
    # The blocks around it are fine.
    assert pread(victim, 0, 2 * BS) == contents["victim"][:2 * BS]
    assert pread(victim, 3 * BS, 5 * BS) == contents["victim"][3 * BS:]
    # Other files read fine and the daemon is alive.
    assert (m.path / "neighbour").read_bytes() == contents["neighbour"]
    assert (m.path / "small").read_bytes() == b"tiny\n"
    assert m.daemon_alive
    # Metadata operations on the damaged file still work.
    assert victim.stat().st_size == 8 * BS
    # The daemon's log names the block (and no traceback: it is an expected failure).
    log = m.log.read_text()
    assert f"checksum mismatch in device block {dev}" in log, log[-2000:]
    assert "Traceback" not in log
    # A partial write into the damaged block needs its old contents: EIO as well.
    fd = os.open(victim, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"patch", 2 * BS + 10)
        assert ei.value.errno == errno.EIO
        # Overwriting the whole block replaces the damaged data: the file heals.
        fresh = os.urandom(BS)
        assert os.pwrite(fd, fresh, 2 * BS) == BS
    finally:
        os.close(fd)
    want = contents["victim"][:2 * BS] + fresh + contents["victim"][3 * BS:]
    assert victim.read_bytes() == want
    m.stop()
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode == 0 and ", 0 bad" in r.stdout, r.stdout


def test_fsck_verify_data_reports_mismatch(corrupted) -> None:
    volume, _, dev = corrupted
    # Without --verify-data fsck checks metadata only: the volume is consistent.
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"checksum mismatch in device block {dev}" in r.stdout
    assert "1 bad" in r.stdout
    assert r.stdout.strip().endswith("1 error found"), r.stdout
    assert "Traceback" not in r.stderr


def test_corruption_detected_while_mounted(volume: Path, mount_factory) -> None:
    """With a tiny pager cache the file's first blocks are evicted: a flip made while
    mounted is caught on the next read from the device."""
    m = mount_factory(volume, "--cache-size", "64K")
    data = os.urandom(1 << 20)
    path = m.path / "big"
    path.write_bytes(data)
    other = m.path / "other"
    other.write_bytes(b"unrelated\n")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # commits the extents to meta.db
    os.close(fd)
    dev = device_block(volume, os.stat(path).st_ino, 0)
    flip_byte(volume, dev, offset=4000)
    assert_eio(pread, path, 0, BS)
    assert_eio(pread, path, 3999, 2)
    assert pread(path, BS, BS) == data[BS:2 * BS]
    assert pread(path, len(data) - 10, 100) == data[-10:]
    assert other.read_bytes() == b"unrelated\n"
    assert m.daemon_alive
    assert f"checksum mismatch in device block {dev}" in m.log.read_text()
