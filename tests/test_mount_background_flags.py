"""`sluice mount -o ...` without --foreground keeps the VFS flags asked for (issue 6,
hostile probe finding 5, second half).

The command starts the daemon in the background and hands it the flags as `-o`; it
passed them as mount(8) writes them ("rw,relatime" for suid,dev: what is off is left
out), which the daemon read over the FUSE defaults (nosuid,nodev). So `-o suid` came
up nosuid, although README says root's suid is honoured; only a remount gave suid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from conftest import make_volume, sluice
from shim_util import user_run

pytestmark = pytest.mark.mounted


def proc_mounts_options(mp: Path) -> set[str]:
    """The mount options /proc/mounts gives for mount point `mp`."""
    with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
        rows = [line.split() for line in f]
    found = [r[3] for r in rows if r[1] == str(mp)]
    assert found, f"{mp} is not in /proc/mounts"
    return set(found[-1].split(","))


@pytest.fixture
def background_mount(tmp_path: Path):
    """Call with (volume, *options): `sluice mount` as a user runs it (the daemon in
    the background); returns the mount point (reachable by other uids). Unmounted in
    teardown, the daemon killed by its PID if it did not go."""
    base = Path(tempfile.mkdtemp(prefix="sluice-bg-", dir="/tmp"))
    os.chmod(base, 0o755)
    made: list[tuple[Path, Path]] = []

    def mount(volume: Path, *options: str) -> Path:
        mp = base / f"mnt{len(made)}"
        mp.mkdir()
        made.append((volume, mp))
        sluice("mount", str(volume), str(mp), "--cache-size", "8M", *options)
        return mp

    yield mount
    for volume, mp in made:
        pid = None
        state = volume / "mount.json"
        if state.exists() and state.read_text():
            pid = json.loads(state.read_text()).get("pid")
        if os.path.ismount(mp):
            r = sluice("umount", str(mp), check=False)
            if r.returncode != 0 and pid:
                os.kill(pid, signal.SIGKILL)
    if not any(os.path.ismount(mp) for _v, mp in made):
        shutil.rmtree(base, ignore_errors=True)


def test_suid_and_dev_reach_the_kernel(tmp_path: Path, background_mount) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    mp = background_mount(vol, "-o", "suid,dev")
    opts = proc_mounts_options(mp)
    assert "nosuid" not in opts and "nodev" not in opts, opts
    # What suid means: root's set-user-ID program runs as root for another uid.
    shutil.copy("/usr/bin/id", mp / "id")
    os.chmod(mp / "id", 0o4755)
    r = user_run([str(mp / "id"), "-u"])
    assert r.stdout.strip() == "0", r.stderr
    assert json.loads((vol / "mount.json").read_text())["applied"] == "rw,relatime"


@pytest.mark.parametrize("asked, present, absent", [
    ("", {"rw", "nosuid", "nodev", "relatime"}, {"noexec"}),
    ("suid", {"nodev"}, {"nosuid"}),
    ("noexec,strictatime,nodiratime", {"nosuid", "nodev", "noexec", "nodiratime"},
     {"relatime", "noatime"}),
    ("ro,dev,noatime", {"ro", "nosuid", "noatime"}, {"nodev", "rw"}),
])
def test_every_flag_survives_the_background_start(tmp_path: Path, background_mount,
                                                  asked: str, present: set[str],
                                                  absent: set[str]) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    mp = background_mount(vol, *(("-o", asked) if asked else ()))
    opts = proc_mounts_options(mp)
    assert present <= opts and not absent & opts, (asked, opts)
