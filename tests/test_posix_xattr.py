"""Extended attributes on a mounted sluice volume: user.* and trusted.* set, get, list
and remove; XATTR_CREATE / XATTR_REPLACE; the size limits (name 255 bytes -> ERANGE,
value 64 KiB -> E2BIG); the ERANGE protocol of a too-small buffer; which file types and
which users may have or change them; and the getfattr/setfattr tools.

Expectations are Linux's; tmpfs (/dev/shm), which like sluice keeps values up to
64 KiB, serves as the reference where the kernel and the filesystem share the work."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import run_as
from posix_util import (GID_A, GID_B, UID_A, UID_B, XATTR_CREATE, XATTR_REPLACE, _libc,
                        errno_of, make_traversable, raises_errno)

pytestmark = pytest.mark.mounted

PY = "/usr/bin/python3"


@pytest.fixture
def shm_ref() -> Iterator[Path]:
    """A scratch directory on tmpfs: the reference for values larger than ext4 allows."""
    d = Path(tempfile.mkdtemp(prefix="sluice-xattr-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _outcome(fn: Callable[[], object]) -> object:
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return r


def test_set_get_list_remove(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"data")
    assert os.listxattr(f) == []
    os.setxattr(f, "user.alpha", b"one")
    os.setxattr(f, "user.beta", b"\x00binary\xff" * 10)
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "trusted.secret", b"root only")
    assert os.getxattr(f, "user.alpha") == b"one"
    assert os.getxattr(f, "user.beta") == b"\x00binary\xff" * 10
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "trusted.secret") == b"root only"
    assert sorted(os.listxattr(f)) == ["trusted.secret", "user.alpha", "user.beta",
                                       "user.empty"]
    # Replacing keeps one entry with the new value.
    os.setxattr(f, "user.alpha", b"uno")
    assert os.getxattr(f, "user.alpha") == b"uno"
    assert len(os.listxattr(f)) == 4
    os.removexattr(f, "user.alpha")
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.alpha")
    with raises_errno(errno.ENODATA):
        os.removexattr(f, "user.alpha")
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.never")
    assert sorted(os.listxattr(f)) == ["trusted.secret", "user.beta", "user.empty"]
    # Data is untouched; directories and links share/keep their attributes.
    assert f.read_bytes() == b"data"
    os.mkdir(mnt / "d")
    os.setxattr(mnt / "d", "user.dir", b"on a directory")
    assert os.getxattr(mnt / "d", "user.dir") == b"on a directory"
    os.link(f, mnt / "d" / "hard")
    assert os.getxattr(mnt / "d" / "hard", "user.beta") == b"\x00binary\xff" * 10
    os.setxattr(mnt / "d" / "hard", "user.via-link", b"1")
    assert os.getxattr(f, "user.via-link") == b"1"
    os.rename(f, mnt / "renamed")
    assert os.getxattr(mnt / "renamed", "trusted.secret") == b"root only"
    # Through a descriptor.
    fd = os.open(mnt / "renamed", os.O_RDONLY)
    try:
        os.setxattr(fd, "user.fd", b"by fd")
        assert os.getxattr(fd, "user.fd") == b"by fd"
        assert "user.fd" in os.listxattr(fd)
    finally:
        os.close(fd)


def test_create_and_replace_flags(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.k", b"first", XATTR_CREATE)
    with raises_errno(errno.EEXIST):
        os.setxattr(f, "user.k", b"second", XATTR_CREATE)
    assert os.getxattr(f, "user.k") == b"first"
    os.setxattr(f, "user.k", b"replaced", XATTR_REPLACE)
    assert os.getxattr(f, "user.k") == b"replaced"
    with raises_errno(errno.ENODATA):
        os.setxattr(f, "user.missing", b"x", XATTR_REPLACE)
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.missing")
    with raises_errno(errno.EINVAL):
        os.setxattr(f, "user.k", b"x", XATTR_CREATE | XATTR_REPLACE | 4)
    assert os.listxattr(f) == ["user.k"]


def test_size_limits(mnt: Path, shm_ref: Path) -> None:
    def scenario(d: Path) -> list[object]:
        f = d / "f"
        f.write_bytes(b"")
        n255 = "user." + "n" * 250
        n256 = "user." + "n" * 251
        out: list[object] = [
            _outcome(lambda: os.setxattr(f, n255, b"v")),
            _outcome(lambda: os.getxattr(f, n255)),
            _outcome(lambda: os.setxattr(f, n256, b"v")),
            _outcome(lambda: os.getxattr(f, n256)),
            _outcome(lambda: os.removexattr(f, n256)),
            _outcome(lambda: os.setxattr(f, "user.max", b"m" * 65536)),
            _outcome(lambda: len(os.getxattr(f, "user.max"))),
            _outcome(lambda: os.setxattr(f, "user.max", b"m" * 65537)),
            _outcome(lambda: os.setxattr(f, "user.over", b"o" * (1 << 20))),
            _outcome(lambda: len(os.getxattr(f, "user.max"))),
            _outcome(lambda: sorted(os.listxattr(f))),
        ]
        return out

    expected = [None, b"v", "ERANGE", "ERANGE", "ERANGE", None, 65536, "E2BIG", "E2BIG",
                65536, ["user.max", "user." + "n" * 250]]
    assert scenario(shm_ref) == expected
    assert scenario(mnt) == expected


def test_too_small_buffer_gives_erange(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.value", b"0123456789")
    os.setxattr(f, "user.other", b"")
    getx = _libc.getxattr
    getx.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    getx.restype = ctypes.c_ssize_t
    listx = _libc.listxattr
    listx.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    listx.restype = ctypes.c_ssize_t
    path = os.fsencode(f)
    # Size 0 asks for the size; a smaller buffer is ERANGE; the right size works.
    assert getx(path, b"user.value", None, 0) == 10
    buf = ctypes.create_string_buffer(64)
    assert getx(path, b"user.value", buf, 9) == -1 and ctypes.get_errno() == errno.ERANGE
    assert getx(path, b"user.value", buf, 10) == 10 and buf.raw[:10] == b"0123456789"
    names = b"user.other\0user.value\0"
    assert listx(path, None, 0) == len(names)
    assert listx(path, buf, len(names) - 1) == -1 and ctypes.get_errno() == errno.ERANGE
    assert listx(path, buf, len(names)) == len(names)
    assert sorted(buf.raw[:len(names)].split(b"\0")[:-1]) == [b"user.other", b"user.value"]


def test_namespaces_and_file_types(mnt: Path, tmp_path: Path) -> None:
    def scenario(d: Path) -> list[object]:
        f = d / "f"
        f.write_bytes(b"")
        os.symlink("f", d / "l")
        os.mkfifo(d / "p")
        nofollow = dict(follow_symlinks=False)
        return [
            _outcome(lambda: os.setxattr(f, "foo.bar", b"v")),
            _outcome(lambda: os.getxattr(f, "foo.bar")),
            _outcome(lambda: os.setxattr(f, "user.", b"v")),
            _outcome(lambda: os.setxattr(f, "nonamespace", b"v")),
            # user.* only on regular files and directories: EPERM to set, ENODATA to get.
            _outcome(lambda: os.setxattr(d / "l", "user.a", b"v", **nofollow)),
            _outcome(lambda: os.getxattr(d / "l", "user.a", **nofollow)),
            _outcome(lambda: os.setxattr(d / "p", "user.a", b"v")),
            # ... but trusted.* works on a symlink itself (root).
            _outcome(lambda: os.setxattr(d / "l", "trusted.a", b"v", **nofollow)),
            _outcome(lambda: os.getxattr(d / "l", "trusted.a", **nofollow)),
            _outcome(lambda: os.listxattr(f)),
            # Following the link reaches the target.
            _outcome(lambda: os.setxattr(d / "l", "user.through", b"t")),
            _outcome(lambda: os.getxattr(f, "user.through")),
        ]

    expected = ["ENOTSUP", "ENOTSUP", "EINVAL", "ENOTSUP", "EPERM", "ENODATA", "EPERM",
                None, b"v", [], None, b"t"]
    assert scenario(tmp_path) == expected
    assert scenario(mnt) == expected


def test_xattr_permissions_for_other_users(mnt: Path, tmp_path: Path) -> None:
    def scenario(d: Path) -> list[str]:
        make_traversable(d)
        f = d / "f"
        f.write_bytes(b"")
        os.chown(f, UID_A, GID_A)
        os.chmod(f, 0o644)
        os.setxattr(f, "user.shared", b"readable")
        os.setxattr(f, "trusted.t", b"hidden")
        fs_ = str(f)
        code = f"""
import os
def e(fn):
    try:
        r = fn()
        return repr(r)
    except OSError as x:
        return str(x.errno)
out = [
  e(lambda: os.getxattr({fs_!r}, "user.shared")),
  e(lambda: os.setxattr({fs_!r}, "user.mine", b"x")),
  e(lambda: os.removexattr({fs_!r}, "user.shared")),
  e(lambda: os.getxattr({fs_!r}, "trusted.t")),
  e(lambda: os.setxattr({fs_!r}, "trusted.t", b"x")),
  e(lambda: sorted(os.listxattr({fs_!r}))),
]
print("|".join(out))
"""
        res = []
        for uid, gid in ((UID_B, GID_B), (UID_A, GID_A)):
            r = run_as(uid, gid, [PY, "-c", code], timeout=60)
            assert r.returncode == 0, r.stderr
            res.append(r.stdout.strip())
        os.chmod(f, 0o600)
        r = run_as(UID_B, GID_B, [PY, "-c", code], timeout=60)
        res.append(r.stdout.strip())
        return res

    (tmp_path / "ref").mkdir()
    (mnt / "m").mkdir()
    ref = scenario(tmp_path / "ref")
    got = scenario(mnt / "m")
    assert got == ref
    e = lambda c: str(c)  # noqa: E731
    # B (other): reads user.*, may not write them; trusted.* invisible, not settable,
    # and not listed (probe 11, F7: the list showed its name).
    assert got[0] == "|".join(["b'readable'", e(errno.EACCES), e(errno.EACCES),
                               e(errno.ENODATA), e(errno.EPERM), "['user.shared']"])
    # A (owner, write permission): may change user.*, not trusted.*.
    assert got[1] == "|".join(["b'readable'", "None", "None", e(errno.ENODATA),
                               e(errno.EPERM), "['user.mine']"])
    # root lists both
    assert sorted(os.listxattr(mnt / "m" / "f")) == ["trusted.t", "user.mine"]
    # No read permission: no reading user.* either.
    assert got[2].split("|")[0] == e(errno.EACCES)


def test_many_attributes_and_list_limit(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"")
    names = [f"user.attr-{i:04d}-" + "x" * 200 for i in range(400)]
    stored = []
    err = 0
    for n in names:
        err = errno_of(lambda: os.setxattr(f, n, n.encode()))
        if err:
            break
        stored.append(n)
    # The name list is capped at 64 KiB (XATTR_LIST_MAX) so listxattr always works.
    assert err == errno.ENOSPC
    assert sum(len(n) + 1 for n in stored) <= 65536
    assert sorted(os.listxattr(f)) == stored
    for n in stored[::37]:
        assert os.getxattr(f, n) == n.encode()
    # Existing names can still be replaced; removing one makes room again.
    os.setxattr(f, stored[0], b"new value")
    os.removexattr(f, stored[1])
    os.setxattr(f, names[len(stored)], b"fits now")
    assert len(os.listxattr(f)) == len(stored)


def test_xattrs_go_with_the_file(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.k", b"old file")
    os.unlink(f)
    f.write_bytes(b"")
    assert os.listxattr(f) == []
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.k")
    # Unlinked while open: still accessible through the descriptor.
    os.setxattr(f, "user.k", b"v")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.unlink(f)
        assert os.getxattr(fd, "user.k") == b"v"
        os.setxattr(fd, "user.k2", b"v2")
        assert sorted(os.listxattr(fd)) == ["user.k", "user.k2"]
    finally:
        os.close(fd)


def test_getfattr_setfattr_tools(mnt: Path) -> None:
    if not shutil.which("getfattr") or not shutil.which("setfattr"):
        pytest.skip("attr tools not installed")
    f = mnt / "tool"
    f.write_bytes(b"")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)

    assert run("setfattr", "-n", "user.greeting", "-v", "hello world", str(f)).returncode == 0
    assert run("setfattr", "-n", "user.hex", "-v", "0x00ff10", str(f)).returncode == 0
    assert run("setfattr", "-n", "trusted.t", "-v", "tv", str(f)).returncode == 0
    r = run("getfattr", "--only-values", "-n", "user.greeting", str(f))
    assert r.returncode == 0 and r.stdout == "hello world"
    assert os.getxattr(f, "user.hex") == b"\x00\xff\x10"
    r = run("getfattr", "-d", "-m", "-", "--absolute-names", str(f))
    assert r.returncode == 0
    assert 'user.greeting="hello world"' in r.stdout
    assert 'trusted.t="tv"' in r.stdout
    assert "user.hex=0sAP8Q" in r.stdout
    r = run("getfattr", "-n", "user.missing", str(f))
    assert r.returncode != 0 and "No such attribute" in r.stderr
    assert run("setfattr", "-x", "user.greeting", str(f)).returncode == 0
    r = run("setfattr", "-x", "user.greeting", str(f))
    assert r.returncode != 0 and "No such attribute" in r.stderr
    assert sorted(os.listxattr(f)) == ["trusted.t", "user.hex"]
    # Restore from a dump onto another file.
    dump = run("getfattr", "-d", "-m", "-", str(f)).stdout
    g = mnt / "restored"
    g.write_bytes(b"")
    dump = dump.replace("# file: " + str(f).lstrip("/"), "# file: " + str(g).lstrip("/"))
    r = subprocess.run(["setfattr", "--restore=-"], input=dump, capture_output=True,
                       text=True, cwd="/", timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.getxattr(g, "user.hex") == b"\x00\xff\x10"
    assert os.getxattr(g, "trusted.t") == b"tv"
