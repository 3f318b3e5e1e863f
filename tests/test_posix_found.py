"""Cases found by the POSIX model test (tests/test_posix_model.py), shrunk to minimal
sequences and kept as plain tests. Each runs the same steps on a sluice mount and on a
plain directory of the host filesystem (ext4) and compares; a case that is a sluice bug
not yet fixed is marked xfail(strict=True) with the reason, so fixing it turns the test
into a failure until the mark is removed (and the model stops steering around it: see
KNOWN_BUGS there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.mounted


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    """A plain directory on the host filesystem, the reference."""
    d = tmp_path / "ref"
    d.mkdir()
    return d


def both(mnt: Path, ref: Path, fn: Callable[[Path], object]) -> object:
    """Run `fn` on the reference and on the mount; both results must agree."""
    want, got = fn(ref), fn(mnt)
    assert got == want, f"sluice gave {got!r}, the host fs gave {want!r}"
    return got


def test_rdonly_trunc_truncates_like_linux(mnt: Path, ref: Path) -> None:
    def scenario(d: Path) -> tuple[int, int]:
        (d / "f").write_bytes(b"x" * 4095)
        fd = os.open(d / "f", os.O_RDONLY | os.O_TRUNC)
        try:
            return os.fstat(fd).st_size, os.stat(d / "f").st_size
        finally:
            os.close(fd)
    assert both(mnt, ref, scenario) == (0, 0)


def test_a_write_across_the_maximum_file_size_is_short(mnt: Path) -> None:
    """Probe 9, F5. As Linux's generic_write_check_limits: a write that starts below
    the maximum file size (2^50 here; ext4's is smaller, so no reference run) and
    crosses it writes up to it; one at the limit or past it fails with EFBIG (before:
    the whole write failed with EFBIG)."""
    import errno
    limit = 1 << 50
    fd = os.open(mnt / "big", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"A" * 8192, limit - 100) == 100
        assert os.fstat(fd).st_size == limit
        assert os.pread(fd, 200, limit - 150) == bytes(50) + b"A" * 100
        for off in (limit, limit + 4096):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"B", off)
            assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)


def test_a_truncate_to_the_same_size_sets_mtime_and_ctime_like_linux(mnt: Path,
                                                                     ref: Path) -> None:
    """Probe 9, F3: ftruncate and truncate to the file's own size leave its bytes and
    set mtime and ctime, as Linux does (POSIX requires it only when the size changes)."""
    import time

    def scenario(d: Path) -> tuple[bool, bool, bool, bool, bool]:
        p = d / "f"
        p.write_bytes(b"y" * 5000)
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
        st0 = os.stat(p)
        time.sleep(0.01)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.ftruncate(fd, 5000)
        finally:
            os.close(fd)
        st1 = os.stat(p)
        time.sleep(0.01)
        os.truncate(p, 5000)
        st2 = os.stat(p)
        return (st1.st_mtime_ns > st0.st_mtime_ns, st1.st_ctime_ns > st0.st_ctime_ns,
                st2.st_mtime_ns > st1.st_mtime_ns, st2.st_ctime_ns > st1.st_ctime_ns,
                p.read_bytes() == b"y" * 5000)

    assert both(mnt, ref, scenario) == (True,) * 5
