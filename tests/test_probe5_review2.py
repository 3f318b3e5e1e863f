"""The second review of the fifth hostile-tenant probe's fixes (docs/RELIABILITY.md,
"the fifth hostile-tenant probe", second review, R1-R7): each a regression test that
fails on the branch before its fix.

- R3: ZERO_RANGE's replacement blocks were never reserved on the host, and a later
  write into those UNWRITTEN blocks allocates nothing, so it never met the headroom
  check: a tenant filled the host, zero-ranged its file and wrote it again, the host
  filled, the next commit failed and the volume went read-only. Now the replacement
  blocks are reserved (as a relocation) before the map changes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

MiB = 1 << 20

ZERO_RANGE_HOG = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
buf = os.urandom(65536)
n = 0
try:
    while n < 512 << 20:
        os.pwrite(fd, buf, n); n += 65536
except OSError as e:
    assert e.errno == errno.ENOSPC, e
print("FULL", n, flush=True)
os.fsync(fd)
for rnd in range(3):
    if libc.fallocate(fd, 0x10, 0, n) != 0:   # FALLOC_FL_ZERO_RANGE
        print("ZERO_RANGE errno", ctypes.get_errno(), flush=True); break
    m = 0
    try:
        while m < n:
            os.pwrite(fd, buf, m); m += 65536
    except OSError as e:
        print("rewrite errno", e.errno, "at", m, flush=True)
    try:
        os.fsync(fd)
    except OSError as e:
        print("fsync errno", e.errno, flush=True)
os.close(fd)
"""


@pytest.mark.parametrize("mode", ["--no-writeback", "--writeback"])
def test_r3_zero_range_then_rewrite_does_not_fill_the_host(tmp_path: Path, small_tmpfs,
                                                           mode: str) -> None:
    """A 1 GiB volume on a 40 MiB host: the tenant writes until ENOSPC, fsyncs,
    zero-ranges the whole file and writes it again, three times (before: the host
    reached 0 bytes free, the commit failed and the volume went read-only; root's
    writes got EROFS). Now the zero-range or the rewrite may get ENOSPC, but root can
    still overwrite, fsync and create, and fsck is clean."""
    from conftest import make_volume, sluice
    from shim_util import UID, user_run
    from test_hostile_probe5 import _public_mount

    host = small_tmpfs("40m")
    os.chmod(host, 0o755)
    vol = make_volume(host / "vol", "1G")
    log = tmp_path / "r3-daemon.log"
    with _public_mount(vol, log, mode, "--cache-size", "32M") as mnt:
        (mnt / "root-file").write_bytes(os.urandom(4 * MiB))
        os.sync()
        r = user_run(["/usr/bin/python3", "-c", ZERO_RANGE_HOG, str(mnt / "u" / "hog")], UID)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("FULL"), r.stdout
        for line in r.stdout.splitlines()[1:]:
            if "errno" in line:
                assert int(line.split("errno")[1].split()[0]) == errno.ENOSPC, r.stdout
        fd = os.open(mnt / "root-file", os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)  # a relocation: may use half the headroom
            os.fsync(fd)
        finally:
            os.close(fd)
        os.sync()
    assert "read-only" not in log.read_text()
    out = sluice("fsck", str(vol)).stdout
    assert out.strip().endswith("clean"), out
