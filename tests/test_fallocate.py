"""fallocate(2) and SEEK_DATA/SEEK_HOLE through a real default-mode (direct I/O) mount.

- mode 0 and KEEP_SIZE reserve UNWRITTEN blocks charged to the caller's principal,
  refused up front (EDQUOT, ENOSPC) with nothing changed;
- PUNCH_HOLE and ZERO_RANGE zero what they cover, free (or replace) whole blocks with
  truncate's fencing: a direct client's grant is revoked before a freed block can be
  reused, and no read through it ever returns another file's data;
- the crash rules hold: what was fsync'd after a punch or a zero comes back exactly
  after `kill -9`, and fsck finds the volume clean;
- SEEK_DATA/SEEK_HOLE answer from the extent map (unwritten blocks are holes), so
  `cp --sparse=always` keeps a sparse file sparse.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from conftest import SLUICE, REPO, make_volume, sluice
from kernelshim.client import Client
from kernelshim.errors import GrantRevoked
from test_grants import Hammer, _fill, assert_reused, dev_blocks, extents, small, wait_free  # noqa: F401
from test_principals import entry, usage

pytestmark = pytest.mark.mounted

BS = 4096
MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate knows mode 0 only)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def run_as_principal(mnt: Path, principal: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SLUICE, "run", str(mnt), "--principal", principal, "--", *cmd],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // BS


# -- reserving: mode 0 and KEEP_SIZE ------------------------------------------------------

def test_fallocate_l_reserves_unwritten_blocks_charged_to_the_principal(mnt: Path) -> None:
    sluice("principal", "add", str(mnt), "a", "--space", "8M")
    (mnt / "d").mkdir()
    before = usage(mnt)["a"][0]
    r = run_as_principal(mnt, "a", "fallocate", "-l", "4M", str(mnt / "d" / "f"))
    assert r.returncode == 0, r.stderr
    f = mnt / "d" / "f"
    assert f.stat().st_size == 4 * MiB
    assert blocks(f) == 4 * MiB // BS
    assert usage(mnt)["a"][0] - before == 4 * MiB + entry("f")
    assert f.read_bytes() == bytes(4 * MiB)  # unwritten blocks read as zeros
    fd = os.open(f, os.O_RDONLY)
    try:  # unwritten is a hole for SEEK_DATA/SEEK_HOLE
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)
    # Writing into the reservation costs nothing more.
    r = run_as_principal(mnt, "a", "dd", "if=/dev/urandom", f"of={f}", "bs=1M", "count=4",
                         "conv=notrunc,fsync", "status=none")
    assert r.returncode == 0, r.stderr
    assert usage(mnt)["a"][0] - before == 4 * MiB + entry("f")
    assert blocks(f) == 4 * MiB // BS


def test_fallocate_over_the_bank_is_edquot_up_front_and_changes_nothing(mnt: Path) -> None:
    sluice("principal", "add", str(mnt), "a", "--space", "2M")
    (mnt / "d").mkdir()
    f = mnt / "d" / "f"
    f.write_bytes(b"x" * 1000)
    os.chmod(f, 0o666)
    before = usage(mnt)["a"]
    r = run_as_principal(mnt, "a", "fallocate", "-l", "4M", str(f))
    assert r.returncode != 0
    assert "Disk quota exceeded" in r.stderr, r.stderr
    assert f.stat().st_size == 1000 and f.read_bytes() == b"x" * 1000
    assert blocks(f) == 1
    assert usage(mnt)["a"] == before
    # Within the bank it works, charged to a.
    r = run_as_principal(mnt, "a", "fallocate", "-n", "-o", "0", "-l", "1M", str(f))
    assert r.returncode == 0, r.stderr


def test_fallocate_past_the_device_is_enospc_up_front(tmp_path: Path, mount_factory) -> None:
    m = mount_factory(make_volume(tmp_path / "v", "8M"))
    f = m.path / "f"
    f.write_bytes(b"y" * 5000)
    free = os.statvfs(m.path).f_bavail
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.posix_fallocate(fd, 0, (free + 10) * BS)
        assert ei.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == 5000
        assert os.statvfs(m.path).f_bavail == free
        os.posix_fallocate(fd, 0, (free - 1) * BS)  # what fits is granted
        assert os.statvfs(m.path).f_bavail == 3  # the file held 2 blocks already
        # Writing into the reservation never fails for space.
        os.pwrite(fd, b"z" * ((free - 1) * BS - 5000), 5000)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"y" * 5000 + b"z" * ((free - 1) * BS - 5000)


def test_keep_size_reserves_while_open_and_is_given_back_at_the_last_close(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"a" * 100)
    free0 = os.statvfs(mnt).f_bavail
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 * MiB)
        assert os.fstat(fd).st_size == 100
        assert os.fstat(fd).st_blocks * 512 == 1 * MiB
        assert os.statvfs(mnt).f_bavail == free0 - (MiB // BS - 1)
        os.pwrite(fd, b"b" * 5000, 200)  # into the reservation
        assert os.fstat(fd).st_size == 5200
        assert os.pread(fd, 5300, 0) == b"a" * 100 + bytes(100) + b"b" * 5000
    finally:
        os.close(fd)
    # The unwritten blocks past the end go back (see FileSystem._trim_preallocation).
    assert os.stat(f).st_blocks * 512 == 2 * BS
    r = sluice("fsck", str(mnt), check=False)  # a mounted volume: fsck refuses
    assert r.returncode != 0


def test_unsupported_modes_are_eopnotsupp(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"q" * (4 * BS))
    fd = os.open(f, os.O_RDWR)
    try:
        for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
            with pytest.raises(OSError) as ei:
                fallocate(fd, mode, 0, BS)
            assert ei.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as ei:  # the kernel: PUNCH_HOLE needs KEEP_SIZE
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, BS)
        assert ei.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as ei:
            fallocate(fd, 0, 0, 0)
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    ro = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            fallocate(ro, 0, 0, BS)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(ro)
    assert f.read_bytes() == b"q" * (4 * BS)


# -- punching and zeroing -------------------------------------------------------------------

def test_punch_hole_zeroes_frees_and_refunds(mnt: Path, tmp_path: Path) -> None:
    sluice("principal", "add", str(mnt), "a", "--space", "64M")
    (mnt / "d").mkdir()
    f = mnt / "d" / "f"
    data = os.urandom(MiB)
    (tmp_path / "src").write_bytes(data)
    r = run_as_principal(mnt, "a", "cp", str(tmp_path / "src"), str(f))
    assert r.returncode == 0, r.stderr
    used = usage(mnt)["a"][0]
    assert used == MiB + entry("f")
    # 100 bytes into block 1 up to 100 bytes into block 65: blocks 2..64 are freed whole.
    lo, n = BS + 100, 64 * BS
    r = subprocess.run(["fallocate", "-p", "-o", str(lo), "-l", str(n), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = data[:lo] + bytes(n) + data[lo + n:]
    assert f.read_bytes() == want
    assert f.stat().st_size == MiB
    assert blocks(f) == MiB // BS - 63
    assert usage(mnt)["a"][0] == used - 63 * BS  # refunded to the principal that paid
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 * BS
        assert os.lseek(fd, 2 * BS, os.SEEK_DATA) == 65 * BS
        assert os.lseek(fd, BS + 7, os.SEEK_DATA) == BS + 7
    finally:
        os.close(fd)


def test_punch_hole_frees_reserved_blocks_too(mnt: Path) -> None:
    """Probe 16, F4: a hole punched over fallocated, never written blocks freed
    nothing (st_blocks and the principal's charge stayed until truncate or unlink);
    ext4 gives them back, and so does sluice now. A punch over a mix of written and
    reserved blocks frees both; ZERO_RANGE keeps them (test below)."""
    sluice("principal", "add", str(mnt), "a", "--space", "64M")
    (mnt / "d").mkdir()
    f = mnt / "d" / "f"
    r = run_as_principal(mnt, "a", "fallocate", "-l", "8M", str(f))
    assert r.returncode == 0, r.stderr
    used = usage(mnt)["a"][0]
    assert used == 8 * MiB + entry("f") and blocks(f) == 8 * MiB // BS
    r = run_as_principal(mnt, "a", "dd", "if=/dev/urandom", f"of={f}", "bs=1M", "count=1",
                         "seek=2", "conv=notrunc,fsync", "status=none")
    assert r.returncode == 0, r.stderr
    data = f.read_bytes()
    # blocks 0..767 punched: 1 MiB written (blocks 512..767) and 2 MiB reserved
    r = subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(3 * MiB), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f.stat().st_size == 8 * MiB
    assert blocks(f) == 5 * MiB // BS
    assert usage(mnt)["a"][0] == used - 3 * MiB
    assert f.read_bytes() == bytes(3 * MiB) + data[3 * MiB:]
    # the space is the principal's again: 58 MiB more fit in its 64 MiB bank
    r = run_as_principal(mnt, "a", "fallocate", "-o", str(8 * MiB), "-l", str(58 * MiB),
                         str(f))
    assert r.returncode == 0, r.stderr


def test_zero_range_keeps_the_blocks_and_grows_the_file(mnt: Path) -> None:
    f = mnt / "f"
    data = os.urandom(40 * BS)
    f.write_bytes(data)
    free0 = os.statvfs(mnt).f_bavail
    r = subprocess.run(["fallocate", "-z", "-o", str(3 * BS - 10), "-l", str(30 * BS),
                        str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lo, hi = 3 * BS - 10, 33 * BS - 10
    assert f.read_bytes() == data[:lo] + bytes(hi - lo) + data[hi:]
    assert blocks(f) == 40
    fd = os.open(f, os.O_RDONLY)
    try:  # the replaced blocks are unwritten: holes to SEEK_HOLE
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 3 * BS
        assert os.lseek(fd, 3 * BS, os.SEEK_DATA) == 32 * BS
    finally:
        os.close(fd)
    # Past the end without -n: the file grows over zeros, the new blocks are charged.
    r = subprocess.run(["fallocate", "-z", "-o", str(40 * BS), "-l", str(10 * BS), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f.stat().st_size == 50 * BS
    assert f.read_bytes()[40 * BS:] == bytes(10 * BS)
    assert blocks(f) == 50
    wait_free(mnt, free0 - 10)  # the replaced blocks come back after the commit


def test_punch_hole_fences_a_direct_client_before_reuse(small) -> None:  # noqa: F811
    """As truncate (tests/test_grants.py): a client reading F as fast as it can while F is
    punched whole; its grant is revoked, the freed blocks go to B, and no read through
    the old grant ever returned anything but F's old data."""
    mnt = small.path
    _fill(mnt)
    f_blocks = dev_blocks(extents(small.volume, os.stat(mnt / "F").st_ino))
    with Client.connect(mnt) as a:
        fa = a.open("F", "r")
        hammer = Hammer(mnt)
        hammer.start()
        assert hammer.first.wait(10)
        try:
            r = subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(64 * BS),
                                str(mnt / "F")], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            wait_free(mnt, 64)
            with open(mnt / "B", "wb") as fb:
                fb.write(b"B" * (64 * BS))
                os.fsync(fb.fileno())
        finally:
            hammer.finish()
        assert_reused(dev_blocks(extents(small.volume, os.stat(mnt / "B").st_ino)), f_blocks)
        assert hammer.results and all(r == b"A" * (64 * BS) for r in hammer.results)
        assert isinstance(hammer.error, GrantRevoked), hammer.error
        with pytest.raises(GrantRevoked):
            fa.pread(10, 0)
        with a.open("F") as again:
            assert again.read() == bytes(64 * BS)  # size kept, all hole
    assert (mnt / "F").stat().st_size == 64 * BS and blocks(mnt / "F") == 0


def test_zero_range_revokes_direct_grants(mnt: Path) -> None:
    (mnt / "F").write_bytes(b"A" * (16 * BS))
    with Client.connect(mnt) as a:
        fa = a.open("F", "r")
        assert fa.pread(10, 0) == b"A" * 10
        r = subprocess.run(["fallocate", "-z", "-o", str(BS), "-l", str(8 * BS),
                            str(mnt / "F")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with pytest.raises(GrantRevoked):
            fa.pread(10, 0)
        with a.open("F") as again:
            assert again.read() == b"A" * BS + bytes(8 * BS) + b"A" * (7 * BS)


def test_punch_and_zero_reach_shared_mappings(mnt: Path) -> None:
    """The kernel drops its cached pages of the range: a mapping sees the zeros."""
    f = mnt / "f"
    f.write_bytes(b"m" * (8 * BS))
    fd = os.open(f, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 8 * BS, mmap.MAP_SHARED)
        assert m[:] == b"m" * (8 * BS)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BS, 2 * BS)
        assert m[BS:3 * BS] == bytes(2 * BS) and m[:BS] == b"m" * BS
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 5 * BS + 1, 10)
        assert m[5 * BS:5 * BS + 12] == b"m" + bytes(10) + b"m"
        m.close()
    finally:
        os.close(fd)


# -- crash rules ----------------------------------------------------------------------------

def test_fsyncd_punch_and_zero_survive_kill_9(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    f = m.path / "f"
    data = bytearray(os.urandom(64 * BS))
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * BS + 3, 10 * BS)
    data[5 * BS + 3:15 * BS + 3] = bytes(10 * BS)
    fallocate(fd, FALLOC_FL_ZERO_RANGE, 30 * BS, 70 * BS)  # grows the file too
    data[30 * BS:] = bytes(34 * BS)
    data += bytes(36 * BS)
    os.posix_fallocate(fd, 120 * BS, 8 * BS)
    data += bytes(28 * BS)
    os.fsync(fd)
    os.close(fd)
    m.kill()
    m.stop()
    m.start()
    assert f.read_bytes() == bytes(data)
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_zero_range_keep_size_past_eof_saves_its_extents(volume: Path, mount_factory) -> None:
    """A ZERO_RANGE|KEEP_SIZE wholly past the end allocates only holes: the extents it
    made are saved with the block count (found by fsx seed 9302: fsck said "records 31
    blocks, its extents hold 14" after a clean unmount, and a crash brought st_blocks
    back wrong)."""
    m = mount_factory(volume)
    f = m.path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"a" * 55610, 0)
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 60920, 65111)
    os.ftruncate(fd, 131072)
    os.fsync(fd)
    want_blocks = os.fstat(fd).st_blocks
    os.close(fd)
    m.kill()
    m.stop()
    m.start()
    assert f.read_bytes() == b"a" * 55610 + bytes(131072 - 55610)
    assert os.stat(f).st_blocks == want_blocks
    m.stop()
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fsck_of_a_killed_daemons_volume_notes_an_open_reservation(volume: Path,
                                                                   mount_factory) -> None:
    """A KEEP_SIZE reservation of a file open when the daemon was killed lies past the
    end of the file: the state a crash leaves, which the next mount drops. fsck before
    that mount says so as a note (exit 0); on a cleanly unmounted volume it would be an
    error."""
    m = mount_factory(volume)
    f = m.path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * BS)
    fallocate(fd, FALLOC_FL_KEEP_SIZE, BS, 8 * BS)
    os.fsync(fd)
    m.kill()
    os.close(fd)
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: 8 unwritten blocks" in r.stdout and "next mount drops them" in r.stdout, \
        r.stdout
    m.start()
    assert f.read_bytes() == b"x" * BS
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and "unwritten" not in r.stdout, r.stdout + r.stderr


# -- SEEK_DATA / SEEK_HOLE ---------------------------------------------------------------------

def test_seek_hole_on_a_sparse_file_and_cp_keeps_it_sparse(mnt: Path) -> None:
    f = mnt / "sparse"
    with open(f, "wb") as fh:
        fh.seek(MiB)
        fh.write(b"D" * BS)          # data at 1 MiB
        fh.seek(3 * MiB)
        fh.write(b"E" * 10)          # data at 3 MiB, partial last block
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + BS
        assert os.lseek(fd, MiB + BS, os.SEEK_DATA) == 3 * MiB
        assert os.lseek(fd, 3 * MiB + 5, os.SEEK_HOLE) == 3 * MiB + 10  # EOF is a hole
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            with pytest.raises(OSError) as ei:
                os.lseek(fd, 3 * MiB + 10, whence)
            assert ei.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = mnt / "copy"
    r = subprocess.run(["cp", "--sparse=always", str(f), str(copy)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert copy.read_bytes() == f.read_bytes()
    assert blocks(copy) == 2
