"""POSIX name-space semantics on a mounted sluice volume (pjdfstest-style): regular
files, directories, hard links, symlinks, rename (with renameat2 flags), special files
(fifos, sockets, device nodes), name length limits and a large directory (10,000
entries; 100,000 with `-m campaign`).

Each check asserts both the outcome and the precise errno. Where the kernel rather than
sluice decides, the expected value is what Linux does on ext4 (some checks run the same
operation on a plain directory under tmp_path and on the mount and compare)."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from posix_util import (RENAME_EXCHANGE, RENAME_NOREPLACE, errno_of, link_follow, linkat_fd,
                        raises_errno, renameat2)

pytestmark = pytest.mark.mounted


# -- regular files and directories ------------------------------------------------------

def test_create_open_and_lookup_errors(mnt: Path) -> None:
    f = mnt / "file"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    try:
        assert os.write(fd, b"contents") == 8
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"contents"
    finally:
        os.close(fd)
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_nlink == 1 and st.st_size == 8
    assert st.st_uid == 0 and st.st_gid == 0
    with raises_errno(errno.EEXIST):
        os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with raises_errno(errno.ENOENT):
        os.open(mnt / "missing", os.O_RDONLY)
    with raises_errno(errno.ENOENT):
        os.stat(mnt / "missing")
    # A name used as a directory when it is a file.
    with raises_errno(errno.ENOTDIR):
        os.stat(mnt / "file" / "x")
    with raises_errno(errno.ENOTDIR):
        os.open(mnt / "file" / "x", os.O_CREAT | os.O_WRONLY, 0o644)
    with raises_errno(errno.ENOTDIR):
        os.mkdir(mnt / "file" / "sub")
    with raises_errno(errno.ENOTDIR):
        os.open(f, os.O_RDONLY | os.O_DIRECTORY)
    # A directory opened for writing.
    with raises_errno(errno.EISDIR):
        os.open(mnt, os.O_WRONLY)
    # The negative lookup cached for "missing" does not hide a later create.
    (mnt / "missing").write_bytes(b"now here")
    assert (mnt / "missing").read_bytes() == b"now here"
    assert sorted(os.listdir(mnt)) == ["file", "missing"]


def test_mkdir_rmdir_and_directory_nlink(mnt: Path) -> None:
    root_nlink = os.stat(mnt).st_nlink
    assert root_nlink == 2
    os.mkdir(mnt / "d", 0o750)
    st = os.stat(mnt / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    assert os.stat(mnt).st_nlink == 3
    os.mkdir(mnt / "d" / "a")
    os.mkdir(mnt / "d" / "b")
    (mnt / "d" / "file").write_bytes(b"x")
    assert os.stat(mnt / "d").st_nlink == 4  # '.', its name, and two subdirectories' '..'
    assert os.stat(mnt / "d" / "a" / "..").st_ino == st.st_ino
    assert os.stat(mnt / "d" / ".").st_ino == st.st_ino
    assert sorted(os.listdir(mnt / "d")) == ["a", "b", "file"]

    with raises_errno(errno.EEXIST):
        os.mkdir(mnt / "d")
    with raises_errno(errno.EEXIST):
        os.mkdir(mnt / "d" / "file")
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(mnt / "d")
    with raises_errno(errno.ENOTDIR):
        os.rmdir(mnt / "d" / "file")
    with raises_errno(errno.EISDIR):
        os.unlink(mnt / "d" / "a")
    with raises_errno(errno.ENOENT):
        os.rmdir(mnt / "d" / "missing")
    with raises_errno(errno.EINVAL):
        os.rmdir(f"{mnt}/d/a/.")  # (pathlib would drop the '.')
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(f"{mnt}/d/a/..")

    os.rmdir(mnt / "d" / "a")
    assert os.stat(mnt / "d").st_nlink == 3
    os.rmdir(mnt / "d" / "b")
    os.unlink(mnt / "d" / "file")
    assert os.stat(mnt / "d").st_nlink == 2
    os.rmdir(mnt / "d")
    assert os.stat(mnt).st_nlink == 2
    assert os.listdir(mnt) == []


def test_removed_cwd_directory(mnt: Path) -> None:
    """A process whose cwd was removed cannot create entries in it (ENOENT, as ext4)."""
    os.mkdir(mnt / "gone")
    fd = os.open(mnt / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(mnt / "gone")
        assert os.fstat(fd).st_nlink == 0
        with raises_errno(errno.ENOENT):
            os.open("newfile", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        with raises_errno(errno.ENOENT):
            os.mkdir("newdir", dir_fd=fd)
        (mnt / "f").write_bytes(b"")
        for op in (lambda: os.link(mnt / "f", "x", dst_dir_fd=fd),
                   lambda: os.symlink("t", "x", dir_fd=fd),
                   lambda: os.mknod("x", dir_fd=fd),
                   lambda: os.mkfifo("x", dir_fd=fd),
                   lambda: os.rename(mnt / "f", "x", dst_dir_fd=fd)):
            with raises_errno(errno.ENOENT):
                op()
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


# -- hard links -----------------------------------------------------------------------------

def test_hard_links_share_the_inode(mnt: Path) -> None:
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    a, b, c = mnt / "d1" / "a", mnt / "d2" / "b", mnt / "d1" / "c"
    a.write_bytes(b"one")
    ino = os.stat(a).st_ino
    os.link(a, b)
    os.link(b, c)
    for p in (a, b, c):
        st = os.stat(p)
        assert st.st_ino == ino and st.st_nlink == 3
    # Directories' link counts do not change for file links.
    assert os.stat(mnt / "d1").st_nlink == 2 and os.stat(mnt / "d2").st_nlink == 2
    with open(b, "ab") as f:
        f.write(b"+two")
    assert a.read_bytes() == c.read_bytes() == b"one+two"

    with raises_errno(errno.EEXIST):
        os.link(a, c)
    with raises_errno(errno.ENOENT):
        os.link(mnt / "d1" / "missing", mnt / "d1" / "x")
    with raises_errno(errno.EPERM):
        os.link(mnt / "d1", mnt / "d2" / "dirlink")
    with raises_errno(errno.ENOENT):
        os.link(a, mnt / "nodir" / "x")

    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    with raises_errno(errno.ENOENT):
        os.stat(a)
    os.unlink(c)
    st = os.stat(b)
    assert st.st_nlink == 1 and st.st_ino == ino
    assert b.read_bytes() == b"one+two"
    assert sorted(os.listdir(mnt / "d1")) == [] and os.listdir(mnt / "d2") == ["b"]


def _link_unlinked_open_file(d: Path) -> tuple[int, int]:
    """errnos of linking an unlinked-while-open file back in, through /proc/self/fd
    (link with follow) and through linkat(AT_EMPTY_PATH)."""
    f = d / "tmp"
    f.write_bytes(b"data")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert os.fstat(fd).st_nlink == 0
        e1 = errno_of(lambda: link_follow(f"/proc/self/fd/{fd}", d / "revived1"))
        e2 = errno_of(lambda: linkat_fd(fd, d / "revived2"))
        assert os.pread(fd, 10, 0) == b"data"
    finally:
        os.close(fd)
    assert not (d / "revived1").exists() and not (d / "revived2").exists()
    return e1, e2


def test_link_to_unlinked_open_file_fails_with_enoent(mnt: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _link_unlinked_open_file(ref) == (errno.ENOENT, errno.ENOENT)
    assert _link_unlinked_open_file(mnt) == (errno.ENOENT, errno.ENOENT)


def test_link_open_file_via_fd(mnt: Path) -> None:
    """linkat(AT_EMPTY_PATH) and linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW) on a file that
    still has a name work (root has CAP_DAC_READ_SEARCH)."""
    f = mnt / "named"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDONLY)
    try:
        linkat_fd(fd, mnt / "second")
        link_follow(f"/proc/self/fd/{fd}", mnt / "third")
    finally:
        os.close(fd)
    assert os.stat(mnt / "second").st_ino == os.stat(f).st_ino
    assert os.stat(mnt / "third").st_ino == os.stat(f).st_ino
    assert os.stat(f).st_nlink == 3
    assert (mnt / "third").read_bytes() == b"abc"


# -- symlinks -------------------------------------------------------------------------------

def test_symlinks(mnt: Path) -> None:
    (mnt / "target").write_bytes(b"pointed at")
    os.mkdir(mnt / "dir")
    os.symlink("target", mnt / "rel")
    os.symlink(str(mnt / "dir"), mnt / "abs")
    os.symlink("nowhere/at/all", mnt / "dangling")

    assert os.readlink(mnt / "rel") == "target"
    assert os.readlink(mnt / "abs") == str(mnt / "dir")
    lst = os.lstat(mnt / "rel")
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target")
    assert stat.S_IMODE(lst.st_mode) == 0o777 and lst.st_nlink == 1
    assert os.stat(mnt / "rel").st_ino == os.stat(mnt / "target").st_ino
    assert (mnt / "rel").read_bytes() == b"pointed at"
    (mnt / "abs" / "inside").write_bytes(b"i")
    assert os.listdir(mnt / "dir") == ["inside"]
    assert stat.S_ISLNK(os.lstat(mnt / "dangling").st_mode)
    with raises_errno(errno.ENOENT):
        os.stat(mnt / "dangling")
    with raises_errno(errno.EINVAL):
        os.readlink(mnt / "target")
    with raises_errno(errno.EEXIST):
        os.symlink("x", mnt / "rel")
    with raises_errno(errno.ELOOP):
        os.open(mnt / "rel", os.O_RDONLY | os.O_NOFOLLOW)
    # A link to a symlink is a link to the symlink itself (link(2) does not follow).
    os.link(mnt / "rel", mnt / "rel2", follow_symlinks=False)
    assert os.lstat(mnt / "rel2").st_ino == lst.st_ino
    assert os.lstat(mnt / "rel").st_nlink == 2
    # Removing the symlink leaves the target.
    os.unlink(mnt / "rel")
    os.unlink(mnt / "rel2")
    assert (mnt / "target").read_bytes() == b"pointed at"
    # A long target survives unchanged.
    long_target = "/".join(["x" * 200] * 15)
    os.symlink(long_target, mnt / "long")
    assert os.readlink(mnt / "long") == long_target
    assert os.lstat(mnt / "long").st_size == len(long_target)
    # PATH_MAX: a 4095-byte target is the longest.
    os.symlink("a" * 4095, mnt / "longest")
    assert os.readlink(mnt / "longest") == "a" * 4095
    with raises_errno(errno.ENAMETOOLONG):
        os.symlink("a" * 4096, mnt / "too-long")


def test_symlink_loops_give_eloop(mnt: Path) -> None:
    os.symlink("loop-b", mnt / "loop-a")
    os.symlink("loop-a", mnt / "loop-b")
    os.symlink("self", mnt / "self")
    for p in ("loop-a", "loop-b", "self"):
        with raises_errno(errno.ELOOP):
            os.stat(mnt / p)
        with raises_errno(errno.ELOOP):
            os.open(mnt / p, os.O_RDONLY)
        with raises_errno(errno.ELOOP):
            os.open(mnt / p, os.O_CREAT | os.O_WRONLY, 0o644)
    with raises_errno(errno.ELOOP):
        os.listdir(mnt / "self" / "x")
    # lstat and readlink do not follow.
    assert os.readlink(mnt / "loop-a") == "loop-b"
    assert stat.S_ISLNK(os.lstat(mnt / "self").st_mode)


# -- rename ------------------------------------------------------------------------------------

def test_rename_file_across_directories_and_over_files(mnt: Path) -> None:
    os.mkdir(mnt / "a")
    os.mkdir(mnt / "b")
    (mnt / "a" / "f").write_bytes(b"moving")
    (mnt / "b" / "victim").write_bytes(b"replaced")
    ino = os.stat(mnt / "a" / "f").st_ino
    victim_ino = os.stat(mnt / "b" / "victim").st_ino

    os.rename(mnt / "a" / "f", mnt / "b" / "g")
    assert os.listdir(mnt / "a") == []
    assert sorted(os.listdir(mnt / "b")) == ["g", "victim"]
    assert os.stat(mnt / "b" / "g").st_ino == ino
    with raises_errno(errno.ENOENT):
        os.stat(mnt / "a" / "f")

    # Over an existing file: atomically replaced; the old file's inode is gone.
    fd = os.open(mnt / "b" / "victim", os.O_RDONLY)
    try:
        os.rename(mnt / "b" / "g", mnt / "b" / "victim")
        st = os.fstat(fd)
        assert st.st_ino == victim_ino and st.st_nlink == 0
        assert os.read(fd, 100) == b"replaced"
    finally:
        os.close(fd)
    assert os.listdir(mnt / "b") == ["victim"]
    assert (mnt / "b" / "victim").read_bytes() == b"moving"
    assert os.stat(mnt / "b" / "victim").st_ino == ino
    assert os.stat(mnt / "b" / "victim").st_nlink == 1

    with raises_errno(errno.ENOENT):
        os.rename(mnt / "a" / "missing", mnt / "b" / "x")
    with raises_errno(errno.ENOENT):
        os.rename(mnt / "b" / "victim", mnt / "nodir" / "x")
    with raises_errno(errno.ENOTDIR):
        os.rename(mnt / "b" / "victim", mnt / "b" / "victim" / "x")


def test_rename_directories(mnt: Path) -> None:
    for d in ("p1", "p2", "p1/sub", "p1/sub/deep", "p2/empty", "p2/full", "p2/full/x"):
        os.mkdir(mnt / d)
    (mnt / "p1" / "sub" / "file").write_bytes(b"in sub")
    (mnt / "p2" / "afile").write_bytes(b"f")
    sub_ino = os.stat(mnt / "p1" / "sub").st_ino
    assert os.stat(mnt / "p1").st_nlink == 3 and os.stat(mnt / "p2").st_nlink == 4

    # Into its own subtree: EINVAL; over a non-empty directory: ENOTEMPTY (or EEXIST).
    with raises_errno(errno.EINVAL):
        os.rename(mnt / "p1" / "sub", mnt / "p1" / "sub" / "deep" / "x")
    with raises_errno(errno.EINVAL):
        os.rename(mnt / "p1", mnt / "p1" / "sub" / "p1")
    with raises_errno(errno.ENOTEMPTY, errno.EEXIST):
        os.rename(mnt / "p1" / "sub", mnt / "p2" / "full")
    # Type mismatches.
    with raises_errno(errno.ENOTDIR):
        os.rename(mnt / "p1" / "sub", mnt / "p2" / "afile")
    with raises_errno(errno.EISDIR):
        os.rename(mnt / "p2" / "afile", mnt / "p2" / "empty")
    # An ancestor over a descendant: EINVAL; a descendant over its ancestor: ENOTEMPTY.
    with raises_errno(errno.EINVAL):
        os.rename(mnt / "p1", mnt / "p1" / "sub")
    with raises_errno(errno.ENOTEMPTY):
        os.rename(mnt / "p1" / "sub" / "deep", mnt / "p1")

    # Across directories over an empty directory: the parents' link counts follow.
    empty_ino = os.stat(mnt / "p2" / "empty").st_ino
    os.rename(mnt / "p1" / "sub", mnt / "p2" / "empty")
    assert os.stat(mnt / "p1").st_nlink == 2
    assert os.stat(mnt / "p2").st_nlink == 4  # lost 'empty', gained 'sub'
    st = os.stat(mnt / "p2" / "empty")
    assert st.st_ino == sub_ino and st.st_ino != empty_ino and st.st_nlink == 3
    assert os.stat(mnt / "p2" / "empty" / "..").st_ino == os.stat(mnt / "p2").st_ino
    assert (mnt / "p2" / "empty" / "file").read_bytes() == b"in sub"
    assert os.listdir(mnt / "p2" / "empty" / "deep") == []
    assert os.listdir(mnt / "p1") == []

    # Within one directory: the count does not change.
    os.rename(mnt / "p2" / "empty", mnt / "p2" / "renamed")
    assert os.stat(mnt / "p2").st_nlink == 4
    assert sorted(os.listdir(mnt / "p2")) == ["afile", "full", "renamed"]
    # Up to the root.
    os.rename(mnt / "p2" / "renamed" / "deep", mnt / "deep")
    assert os.stat(mnt / "p2" / "renamed").st_nlink == 2
    assert os.stat(mnt).st_nlink == 5
    assert os.stat(mnt / "deep" / "..").st_ino == os.stat(mnt).st_ino
    # The removed directory's children are checked after the move: rmdir all.
    os.unlink(mnt / "p2" / "renamed" / "file")
    os.rmdir(mnt / "p2" / "renamed")
    assert os.stat(mnt / "p2").st_nlink == 3


def test_rename_hard_links_to_same_inode_is_a_noop(mnt: Path, tmp_path: Path) -> None:
    for d in (tmp_path / "ref", mnt):
        d.mkdir(exist_ok=True)
        (d / "a").write_bytes(b"same")
        os.link(d / "a", d / "b")
        os.rename(d / "a", d / "b")
        assert sorted(os.listdir(d)) == ["a", "b"]
        assert os.stat(d / "a").st_ino == os.stat(d / "b").st_ino
        assert os.stat(d / "a").st_nlink == 2
        os.rename(d / "a", d / "a")  # onto itself: also nothing
        assert os.stat(d / "a").st_nlink == 2


def test_renameat2_noreplace(mnt: Path) -> None:
    (mnt / "src").write_bytes(b"s")
    (mnt / "dst").write_bytes(b"d")
    os.mkdir(mnt / "dir")
    with raises_errno(errno.EEXIST):
        renameat2(mnt / "src", mnt / "dst", RENAME_NOREPLACE)
    with raises_errno(errno.EEXIST):
        renameat2(mnt / "src", mnt / "dir", RENAME_NOREPLACE)
    assert (mnt / "src").read_bytes() == b"s" and (mnt / "dst").read_bytes() == b"d"
    renameat2(mnt / "src", mnt / "dir" / "new", RENAME_NOREPLACE)
    assert (mnt / "dir" / "new").read_bytes() == b"s"
    assert sorted(os.listdir(mnt)) == ["dir", "dst"]
    with raises_errno(errno.EINVAL):
        renameat2(mnt / "dst", mnt / "x", RENAME_NOREPLACE | RENAME_EXCHANGE)


def test_renameat2_exchange(mnt: Path) -> None:
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    os.mkdir(mnt / "d1" / "sub")
    (mnt / "d1" / "sub" / "inner").write_bytes(b"inner")
    (mnt / "d1" / "f").write_bytes(b"file one")
    (mnt / "d2" / "g").write_bytes(b"file two")
    f_ino, g_ino = os.stat(mnt / "d1" / "f").st_ino, os.stat(mnt / "d2" / "g").st_ino
    sub_ino = os.stat(mnt / "d1" / "sub").st_ino

    # Two files in different directories.
    renameat2(mnt / "d1" / "f", mnt / "d2" / "g", RENAME_EXCHANGE)
    assert (mnt / "d1" / "f").read_bytes() == b"file two"
    assert (mnt / "d2" / "g").read_bytes() == b"file one"
    assert os.stat(mnt / "d1" / "f").st_ino == g_ino
    assert os.stat(mnt / "d2" / "g").st_ino == f_ino

    # A directory and a file across directories: link counts of both parents move.
    assert os.stat(mnt / "d1").st_nlink == 3 and os.stat(mnt / "d2").st_nlink == 2
    renameat2(mnt / "d1" / "sub", mnt / "d2" / "g", RENAME_EXCHANGE)
    assert os.stat(mnt / "d1").st_nlink == 2 and os.stat(mnt / "d2").st_nlink == 3
    assert stat.S_ISREG(os.stat(mnt / "d1" / "sub").st_mode)
    assert (mnt / "d1" / "sub").read_bytes() == b"file one"
    assert os.stat(mnt / "d2" / "g").st_ino == sub_ino
    assert (mnt / "d2" / "g" / "inner").read_bytes() == b"inner"
    assert os.stat(mnt / "d2" / "g" / "..").st_ino == os.stat(mnt / "d2").st_ino
    assert os.stat(mnt / "d2" / "g").st_nlink == 2
    assert sorted(os.listdir(mnt / "d1")) == ["f", "sub"]
    assert os.listdir(mnt / "d2") == ["g"]

    # The target must exist; a directory cannot be exchanged into its own subtree.
    with raises_errno(errno.ENOENT):
        renameat2(mnt / "d1" / "f", mnt / "d1" / "missing", RENAME_EXCHANGE)
    with raises_errno(errno.EINVAL):
        renameat2(mnt / "d2", mnt / "d2" / "g" / "inner", RENAME_EXCHANGE)
    # Two directories: contents follow them.
    os.mkdir(mnt / "d1" / "other")
    (mnt / "d1" / "other" / "o").write_bytes(b"o")
    renameat2(mnt / "d1" / "other", mnt / "d2" / "g", RENAME_EXCHANGE)
    assert os.listdir(mnt / "d2" / "g") == ["o"]
    assert (mnt / "d1" / "other" / "inner").read_bytes() == b"inner"
    assert os.stat(mnt / "d1").st_nlink == 3 and os.stat(mnt / "d2").st_nlink == 3
    assert os.stat(mnt / "d1" / "other" / "..").st_ino == os.stat(mnt / "d1").st_ino


def test_rename_link_counts_and_same_directory_replacement(mnt: Path) -> None:
    # A directory over an empty sibling: the parent loses one link.
    os.mkdir(mnt / "a")
    os.mkdir(mnt / "b")
    (mnt / "a" / "kept").write_bytes(b"k")
    assert os.stat(mnt).st_nlink == 4
    os.rename(mnt / "a", mnt / "b")
    assert os.stat(mnt).st_nlink == 3
    assert os.listdir(mnt / "b") == ["kept"]
    # A file over another file's hard link: that file loses one link.
    (mnt / "x").write_bytes(b"x")
    (mnt / "y").write_bytes(b"y")
    os.link(mnt / "y", mnt / "y2")
    assert os.stat(mnt / "y").st_nlink == 2
    os.rename(mnt / "x", mnt / "y2")
    assert os.stat(mnt / "y").st_nlink == 1
    assert (mnt / "y2").read_bytes() == b"x"
    # Exchanging a file and a directory in one directory changes no link count.
    os.mkdir(mnt / "d")
    before = os.stat(mnt).st_nlink
    t0 = time.time_ns()
    renameat2(mnt / "d", mnt / "y", RENAME_EXCHANGE)
    assert os.stat(mnt).st_nlink == before
    assert stat.S_ISDIR(os.stat(mnt / "y").st_mode) and stat.S_ISREG(os.stat(mnt / "d").st_mode)
    assert (mnt / "d").read_bytes() == b"y"
    # Both exchanged inodes' ctimes change.
    assert os.stat(mnt / "y").st_ctime_ns >= t0 and os.stat(mnt / "d").st_ctime_ns >= t0
    # A symlink is renamed, not its target.
    os.symlink("d", mnt / "sym")
    os.rename(mnt / "sym", mnt / "b" / "sym2")
    assert os.readlink(mnt / "b" / "sym2") == "d"
    assert (mnt / "d").read_bytes() == b"y"
    # NOREPLACE cannot move a directory into itself either.
    with raises_errno(errno.EINVAL):
        renameat2(mnt / "b", mnt / "b" / "inside", RENAME_NOREPLACE)


def test_create_through_dangling_symlink(mnt: Path, tmp_path: Path) -> None:
    """open(O_CREAT) follows a dangling symlink and creates its target; with O_EXCL it
    fails with EEXIST (as on ext4)."""
    def scenario(d: Path) -> list[object]:
        os.symlink("target", d / "link")
        out: list[object] = [errno_of(lambda: os.open(d / "link", os.O_CREAT | os.O_EXCL |
                                                       os.O_WRONLY, 0o644))]
        fd = os.open(d / "link", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"via link")
        os.close(fd)
        out.append((d / "target").read_bytes())
        out.append(stat.S_ISLNK(os.lstat(d / "link").st_mode))
        return out

    (tmp_path / "ref").mkdir()
    assert scenario(tmp_path / "ref") == scenario(mnt) == [errno.EEXIST, b"via link", True]


def test_create_modes_keep_special_bits(mnt: Path, tmp_path: Path) -> None:
    def scenario(d: Path) -> list[str]:
        os.mkdir(d / "dir", 0o7777)
        os.close(os.open(d / "file", os.O_CREAT | os.O_WRONLY, 0o7777))
        os.mknod(d / "fifo", stat.S_IFIFO | 0o7777)
        return [oct(stat.S_IMODE(os.stat(d / n).st_mode)) for n in ("dir", "file", "fifo")]

    (tmp_path / "ref").mkdir()
    old = os.umask(0o022)
    try:
        assert scenario(tmp_path / "ref") == scenario(mnt)
    finally:
        os.umask(old)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def test_readdir_cookies_are_stable_with_seekdir(mnt: Path) -> None:
    """telldir() positions stay valid while entries are removed and added: seekdir()
    back resumes exactly after the entries already returned."""
    from posix_util import _libc as libc
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]

    d = mnt / "dir"
    os.mkdir(d)
    n = 3000
    for i in range(n):
        os.mknod(d / f"e{i:05d}")
    inos = {e.name: e.inode() for e in os.scandir(d)}

    dirp = libc.opendir(os.fsencode(d))
    assert dirp
    try:
        def read_all() -> list[tuple[str, int]]:
            out = []
            while True:
                ent = libc.readdir(dirp)
                if not ent:
                    return out
                if ent.contents.d_name not in (b".", b".."):
                    out.append((ent.contents.d_name.decode(), ent.contents.d_ino))

        def read_n(k: int) -> list[str]:
            out: list[str] = []
            while len(out) < k:
                ent = libc.readdir(dirp)
                assert ent
                if ent.contents.d_name not in (b".", b".."):
                    out.append(ent.contents.d_name.decode())
            return out

        first = read_n(1000)
        pos = libc.telldir(dirp)
        second = read_n(500)
        # Remove half of what was read and of what was not; add new names.
        for name in first[::2] + second[::2]:
            os.unlink(d / name)
        later = [f"e{i:05d}" for i in range(2000, n, 7)]
        for name in later:
            os.unlink(d / name)
        for i in range(50):
            os.mknod(d / f"new{i:03d}")
        libc.seekdir(dirp, pos)
        rest = read_all()
    finally:
        libc.closedir(dirp)
    names = [r[0] for r in rest]
    assert len(names) == len(set(names))
    assert not set(names) & set(first), "entries before the position came back"
    expect = set(f"e{i:05d}" for i in range(n)) - set(first) - set(second[::2]) - set(later)
    assert expect <= set(names), "entries after the position were skipped"
    assert set(names) - expect <= {f"new{i:03d}" for i in range(50)} | set(later)
    # d_ino matches st_ino.
    for name, ino in rest:
        if name.startswith("e"):
            assert ino == inos[name]


# -- special files ---------------------------------------------------------------------------

def test_fifo_carries_data(mnt: Path) -> None:
    p = mnt / "fifo"
    os.mkfifo(p, 0o640)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 0
    payload = os.urandom(200_000)  # more than a pipe buffer
    got: list[bytes] = []

    def reader() -> None:
        with open(p, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(p, "wb") as f:
        f.write(payload)
    t.join(30)
    assert not t.is_alive()
    assert got == [payload]
    with raises_errno(errno.EEXIST):
        os.mkfifo(p)
    # O_NONBLOCK write-only open with no reader: ENXIO (the kernel's pipe semantics).
    with raises_errno(errno.ENXIO):
        os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    os.unlink(p)
    assert os.listdir(mnt) == []


def test_unix_socket_bound_on_the_mount(mnt: Path) -> None:
    path = str(mnt / "sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(1)
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cli.connect(path)
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        finally:
            cli.close()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with raises_errno(errno.EADDRINUSE):
                other.bind(path)
        finally:
            other.close()
    finally:
        srv.close()
    os.unlink(path)
    assert os.listdir(mnt) == []


def test_device_nodes_metadata(mnt: Path) -> None:
    os.mknod(mnt / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(mnt / "blk", stat.S_IFBLK | 0o640, os.makedev(8, 17))
    os.mknod(mnt / "big", stat.S_IFCHR | 0o600, os.makedev(4095, 1 << 19))
    os.mknod(mnt / "plain", 0o644)  # no type: a regular file
    c, b, big = os.stat(mnt / "chr"), os.stat(mnt / "blk"), os.stat(mnt / "big")
    assert stat.S_ISCHR(c.st_mode) and stat.S_IMODE(c.st_mode) == 0o600
    assert (os.major(c.st_rdev), os.minor(c.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(b.st_mode) and stat.S_IMODE(b.st_mode) == 0o640
    assert (os.major(b.st_rdev), os.minor(b.st_rdev)) == (8, 17)
    assert (os.major(big.st_rdev), os.minor(big.st_rdev)) == (4095, 1 << 19)
    assert c.st_size == 0 and c.st_nlink == 1
    assert stat.S_ISREG(os.stat(mnt / "plain").st_mode)
    assert os.stat(mnt / "plain").st_rdev == 0
    with raises_errno(errno.EEXIST):
        os.mknod(mnt / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    # The mount is nodev (FUSE's default): opening the node is refused by the kernel.
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as fh:
        opts = next(ln.split()[3] for ln in fh if ln.split()[1] == str(mnt.resolve()))
    if "nodev" in opts.split(","):
        with raises_errno(errno.EACCES):
            os.open(mnt / "chr", os.O_RDONLY)
    # Rename and link keep the device number.
    os.rename(mnt / "chr", mnt / "chr2")
    os.link(mnt / "chr2", mnt / "chr3")
    assert os.stat(mnt / "chr3").st_rdev == c.st_rdev
    assert os.stat(mnt / "chr2").st_nlink == 2
    for n in ("chr2", "chr3", "blk", "big", "plain"):
        os.unlink(mnt / n)
    assert os.listdir(mnt) == []


# -- name limits ---------------------------------------------------------------------------------

def test_name_length_limits(mnt: Path, tmp_path: Path) -> None:
    n255, n256 = "n" * 255, "n" * 256
    (mnt / n255).write_bytes(b"longest")
    assert (mnt / n255).read_bytes() == b"longest"
    assert os.listdir(mnt) == [n255]
    os.mkdir(mnt / ("d" * 255))
    os.symlink("t", mnt / ("s" * 255))
    os.link(mnt / n255, mnt / ("l" * 255))
    os.rename(mnt / ("l" * 255), mnt / ("m" * 255))
    # Multi-byte: 255 bytes is the limit, not 255 characters.
    (mnt / ("é" * 127 + "x")).write_bytes(b"")  # 255 bytes
    (tmp_path / n255).write_bytes(b"reference")
    for op in (lambda d: os.open(d / n256, os.O_CREAT | os.O_WRONLY, 0o644),
               lambda d: os.stat(d / n256),
               lambda d: os.mkdir(d / n256),
               lambda d: os.symlink("t", d / n256),
               lambda d: os.mknod(d / n256),
               lambda d: os.mkfifo(d / n256),
               lambda d: os.link(d / n255, d / n256),
               lambda d: os.rename(d / n255, d / n256),
               lambda d: os.unlink(d / n256),
               lambda d: os.rmdir(d / n256)):
        assert errno_of(lambda: op(tmp_path)) == errno.ENAMETOOLONG
        with raises_errno(errno.ENAMETOOLONG):
            op(mnt)
    with raises_errno(errno.ENAMETOOLONG):
        os.open(mnt / ("é" * 128), os.O_CREAT | os.O_WRONLY, 0o644)  # 256 bytes
    assert (mnt / n255).read_bytes() == b"longest"
    assert len(os.listdir(mnt)) == 5


# -- a large directory --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.campaign)])
def test_directory_of_many_entries(mnt: Path, n: int) -> None:
    # The same checks on 10,000 entries in the default run (the readdir cookies span
    # many READDIR replies either way); 100,000 with `-m campaign` (about a minute).
    d = mnt / "big"
    os.mkdir(d)
    names = [f"entry-{i:06d}" for i in range(n)]
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mknod(name, 0o644, dir_fd=dfd)
    finally:
        os.close(dfd)

    listed = os.listdir(d)
    assert len(listed) == n
    assert sorted(listed) == names  # every entry, exactly once

    # Remove entries while iterating: each seen entry is removed, and so is an unseen
    # one (from the far end) every other step. Entries never removed must each be seen
    # exactly once; removed ones at most once.
    rng = random.Random(1)
    unseen = set(names)
    seen: list[str] = []
    removed_early: set[str] = set()
    pending_far = names[:]  # candidates to remove ahead of the iterator
    rng.shuffle(pending_far)
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            name = entry.name
            seen.append(name)
            unseen.discard(name)
            if name not in removed_early:
                os.unlink(d / name)
            if i % 2 == 0:
                while pending_far:
                    victim = pending_far.pop()
                    if victim in unseen and victim not in removed_early:
                        os.unlink(d / victim)
                        removed_early.add(victim)
                        break
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    never_removed = set(names) - removed_early
    assert never_removed <= set(seen), \
        f"{len(never_removed - set(seen))} entries skipped by readdir"
    assert set(seen) <= set(names)
    assert len(removed_early) > n // 4
    assert os.listdir(d) == []
    assert os.stat(d).st_nlink == 2
    os.rmdir(d)
