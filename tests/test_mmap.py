"""Shared mmap in the default cache mode (FUSE direct I/O with FUSE_DIRECT_IO_ALLOW_MMAP,
negotiated by sluice's own binding: binding/).

The kernel keeps a mapped file's pages in its page cache; direct reads and writes through
the mount stay coherent with them (a direct read first writes the dirty mapped pages
back, a direct write drops the cached pages it covers). What the daemon, and so the
pager, sees of mapped I/O: a page fault that misses the page cache is a READ request, a
dirty page written back (msync, munmap, fsync, close, or the kernel's write-back) is a
WRITE request through a writable open of the file (charged to its principal); hits in
the page cache are invisible to it.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, sluice

pytestmark = pytest.mark.mounted

BS = 4096


def requests(mnt: Path) -> dict[str, int]:
    return json.loads(sluice("stats", str(mnt), "--json").stdout)["fuse_requests"]


def test_shared_mapping_is_coherent_with_read_and_write(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"." * (4 * BS))
    fd = os.open(f, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 4 * BS, mmap.MAP_SHARED)
        m[10:15] = b"hello"                      # a store, no msync
        assert os.pread(fd, 5, 10) == b"hello"   # a direct read sees it
        os.pwrite(fd, b"WORLD", BS + 7)          # a direct write
        assert m[BS + 7:BS + 12] == b"WORLD"     # the mapping sees it
        # Another process, reading through its own descriptor, sees the store too.
        out = subprocess.run([sys.executable, "-c",
                              f"import os; print(open({str(f)!r}, 'rb').read(15)[10:])"],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "b'hello'"
        # A read-only shared mapping of a second descriptor sees both.
        ro = os.open(f, os.O_RDONLY)
        m2 = mmap.mmap(ro, 4 * BS, mmap.MAP_SHARED, mmap.PROT_READ)
        assert m2[10:15] == b"hello" and m2[BS + 7:BS + 12] == b"WORLD"
        m2.close()
        os.close(ro)
        m.close()
    finally:
        os.close(fd)
    want = bytearray(b"." * (4 * BS))
    want[10:15] = b"hello"
    want[BS + 7:BS + 12] = b"WORLD"
    assert f.read_bytes() == bytes(want)


def test_mapped_io_reaches_the_daemon_as_reads_and_writes(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"r" * (16 * BS))
    fd = os.open(f, os.O_RDWR)
    try:
        before = requests(mnt)
        m = mmap.mmap(fd, 16 * BS, mmap.MAP_SHARED)
        assert m[5 * BS] == ord("r")          # a fault: READ requests
        mid = requests(mnt)
        assert mid.get("read", 0) > before.get("read", 0)
        m[5 * BS:5 * BS + 3] = b"new"          # dirties one page
        m.flush()                              # msync: written back
        after = requests(mnt)
        assert after.get("write", 0) > mid.get("write", 0)
        m.close()
    finally:
        os.close(fd)
    assert f.read_bytes()[5 * BS:5 * BS + 4] == b"newr"


def test_msynced_and_fsynced_mapping_survives_kill_9(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    f = m.path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8 * BS)
    data = os.urandom(8 * BS)
    mp = mmap.mmap(fd, 8 * BS, mmap.MAP_SHARED)
    mp[:] = data
    mp.flush()
    os.fsync(fd)
    mp.close()
    os.close(fd)
    m.kill()
    m.stop()
    m.start()
    assert f.read_bytes() == data
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


WAL_WRITER = textwrap.dedent("""
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], timeout=60)
    con.execute("PRAGMA busy_timeout=60000")
    who = int(sys.argv[2])
    for i in range(int(sys.argv[3])):
        with con:
            con.execute("INSERT INTO t(who, i, pad) VALUES (?, ?, ?)", (who, i, "x" * 300))
        if i % 25 == 0:
            assert con.execute("SELECT COUNT(*) FROM t WHERE who = ?", (who,)).fetchone()[0] == i + 1
    con.close()
""")


def test_sqlite_wal_with_several_writing_processes(mnt: Path) -> None:
    db = mnt / "wal.sqlite"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, who INT, i INT, pad TEXT)")
    con.commit()
    writers, rows = 4, 150
    procs = [subprocess.Popen([sys.executable, "-c", WAL_WRITER, str(db), str(w), str(rows)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert (mnt / "wal.sqlite-shm").exists()  # the shared-memory index is mapped
    assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == writers * rows
    assert sorted(con.execute("SELECT who, COUNT(DISTINCT i) FROM t GROUP BY who")) == \
        [(w, rows) for w in range(writers)]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    # The sqlite3 program agrees, from a cold open.
    r = subprocess.run(["sqlite3", str(db), "SELECT COUNT(*) FROM t; PRAGMA journal_mode;"],
                       capture_output=True, text=True)
    assert r.stdout.split() == [str(writers * rows), "wal"], r.stderr


def test_pip_install_of_a_source_package_with_tmpdir_on_the_mount(mnt: Path,
                                                                   tmp_path: Path) -> None:
    src = tmp_path / "tinypkg-1.0"
    (src / "tinypkg").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tinypkg"
        version = "1.0"
    """))
    (src / "tinypkg" / "__init__.py").write_text("VALUE = 42\n")
    sdist = tmp_path / "tinypkg-1.0.tar.gz"
    subprocess.run(["tar", "-C", str(tmp_path), "-czf", str(sdist), "tinypkg-1.0"], check=True)
    (mnt / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(mnt / "tmp"), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                        "--target", str(mnt / "site"), str(sdist)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = subprocess.run([sys.executable, "-c", "import tinypkg; print(tinypkg.VALUE)"],
                         capture_output=True, text=True, env=dict(os.environ,
                                                                  PYTHONPATH=str(mnt / "site")))
    assert out.stdout.strip() == "42", out.stderr
    assert (mnt / "site" / "tinypkg-1.0.dist-info" / "RECORD").exists()


MAPPED_WRITER = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)                  # sparse: no block yet
    m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
    for page in range(0, 256, 16):             # 16 pages stored through the mapping
        m[page * 4096:page * 4096 + 5] = b"page!"
    m.flush()
    m.close()
    os.close(fd)
""")


def test_mapped_writes_are_charged_to_the_principal_that_mapped(mnt: Path) -> None:
    from test_principals import entry, usage
    sluice("principal", "add", str(mnt), "a", "--space", "64M")
    (mnt / "d").mkdir()
    f = mnt / "d" / "mapped"
    r = subprocess.run([*SLUICE, "run", str(mnt), "--principal", "a", "--", sys.executable,
                        "-c", MAPPED_WRITER, str(f)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert usage(mnt)["a"][0] == 16 * BS + entry("mapped")
    data = f.read_bytes()
    assert len(data) == 1 << 20
    assert all(data[p * BS:p * BS + 5] == b"page!" for p in range(0, 256, 16))
    assert data.count(b"page!") == 16
    assert os.stat(f).st_blocks * 512 == 16 * BS


@pytest.mark.parametrize("change", ["write", "append", "truncate", "burst"])
def test_a_direct_change_keeps_its_bytes_beside_a_dirty_mapping(mnt: Path,
                                                                 change: str) -> None:
    """F2 (hostile probe 7). One tenant maps a file through the mount and dirties a
    byte of its first page (not yet written back); another changes the file with a
    direct client — writes 10 bytes elsewhere in that page, commits and fsyncs. The
    kernel dropped its cached pages only after the direct change (the commit's
    notification) and wrote the dirty page back first, whole: the direct client's
    fsync'd bytes read as the page's old zeros (10 of 10). The kernel's dirty pages
    are now written back before a direct change lands, as Linux does for an O_DIRECT
    write: both tenants' bytes stay. Also for an append, a truncate through the grant
    and a burst of pipelined whole-block overwrites."""
    from kernelshim.client import Client
    f = mnt / "f"
    f.write_bytes(bytes(4 * BS))
    fd0 = os.open(f, os.O_RDONLY)
    os.fsync(fd0)  # (committed: the burst's overwrites relocate)
    os.close(fd0)
    fd = os.open(f, os.O_RDWR)
    m = mmap.mmap(fd, 4 * BS)
    try:
        m[0:1] = b"M"  # page 0 dirty in the kernel, not written back
        m[BS:BS + 1] = b"N"  # and page 1
        with Client.connect(mnt) as c:
            df = c.open("f", "r+")
            if change == "write":
                assert df.pwrite(b"D" * 10, 100) == 10
            elif change == "append":
                af = c.open("f", "a")
                assert af.write(b"A" * 10) == 10
                af.close()
                assert df.pwrite(b"D" * 10, 100) == 10
            elif change == "truncate":
                assert df.pwrite(b"D" * 10, 100) == 10
                df.commit()
                df.truncate(3 * BS)
            else:
                for k in range(4):  # whole blocks, pipelined
                    df.pwrite(bytes([65 + k]) * BS, k * BS)
            df.commit()
            df.fsync()
            df.close()
        m.flush()
        os.fsync(fd)
    finally:
        m.close()
        os.close(fd)
    data = f.read_bytes()
    if change == "burst":
        # the direct client's whole blocks are the newer: they win over the pages the
        # mapping dirtied before them (written back first)
        assert data == b"".join(bytes([65 + k]) * BS for k in range(4)), \
            [data[k * BS:k * BS + 2] for k in range(4)]
        return
    assert data[100:110] == b"D" * 10, "the direct client's fsync'd bytes were lost"
    assert data[0:1] == b"M" and data[BS:BS + 1] == b"N"
    if change == "append":
        assert data[4 * BS:] == b"A" * 10
    else:
        assert len(data) == (3 * BS if change == "truncate" else 4 * BS)
