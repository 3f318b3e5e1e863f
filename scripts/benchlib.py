"""What the benchmark scripts (bench_fs.py, bench_direct.py) share.

Running a command and logging progress, dropping the page cache, reading /proc (mounts,
a process's CPU time, the load average), writing a scratch file to warm the memory up,
the timed loops of a sequential read to the end and of random 4 KiB I/O (with random
aligned offsets), and `SluiceMount`: a sluice volume made, mounted, unmounted and
cleaned up through `python -m fs.cli`.

The scripts run as `.venv/bin/python scripts/bench_X.py`, so this directory is
sys.path[0] and `import benchlib` finds this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]
MiB = 1 << 20
BS = 4096


def unused_uids(n: int, start: int = 61000) -> tuple[int, ...]:
    """`n` uids from `start` up that no account has (no passwd entry) and no process
    runs as: a benchmark's hostile tenants run as them (setpriv), never as a real
    user's uid (probe 27: uids 1000 and 1002 were two accounts of the host)."""
    import pwd
    busy = set()
    for st in Path("/proc").glob("[0-9]*/status"):
        try:
            for line in st.read_text().splitlines():
                if line.startswith("Uid:"):
                    busy.update(int(x) for x in line.split()[1:])
                    break
        except OSError:
            continue
    out: list[int] = []
    uid = start
    while len(out) < n:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in busy:
                out.append(uid)
        uid += 1
    return tuple(out)


def parse_uids(text: str, n: int) -> tuple[int, ...]:
    """`--uids A,B`: `n` distinct uids other than root (ValueError saying why)."""
    try:
        uids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: give {n} uids separated by commas") from None
    if len(uids) != n or len(set(uids)) != n or min(uids) <= 0:
        raise ValueError(f"{text!r}: give {n} distinct uids other than 0")
    return uids


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str] | str, **kw: Any) -> subprocess.CompletedProcess:
    """Run `cmd` (a string goes through the shell) capturing its output; RuntimeError
    with its stderr if it fails."""
    shell = isinstance(cmd, str)
    r = subprocess.run(cmd, shell=shell, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        what = repr(cmd) if isinstance(cmd, str) else " ".join(cmd)
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == real for line in f)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all threads), seconds."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def warm_memory(scratch: Path, chunks: Iterable[Any], *, fsync: bool = False) -> None:
    """Write `chunks` to the file `scratch` (fsync it if asked), then delete it; untimed.
    This VM returns freed guest memory to its host (virtio-balloon free page reporting),
    and the first touch of such a page is slow: without this, a sequential write or cold
    read into the page cache measures the hypervisor more than the filesystem."""
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks:
            os.write(fd, chunk)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(scratch)


def random_offsets(size: int, seed: int, n: int = 1 << 16) -> list[int]:
    """`n` random BS-aligned offsets of blocks inside a file of `size` bytes."""
    rnd = random.Random(seed)
    nblocks = size // BS
    return [rnd.randrange(nblocks) * BS for _ in range(n)]


def read_to_end(fd: int, buf: Any, *, positional: bool) -> tuple[int, float]:
    """Read `fd` to its end with requests of len(buf) bytes into `buf`: os.preadv at the
    running offset if `positional`, else os.readv at the file position. Returns (bytes
    read, seconds)."""
    bufs = [buf]
    total = 0
    t0 = time.perf_counter()
    while True:
        n = os.preadv(fd, bufs, total) if positional else os.readv(fd, bufs)
        if not n:
            break
        total += n
    return total, time.perf_counter() - t0


def io_until(op: Callable[[int, list[Any], int], int], fd: int, bufs: list[Any],
             offs: list[int], seconds: float, *, batch: int, error: str) -> int:
    """Call op(fd, bufs, offset) (os.preadv, os.pwritev) for the offsets of `offs` in turn
    (65536 of them, reused round robin) until `seconds` have passed, looking at the clock
    every `batch` calls; RuntimeError(`error`) when one moves less than BS bytes. Returns
    the number of calls."""
    now = time.perf_counter
    n = 0
    t_end = now() + seconds
    while True:
        for k in range(batch):
            if op(fd, bufs, offs[(n + k) & 0xFFFF]) != BS:
                raise RuntimeError(error)
        n += batch
        if now() >= t_end:
            return n


class SluiceMount:
    """A sluice volume (timing profile `none`) at `volume`, mounted at `mountpoint`;
    `pid` is its daemon's while mounted."""

    def __init__(self, volume: Path, mountpoint: Path, size: int | str = "16G",
                 options: tuple[str, ...] = ()) -> None:
        self.volume = volume
        self.mountpoint = mountpoint
        self.size = size
        #: more `sluice mount` options (e.g. ("--idle-poll", "0"))
        self.options = options
        self.pid: int | None = None

    def mkfs(self) -> None:
        run([*SLUICE, "mkfs", str(self.volume), "--size", str(self.size), "--profile", "none",
             "-q"], cwd=REPO)

    def mount(self) -> None:
        run([*SLUICE, "mount", str(self.volume), str(self.mountpoint), "--profile", "none",
             *self.options], cwd=REPO)
        self.pid = int(json.loads((self.volume / "mount.json").read_text())["pid"])

    def umount(self) -> None:
        if is_mounted(self.mountpoint):
            run([*SLUICE, "umount", str(self.mountpoint)], cwd=REPO)
        self.pid = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def cleanup(self) -> None:
        """Best effort, for `finally`: unmount, lazily if need be; end our daemon."""
        pid = self.pid
        if is_mounted(self.mountpoint):
            r = subprocess.run([*SLUICE, "umount", str(self.mountpoint)], cwd=REPO,
                               capture_output=True, text=True)
            if r.returncode != 0:
                log(f"umount failed ({r.stderr.strip()}); unmounting lazily")
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True)
        if pid is not None:
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                log(f"daemon {pid} still running: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pid = None


@contextlib.contextmanager
def signals_held() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM wait (blocked) until the block ends, and then stop the script
    as usual: what the block starts (a process, a mount) is recorded for the cleanup
    before a stop can come. Yields the `preexec_fn` for processes started in the block,
    so that they start with the script's signal mask, not with these two blocked."""
    stops = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def unblock() -> None:
        # (in a child: these two unblocked whatever the blocks around this one held)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    try:
        yield unblock
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_processes(procs: Iterable[subprocess.Popen]) -> None:
    """Kill (SIGKILL) those of `procs` that still run and reap them all; a stop signal
    waits until they are (a process left behind would run on with its files open on
    a mount the script then cannot unmount). A caller with more cleanup to do after it
    (an unmount) holds the signals over the whole of it: a stop that came meanwhile
    would otherwise be raised here, and the rest skipped."""
    with signals_held():
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in procs:
            p.wait()


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `main` unwinds (and unmounts)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def main_quietly(main: Callable[[], int | None]) -> int | None:
    """Run a script's `main`; when the reader of its output goes away (`... | head`)
    stop quietly, as command-line tools do, instead of with a BrokenPipeError traceback.
    Ctrl-C and SIGTERM (`timeout`, a CI's cancel) stop it with one line and status 130 or
    143, not a traceback nor — SIGTERM's default — a volume left mounted (probe 27). The
    exception unwinds through `main` first, so its mounts are unmounted as usual."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            return main()
        finally:
            sys.stdout.flush()  # (here, not at exit, where a failure is a traceback)
    except BrokenPipeError:
        # (and keep Python from complaining again when it flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, _Terminated, BaseExceptionGroup) as exc:
        # (a benchmark that runs trio gets them wrapped in an exception group: review
        # of stop 31, 4)
        term = isinstance(exc, _Terminated) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(_Terminated) is not None)
        if not term and not isinstance(exc, KeyboardInterrupt) and (
                not isinstance(exc, BaseExceptionGroup)
                or exc.subgroup(KeyboardInterrupt) is None):
            raise
        print(f"{Path(sys.argv[0]).name}: {'terminated' if term else 'interrupted'}",
              file=sys.stderr)
        return 143 if term else 130
