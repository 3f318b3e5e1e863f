"""Helpers shared by the POSIX conformance tests (test_posix_*.py): libc calls Python
does not wrap (renameat2, utimensat with UTIME_NOW/UTIME_OMIT, linkat), errno
assertions, and making a mount reachable by unprivileged uids."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE
SYS_renameat2 = 316  # x86_64

#: unprivileged identities used by the permission tests
UID_A, GID_A = 1000, 1000
UID_B, GID_B = 1001, 1001


def _check(ret: int, *what: object) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), *[str(w) for w in what[:1]])
    return ret


def renameat2(old: os.PathLike | str, new: os.PathLike | str, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE / RENAME_EXCHANGE)."""
    o, n = os.fsencode(old), os.fsencode(new)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        ret = fn(AT_FDCWD, o, AT_FDCWD, n, flags)
    else:
        _libc.syscall.restype = ctypes.c_long
        ret = _libc.syscall(ctypes.c_long(SYS_renameat2), ctypes.c_int(AT_FDCWD),
                            ctypes.c_char_p(o), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(n),
                            ctypes.c_uint(flags))
    _check(ret, old)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: os.PathLike | str, atime: tuple[int, int], mtime: tuple[int, int],
              *, follow: bool = True) -> None:
    """utimensat(2); each time is (sec, nsec), nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                                ctypes.c_int]
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), ts,
                           0 if follow else AT_SYMLINK_NOFOLLOW), path)


def link_follow(src: os.PathLike | str, new: os.PathLike | str) -> None:
    """linkat(AT_FDCWD, src, AT_FDCWD, new, AT_SYMLINK_FOLLOW). (os.link without dir_fd
    calls link(2), which does not follow: on /proc/self/fd/N that gives EXDEV.)"""
    _libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_int]
    _check(_libc.linkat(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(new),
                        AT_SYMLINK_FOLLOW), new)


def linkat_fd(fd: int, new: os.PathLike | str) -> None:
    """linkat(fd, "", AT_FDCWD, new, AT_EMPTY_PATH): give an open file a name."""
    _libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_int]
    _check(_libc.linkat(fd, b"", AT_FDCWD, os.fsencode(new), AT_EMPTY_PATH), new)


@contextlib.contextmanager
def raises_errno(*codes: int) -> Iterator[pytest.ExceptionInfo]:
    """Like pytest.raises(OSError) but the errno must be one of `codes`."""
    with pytest.raises(OSError) as ei:
        yield ei
    assert ei.value.errno in codes, \
        f"expected {[errno.errorcode[c] for c in codes]}, got " \
        f"{errno.errorcode.get(ei.value.errno, ei.value.errno)}: {ei.value}"


def errno_of(fn: Callable[[], object]) -> int:
    """Run `fn`; 0 if it succeeds, else the errno of the OSError it raised."""
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def make_traversable(path: Path) -> None:
    """Let every uid search the directories leading to `path` (pytest's tmp dirs are 0700),
    so unprivileged processes can reach a mount point below it."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        st = d.stat()
        if st.st_mode & 0o001 == 0:
            os.chmod(d, (st.st_mode & 0o7777) | 0o011)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def ns_tick() -> None:
    """Sleep long enough that a new timestamp differs from the last one."""
    time.sleep(0.02)
