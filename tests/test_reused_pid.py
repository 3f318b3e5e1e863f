"""A volume's mount.json names its daemon's pid; after the daemon is killed, the kernel
may give that pid to another process. fsck and the CLI took any process with that pid
for the daemon: fsck said "the volume is mounted ... read-only" of a volume nothing
mounts, refused to repair it as in use, and `sluice stats VOLUME` said it was mounted.
The daemon is the one that holds the volume's lock (fs/volume.py `daemon_alive`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import sluice


@pytest.fixture
def unrelated_pid():
    """The pid of a live process that is no sluice daemon (a `sleep`)."""
    p = subprocess.Popen(["sleep", "300"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def fake_mount_state(volume: Path, mountpoint: Path, pid: int) -> None:
    """mount.json as a daemon killed while mounted at `mountpoint` leaves it."""
    state = volume / "mount.json"
    state.write_text(json.dumps({"mountpoint": str(mountpoint), "pid": pid}) + "\n")
    os.chmod(state, 0o600)


def test_fsck_does_not_take_a_reused_pid_for_a_live_mount(volume: Path, tmp_path: Path,
                                                          unrelated_pid: int) -> None:
    fake_mount_state(volume, tmp_path / "mnt", unrelated_pid)
    r = sluice("fsck", str(volume), "-q", check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert "is mounted at" not in r.stdout and "read-only" not in r.stdout, r.stdout
    assert (f"note: the volume was not cleanly unmounted (daemon pid {unrelated_pid} at "
            f"{tmp_path / 'mnt'})") in r.stdout, r.stdout


def test_a_reused_pid_does_not_stop_a_repair(volume: Path, tmp_path: Path,
                                             unrelated_pid: int) -> None:
    fake_mount_state(volume, tmp_path / "mnt", unrelated_pid)
    r = sluice("fsck", str(volume), "--repair", "-q", check=False)
    assert r.returncode == 0 and "in use" not in r.stderr, (r.returncode, r.stdout, r.stderr)


def test_a_reused_pid_does_not_make_a_volume_mounted(volume: Path, tmp_path: Path,
                                                     unrelated_pid: int) -> None:
    fake_mount_state(volume, tmp_path / "mnt", unrelated_pid)
    r = sluice("stats", str(volume), check=False)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"sluice stats: {volume} is a sluice volume, not a mount point (and it is not "
        "mounted)"), r.stderr
