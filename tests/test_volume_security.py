"""A volume is private to its owner (issue 6): `sluice mkfs` makes the directory 0700 and
every file in it 0600 whatever the umask, the daemon keeps what it creates private, and
`sluice mount` / `sluice fsck` refuse a volume other users could read or write unless
asked to fix it. Checked as another user (uid 65534) with real open(2) and flock(2).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, as_uid, is_mounted, sluice
from fs.errors import VolumeError
from fs.mount import control_socket_path
from test_cli import assert_one_line_error

pytestmark = pytest.mark.mounted

NOBODY = 65534
VENV_HELPER = REPO / ".venv" / "bin" / "mount.fuse.sluice"
#: every file a mounted volume holds (with --profile none and a background daemon)
VOLUME_FILES = {"device.img", "checksums", "device.json", "meta.db", "meta.db-wal",
                "meta.db-shm", "principals.json", "volume.json", "lock", "mount.json",
                "sluice.log"}


def _umask0() -> None:
    os.umask(0)


def run_umask0(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The sluice CLI run with umask 0: nothing may rely on the caller's umask."""
    return sluice(*args, check=check, preexec_fn=_umask0)


def modes(volume: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in volume.iterdir()}


@pytest.fixture
def pubdir() -> Iterator[Path]:
    """A directory every uid can traverse (not below tmp_path, which is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="sluice-sec-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class Mounted:
    """`sluice mount` in the background; always unmounted, the daemon always gone."""

    def __init__(self, volume: Path, mp: Path) -> None:
        self.volume, self.mp = volume, mp

    def __enter__(self) -> Mounted:
        self.mp.mkdir(exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        state = {}
        try:
            state = json.loads((self.volume / "mount.json").read_text())
        except (OSError, ValueError):
            pass
        if is_mounted(self.mp):
            r = sluice("umount", str(self.mp), check=False)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
        pid = state.get("pid")
        if pid and Path(f"/proc/{pid}").exists() and is_mounted(self.mp):
            os.kill(pid, signal.SIGKILL)


def test_volume_private_whatever_the_umask(pubdir: Path) -> None:
    vol = pubdir / "vol"
    run_umask0("mkfs", str(vol), "--size", "64M", "-q")
    assert stat.S_IMODE(vol.stat().st_mode) == 0o700
    # Only the volume: its parent keeps its mode (mkfs makes no parents: a typo must
    # not make a tree; stop 23's new user).
    (pubdir / "new").mkdir(mode=0o755)
    sluice("mkfs", str(pubdir / "new" / "vol2"), "--size", "64M", "-q",
           preexec_fn=lambda: os.umask(0o022))
    assert stat.S_IMODE((pubdir / "new").stat().st_mode) == 0o755
    assert stat.S_IMODE((pubdir / "new" / "vol2").stat().st_mode) == 0o700
    assert set(modes(vol).values()) == {0o600}, modes(vol)
    with Mounted(vol, pubdir / "mp") as m:
        run_umask0("mount", str(vol), str(m.mp))
        (m.mp / "f").write_bytes(b"data")
        fd = os.open(m.mp / "f", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        run_umask0("principal", "add", str(m.mp), "alice", "--space", "1M")
        seen = modes(vol)
        assert VOLUME_FILES <= set(seen), sorted(seen)
        assert {n: md for n, md in seen.items() if md != 0o600} == {}
        assert stat.S_IMODE(vol.stat().st_mode) == 0o700
        run_umask0("umount", str(m.mp))
    assert {n: md for n, md in modes(vol).items() if md != 0o600} == {}


def _probe_volume(vol: str) -> dict:
    """As another user: try to read the device and the metadata, and to lock the volume."""
    out = {}
    for name in ("device.img", "meta.db", "checksums", "principals.json"):
        try:
            with open(os.path.join(vol, name), "rb") as f:
                out[name] = f.read(1 << 20).count(b"TOP-SECRET")  # read!
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    try:
        fd = os.open(os.path.join(vol, "lock"), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out["lock"] = "locked"
        finally:
            os.close(fd)
    except OSError as exc:
        out["lock"] = errno.errorcode[exc.errno]
    return out


def test_other_users_cannot_read_the_store_or_lock_the_volume(pubdir: Path) -> None:
    vol = pubdir / "vol"
    run_umask0("mkfs", str(vol), "--size", "64M", "-q")
    with Mounted(vol, pubdir / "mp") as m:
        run_umask0("mount", str(vol), str(m.mp))
        secret = m.mp / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"TOP-SECRET" * 100)
        os.fsync(fd)
        os.close(fd)
        run_umask0("principal", "add", str(m.mp), "alice", "--space", "1M")
        run_umask0("umount", str(m.mp))
    denied = {n: "EACCES" for n in ("device.img", "meta.db", "checksums", "principals.json",
                                    "lock")}
    assert as_uid(NOBODY, lambda: _probe_volume(str(vol))) == denied
    # Even with the directory opened for traversal, every file keeps others out.
    os.chmod(vol, 0o711)
    assert as_uid(NOBODY, lambda: _probe_volume(str(vol))) == denied
    os.chmod(vol, 0o700)
    # ... and root's fsck (which takes the lock) is not locked out.
    r = sluice("fsck", str(vol), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr


def test_mount_and_fsck_refuse_an_exposed_volume(pubdir: Path) -> None:
    vol = pubdir / "vol"
    run_umask0("mkfs", str(vol), "--size", "64M", "-q")
    with Mounted(vol, pubdir / "mp") as m:
        _refuse_then_fix(vol, m.mp)


def _refuse_then_fix(vol: Path, mp: Path) -> None:
    """(The caller's `Mounted` unmounts whatever this mounts, even if it fails.)"""
    os.chmod(vol / "device.img", 0o644)
    for extra in ([], ["--foreground"]):
        r = sluice("mount", str(vol), str(mp), *extra, check=False)
        line = assert_one_line_error(r, "sluice mount:", "device.img is 0644",
                                     f"chmod -R go-rwx {vol}", "--fix-permissions")
        assert "Traceback" not in line
    assert not is_mounted(mp) and not (vol / "mount.json").exists()
    os.chmod(vol / "device.img", 0o600)
    os.chmod(vol, 0o755)  # a directory others can list is refused too
    r = sluice("mount", str(vol), str(mp), check=False)
    assert_one_line_error(r, "vol is 0755", "chmod -R go-rwx")
    assert not is_mounted(mp)
    os.chmod(vol / "meta.db", 0o660)
    r = sluice("fsck", str(vol), check=False)
    assert_one_line_error(r, "sluice fsck:", "and 1 more", "chmod -R go-rwx", "--fix-permissions",
                          code=8)
    # Fixed only when asked to.
    r = sluice("fsck", str(vol), "--fix-permissions", check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert stat.S_IMODE(vol.stat().st_mode) == 0o700
    assert set(modes(vol).values()) == {0o600}, modes(vol)
    os.chmod(vol / "checksums", 0o604)
    sluice("mount", str(vol), str(mp), "--fix-permissions")
    assert is_mounted(mp)
    assert set(modes(vol).values()) == {0o600}, modes(vol)
    sluice("umount", str(mp))


def test_mount_helper_fix_permissions_option(pubdir: Path) -> None:
    """mount -t fuse.sluice refuses an exposed volume like the command does, and fixes
    it only with an explicit `-o fix_permissions`."""
    if not VENV_HELPER.exists():
        pytest.skip(f"{VENV_HELPER} missing (run scripts/setup.sh)")
    vol = pubdir / "vol"
    run_umask0("mkfs", str(vol), "--size", "64M", "-q")
    os.chmod(vol / "volume.json", 0o644)
    with Mounted(vol, pubdir / "mp") as m:
        r = subprocess.run([str(VENV_HELPER), str(vol), str(m.mp), "-o", "cache_size=16M"],
                           capture_output=True, text=True, timeout=60)
        assert_one_line_error(r, "volume.json is 0644", "chmod -R go-rwx",
                              "or use -o fix_permissions")
        assert not is_mounted(m.mp)
        r = subprocess.run([str(VENV_HELPER), str(vol), str(m.mp), "-o",
                            "cache_size=16M,fix_permissions"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert is_mounted(m.mp)
        assert stat.S_IMODE((vol / "volume.json").stat().st_mode) == 0o600
        sluice("umount", str(m.mp))


# -- the control socket's directory of a daemon that is not root -----------------------------

def _socket_dir_as_daemon(tmpdir: str, runtime: str | None) -> dict:
    """In the child (uid 65534): where would a daemon of this uid put its socket?"""
    os.environ.pop("XDG_RUNTIME_DIR", None)
    if runtime:
        os.environ["XDG_RUNTIME_DIR"] = runtime
    os.environ["TMPDIR"] = tmpdir
    tempfile.tempdir = None  # gettempdir() caches what it found in the parent
    try:
        path = control_socket_path("0123-uuid")
    except VolumeError as exc:
        return {"error": str(exc)}
    st = os.lstat(path.parent)
    return {"path": str(path), "uid": st.st_uid, "mode": stat.S_IMODE(st.st_mode)}


def test_fallback_socket_directory_is_made_and_checked_by_the_daemon(pubdir: Path) -> None:
    tmp = pubdir / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)  # like /tmp: everyone may create, nobody may remove another's
    mine = tmp / f"sluice-{NOBODY}"

    # Made by the daemon itself, 0700, whatever the umask.
    old = os.umask(0)
    try:
        got = as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), None))
    finally:
        os.umask(old)
    assert got == {"path": str(mine / "0123-uuid.sock"), "uid": NOBODY, "mode": 0o700}
    # Used again as it is.
    assert as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), None)) == got

    # Made first by another user (here root), open to all: refused with a clear error.
    shutil.rmtree(mine)
    mine.mkdir()
    os.chmod(mine, 0o777)
    got = as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), None))
    assert got == {"error": f"control socket directory {mine} belongs to uid 0, not to "
                            f"this daemon's uid {NOBODY}: remove it"}

    # A symbolic link planted there (to a directory the daemon owns) is refused too.
    mine.rmdir()
    target = tmp / "elsewhere"
    target.mkdir()
    os.chown(target, NOBODY, NOBODY)
    mine.symlink_to(target)
    got = as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), None))
    assert "error" in got and "not a directory of ours" in got["error"], got

    # Its own directory, but left open to others: refused, saying how to fix it.
    mine.unlink()
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    os.chmod(mine, 0o755)
    got = as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), None))
    assert got == {"error": f"control socket directory {mine} has mode 0755, more open "
                            f"than 0700: chmod 700 {mine} or remove it"}

    # $XDG_RUNTIME_DIR (the user's own) comes first.
    runtime = pubdir / "run-user"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    got = as_uid(NOBODY, lambda: _socket_dir_as_daemon(str(tmp), str(runtime)))
    assert got == {"path": str(runtime / "sluice" / "0123-uuid.sock"), "uid": NOBODY,
                   "mode": 0o700}
