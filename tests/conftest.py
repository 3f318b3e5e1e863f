"""Shared fixtures: fresh volumes, and real mounts served by a real sluice daemon.

`mounted` starts `sluice mount --foreground` as a child process, waits for the mount
while checking that the daemon is alive, and always unmounts in teardown: politely
first, then lazily and by killing the daemon's PID if a test left it hanging.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]


def sluice(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the sluice CLI; returns the CompletedProcess (text mode)."""
    r = subprocess.run([*SLUICE, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"sluice {' '.join(args)} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


# -- tests that need the machine to themselves under pytest-xdist -------------------------

def _xdist_locks(config: pytest.Config) -> tuple[Path, Path] | None:
    """The run's two lock files, shared by its xdist workers (in the run's own temporary
    root, the parent of each worker's popen-gwN); None when not run by xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    root = config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]
    return root / "exclusive.turnstile", root / "exclusive.lock"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """A test marked `exclusive` (it measures timing or ratios under load) runs while no
    other worker runs a test: every test holds a shared lock from its set-up to its
    teardown, an exclusive one holds it exclusively. The turnstile, taken briefly by
    every test and held by an exclusive one while it waits, keeps the other worker from
    starting test after test ahead of it."""
    import fcntl
    locks = _xdist_locks(item.config)
    if locks is None:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    turn = os.open(locks[0], os.O_RDWR | os.O_CREAT, 0o600)
    rw = os.open(locks[1], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)
        fcntl.flock(rw, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turn, fcntl.LOCK_UN)
        yield
    finally:
        os.close(rw)  # (closing releases the locks)
        os.close(turn)


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    # (another user's mount may have any bytes in its path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == real for line in f)


def _answers(path: Path) -> bool:
    """The mount at `path` is served (a dead mount left by a killed daemon is listed in
    /proc/mounts too, but answers ENOTCONN)."""
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


@dataclasses.dataclass
class Mount:
    volume: Path
    path: Path
    proc: subprocess.Popen | None
    log: Path

    def start(self, *extra: str, timeout: float = 30) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*SLUICE, "mount", str(self.volume), str(self.path),
                                      "--foreground", *extra],
                                     stdout=logf, stderr=logf, cwd=REPO,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while not (is_mounted(self.path) and _answers(self.path)):
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before "
                                     f"mounting:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not appear in time")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the daemon, leaving a dead mount behind (crash tests)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Unmount politely and wait for the daemon; escalate if it does not go."""
        if is_mounted(self.path):
            r = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    @property
    def daemon_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def make_volume(path: Path, size: str = "8G", *extra: str) -> Path:
    """`sluice mkfs PATH --size SIZE -q EXTRA...`, run in this process: the same parser
    and command function as the CLI, without the ~0.9 s of a new interpreter importing
    sluice (one or more per mounted test; tests/test_cli.py runs mkfs as a program)."""
    from fs import cli
    args = cli.build_parser().parse_args(["mkfs", str(path), "--size", size, "-q", *extra])
    assert cli.cmd_mkfs(args) == 0
    return path


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return make_volume(tmp_path / "vol")


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """Call with (volume, *mount options) to get a started Mount; all are torn down."""
    mounts: list[Mount] = []

    def factory(volume: Path, *extra: str, name: str = "mnt") -> Mount:
        mp = tmp_path / name
        mp.mkdir(exist_ok=True)
        os.chmod(mp, 0o755)
        m = Mount(volume, mp, None, tmp_path / f"{name}-daemon.log")
        mounts.append(m)
        m.start(*extra)
        return m

    yield factory
    errors = []
    for m in mounts:
        m.stop()
        if m.log.exists():
            text = m.log.read_text()
            if "Traceback" in text and "unexpected" not in text:
                errors.append(text[-3000:])
    # Every handler's unexpected failure is a bug: the daemon logs it with a traceback.
    assert not errors, "daemon logged tracebacks:\n" + "\n".join(errors)


@pytest.fixture
def public_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Like mount_factory, with the mount point under a fresh 0755 directory in /tmp
    (pytest's tmp_path is not reachable by other uids), at `<base>/mnt`; the daemon's
    log is tmp_path/daemon.log."""
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="sluice-pub-", dir="/tmp"))
    os.chmod(base, 0o755)
    mounts: list[Mount] = []

    def start(volume: Path, *extra: str) -> Mount:
        mp = base / "mnt"
        mp.mkdir(exist_ok=True)
        m = Mount(volume, mp, None, tmp_path / "daemon.log")
        mounts.append(m)
        m.start(*extra)
        return m

    try:
        yield start
    finally:
        for m in mounts:
            m.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mnt(volume: Path, mount_factory) -> Iterator[Path]:
    """A fresh volume mounted; yields the mount point."""
    m = mount_factory(volume)
    yield m.path
    assert m.daemon_alive, "the daemon died during the test"


def run_as(uid: int, gid: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `cmd` with the given uid/gid and no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "--", *cmd], capture_output=True, text=True, **kw)


# -- code run as another uid in a forked child, and a small tmpfs of our own -----------------

def in_child(uid: int, fn: Callable[[], dict]) -> tuple[int, int]:
    """Fork a child that runs `fn` as `uid`; returns (pid, read end of its result)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, json.dumps(fn()).encode())
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(w, json.dumps({"child-error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def child_result(pid: int, r: int) -> dict:
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "child-error" not in out, out
    return out


def as_uid(uid: int, fn: Callable[[], dict]) -> dict:
    """Run `fn` in a forked child with `uid` (and gid, no groups); returns its result."""
    return child_result(*in_child(uid, fn))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """Call with a size ("256k") for a tmpfs of our own to fill up (the host filesystem
    under a backing file); unmounted in teardown."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        mp = tmp_path / f"tmpfs-{len(mounted)}"
        mp.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            str(mp)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounted.append(mp)
        return mp

    yield make
    for mp in mounted:
        subprocess.run(["umount", "-l", str(mp)], check=False)
