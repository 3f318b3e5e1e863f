"""POSIX attribute semantics on a mounted sluice volume: permissions and ownership as
unprivileged uids (the kernel checks mode bits: default_permissions), setuid/setgid
handling, sticky and setgid directories, access(), and nanosecond timestamps (which
operations change atime, mtime and ctime; utimensat with UTIME_NOW / UTIME_OMIT).

Where the kernel decides, the expectation is what Linux does on ext4: several checks run
the same sequence on a plain directory under tmp_path and on the mount, and compare."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_as
from posix_util import (GID_A, GID_B, UID_A, UID_B, UTIME_NOW, UTIME_OMIT, make_traversable,
                        ns_tick, raises_errno, utimensat)

pytestmark = pytest.mark.mounted

#: an interpreter every uid can run (the venv's lives under /root)
PY = "/usr/bin/python3"


def user_errno(uid: int, gid: int, stmt: str) -> int:
    """Run the Python statement(s) `stmt` as uid/gid; 0 on success, else the errno."""
    if not os.access(PY, os.X_OK):
        pytest.skip(f"{PY} is needed to run code as other uids")
    code = "import os, sys\ntry:\n" + textwrap.indent(textwrap.dedent(stmt), "    ") + \
           "\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n"
    r = run_as(uid, gid, [PY, "-c", code], timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def user_out(uid: int, gid: int, code: str) -> str:
    r = run_as(uid, gid, [PY, "-c", textwrap.dedent(code)], timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def umnt(mnt: Path) -> Path:
    """The mount, reachable by every uid; a 0777 scratch directory in it."""
    make_traversable(mnt)
    d = mnt / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    return d


@pytest.fixture
def uref(tmp_path: Path) -> Path:
    """The same on the host filesystem (ext4), for comparison."""
    d = tmp_path / "ref"
    d.mkdir()
    make_traversable(d)
    os.chmod(d, 0o777)
    return d


def both(umnt: Path, uref: Path, fn: Callable[[Path], object]) -> object:
    """Run `fn` on the reference directory and on the mount; both results must agree."""
    ref, got = fn(uref), fn(umnt)
    assert got == ref, f"sluice gave {got!r}, ext4 gave {ref!r}"
    return got


# -- permission checks -----------------------------------------------------------------------

def test_private_file_of_another_user(umnt: Path) -> None:
    f = umnt / "secret"
    f.write_bytes(b"for A only")
    os.chown(f, UID_A, GID_A)
    os.chmod(f, 0o600)
    assert user_out(UID_A, GID_A, f"print(open({str(f)!r}).read())") == "for A only"
    assert user_errno(UID_B, GID_B, f"open({str(f)!r}).read()") == errno.EACCES
    assert user_errno(UID_B, GID_B, f"open({str(f)!r}, 'a')") == errno.EACCES
    assert user_errno(UID_B, GID_B, f"os.truncate({str(f)!r}, 0)") == errno.EACCES
    # Group members read through the group bits; others do not.
    os.chmod(f, 0o640)
    os.chown(f, UID_A, GID_B)
    assert user_out(UID_B, GID_B, f"print(open({str(f)!r}).read())") == "for A only"
    assert user_errno(UID_B, GID_B, f"open({str(f)!r}, 'a')") == errno.EACCES
    assert user_errno(UID_B, 4242, f"open({str(f)!r})") == errno.EACCES
    # The owner is judged by the owner bits alone, even when others may do more.
    os.chmod(f, 0o077)
    assert user_errno(UID_A, GID_A, f"open({str(f)!r})") == errno.EACCES
    assert user_out(UID_B, 4242, f"print(open({str(f)!r}).read())") == "for A only"
    assert f.read_bytes() == b"for A only"


def test_directory_permission_bits(umnt: Path) -> None:
    d = umnt / "ro"
    d.mkdir()
    (d / "existing").write_bytes(b"e")
    os.chown(d, UID_A, GID_A)
    os.chmod(d, 0o555)
    ds = str(d)
    # No write permission: no create, unlink, rename or mkdir.
    assert user_errno(UID_A, GID_A, f"open({ds!r} + '/new', 'w')") == errno.EACCES
    assert user_errno(UID_A, GID_A, f"os.mkdir({ds!r} + '/sub')") == errno.EACCES
    assert user_errno(UID_A, GID_A, f"os.unlink({ds!r} + '/existing')") == errno.EACCES
    assert user_errno(UID_A, GID_A,
                      f"os.rename({ds!r} + '/existing', {ds!r} + '/moved')") == errno.EACCES
    assert user_errno(UID_A, GID_A, f"os.symlink('x', {ds!r} + '/sym')") == errno.EACCES
    # Reading and searching still work.
    assert user_out(UID_A, GID_A, f"import os; print(os.listdir({ds!r}))") == "['existing']"
    # Search (x) without read: names resolve, listing fails.
    os.chmod(d, 0o311)
    assert user_errno(UID_A, GID_A, f"os.listdir({ds!r})") == errno.EACCES
    assert user_out(UID_A, GID_A, f"print(open({ds!r} + '/existing').read())") == "e"
    # Read without search: listing works, names do not resolve.
    os.chmod(d, 0o644)
    assert user_out(UID_A, GID_A, f"import os; print(os.listdir({ds!r}))") == "['existing']"
    assert user_errno(UID_A, GID_A, f"os.stat({ds!r} + '/existing')") == errno.EACCES
    assert user_errno(UID_A, GID_A, f"open({ds!r} + '/existing')") == errno.EACCES
    # Root is not bound by any of this.
    (d / "by-root").write_bytes(b"r")
    assert sorted(os.listdir(d)) == ["by-root", "existing"]


def test_chmod_chown_permissions(umnt: Path) -> None:
    f = umnt / "owned"
    f.write_bytes(b"x")
    os.chown(f, UID_A, GID_A)
    os.chmod(f, 0o644)
    fs_ = str(f)
    assert user_errno(UID_B, GID_B, f"os.chmod({fs_!r}, 0o777)") == errno.EPERM
    assert user_errno(UID_B, GID_B, f"os.chown({fs_!r}, {UID_B}, {GID_B})") == errno.EPERM
    assert user_errno(UID_B, GID_B, f"os.utime({fs_!r}, (1, 1))") == errno.EPERM
    # The owner may chmod, but may not give the file away or pick a foreign group.
    assert user_errno(UID_A, GID_A, f"os.chmod({fs_!r}, 0o600)") == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert user_errno(UID_A, GID_A, f"os.chown({fs_!r}, {UID_B}, -1)") == errno.EPERM
    assert user_errno(UID_A, GID_A, f"os.chown({fs_!r}, -1, {GID_B})") == errno.EPERM
    # Unchanged owner, or a group the owner is in: allowed.
    assert user_errno(UID_A, GID_A, f"os.chown({fs_!r}, {UID_A}, {GID_A})") == 0
    os.chown(f, UID_A, 0)
    assert user_errno(UID_A, GID_A, f"os.chown({fs_!r}, -1, {GID_A})") == 0
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (UID_A, GID_A)
    # Root may do anything.
    os.chown(f, UID_B, GID_B)
    os.chmod(f, 0o7777)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID_B, GID_B, 0o7777)
    # Symlinks: lchown changes the link, not the target.
    os.symlink("owned", umnt / "link")
    os.chown(umnt / "link", UID_A, GID_A, follow_symlinks=False)
    assert os.lstat(umnt / "link").st_uid == UID_A and os.stat(f).st_uid == UID_B


def test_setuid_setgid_cleared_like_ext4(umnt: Path, uref: Path) -> None:
    def scenario(d: Path) -> list[int]:
        f = d / "prog"
        f.write_bytes(b"#!/bin/sh\n")
        os.chown(f, UID_A, GID_A)
        modes = []

        def step(mode: int, action: Callable[[], object]) -> None:
            os.chmod(f, mode)
            action()
            modes.append(stat.S_IMODE(os.stat(f).st_mode))

        fs_ = str(f)
        # Written by its (unprivileged) owner: both bits go (group exec set).
        step(0o6755, lambda: user_errno(UID_A, GID_A, f"open({fs_!r}, 'a').write('x')"))
        # setgid without group exec (a locking marker) stays; setuid goes.
        step(0o6745, lambda: user_errno(UID_A, GID_A, f"open({fs_!r}, 'a').write('x')"))
        # Truncation by the owner, through truncate() and through O_TRUNC.
        step(0o6755, lambda: user_errno(UID_A, GID_A, f"os.truncate({fs_!r}, 1)"))
        step(0o6755, lambda: user_errno(UID_A, GID_A,
                                        f"os.close(os.open({fs_!r}, os.O_WRONLY|os.O_TRUNC))"))
        # O_TRUNC of a file that is already empty clears them too.
        step(0o6755, lambda: user_errno(UID_A, GID_A,
                                        f"os.close(os.open({fs_!r}, os.O_WRONLY|os.O_TRUNC))"))
        # Root (CAP_FSETID) writing keeps them.
        step(0o6755, lambda: _append(f, b"root"))
        # chown by root clears them, even to the same owner.
        step(0o6755, lambda: os.chown(f, UID_A, GID_A))
        step(0o2755, lambda: os.chown(f, -1, GID_B))
        step(0o6755, lambda: os.chown(f, -1, -1))  # even a chown that changes nothing
        os.chown(f, UID_A, GID_A)
        step(0o6755, lambda: user_errno(UID_A, GID_A, f"os.chown({fs_!r}, -1, {GID_A})"))
        # chmod by an owner outside the file's group cannot set setgid.
        os.chown(f, UID_A, GID_B)
        step(0o0755, lambda: user_errno(UID_A, GID_A, f"os.chmod({fs_!r}, 0o2755)"))
        # A directory keeps its bits on chown.
        os.mkdir(d / "dir")
        os.chmod(d / "dir", 0o3755)
        os.chown(d / "dir", UID_A, GID_A)
        modes.append(stat.S_IMODE(os.stat(d / "dir").st_mode))
        return modes

    got = both(umnt, uref, scenario)
    assert got == [0o755, 0o2745, 0o755, 0o755, 0o755, 0o6755, 0o755, 0o755, 0o755, 0o755,
                   0o755, 0o3755]


def test_mmap_write_back_keeps_set_id_bits_set_after_the_store_like_ext4(
        umnt: Path, uref: Path) -> None:
    """Probe 21, F3: the owner stores into a shared mapping, then sets the set-ID bits,
    then the stores are written back (msync). ext4 keeps the bits: a write-back is no
    write(2) of a process (mmap stores do not clear them at all). sluice cleared them
    at the write-back's WRITE, which the kernel sends with flags 0; a write(2) by the
    owner afterwards still clears them, on both."""
    def scenario(d: Path) -> list[int]:
        f = d / "mapped"
        f.write_bytes(b"." * 8192)
        os.chown(f, UID_A, GID_A)
        os.chmod(f, 0o755)
        fs_ = str(f)
        out = user_out(UID_A, GID_A, f"""
            import mmap, os, stat
            fd = os.open({fs_!r}, os.O_RDWR)
            m = mmap.mmap(fd, 8192)
            m[0:5] = b"STORE"
            m[4096:4101] = b"PAGE2"
            os.chmod({fs_!r}, 0o6755)
            m.flush()
            after_flush = stat.S_IMODE(os.stat({fs_!r}).st_mode)
            m.close()
            os.close(fd)
            after_close = stat.S_IMODE(os.stat({fs_!r}).st_mode)
            with open({fs_!r}, "r+b") as w:
                w.write(b"W")
            print(after_flush, after_close, stat.S_IMODE(os.stat({fs_!r}).st_mode))
        """)
        data = f.read_bytes()
        assert data[:5] == b"WTORE" and data[4096:4101] == b"PAGE2", data[:8]
        return [int(x) for x in out.split()]

    got = both(umnt, uref, scenario)
    assert got == [0o6755, 0o6755, 0o755], [oct(x) for x in got]


def test_sticky_directory(umnt: Path, uref: Path) -> None:
    def scenario(base: Path) -> list[int]:
        t = base / "tmp"
        t.mkdir()
        os.chmod(t, 0o1777)
        ts = str(t)
        out = [user_errno(UID_A, GID_A, f"open({ts!r} + '/a-file', 'w').write('A')"),
               user_errno(UID_A, GID_A, f"os.mkdir({ts!r} + '/a-dir')"),
               user_errno(UID_B, GID_B, f"open({ts!r} + '/b-file', 'w').write('B')")]
        # B may not remove or rename A's entries, nor replace them by rename.
        out += [user_errno(UID_B, GID_B, f"os.unlink({ts!r} + '/a-file')"),
                user_errno(UID_B, GID_B, f"os.rmdir({ts!r} + '/a-dir')"),
                user_errno(UID_B, GID_B, f"os.rename({ts!r} + '/a-file', {ts!r} + '/stolen')"),
                user_errno(UID_B, GID_B, f"os.rename({ts!r} + '/b-file', {ts!r} + '/a-file')")]
        # Even when the file itself is writable by B.
        os.chmod(t / "a-file", 0o666)
        out.append(user_errno(UID_B, GID_B, f"os.unlink({ts!r} + '/a-file')"))
        out.append(user_errno(UID_B, GID_B, f"open({ts!r} + '/a-file', 'a').write('b')"))
        # Owners remove their own; root removes anything.
        out += [user_errno(UID_B, GID_B, f"os.rename({ts!r} + '/b-file', {ts!r} + '/b2')"),
                user_errno(UID_B, GID_B, f"os.unlink({ts!r} + '/b2')"),
                user_errno(UID_A, GID_A, f"os.rmdir({ts!r} + '/a-dir')")]
        out.append(len((t / "a-file").read_bytes()))
        os.unlink(t / "a-file")
        out.append(len(os.listdir(t)))
        return out

    got = both(umnt, uref, scenario)
    assert got[:3] == [0, 0, 0]
    assert all(e in (errno.EPERM, errno.EACCES) for e in got[3:7]), got
    assert got[7] in (errno.EPERM, errno.EACCES)
    assert got[8:12] == [0, 0, 0, 0] and got[12:] == [2, 0]


def test_setgid_directory_inheritance(umnt: Path, uref: Path) -> None:
    def scenario(base: Path) -> list:
        g = base / "proj"
        g.mkdir()
        os.chown(g, 0, 4321)
        os.chmod(g, 0o2777)
        gs = str(g)
        user_errno(UID_A, GID_A, f"open({gs!r} + '/file', 'w').write('x')")
        user_errno(UID_A, GID_A, f"os.mkdir({gs!r} + '/sub', 0o755)")
        user_errno(UID_A, GID_A, f"os.mkdir({gs!r} + '/sub/deeper', 0o700)")
        # A non-member asking for setgid + group exec on a new file does not get setgid.
        user_errno(UID_A, GID_A, f"os.close(os.open({gs!r} + '/prog', os.O_CREAT|os.O_WRONLY,"
                                 f" 0o2755))")
        user_errno(UID_A, GID_A, f"os.mkfifo({gs!r} + '/fifo', 0o644)")
        os.mkdir(g / "rootdir", 0o755)
        os.close(os.open(g / "rootprog", os.O_CREAT | os.O_WRONLY, 0o2755))
        out = []
        for n in ("file", "sub", "sub/deeper", "prog", "fifo", "rootdir", "rootprog"):
            st = os.stat(g / n)
            out.append((n, st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))))
        return out

    got = both(umnt, uref, scenario)
    assert got == [("file", UID_A, 4321, "0o644"), ("sub", UID_A, 4321, "0o2755"),
                   ("sub/deeper", UID_A, 4321, "0o2700"), ("prog", UID_A, 4321, "0o755"),
                   ("fifo", UID_A, 4321, "0o644"), ("rootdir", 0, 4321, "0o2755"),
                   ("rootprog", 0, 4321, "0o2755")]


def test_access_checks(umnt: Path, uref: Path) -> None:
    def scenario(base: Path) -> list:
        out = []
        for name, mode, owner in (("mine-ro", 0o444, UID_A), ("mine-x", 0o700, UID_A),
                                  ("theirs", 0o600, UID_B), ("other-r", 0o604, UID_B),
                                  ("none", 0o000, UID_B), ("noexec", 0o644, UID_B),
                                  ("gx", 0o010, UID_B)):
            p = base / name
            p.write_bytes(b"")
            os.chown(p, owner, GID_B)
            os.chmod(p, mode)
            ps = str(p)
            out.append(user_out(UID_A, GID_A, f"""
                import os
                print([os.access({ps!r}, m) for m in
                       (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK)])"""))
            out.append([os.access(p, m) for m in (os.F_OK, os.R_OK, os.W_OK, os.X_OK)])
        out.append(os.access(base / "missing", os.F_OK))
        return out

    got = both(umnt, uref, scenario)
    user = got[0:14:2]
    root = got[1:14:2]
    assert user == ["[True, True, False, False, False]", "[True, True, True, True, True]",
                    "[True, False, False, False, False]", "[True, True, False, False, False]",
                    "[True, False, False, False, False]", "[True, True, False, False, False]",
                    "[True, False, False, False, False]"]
    # Root: read and write always; execute only if some x bit is set.
    assert root == [[True, True, True, False], [True, True, True, True],
                    [True, True, True, False], [True, True, True, False],
                    [True, True, True, False], [True, True, True, False],
                    [True, True, True, True]]
    assert got[-1] is False


def test_root_bypasses_rw_but_not_exec(umnt: Path) -> None:
    f = umnt / "locked"
    f.write_bytes(b"#!/bin/sh\necho ran\n")
    os.chown(f, UID_A, GID_A)
    os.chmod(f, 0o000)
    assert f.read_bytes().startswith(b"#!/bin/sh")
    with open(f, "ab") as fh:
        fh.write(b"# appended by root\n")
    with raises_errno(errno.EACCES):
        subprocess.run([str(f)], check=False)
    os.chmod(f, 0o100)  # only the owner may execute; root may because an x bit is set
    # (the mount is nosuid/nodev, not noexec)
    r = subprocess.run([str(f)], capture_output=True, text=True)
    assert r.stdout == "ran\n"
    # A directory without any permission is still searchable and listable by root.
    d = umnt / "closed"
    d.mkdir()
    (d / "in").write_bytes(b"i")
    os.chmod(d, 0o000)
    assert os.listdir(d) == ["in"] and (d / "in").read_bytes() == b"i"


def test_utime_permissions(umnt: Path, uref: Path) -> None:
    def scenario(base: Path) -> list[int]:
        f = base / "f"
        f.write_bytes(b"")
        os.chown(f, UID_A, GID_A)
        fs_ = str(f)
        out = []
        for mode in (0o666, 0o644):
            os.chmod(f, mode)
            out += [user_errno(UID_B, GID_B, f"os.utime({fs_!r})"),  # UTIME_NOW both
                    user_errno(UID_B, GID_B, f"os.utime({fs_!r}, ns=(1, 1))"),
                    user_errno(UID_A, GID_A, f"os.utime({fs_!r}, ns=(1, 1))")]
        return out

    assert both(umnt, uref, scenario) == [0, errno.EPERM, 0, errno.EACCES, errno.EPERM, 0]


# -- timestamps ---------------------------------------------------------------------------------

def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as fh:
        fh.write(data)


def _times(p: Path | str) -> tuple[int, int, int]:
    st = os.stat(p, follow_symlinks=False)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def test_create_sets_all_times_and_parent_times(mnt: Path) -> None:
    os.mkdir(mnt / "d")
    ns_tick()
    before = time.time_ns()
    (mnt / "d" / "f").write_bytes(b"")
    after = time.time_ns()
    a, m, c = _times(mnt / "d" / "f")
    assert before <= c <= after and a == m == c
    _pa, pm, pc = _times(mnt / "d")
    assert before <= pm <= after and pm == pc
    # Not all timestamps are whole seconds or microseconds: nanoseconds are kept.
    stamps = []
    for i in range(5):
        (mnt / "d" / f"g{i}").write_bytes(b"")
        stamps.append(_times(mnt / "d" / f"g{i}")[2])
    assert any(s % 1000 for s in stamps)
    for kind in ("dir", "symlink", "fifo"):
        ns_tick()
        before = time.time_ns()
        p = mnt / "d" / kind
        if kind == "dir":
            os.mkdir(p)
        elif kind == "symlink":
            os.symlink("target", p)
        else:
            os.mkfifo(p)
        a, m, c = _times(p)
        assert before <= c <= time.time_ns() and a == m == c, kind
        assert _times(mnt / "d")[1] >= before


def test_write_and_truncate_change_mtime_ctime_not_atime(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"1234")
    a0, m0, c0 = _times(f)
    ns_tick()
    fd = os.open(f, os.O_WRONLY)
    try:
        before = time.time_ns()
        os.write(fd, b"ab")
        a1, m1, c1 = _times(f)
        assert a1 == a0 and before <= m1 == c1 <= time.time_ns()
        ns_tick()
        os.ftruncate(fd, 1)
        a2, m2, c2 = _times(f)
        assert a2 == a0 and m2 == c2 > m1
        ns_tick()
        os.write(fd, b"")  # an empty write changes nothing
        assert _times(f) == (a2, m2, c2)
    finally:
        os.close(fd)
    ns_tick()
    os.truncate(f, 4096)
    a3, m3, c3 = _times(f)
    assert a3 == a0 and m3 == c3 > m2
    assert f.read_bytes() == b"a" + bytes(4095)


def test_open_trunc_updates_times_even_when_empty(mnt: Path, tmp_path: Path) -> None:
    for d in (tmp_path, mnt):
        f = d / "empty"
        f.write_bytes(b"")
        _a, m0, c0 = _times(f)
        ns_tick()
        os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
        _a, m1, c1 = _times(f)
        assert m1 > m0 and c1 > c0, d
    # Opening without O_TRUNC changes nothing.
    t = _times(mnt / "empty")
    ns_tick()
    os.close(os.open(mnt / "empty", os.O_WRONLY))
    assert _times(mnt / "empty") == t


def test_metadata_changes_touch_ctime_only(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"data")
    a0, m0, c0 = _times(f)
    for change in (lambda: os.chmod(f, 0o600), lambda: os.chown(f, UID_A, GID_A),
                   lambda: os.setxattr(f, "user.k", b"v"), lambda: os.removexattr(f, "user.k")):
        ns_tick()
        before = time.time_ns()
        change()
        a, m, c = _times(f)
        assert (a, m) == (a0, m0) and before <= c <= time.time_ns()


def test_rename_link_unlink_times(mnt: Path) -> None:
    os.mkdir(mnt / "src")
    os.mkdir(mnt / "dst")
    f = mnt / "src" / "f"
    f.write_bytes(b"x")
    a0, m0, _c0 = _times(f)
    ns_tick()
    before = time.time_ns()
    os.rename(f, mnt / "dst" / "g")
    a, m, c = _times(mnt / "dst" / "g")
    assert (a, m) == (a0, m0) and c >= before  # the moved inode's ctime (as ext4)
    for d in ("src", "dst"):
        _pa, pm, pc = _times(mnt / d)
        assert pm == pc >= before, d
    # A directory moved to another parent: its ctime, both parents' mtime/ctime.
    os.mkdir(mnt / "src" / "sub")
    sub_a, sub_m, _ = _times(mnt / "src" / "sub")
    ns_tick()
    before = time.time_ns()
    os.rename(mnt / "src" / "sub", mnt / "dst" / "sub")
    a, m, c = _times(mnt / "dst" / "sub")
    assert (a, m) == (sub_a, sub_m) and c >= before
    assert _times(mnt / "src")[1] >= before and _times(mnt / "dst")[1] >= before

    # link: the inode's ctime and the new parent's mtime/ctime.
    g = mnt / "dst" / "g"
    a0, m0, _ = _times(g)
    src_m = _times(mnt / "src")[1]
    ns_tick()
    before = time.time_ns()
    os.link(g, mnt / "src" / "h")
    a, m, c = _times(g)
    assert (a, m) == (a0, m0) and c >= before
    assert _times(mnt / "src")[1] >= before > src_m
    # unlink of one name: the inode's ctime (seen through the other name), the parent's.
    ns_tick()
    before = time.time_ns()
    os.unlink(g)
    a, m, c = _times(mnt / "src" / "h")
    assert (a, m) == (a0, m0) and c >= before
    _pa, pm, pc = _times(mnt / "dst")
    assert pm == pc >= before
    # rmdir: the parent's mtime/ctime.
    ns_tick()
    before = time.time_ns()
    os.rmdir(mnt / "dst" / "sub")
    assert _times(mnt / "dst")[1] >= before


def test_atime_relatime_rules(mnt: Path, tmp_path: Path) -> None:
    """relatime (the mount's option, as on ext4): a read updates atime when atime is not
    newer than mtime/ctime; a second read does not."""
    def scenario(d: Path) -> list[bool]:
        f = d / "f"
        f.write_bytes(b"contents")
        os.utime(f, ns=(10**18, 10**18))  # atime == mtime: next read updates
        out = []
        ns_tick()
        f.read_bytes()
        a1 = _times(f)[0]
        out.append(a1 > 10**18)
        ns_tick()
        f.read_bytes()
        out.append(_times(f)[0] == a1)  # atime newer than mtime and ctime: unchanged
        ns_tick()
        with open(f, "r+b") as fh:
            fh.write(b"C")
        ns_tick()
        f.read_bytes()
        a3 = _times(f)[0]
        out.append(a3 > a1)  # first read after a write updates
        ns_tick()
        f.read_bytes()
        out.append(_times(f)[0] == a3)
        # Old atime (more than a day): updated even though it is newer than mtime.
        old = time.time_ns() - 3 * 86400 * 10**9
        os.utime(f, ns=(old, old - 10**9))
        f.read_bytes()
        out.append(_times(f)[0] > old)
        # An explicit atime newer than mtime survives a read.
        future = time.time_ns() + 3600 * 10**9
        os.utime(f, ns=(future, 10**18))
        f.read_bytes()
        out.append(_times(f)[0] == future)
        return out

    assert scenario(tmp_path) == scenario(mnt) == [True] * 6


def test_utime_nanoseconds_and_special_values(mnt: Path, tmp_path: Path) -> None:
    def scenario(d: Path) -> list:
        f = d / "f"
        f.write_bytes(b"x")
        out = []
        os.utime(f, ns=(1_234_567_890_123_456_789, 987_654_321_987_654_321))
        out.append(_times(f)[:2])
        # Before 1970 and after 2038.
        os.utime(f, ns=(-1_500_000_001, 2**33 * 10**9 + 7))
        out.append(_times(f)[:2])
        # utimensat: UTIME_OMIT keeps a time, UTIME_NOW sets the current time.
        os.utime(f, ns=(5_000_000_005, 6_000_000_006))
        utimensat(f, (0, UTIME_OMIT), (123, 456))
        out.append(_times(f)[:2])
        utimensat(f, (77, 78), (0, UTIME_OMIT))
        out.append(_times(f)[:2])
        _a, _m, c0 = _times(f)
        ns_tick()
        utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))  # nothing at all changes
        out.append(_times(f) == (77_000_000_078, 123_000_000_456, c0))
        return out

    expected = [(1_234_567_890_123_456_789, 987_654_321_987_654_321),
                (-1_500_000_001, 2**33 * 10**9 + 7),
                (5_000_000_005, 123_000_000_456),
                (77_000_000_078, 123_000_000_456), True]
    assert scenario(tmp_path) == expected
    assert scenario(mnt) == expected

    f = mnt / "f"
    # UTIME_NOW: the current time (the kernel's clock is coarse: allow a few ms).
    slack = 20_000_000
    before = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    a, m, c = _times(f)
    assert before - slack <= a <= time.time_ns() and m == 123_000_000_456
    assert before - slack <= c <= time.time_ns()
    before = time.time_ns()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))
    a2, m2, c2 = _times(f)
    assert a2 == a and before - slack <= m2 <= time.time_ns()
    os.utime(f)  # both now
    a3, m3, _ = _times(f)
    assert a3 >= a2 and m3 >= m2
    # Symlinks: times of the link itself (AT_SYMLINK_NOFOLLOW).
    os.symlink("f", mnt / "l")
    t_target = _times(f)
    utimensat(mnt / "l", (11, 12), (13, 14), follow=False)
    assert _times(mnt / "l")[:2] == (11_000_000_012, 13_000_000_014)
    assert _times(f) == t_target
    # Directories too.
    os.utime(mnt, ns=(42, 43))
    assert _times(mnt)[:2] == (42, 43)


def test_readdir_updates_directory_atime(mnt: Path, tmp_path: Path) -> None:
    def scenario(d: Path) -> list[bool]:
        sub = d / "sub"
        sub.mkdir()
        (sub / "x").write_bytes(b"")
        os.utime(sub, ns=(10**18, 10**18))
        ns_tick()
        os.listdir(sub)
        a1 = _times(sub)[0]
        ns_tick()
        os.listdir(sub)
        return [a1 > 10**18, _times(sub)[0] == a1]

    assert scenario(tmp_path) == scenario(mnt) == [True, True]


def test_fstat_times_on_unlinked_file(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        ns_tick()
        before = time.time_ns()
        os.unlink(f)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_ctime_ns >= before
        ns_tick()
        os.write(fd, b"Z")
        st2 = os.fstat(fd)
        assert st2.st_mtime_ns > st.st_mtime_ns and st2.st_size == 3
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
