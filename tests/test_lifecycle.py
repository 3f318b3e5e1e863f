"""The daemon's life and death (issue 6): a daemon whose main loop fails leaves the
mount dead (ENOTCONN) instead of unmounting it, so programs cannot write into the bare
mount-point directory; the next `sluice mount` cleans it up and every fsync'd byte is
there. A clean stop (SIGTERM, SIGINT, umount) still unmounts.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, is_mounted, make_volume, sluice

pytestmark = pytest.mark.mounted

#: A test-only wrapper around the normal entry point: one service of the daemon (the
#: pid pruner) is replaced by one that raises on SIGUSR1, so an exception escapes the
#: daemon's main loop at the moment the test chooses.
FAILING_DAEMON = """
import signal, sys
import trio
import fs.mount

async def failing_service(principals):
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            raise RuntimeError("injected: a service of the daemon failed")

fs.mount._prune_registrations = failing_service
from fs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _answers(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def _mount_type(path: Path) -> str | None:
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        found = [line.split()[2] for line in f if line.split()[1] == real]
    return found[-1] if found else None


class Daemon:
    """A daemon started from `argv` in the foreground; always gone after the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.mountpoints: list[Path] = []

    def start(self, argv: list[str], mp: Path, log: Path) -> subprocess.Popen:
        self.mountpoints.append(mp)
        with open(log, "ab") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=logf, cwd=REPO,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not (is_mounted(mp) and _answers(mp)):
            assert proc.poll() is None, f"daemon exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "mount did not appear in time"
            time.sleep(0.02)
        return proc

    def cleanup(self) -> None:
        for mp in self.mountpoints:
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for mp in self.mountpoints:
            while is_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def _write_fsynced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_failed_main_loop_leaves_the_mount_dead(tmp_path: Path, daemons: Daemon) -> None:
    volume = make_volume(tmp_path / "vol", "256M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    log = tmp_path / "daemon.log"
    proc = daemons.start([sys.executable, "-c", FAILING_DAEMON, "mount", str(volume),
                          str(mp), "--foreground"], mp, log)
    data = os.urandom(300_000)
    _write_fsynced(mp / "kept", data)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) != 0
    assert "injected: a service of the daemon failed" in log.read_text()

    # The mount is still there, and dead: nothing lands in the bare directory.
    assert _mount_type(mp) == "fuse.sluice"
    with pytest.raises(OSError) as exc:
        os.statvfs(mp)
    assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as exc:
        with open(mp / "after-death", "wb") as f:
            f.write(b"must not land on the host filesystem")
    assert exc.value.errno == errno.ENOTCONN
    assert (volume / "mount.json").exists()  # how the next mount finds what to clean

    # The next `sluice mount` of the volume (elsewhere) cleans the dead mount, and the
    # fsync'd file is whole.
    mp2 = tmp_path / "mnt2"
    mp2.mkdir()
    daemons.start([sys.executable, "-m", "fs.cli", "mount", str(volume), str(mp2),
                   "--foreground"], mp2, tmp_path / "daemon2.log")
    assert not is_mounted(mp) and os.listdir(mp) == []
    assert (mp2 / "kept").read_bytes() == data
    assert sorted(os.listdir(mp2)) == ["kept"]
    sluice("umount", str(mp2))
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path: Path, daemons: Daemon, signum: int) -> None:
    volume = make_volume(tmp_path / "vol", "256M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = daemons.start([sys.executable, "-m", "fs.cli", "mount", str(volume), str(mp),
                          "--foreground"], mp, tmp_path / "daemon.log")
    (mp / "f").write_bytes(b"hello")
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 0
    assert not is_mounted(mp) and os.listdir(mp) == []
    assert not (volume / "mount.json").exists()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout


#: A test-only wrapper whose control socket server fails as it starts, before the mount
#: is announced live.
FAILING_START = """
import sys
import kernelshim.server

async def failing_run(self, *, task_status=None):
    raise RuntimeError("injected: the control socket server failed to start")

kernelshim.server.ShimServer.run = failing_run
from fs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_failure_while_starting_leaves_nothing_mounted(tmp_path: Path,
                                                       daemons: Daemon) -> None:
    """A `sluice mount` that fails before the mount is live is an ordinary failed mount:
    nothing was told to use it, so it is unmounted, not left dead."""
    volume = make_volume(tmp_path / "vol", "256M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    daemons.mountpoints.append(mp)
    r = subprocess.run([sys.executable, "-c", FAILING_START, "mount", str(volume), str(mp),
                        "--foreground"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert "the control socket server failed to start" in r.stderr
    assert not is_mounted(mp) and os.listdir(mp) == []
    assert not (volume / "mount.json").exists()
    # and the volume mounts normally afterwards
    proc = daemons.start([sys.executable, "-m", "fs.cli", "mount", str(volume), str(mp),
                          "--foreground"], mp, tmp_path / "daemon.log")
    (mp / "f").write_bytes(b"x")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
