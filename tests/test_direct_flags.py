"""Open flags on the direct path (issue 6, defect 10): O_TRUNC, O_EXCL and O_APPEND do
what they do for a program through the mount. Each case runs both ways on the same
volume and compares sizes, contents and errnos; appends race appenders through the
mount and must neither overlap nor interleave.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from kernelshim.client import AsyncClient, Client
from shim_util import pubmnt, user_python  # noqa: F401 (fixture)

pytestmark = pytest.mark.mounted


def test_w_truncates_like_the_mount(mnt: Path) -> None:
    for name in ("via-mount", "via-direct"):
        (mnt / name).write_bytes(b"x" * 10_000)
    fd = os.open(mnt / "via-mount", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"hello")
    os.close(fd)
    with Client.connect(mnt) as c:
        with c.open("via-direct", "w") as f:
            f.write(b"hello")
        with c.open("via-direct", "w+") as f:  # read back what a fresh "w+" leaves
            assert f.size() == 0 and f.read() == b""
            f.write(b"hello")
    for name in ("via-mount", "via-direct"):
        assert (mnt / name).read_bytes() == b"hello", name
        st = os.stat(mnt / name)
        assert st.st_size == 5 and st.st_blocks == 8, (name, st)


def test_w_truncation_updates_times_and_keeps_others_consistent(mnt: Path) -> None:
    p = mnt / "f"
    p.write_bytes(b"y" * 50_000)
    os.utime(p, ns=(10**18, 10**18))
    before = os.stat(p)
    fd = os.open(p, os.O_RDONLY)  # a reader through the mount sees the new size
    try:
        with Client.connect(mnt) as c:
            c.open("f", "w").close()
        st = os.stat(p)
        assert st.st_size == 0 and st.st_mtime_ns > before.st_mtime_ns
        assert st.st_ctime_ns >= st.st_mtime_ns
        assert os.pread(fd, 100, 0) == b""
    finally:
        os.close(fd)
    # An empty file opened "w" gets new times too, as through the mount.
    os.utime(p, ns=(10**18, 10**18))
    with Client.connect(mnt) as c:
        c.open("f", "w").close()
    assert os.stat(p).st_mtime_ns > 10**18


def test_trunc_as_another_user(pubmnt: Path) -> None:
    """O_TRUNC needs write permission, and with it truncates, for a user as for root."""
    mnt = pubmnt
    p, q = mnt / "ro", mnt / "rw"
    p.write_bytes(b"keep")
    os.chmod(p, 0o644)
    q.write_bytes(b"z" * 10_000)
    os.chmod(q, 0o666)
    out = user_python(f"""
import os
from kernelshim.client import Client
try:
    os.open({str(p)!r}, os.O_WRONLY | os.O_TRUNC)
except OSError as exc:
    print("mount", exc.errno)
with Client.connect({str(mnt)!r}) as c:
    try:
        c.open("ro", "w")
    except OSError as exc:
        print("direct", exc.errno)
    with c.open("rw", "w") as f:
        f.write(b"user")
""")
    assert out.split() == ["mount", str(errno.EACCES), "direct", str(errno.EACCES)]
    assert p.read_bytes() == b"keep"
    assert q.read_bytes() == b"user"


def test_x_is_exclusive_and_w_truncates_like_the_mount(mnt: Path) -> None:
    (mnt / "there").write_bytes(b"old")
    with pytest.raises(OSError) as mount_err:
        os.open(mnt / "there", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with Client.connect(mnt) as c:
        with pytest.raises(OSError) as direct_err:
            c.open("there", "x")
        with pytest.raises(FileExistsError):
            c.open("there", "x+")
        with c.open("new", "x") as f:
            f.write(b"fresh")
    assert mount_err.value.errno == direct_err.value.errno == errno.EEXIST
    assert (mnt / "there").read_bytes() == b"old"
    assert (mnt / "new").read_bytes() == b"fresh"
    # "x" after "w" on what "w" left: the same file, shorter, still exclusive.
    with Client.connect(mnt) as c:
        with c.open("new", "w") as f:
            f.write(b"f")
        with pytest.raises(FileExistsError):
            c.open("new", "x")
    assert (mnt / "new").read_bytes() == b"f"


def test_a_appends_at_eof(mnt: Path) -> None:
    p = mnt / "log"
    p.write_bytes(b"0123456789")
    with Client.connect(mnt, shm_size=1 << 16) as c:
        with c.open("log", "a") as f:
            # Someone else appends through the mount between this client's writes.
            assert f.write(b"AB") == 2
            with open(p, "ab") as g:
                g.write(b"mount")
            f.write(b"CD")
            assert f.tell() == 19
            f.write(b"z" * 200_000)  # larger than the shared buffer: appended piecewise
    assert p.read_bytes() == b"0123456789ABmountCD" + b"z" * 200_000
    # "a" creates, like O_CREAT|O_APPEND through the mount.
    with Client.connect(mnt) as c:
        with c.open("fresh", "a") as f:
            f.write(b"1")
            f.write(b"2")
    assert (mnt / "fresh").read_bytes() == b"12"


async def test_async_client_flags(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x" * 10_000)
    c = await AsyncClient.connect(mnt)
    async with c:
        f = await c.open("f", "w")
        await f.write(b"w")
        await f.close()
        assert (mnt / "f").read_bytes() == b"w"
        with pytest.raises(FileExistsError):
            await c.open("f", "x")
        f = await c.open("f", "a")
        await f.write(b"a1")
        with open(mnt / "f", "ab") as g:
            g.write(b"-m-")
        await f.write(b"a2")
        await f.close()
    assert (mnt / "f").read_bytes() == b"wa1-m-a2"


RECORD = 1000  # bytes; not a multiple of the block size, so appends share blocks


def _appender(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_appends_through_mount_and_socket(mnt: Path) -> None:
    """Two processes append records through the mount with O_APPEND while two direct
    clients append with "a": every record lands whole, at its own place, none lost."""
    p = mnt / "shared.log"
    p.write_bytes(b"")
    n = 150
    mount_code = f"""
import os
fd = os.open({str(p)!r}, os.O_WRONLY | os.O_APPEND)
for i in range({n}):
    rec = b"%s%05d" % (TAG, i)
    os.write(fd, rec + b"." * ({RECORD} - len(rec) - 1) + b"\\n")
os.close(fd)
"""
    direct_code = f"""
from kernelshim.client import Client
with Client.connect({str(mnt)!r}, shm_size=1 << 16) as c:
    with c.open("shared.log", "a") as f:
        for i in range({n}):
            rec = b"%s%05d" % (TAG, i)
            f.write(rec + b"." * ({RECORD} - len(rec) - 1) + b"\\n")
"""
    procs = [_appender(f"TAG = b'{tag}'\n" + textwrap.dedent(code))
             for tag, code in (("M", mount_code), ("N", mount_code),
                               ("D", direct_code), ("E", direct_code))]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    data = p.read_bytes()
    assert len(data) == 4 * n * RECORD
    seen: dict[bytes, list[int]] = {}
    for k in range(0, len(data), RECORD):
        rec = data[k:k + RECORD]
        assert rec.endswith(b"\n") and rec[6:-1] == b"." * (RECORD - 7), (k, rec[:40])
        seen.setdefault(rec[:1], []).append(int(rec[1:6]))
    # Every writer's records are all there, in its own order.
    assert {t: v for t, v in seen.items()} == {t: list(range(n)) for t in (b"M", b"N", b"D", b"E")}


def test_a_trailing_slash_names_a_directory_like_the_mount(mnt: Path) -> None:
    """Probe 22, F4: the direct client's walk dropped a trailing "/" or "/.": "f/"
    opened the regular file f (and truncated it with "w"), "new/" with O_CREAT made a
    regular file new; the mount (the kernel's walk) says ENOTDIR and EISDIR."""
    (mnt / "f").write_bytes(b"data")
    cases = [("f/", "r", os.O_RDONLY), ("f//", "r", os.O_RDONLY),
             ("f/.", "r", os.O_RDONLY), ("f/", "w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
             ("new/", "w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
             ("gone/", "r", os.O_RDONLY), ("", "r", os.O_RDONLY)]
    with Client.connect(mnt) as c:
        for path, mode, flags in cases:
            with pytest.raises(OSError) as mount_err:
                os.close(os.open(os.path.join(mnt, path) if path else "", flags, 0o644))
            with pytest.raises(OSError) as direct_err:
                c.open(path, mode)
            assert direct_err.value.errno == mount_err.value.errno, (path, mode)
    assert sorted(os.listdir(mnt)) == ["f"]
    assert (mnt / "f").read_bytes() == b"data"
