"""Cache mode hints: `user.sluice.cache=kernel` on a directory is inherited by what is
created in it, and such files support shared mmap (SQLite in WAL mode needs it). Shared
mmap of direct-mode files (the default) is tested in tests/test_mmap.py."""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
from pathlib import Path

import pytest

pytestmark = pytest.mark.mounted


def test_kernel_cache_mode_is_inherited_and_allows_shared_mmap(mnt: Path) -> None:
    d = mnt / "db"
    d.mkdir()
    os.setxattr(d, "user.sluice.cache", b"kernel")
    f = d / "shared.bin"
    f.write_bytes(b"\0" * 8192)
    assert os.getxattr(f, "user.sluice.cache") == b"kernel"
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 8192, mmap.MAP_SHARED)
        m[100:105] = b"hello"
        m.flush()
        m.close()
    assert f.read_bytes()[100:105] == b"hello"

    con = sqlite3.connect(d / "wal.sqlite")
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT)")
    con.executemany("INSERT INTO t(b) VALUES (?)", [(f"row {i}",) for i in range(2000)])
    con.commit()
    assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2000
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_bad_cache_mode_value_is_rejected(mnt: Path) -> None:
    with pytest.raises(OSError) as ei:
        os.setxattr(mnt, "user.sluice.cache", b"sometimes")
    assert ei.value.errno == errno.EINVAL


def test_direct_client_write_seen_by_kernel_cached_reader(mnt: Path) -> None:
    """A kernel-cached file changed by a direct client: the mount shows the new bytes."""
    from kernelshim.client import Client
    d = mnt / "kc"
    d.mkdir()
    os.setxattr(d, "user.sluice.cache", b"kernel")
    f = d / "f.bin"
    f.write_bytes(b"a" * 8192)
    with open(f, "rb") as fh:
        assert fh.read() == b"a" * 8192  # now in the kernel's page cache
        with Client.connect(mnt) as c:
            with c.open("kc/f.bin", "r+") as g:
                g.pwrite(b"b" * 4096, 0)
        import time
        deadline = time.monotonic() + 5
        while True:
            fh.seek(0)
            data = fh.read()
            if data[:4096] == b"b" * 4096 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert data == b"b" * 4096 + b"a" * 4096
