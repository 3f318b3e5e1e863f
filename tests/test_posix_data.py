"""POSIX data semantics on a mounted sluice volume: files unlinked while open, sparse
files and holes (honest st_blocks), truncate up and down, O_APPEND from several
descriptors, files past 4 GiB, statfs, and a full device (ENOSPC, recovery, fsck)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest

from conftest import make_volume, sluice
from posix_util import raises_errno, wait_for

pytestmark = pytest.mark.mounted

BS = 4096
MiB = 1 << 20
GiB = 1 << 30


def _blocks(p: Path | int) -> int:
    """Allocated bytes / 512 (st_blocks)."""
    st = os.fstat(p) if isinstance(p, int) else os.stat(p)
    return st.st_blocks


def _bfree(p: Path) -> int:
    return os.statvfs(p).f_bavail


# -- unlinked while open ----------------------------------------------------------------------

def test_unlinked_open_file_lives_until_close(mnt: Path) -> None:
    f = mnt / "doomed"
    payload = os.urandom(8 * MiB)
    f.write_bytes(payload)
    os.sync()
    free_with_file = _bfree(mnt)
    fd = os.open(f, os.O_RDWR)
    fd2 = os.open(f, os.O_RDONLY)
    try:
        os.unlink(f)
        assert os.listdir(mnt) == []
        with raises_errno(errno.ENOENT):
            os.stat(f)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 8 * MiB
        # Still readable and writable through the descriptors.
        assert os.pread(fd, 8 * MiB, 0) == payload
        assert os.pwrite(fd, b"still here", 4 * MiB) == 10
        assert os.pread(fd2, 10, 4 * MiB) == b"still here"
        os.ftruncate(fd, 12 * MiB)
        assert os.fstat(fd2).st_size == 12 * MiB
        assert os.pread(fd2, 16, 12 * MiB - 16) == bytes(16)
        # A new file by the same name is a different file.
        f.write_bytes(b"new")
        assert os.stat(f).st_ino != st.st_ino
        assert os.pread(fd2, 3, 0) == payload[:3]
        os.unlink(f)
        # The space is held while a descriptor is open.
        os.close(fd)
        fd = -1
        assert _bfree(mnt) <= free_with_file + 16
        assert os.pread(fd2, 10, 4 * MiB) == b"still here"
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(fd2)
    # ...and given back after the last close (once the freeing transaction commits).
    assert wait_for(lambda: _bfree(mnt) >= free_with_file + 8 * MiB // BS, timeout=15), \
        (free_with_file, _bfree(mnt))


def test_rename_over_open_file_frees_after_close(mnt: Path) -> None:
    (mnt / "old").write_bytes(os.urandom(4 * MiB))
    (mnt / "new").write_bytes(b"replacement")
    fd = os.open(mnt / "old", os.O_RDONLY)
    try:
        os.rename(mnt / "new", mnt / "old")
        assert os.fstat(fd).st_nlink == 0
        assert len(os.pread(fd, 8 * MiB, 0)) == 4 * MiB
        os.sync()
        held = _bfree(mnt)
    finally:
        os.close(fd)
    assert wait_for(lambda: _bfree(mnt) >= held + 4 * MiB // BS, timeout=15)
    assert (mnt / "old").read_bytes() == b"replacement"


# -- sparse files and truncate --------------------------------------------------------------------

def test_sparse_file_holes_read_as_zeros_and_are_not_allocated(mnt: Path) -> None:
    f = mnt / "sparse"
    with open(f, "wb") as fh:
        fh.seek(GiB)
        fh.write(b"end")
    st = os.stat(f)
    assert st.st_size == GiB + 3
    assert st.st_blocks == BS // 512  # one block: only what was written
    with open(f, "rb") as fh:
        assert fh.read(MiB) == bytes(MiB)
        fh.seek(GiB - MiB)
        assert fh.read(MiB + 10) == bytes(MiB) + b"end"
        fh.seek(GiB // 2 + 12345)
        assert fh.read(100_000) == bytes(100_000)
    # Filling part of a hole allocates only the blocks touched; the rest stays zeros.
    with open(f, "r+b") as fh:
        fh.seek(10 * BS + 100)
        fh.write(b"middle")
    assert _blocks(f) == 2 * BS // 512
    with open(f, "rb") as fh:
        fh.seek(10 * BS)
        assert fh.read(BS) == bytes(100) + b"middle" + bytes(BS - 106)
    # A write at an unaligned offset in a fresh file: the bytes before it read as zeros.
    g = mnt / "offset"
    fd = os.open(g, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"x" * 10, 1000)
    finally:
        os.close(fd)
    assert g.read_bytes() == bytes(1000) + b"x" * 10
    assert _blocks(g) == BS // 512


def test_no_stale_data_in_new_blocks(tmp_path: Path, mount_factory) -> None:
    """Blocks freed by one file and reused by another never show the old contents. On a
    small volume nearly filled by the old file, the new file must reuse its blocks."""
    mp = mount_factory(make_volume(tmp_path / "small", "64M")).path
    free0 = _bfree(mp)
    junk_blocks = free0 - 64
    with open(mp / "junk", "wb") as fh:
        for _ in range(junk_blocks // 256):
            fh.write(b"\xaa" * (256 * BS))
    os.unlink(mp / "junk")
    assert wait_for(lambda: _bfree(mp) >= free0 - 8, timeout=15)
    f = mp / "fresh"
    group = 64 * BS
    size = (junk_blocks // 64) * group
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # Each write covers a 64-block group but its first and last 100 bytes: every
        # block is allocated, the two edge blocks only partly written.
        for off in range(0, size, group):
            os.pwrite(fd, b"E" * (group - 200), off + 100)
        assert _bfree(mp) < 128  # the junk's blocks were all reused
        os.ftruncate(fd, size)  # (the last write ends 100 bytes short)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    assert len(data) == size
    assert b"\xaa" not in data
    for off in range(0, size, group):
        assert data[off:off + 100] == bytes(100)
        assert data[off + group - 100:off + group] == bytes(100)
    assert data.count(b"E") == (size // group) * (group - 200)


def test_truncate_up_and_down(mnt: Path) -> None:
    f = mnt / "t"
    f.write_bytes(b"A" * 10_000)
    assert _blocks(f) == 3 * BS // 512
    # Up: the size grows, no blocks are allocated, the new part reads as zeros.
    os.truncate(f, 100 * MiB)
    assert os.stat(f).st_size == 100 * MiB
    assert _blocks(f) == 3 * BS // 512
    with open(f, "rb") as fh:
        assert fh.read(10_000) == b"A" * 10_000
        assert fh.read(1_000_000) == bytes(1_000_000)
        fh.seek(100 * MiB - 10)
        assert fh.read(100) == bytes(10)
    # Down to an unaligned size inside a block, then up again: the old bytes are gone.
    os.truncate(f, 5000)
    assert os.stat(f).st_size == 5000
    assert _blocks(f) == 2 * BS // 512
    os.truncate(f, 20_000)
    assert f.read_bytes() == b"A" * 5000 + bytes(15_000)
    # The same through an open descriptor, with writes after the end.
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        assert os.pread(fd, 100, 0) == b"AAA"
        os.pwrite(fd, b"Z", 9000)
        assert os.pread(fd, 10_000, 0) == b"AAA" + bytes(8997) + b"Z"
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0 and _blocks(fd) == 0
        assert os.pread(fd, 100, 0) == b""
        os.ftruncate(fd, 8192)
        assert os.pread(fd, 10_000, 0) == bytes(8192)
        assert _blocks(fd) == 0
    finally:
        os.close(fd)
    with raises_errno(errno.EINVAL):
        os.truncate(f, -1)
    with raises_errno(errno.EISDIR):
        os.truncate(mnt, 0)
    # O_TRUNC empties the file.
    f.write_bytes(b"B" * 50_000)
    assert os.stat(f).st_size == 50_000
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    assert os.stat(f).st_size == 0 and _blocks(f) == 0


def test_reads_at_and_past_eof(mnt: Path) -> None:
    f = mnt / "short"
    f.write_bytes(b"0123456789")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 5) == b"56789"
        assert os.pread(fd, 100, 10) == b""
        assert os.pread(fd, 100, 1 << 40) == b""
        os.lseek(fd, 0, os.SEEK_END)
        assert os.read(fd, 10) == b""
        assert os.lseek(fd, 0, os.SEEK_CUR) == 10
        with raises_errno(errno.EBADF):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    fd = os.open(f, os.O_WRONLY)
    try:
        with raises_errno(errno.EBADF):
            os.read(fd, 1)
    finally:
        os.close(fd)


# -- O_APPEND ----------------------------------------------------------------------------------

def test_o_append_from_several_descriptors(mnt: Path) -> None:
    f = mnt / "log"
    f.write_bytes(b"head\n")
    a = os.open(f, os.O_WRONLY | os.O_APPEND)
    b = os.open(f, os.O_RDWR | os.O_APPEND)
    plain = os.open(f, os.O_WRONLY)
    try:
        os.write(a, b"a1\n")
        os.write(b, b"b1\n")
        os.write(a, b"a2\n")
        # A plain descriptor writes at its own offset (0) ...
        os.write(plain, b"H")
        # ... and an O_APPEND one appends regardless of lseek or pwrite's offset.
        os.lseek(b, 0, os.SEEK_SET)
        os.write(b, b"b2\n")
        assert os.lseek(b, 0, os.SEEK_CUR) == os.fstat(b).st_size
        os.pwrite(a, b"a3\n", 0)  # Linux: pwrite on O_APPEND appends
        # Another file's extension is seen by the next append.
        os.truncate(f, os.stat(f).st_size + 2)
        os.write(b, b"b3\n")
    finally:
        for fd in (a, b, plain):
            os.close(fd)
    assert f.read_bytes() == b"Head\na1\nb1\na2\nb2\na3\n\0\0b3\n"


def test_o_append_concurrent_writers_lose_nothing(mnt: Path) -> None:
    f = mnt / "shared-log"
    f.write_bytes(b"")
    writers, lines = 4, 300

    def writer(k: int) -> None:
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(lines):
                os.write(fd, f"writer {k} line {i:04d} {'x' * (k * 7)}\n".encode())
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = f.read_bytes().decode().splitlines()
    assert len(got) == writers * lines
    expect = {f"writer {k} line {i:04d} {'x' * (k * 7)}" for k in range(writers)
              for i in range(lines)}
    assert set(got) == expect  # every line whole: no write overwrote another
    for k in range(writers):
        mine = [ln for ln in got if ln.startswith(f"writer {k} ")]
        assert mine == sorted(mine)  # each writer's lines in its order


# -- large files --------------------------------------------------------------------------------

def test_file_past_4_gib(mnt: Path) -> None:
    f = mnt / "huge"
    off = 5 * GiB
    tail = os.urandom(3 * BS + 17)
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"start", 0) == 5
        assert os.pwrite(fd, b"across-4GiB", 4 * GiB - 5) == 11
        assert os.pwrite(fd, tail, off) == len(tail)
        st = os.fstat(fd)
        assert st.st_size == off + len(tail)
        assert st.st_blocks == (1 + 2 + 4) * BS // 512
        assert os.pread(fd, len(tail), off) == tail
        assert os.pread(fd, 11, 4 * GiB - 5) == b"across-4GiB"
        assert os.pread(fd, 1000, 4 * GiB + 100) == bytes(1000)
        assert os.pread(fd, 100, off - 50)[:50] == bytes(50)
        os.lseek(fd, 0, os.SEEK_END)
        assert os.lseek(fd, 0, os.SEEK_CUR) == off + len(tail)
        os.ftruncate(fd, 4 * GiB + 3)
        assert os.fstat(fd).st_size == 4 * GiB + 3
        assert os.pread(fd, 100, 4 * GiB - 5) == b"across-4"
    finally:
        os.close(fd)
    assert os.stat(f).st_size == 4 * GiB + 3
    with open(f, "rb") as fh:
        assert fh.read(5) == b"start"


# -- statfs and a full device -------------------------------------------------------------------

def test_statfs(mnt: Path) -> None:
    s = os.statvfs(mnt)
    assert s.f_bsize == BS and s.f_frsize == BS
    assert s.f_blocks == 8 * GiB // BS  # the volume's size
    assert s.f_namemax == 255
    assert 0 < s.f_bavail < s.f_bfree <= s.f_blocks  # the reserve: free, not available
    assert s.f_files > 0 and 0 < s.f_ffree <= s.f_files
    before = s
    (mnt / "data").write_bytes(os.urandom(10 * MiB))
    for i in range(10):
        (mnt / f"empty{i}").write_bytes(b"")
    os.sync()
    after = os.statvfs(mnt)
    assert before.f_bfree - after.f_bfree == 10 * MiB // BS
    assert before.f_ffree - after.f_ffree == 11
    assert after.f_blocks == before.f_blocks
    # Inside subdirectories too (the same volume).
    os.mkdir(mnt / "sub")
    assert os.statvfs(mnt / "sub").f_blocks == s.f_blocks


def test_full_device_enospc_and_recovery(tmp_path: Path, mount_factory) -> None:
    vol = make_volume(tmp_path / "small", "64M")
    m = mount_factory(vol)
    mp = m.path
    s = os.statvfs(mp)
    assert s.f_blocks == 64 * MiB // BS
    chunk = 4 * MiB
    files: dict[str, str] = {}
    err = None
    for i in range(64):
        name = f"fill{i:02d}"
        data = os.urandom(chunk)
        try:
            with open(mp / name, "wb") as fh:
                fh.write(data)
        except OSError as e:
            err = e
            partial = name
            break
        files[name] = hashlib.sha256(data).hexdigest()
    assert err is not None and err.errno == errno.ENOSPC, err
    assert len(files) >= 10  # ~64 MiB: most of the device was usable
    assert os.statvfs(mp).f_bavail < chunk // BS
    # The partial file holds a prefix of what was written; nothing else is damaged.
    assert os.stat(mp / partial).st_size < chunk
    # Small writes fail with ENOSPC too, and do not change the file.
    fd = os.open(mp / partial, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        while True:  # use up the last few blocks
            try:
                os.write(fd, b"y" * BS)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        size = os.fstat(fd).st_size
        with raises_errno(errno.ENOSPC):
            os.write(fd, b"z" * BS)
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)
    # Creating empty files and directories still works (no blocks needed).
    (mp / "empty").write_bytes(b"")
    os.mkdir(mp / "dir")
    for name, digest in files.items():
        assert hashlib.sha256((mp / name).read_bytes()).hexdigest() == digest, name
    # Freeing space makes writes work again.
    os.unlink(mp / "fill00")
    os.unlink(mp / "fill01")
    del files["fill00"], files["fill01"]
    assert wait_for(lambda: os.statvfs(mp).f_bavail >= 2 * chunk // BS, timeout=15)
    data = os.urandom(chunk)
    (mp / "after").write_bytes(data)
    files["after"] = hashlib.sha256(data).hexdigest()
    assert (mp / "after").read_bytes() == data
    m.stop()
    r = sluice("fsck", str(vol))
    assert "clean" in r.stdout, r.stdout + r.stderr
    # Everything is still there after a remount.
    m2 = mount_factory(vol, name="mnt2")
    for name, digest in files.items():
        assert hashlib.sha256((m2.path / name).read_bytes()).hexdigest() == digest, name
    assert os.stat(m2.path / partial).st_size == size
