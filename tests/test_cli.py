"""The sluice command's user errors: each is ONE line on stderr, a nonzero exit status,
no traceback, and leaves nothing mounted. Also mount(8) through mount.fuse.sluice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, is_mounted, make_volume, sluice

pytestmark = pytest.mark.mounted

HELPER = Path("/usr/sbin/mount.fuse.sluice")
VENV_HELPER = REPO / ".venv" / "bin" / "mount.fuse.sluice"


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str,
                          code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- mkfs -----------------------------------------------------------------------------------

def test_mkfs_bad_size(tmp_path: Path) -> None:
    r = sluice("mkfs", str(tmp_path / "v"), "--size", "12Q", check=False)
    assert_one_line_error(r, "sluice mkfs:", "bad size '12Q'", code=2)  # a usage error
    assert not (tmp_path / "v" / "volume.json").exists()
    for bad in ("0", "-5G", "lots"):
        r = sluice("mkfs", str(tmp_path / "v"), f"--size={bad}", check=False)
        assert_one_line_error(r, "bad size", code=2)
    r = sluice("mkfs", str(tmp_path / "v"), "--size", "8K", check=False)
    assert_one_line_error(r, "too small", code=2)  # (out of its range: a usage error)
    # A failed mkfs leaves nothing that makes the next attempt fail differently.
    r = sluice("mkfs", str(tmp_path / "v"), "--block-size", "3000", check=False)
    assert_one_line_error(r, "block size 3000", code=2)
    r = sluice("mkfs", str(tmp_path / "v"), "--profile", "floppy", check=False)
    assert_one_line_error(r, "unknown profile 'floppy'", code=2)
    r = sluice("mkfs", str(tmp_path / "v"), "--size", "64M", "-q", check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "v" / "volume.json").is_file()


def test_mkfs_refuses_to_overwrite(tmp_path: Path) -> None:
    vol = make_volume(tmp_path / "v", "64M")
    uuid = json.loads((vol / "volume.json").read_text())["uuid"]
    r = sluice("mkfs", str(vol), "--size", "64M", check=False)
    assert_one_line_error(r, "already holds a sluice volume", "--force")
    assert json.loads((vol / "volume.json").read_text())["uuid"] == uuid
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious").write_text("keep me")
    r = sluice("mkfs", str(other), "--size", "64M", check=False)
    assert_one_line_error(r, "not empty and not a sluice volume")
    assert (other / "precious").read_text() == "keep me"
    r = sluice("mkfs", str(vol), "--size", "64M", "--force", "-q", check=False)
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads((vol / "volume.json").read_text())["uuid"] != uuid


# -- mount ----------------------------------------------------------------------------------

def test_mount_missing_volume(tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    r = sluice("mount", str(tmp_path / "nope"), str(mp), check=False)
    assert_one_line_error(r, "sluice mount:", "no such volume", "sluice mkfs")
    notvol = tmp_path / "notvol"
    notvol.mkdir()
    r = sluice("mount", str(notvol), str(mp), check=False)
    assert_one_line_error(r, "is not a sluice volume")
    assert not is_mounted(mp)


def test_mount_point_missing_or_not_a_directory(volume: Path, tmp_path: Path) -> None:
    r = sluice("mount", str(volume), str(tmp_path / "absent"), check=False)
    assert_one_line_error(r, "does not exist or is not a directory")
    (tmp_path / "file").write_text("")
    r = sluice("mount", str(volume), str(tmp_path / "file"), check=False)
    assert_one_line_error(r, "does not exist or is not a directory")
    assert not (volume / "mount.json").exists()


def test_mount_point_not_empty(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    (mp / "something").write_text("x")
    for extra in ([], ["--foreground"]):
        r = sluice("mount", str(volume), str(mp), *extra, check=False)
        assert_one_line_error(r, f"mount point {mp} is not empty")
    assert not is_mounted(mp)
    assert (mp / "something").read_text() == "x"
    assert not (volume / "mount.json").exists()


def test_mount_point_busy(volume: Path, mount_factory, tmp_path: Path) -> None:
    m = mount_factory(volume)
    (m.path / "mine").write_text("first volume")
    other = make_volume(tmp_path / "vol2", "64M")
    r = sluice("mount", str(other), str(m.path), check=False)
    assert_one_line_error(r, f"mount point {m.path} is busy")
    # Nothing changed: the first volume is still mounted there and served.
    assert (m.path / "mine").read_text() == "first volume"
    assert m.daemon_alive
    assert not (other / "mount.json").exists()


def test_volume_already_mounted_elsewhere(volume: Path, mount_factory, tmp_path: Path) -> None:
    m = mount_factory(volume)
    mp2 = tmp_path / "mp2"
    mp2.mkdir()
    for extra in ([], ["--foreground"]):
        r = sluice("mount", str(volume), str(mp2), *extra, check=False)
        line = assert_one_line_error(r, f"volume {volume} is in use")
        assert str(m.path) in line and f"pid {m.proc.pid}" in line, line
    assert not is_mounted(mp2)
    assert m.daemon_alive and (m.path / ".").exists()
    # fsck refuses too, while the daemon holds the volume.
    r = sluice("fsck", str(volume), check=False)
    assert_one_line_error(r, "sluice fsck:", "in use", code=8)


def test_mount_bad_options(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    r = sluice("mount", str(volume), str(mp), "--cache-size", "12Q", check=False)
    assert_one_line_error(r, "bad size '12Q'", code=2)
    r = sluice("mount", str(volume), str(mp), "--profile", "floppy", check=False)
    assert_one_line_error(r, "unknown profile 'floppy'", code=2)
    r = sluice("mount", str(volume), str(mp), "-o", "profile=floppy", check=False)
    assert_one_line_error(r, "unknown profile 'floppy'", code=2)
    assert not is_mounted(mp)
    # argparse usage errors exit 2, without a traceback
    r = sluice("mount", str(volume), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["sluice mount: the following arguments are "
                                     "required: mountpoint (see sluice mount --help)"]
    r = sluice("mount", str(volume), str(mp), "--cache-mode", "weird", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr


# -- umount / fsck --------------------------------------------------------------------------

def test_umount_errors(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    r = sluice("umount", str(d), check=False)
    assert_one_line_error(r, "sluice umount:", "is not a mounted sluice volume")
    r = sluice("umount", str(tmp_path / "absent"), check=False)
    assert_one_line_error(r, "is not a mounted sluice volume")
    r = sluice("umount", "/proc", check=False)  # mounted, but not sluice
    assert_one_line_error(r, "is not a mounted sluice volume")


def test_fsck_errors(tmp_path: Path) -> None:
    # (8: fsck could not check anything, never 1, "repaired every error"; probe 19, F2)
    r = sluice("fsck", str(tmp_path / "nope"), check=False)
    assert_one_line_error(r, "sluice fsck:", "no such volume", code=8)
    (tmp_path / "notvol").mkdir()
    r = sluice("fsck", str(tmp_path / "notvol"), check=False)
    assert_one_line_error(r, "is not a sluice volume", code=8)


def test_background_mount_and_umount(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    r = sluice("mount", str(volume), str(mp), check=False)
    try:
        assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
        assert is_mounted(mp)
        pid = json.loads((volume / "mount.json").read_text())["pid"]
        assert _pid_alive(pid)
        (mp / "f").write_text("hello")
    finally:
        r2 = sluice("umount", str(mp), check=False)
    assert r2.returncode == 0 and r2.stderr == "", r2.stderr
    assert not is_mounted(mp) and not _pid_alive(pid)
    # A second umount is a one-line error.
    r = sluice("umount", str(mp), check=False)
    assert_one_line_error(r, "is not a mounted sluice volume")
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean")


# -- mount(8) -----------------------------------------------------------------------------

@pytest.fixture
def mount_helper() -> Path:
    """/usr/sbin/mount.fuse.sluice, which mount(8) runs for `-t fuse.sluice` (setup
    symlinks it to the venv's entry point; made here if missing)."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed")
    made = False
    stale = None
    if not HELPER.exists():
        if os.geteuid() != 0 or not VENV_HELPER.exists() or not HELPER.parent.is_dir():
            pytest.skip(f"{HELPER} is missing and cannot be created "
                        f"(needs root and {VENV_HELPER})")
        if HELPER.is_symlink():  # left pointing at a clone that is gone
            stale = os.readlink(HELPER)
            HELPER.unlink()
        os.symlink(VENV_HELPER, HELPER)
        made = True
    yield HELPER
    if made:
        HELPER.unlink()
        if stale is not None:
            os.symlink(stale, HELPER)


def test_mount_t_fuse_sluice(volume: Path, tmp_path: Path, mount_helper: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    r = subprocess.run(["mount", "-t", "fuse.sluice", str(volume), str(mp),
                        "-o", "cache_size=16M,noatime"], capture_output=True, text=True,
                       timeout=60)
    pid = None
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(mp)
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            line = next(l for l in f if l.split()[1] == str(mp))
        assert line.split()[0] == str(volume) and line.split()[2] == "fuse.sluice"
        state = json.loads((volume / "mount.json").read_text())
        pid = state["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"16M" in cmdline, cmdline  # the -o option reached the daemon
        (mp / "via-mount8").write_text("ok\n")
        assert (mp / "via-mount8").read_text() == "ok\n"
        # Errors through mount(8) are the helper's one line, with its status.
        r = subprocess.run(["mount", "-t", "fuse.sluice", str(volume), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert_one_line_error(r, "in use")
        missing = tmp_path / "missing"
        mp2 = tmp_path / "mp2"
        mp2.mkdir()
        r = subprocess.run(["mount", "-t", "fuse.sluice", str(missing), str(mp2)],
                           capture_output=True, text=True, timeout=60)
        assert_one_line_error(r, "no such volume")
    finally:
        r = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    deadline = time.monotonic() + 30
    while pid and _pid_alive(pid):
        assert time.monotonic() < deadline, "daemon did not exit after umount(8)"
        time.sleep(0.05)
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean")


def test_mount_helper_usage_error(mount_helper: Path) -> None:
    r = subprocess.run([str(mount_helper), "only-one-arg"], capture_output=True, text=True)
    assert_one_line_error(r, "usage: mount.fuse.sluice", code=2)  # a usage error
