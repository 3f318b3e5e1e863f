"""Probe 21 (external stress suites and a differential fuzzer against ext4): what it
found, each fixed with a test that fails on the code before it."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import sys
from pathlib import Path

import pytest

from conftest import make_volume, sluice

pytestmark = pytest.mark.mounted


@pytest.fixture(params=["pager", "kernel-cache", "writeback"])
def amnt(request, tmp_path: Path, mount_factory) -> Path:
    """A mount in each way a write can reach the daemon: through the pager
    (write-through), with the file in the kernel's page cache
    (user.sluice.cache=kernel on the directory), and a --writeback mount."""
    vol = make_volume(tmp_path / "vol", "256M")
    extra = ("--writeback",) if request.param == "writeback" else ()
    m = mount_factory(vol, *extra)
    d = m.path / "d"
    d.mkdir()
    if request.param == "kernel-cache":
        os.setxattr(d, "user.sluice.cache", b"kernel")
    return d


def test_mmap_stores_through_a_file_opened_for_append_land_at_their_page(amnt: Path) -> None:
    """F2 (a): Python's open(p, "a+b") then mmap: the stores were written back at the
    end of the file (it grew by a page, the stored bytes lost), because the daemon
    placed every write of a handle opened O_APPEND at the end. A write-back of cached
    pages carries no O_APPEND: it lands where it belongs, as on ext4."""
    p = amnt / "aplus.bin"
    p.write_bytes(b"." * 8192)
    with open(p, "a+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[0:5] = b"HELLO"
        m[4096:4101] = b"WORLD"
        m.flush()
        m.close()
        f.write(b"tail")  # a real append still goes to the end
    data = p.read_bytes()
    assert len(data) == 8196, len(data)
    assert data[:5] == b"HELLO" and data[4096:4101] == b"WORLD"
    assert data[5:4096] == b"." * 4091 and data[-4:] == b"tail"


def test_a_write_after_fcntl_takes_o_append_away_goes_to_its_offset(amnt: Path) -> None:
    """F2 (b): fcntl(F_SETFL) without O_APPEND was ignored: later write and pwrite
    still appended (0123456789ABX instead of AB234X6789). The kernel sends the file's
    flags as they are now with each write; the daemon decides by them. And setting
    O_APPEND again appends again."""
    p = amnt / "toggle.txt"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"0123456789")
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"AB")
        os.pwrite(fd, b"X", 5)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"!")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"AB234X6789!"
    # and a file opened without O_APPEND that is given it appends
    fd = os.open(p, os.O_WRONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
        os.write(fd, b"?")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"AB234X6789!?"


CREATE_AT_LIMIT = r"""
import errno, os, sys
d = sys.argv[1]
held = os.path.join(d, "held")
open(held, "w").close()
fds = [os.open(held, os.O_RDONLY) for _ in range(8)]
out = []
for how in ("create", "tmpfile"):
    try:
        if how == "create":
            os.close(os.open(os.path.join(d, "new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            os.close(os.open(d, os.O_RDWR | os.O_TMPFILE, 0o600))
        out.append("opened")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
os.close(fds.pop())  # (reading the directory takes a handle too)
out.append(",".join(sorted(os.listdir(d))))
for fd in fds:
    os.close(fd)
os.close(os.open(os.path.join(d, "new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
out.append("retried")
print(" ".join(out))
"""


def test_a_create_refused_for_the_callers_open_file_bank_makes_no_file(
        tmp_path: Path, mount_factory) -> None:
    """F4: open(O_CREAT) that failed with EMFILE (the principal's `grants` bank full)
    had made the file all the same: readdir listed it, stat said ENOENT (the kernel's
    negative entry), and the caller's retry with O_EXCL got EEXIST; O_TMPFILE left an
    inode nobody held. Now neither makes anything, and the inode count is unchanged."""
    vol = make_volume(tmp_path / "vol", "256M")
    m = mount_factory(vol)
    sluice("principal", "add", str(m.path), "alice", "--grants", "8")
    d = m.path / "d"
    d.mkdir()
    before = json.loads(sluice("stats", str(m.path), "--json").stdout)["fs"]["inodes"]
    r = sluice("run", str(m.path), "--principal", "alice", "--", sys.executable, "-c",
               CREATE_AT_LIMIT, str(d), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["EMFILE", "EMFILE", "held", "retried"], r.stdout
    after = json.loads(sluice("stats", str(m.path), "--json").stdout)["fs"]["inodes"]
    assert after == before + 2  # "held" and "new", nothing else


def test_fallocate_changes_the_files_times_in_every_mode(amnt: Path) -> None:
    """F5: fallocate mode 0 inside the file, and with FALLOC_FL_KEEP_SIZE, left mtime
    and ctime alone (make and rsync saw no change); Linux's local filesystems update
    both in every mode (`file_modified`)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    p = amnt / "f"
    p.write_bytes(b"x" * 65536)
    for mode, off, length in [(0, 0, 65536), (1, 65536, 65536)]:  # 1: KEEP_SIZE
        os.utime(p, ns=(10**18, 10**18))
        ctime0 = p.stat().st_ctime_ns
        fd = os.open(p, os.O_RDWR)
        try:
            assert libc.fallocate(fd, mode, off, length) == 0, ctypes.get_errno()
        finally:
            os.close(fd)
        st = p.stat()
        assert st.st_mtime_ns > 10**18 + 10**15, (mode, st.st_mtime_ns)
        assert st.st_ctime_ns >= ctime0 and st.st_size == 65536
