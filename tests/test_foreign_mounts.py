"""Other users' mounts on the host are someone else's input: the daemon reads the mount
table at every change of it (the mount-flag follower), and the CLI reads it to find
mounts. Any user may put a FUSE mount on a directory it owns (fusermount3), with any
bytes in its path."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_volume, sluice

pytestmark = pytest.mark.mounted


def test_a_mount_at_a_path_that_is_not_utf8_stops_no_daemon(tmp_path: Path,
                                                            mount_factory) -> None:
    """A mount appearing anywhere at a path with byte 0xfe made the daemon's follower
    raise UnicodeDecodeError: the daemon died and its mount was left dead (ENOTCONN)
    for every tenant; `sluice umount` and `stats` died the same way while it stayed.
    (A tmpfs stands in for a tenant's FUSE mount: the table's line is the same.)"""
    vol = make_volume(tmp_path / "vol", "256M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"before")
    odd = os.path.join(os.fsencode(tmp_path), b"odd\xfe\xff name")
    os.mkdir(odd)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"-o", b"size=1m", b"tmpfs", odd], check=True)
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the follower wakes at the table's change
            assert m.daemon_alive, m.log.read_text()[-3000:]
            assert (m.path / "f").read_bytes() == b"before"
            time.sleep(0.1)
        (m.path / "g").write_bytes(b"after")
        r = sluice("stats", str(m.path), "--json", check=False)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        r = sluice("umount", str(m.path), check=False)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert m.proc is not None and m.proc.wait(timeout=60) == 0
    finally:
        subprocess.run([b"umount", b"-l", odd], check=False)
    assert "Traceback" not in m.log.read_text()
    m2 = mount_factory(vol, name="again")
    assert (m2.path / "g").read_bytes() == b"after"


def test_a_read_only_mount_over_the_mount_point_leaves_the_volume_writable(
        tmp_path: Path, mount_factory) -> None:
    """Probe 22, F1: a tenant that may write the mount's root directory can put a
    read-only FUSE mount over the mount point (fusermount3); the daemon's follower took
    the flags of the topmost mount at its path for its own, said "remounted
    read-only" and made the volume read-only for every tenant until the tenant
    unmounted. It follows its own connection's mount now. (A read-only tmpfs stands
    in for the tenant's mount.) And a mount at a sibling path with a vertical tab in
    it is not taken for this one."""
    vol = make_volume(tmp_path / "vol", "256M")
    m = mount_factory(vol)
    f = m.path / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    sibling = Path(str(m.path) + "\vx")
    sibling.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(sibling)],
                       check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(m.path)],
                       check=True)
        try:
            time.sleep(1.0)  # the follower wakes at each change of the table
            os.write(fd, b"still writable")
            os.fsync(fd)  # old code: EROFS
        finally:
            subprocess.run(["umount", str(m.path)], check=True)
            subprocess.run(["umount", str(sibling)], check=True)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"still writable"
    (m.path / "g").write_bytes(b"and new names")
    assert "read-only" not in m.log.read_text()
