"""O_TMPFILE and RENAME_WHITEOUT through a real mount (FUSE_TMPFILE through the project's
binding), and what they are for: sluice as the upper layer of an overlayfs mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import sluice
from test_principals import entry, usage

pytestmark = pytest.mark.mounted

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)


def linkat_empty(fd: int, dst: Path) -> None:
    """linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH): give an O_TMPFILE file a name."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(dst), AT_EMPTY_PATH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(dst))


def rename_whiteout(src: Path, dst: Path) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                       RENAME_WHITEOUT) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def test_o_tmpfile_is_unnamed_until_linked(mnt: Path) -> None:
    (mnt / "d").mkdir()
    inodes0 = usage(mnt)["root"][1]
    fd = os.open(mnt / "d", os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"hidden " * 1000)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and stat.S_IMODE(st.st_mode) == 0o640
        assert os.listdir(mnt / "d") == []
        assert usage(mnt)["root"][1] == inodes0  # as a file unlinked while open
        linkat_empty(fd, mnt / "d" / "named")
        assert os.fstat(fd).st_nlink == 1
        assert usage(mnt)["root"][1] == inodes0 + 1
    finally:
        os.close(fd)
    assert os.listdir(mnt / "d") == ["named"]
    assert (mnt / "d" / "named").read_bytes() == b"hidden " * 1000


def test_o_tmpfile_never_linked_is_freed_at_close_and_after_a_crash(volume: Path,
                                                                     mount_factory) -> None:
    m = mount_factory(volume)
    free0 = os.statvfs(m.path).f_bfree
    fd = os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"x" * (1 << 20))
    os.fsync(fd)
    assert os.statvfs(m.path).f_bfree == free0 - 256
    os.close(fd)
    deadline = 50
    while os.statvfs(m.path).f_bfree != free0 and deadline:  # freed after the commit
        deadline -= 1
        subprocess.run(["sleep", "0.1"])
    assert os.statvfs(m.path).f_bfree == free0
    # Open when the daemon dies: an orphan, cleaned by the next mount.
    fd = os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"y" * (1 << 20))
    os.fsync(fd)
    m.kill()
    os.close(fd)
    m.stop()
    m.start()
    assert os.statvfs(m.path).f_bfree == free0
    assert os.listdir(m.path) == []
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_o_tmpfile_with_o_excl_cannot_be_linked(mnt: Path) -> None:
    fd = os.open(mnt, os.O_TMPFILE | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        with pytest.raises(OSError) as ei:
            linkat_empty(fd, mnt / "x")
        assert ei.value.errno == errno.ENOENT
    finally:
        os.close(fd)
    assert os.listdir(mnt) == []


def test_rename_whiteout_leaves_a_whiteout(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    before = usage(mnt)["root"]
    rename_whiteout(mnt / "a", mnt / "b")
    st = os.lstat(mnt / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (mnt / "b").read_bytes() == b"A"
    # One more inode and one more name (the whiteout), as a mknod would cost.
    assert usage(mnt)["root"] == (before[0] + entry("b") - entry("a") + entry("a"),
                                  before[1] + 1)


def test_overlayfs_with_its_upper_layer_on_sluice(mnt: Path, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "keep").write_text("lower keep\n")
    (lower / "edit").write_text("lower edit\n")
    (lower / "gone").write_text("lower gone\n")
    (lower / "dir" / "inner").write_text("inner\n")
    (mnt / "upper").mkdir()
    (mnt / "work").mkdir()
    ov = tmp_path / "ov"
    ov.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={mnt / 'upper'},workdir={mnt / 'work'}",
                        str(ov)], capture_output=True, text=True)
    if r.returncode != 0 and "permission denied" in r.stderr.lower():
        pytest.skip(f"overlayfs mounts are not allowed here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    try:
        assert (ov / "keep").read_text() == "lower keep\n"
        with open(ov / "edit", "a") as f:      # copy-up to sluice
            f.write("more\n")
        (ov / "gone").unlink()                 # a whiteout on sluice
        (ov / "new").write_text("new\n")
        os.rename(ov / "new", ov / "renamed")
        (ov / "dir" / "inner").unlink()
        assert sorted(os.listdir(ov)) == ["dir", "edit", "keep", "renamed"]
        assert os.listdir(ov / "dir") == []
        assert (ov / "edit").read_text() == "lower edit\nmore\n"
    finally:
        subprocess.run(["umount", str(ov)], check=True)
    up = mnt / "upper"
    assert (up / "edit").read_text() == "lower edit\nmore\n"
    assert (up / "renamed").read_text() == "new\n"
    for wh in (up / "gone", up / "dir" / "inner"):
        st = os.lstat(wh)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, wh
    assert not (up / "keep").exists()
    # Mounted again, the overlay shows the same.
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={mnt / 'upper'},workdir={mnt / 'work'}",
                        str(ov)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        assert sorted(os.listdir(ov)) == ["dir", "edit", "keep", "renamed"]
    finally:
        subprocess.run(["umount", str(ov)], check=True)
