"""Tests of binding/pyfuse3-3.5.0-sluice.patch, in the style of pyfuse3's own
test/test_fs.py: a tiny file system served in a child process, real system calls
against its mount point, and what its handlers were called with.

Covered: the new init flags (FUSE_DIRECT_IO_ALLOW_MMAP: a shared mapping of a file
opened with direct_io; FUSE_HANDLE_KILLPRIV_V2) and `pyfuse3.negotiated()`; the
`fallocate` and `lseek` handlers (arguments in, errors and offsets out, and the kernel's
fallback when they are not implemented); `FileInfo.noflush` (no FLUSH at close);
`pyfuse3.release_worker()` (a handler that waits without holding one of `main`'s
workers, its arguments intact after its request buffer is reused); the reader (a worker
whose handlers complete without blocking keeps reading requests itself, and hands the
device over when one blocks); `main`'s checkpoint budget (a handler's schedule points
answered without the event loop, real waits not); write payloads (a large one a
read-only, page-aligned view of the request buffer, never changed while the handler
keeps it).
Needs root (or user_allow_other) and /dev/fuse, as upstream's tests do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import multiprocessing
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")
trio = pytest.importorskip("trio")

if not hasattr(pyfuse3, "negotiated"):
    pytest.skip("pyfuse3 is not built with the sluice patch (run scripts/setup.sh)",
                allow_module_level=True)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FILES = {b"noflush": 2, b"flush": 3, b"plain": 4}
SIZE = 4 * 4096
DATA_END = 4096  # the file systems below say: data in [0, 4096), a hole after it

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Fs(pyfuse3.Operations):
    """Three files of SIZE bytes, opened with direct_io; `noflush` asks for no FLUSH."""

    enable_direct_io_allow_mmap = True
    enable_killpriv_v2 = True

    def __init__(self, status) -> None:
        super().__init__()
        self.status = status
        self.data = {ino: bytearray(b"x" * DATA_END + bytes(SIZE - DATA_END))
                     for ino in FILES.values()}

    def _note(self, key: str, value) -> None:
        self.status[key] = self.status.get(key, []) + [value]

    def init(self) -> None:
        got = pyfuse3.negotiated()
        self.status["want"] = sorted(got["want"])
        self.status["capable"] = sorted(got["capable"])

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
        else:
            e.st_mode = stat.S_IFREG | 0o666
            e.st_nlink = 1
            e.st_size = len(self.data[inode])
        e.st_blksize = 4096
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILES[name])

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, ino) in enumerate(FILES.items()):
            if i >= start_id and not pyfuse3.readdir_reply(
                    token, name, await self.getattr(ino), i + 1):
                return

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False,
                                noflush=inode == FILES[b"noflush"])

    async def read(self, fh, off, size):
        return bytes(self.data[fh][off:off + size])

    async def write(self, fh, off, buf):
        d = self.data[fh]
        if off + len(buf) > len(d):
            d.extend(bytes(off + len(buf) - len(d)))
        d[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh):
        self._note("flush", fh)

    async def release(self, fh):
        self._note("release", fh)

    async def fallocate(self, fh, mode, off, length):
        self._note("fallocate", [fh, mode, off, length])
        if mode not in (0, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if mode == 0 and off + length > len(self.data[fh]):
            self.data[fh].extend(bytes(off + length - len(self.data[fh])))

    async def lseek(self, fh, off, whence):
        self._note("lseek", [fh, off, whence])
        size = len(self.data[fh])
        if off >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            if off < DATA_END:
                return off
            raise pyfuse3.FUSEError(errno.ENXIO)
        return max(off, DATA_END)


class PlainFs(Fs):
    """Neither handler implemented: pyfuse3's defaults answer ENOSYS."""

    async def fallocate(self, fh, mode, off, length):
        return await pyfuse3.Operations.fallocate(self, fh, mode, off, length)

    async def lseek(self, fh, off, whence):
        return await pyfuse3.Operations.lseek(self, fh, off, whence)


def _serve(cls, mnt: str, status, uid: int | None = None) -> None:
    if uid is not None:  # a non-root mount: libfuse runs the system's setuid fusermount3
        status = {}  # the manager's socket is root's: this child cannot reach it
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    fs = cls(status)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=bindingtest")
    if uid is not None or getattr(cls, "ALLOW_OTHER", False):
        opts.add("allow_other")  # so that the test, as root (or another uid), may look
    pyfuse3.init(fs, mnt, opts)
    try:
        trio.run(functools.partial(pyfuse3.main, **getattr(cls, "MAIN", {})))
    finally:
        pyfuse3.close()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.fixture(params=[Fs, PlainFs], ids=["handlers", "defaults"])
def served(request, tmp_path: Path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager()
    status = manager.dict()
    proc = ctx.Process(target=_serve, args=(request.param, str(mnt), status))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert proc.is_alive(), "the file system exited before mounting"
            assert time.monotonic() < deadline, "no mount"
            time.sleep(0.02)
        yield request.param, mnt, status
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        manager.shutdown()


def test_init_flags_are_negotiated(served) -> None:
    _cls, mnt, status = served
    os.stat(mnt)
    assert {"direct_io_allow_mmap", "handle_killpriv_v2"} <= set(status["want"])
    assert {"direct_io_allow_mmap", "handle_killpriv_v2"} <= set(status["capable"])


def test_shared_mmap_of_a_direct_io_file(served) -> None:
    _cls, mnt, status = served
    fd = os.open(mnt / "plain", os.O_RDWR)
    try:
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        assert m[:4] == b"xxxx"
        m[:4] = b"abcd"
        m.flush()
        m.close()
        assert os.pread(fd, 5, 0) == b"abcdx"
    finally:
        os.close(fd)


def test_noflush(served) -> None:
    _cls, mnt, status = served
    for name in ("noflush", "flush"):
        os.close(os.open(mnt / name, os.O_RDONLY))
    deadline = time.monotonic() + 10
    while len(status.get("release", [])) < 2:  # RELEASE is asynchronous
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert status.get("flush", []) == [FILES[b"flush"]]


def test_fallocate(served) -> None:
    cls, mnt, status = served
    fd = os.open(mnt / "plain", os.O_RDWR)
    try:
        if cls is PlainFs:  # ENOSYS: the kernel answers EOPNOTSUPP, now and later
            for _ in range(2):
                assert _libc.fallocate(fd, 0, 0, 100) == -1
                assert ctypes.get_errno() == errno.EOPNOTSUPP
            return
        os.posix_fallocate(fd, 100, SIZE * 2)
        assert os.fstat(fd).st_size == SIZE * 2 + 100
        assert _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096,
                               8192) == 0
        assert _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 10) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    ino = FILES[b"plain"]
    assert status["fallocate"] == [[ino, 0, 100, SIZE * 2],
                                   [ino, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 8192],
                                   [ino, FALLOC_FL_KEEP_SIZE, 0, 10]]


def test_lseek(served) -> None:
    cls, mnt, status = served
    fd = os.open(mnt / "plain", os.O_RDONLY)
    try:
        if cls is PlainFs:  # ENOSYS: the kernel's generic answer (all data)
            assert os.lseek(fd, 10, os.SEEK_DATA) == 10
            assert os.lseek(fd, 10, os.SEEK_HOLE) == SIZE
            return
        assert os.lseek(fd, 10, os.SEEK_DATA) == 10
        assert os.lseek(fd, 10, os.SEEK_HOLE) == DATA_END
        with pytest.raises(OSError) as ei:
            os.lseek(fd, DATA_END + 1, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 7, os.SEEK_SET) == 7  # the kernel's own, no request
    finally:
        os.close(fd)
    ino = FILES[b"plain"]
    assert status["lseek"] == [[ino, 10, os.SEEK_DATA], [ino, 10, os.SEEK_HOLE],
                               [ino, DATA_END + 1, os.SEEK_DATA]]


NOBODY = 65534


def test_the_private_libfuse_runs_the_system_fusermount3() -> None:
    """Where the library looks for fusermount3 is compiled in; it must be the setuid one
    of Debian's fuse3 package, not the private prefix (which has none)."""
    import pyfuse3 as mod
    maps = Path("/proc/self/maps").read_text()
    lib = next(ln.split()[-1] for ln in maps.splitlines() if "libfuse3.so" in ln)
    assert "/.build/libfuse/lib/" in lib, lib
    assert b"/usr/bin/fusermount3" in Path(lib).read_bytes()
    assert mod.negotiated is not None


def test_a_non_root_mount_finds_the_system_fusermount3() -> None:
    """The private libfuse looks for fusermount3 in /usr/bin (libfuse-fusermount-path.patch):
    an unprivileged user can still mount, and gets shared mmap of direct_io files."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/fusermount3"):
        pytest.skip("needs root (to become another user) and the fuse3 package")
    if not os.stat("/dev/fuse").st_mode & 0o006:
        # libfuse opens /dev/fuse itself first (as upstream 3.14 does too): a machine
        # that keeps it 0600 allows no unprivileged FUSE mount, with either library.
        pytest.skip("/dev/fuse is not open to other users on this machine")
    base = Path(tempfile.mkdtemp(prefix="binding-", dir="/tmp"))
    os.chmod(base, 0o755)
    mnt = base / "mnt"
    mnt.mkdir()
    os.chown(mnt, NOBODY, NOBODY)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_serve, args=(Fs, str(mnt), None, NOBODY))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert proc.is_alive(), "the unprivileged file system exited before mounting"
            assert time.monotonic() < deadline, "no mount"
            time.sleep(0.02)
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if ln.split()[1] == str(mnt))
        assert f"user_id={NOBODY}" in line, line
        fd = os.open(mnt / "plain", os.O_RDWR)
        try:  # a shared mapping of a direct_io file: the flag was negotiated
            m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
            assert m[:4] == b"xxxx"
            m.close()
        finally:
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        shutil.rmtree(base, ignore_errors=True)


# -- release_worker --------------------------------------------------------------------

PARKED = 8          # requests that wait at once: four times the workers of `main`
REGION = 4096


class ParkFs(Fs):
    """Reads and writes of `noflush` wait until `flush` is read, each released from its
    worker first; `main` has only two workers."""

    MAIN = {"max_tasks": 2}

    def __init__(self, status) -> None:
        super().__init__(status)
        self.slow = FILES[b"noflush"]
        self.data[self.slow] = bytearray(bytes(range(256)) * (2 * PARKED * REGION // 256))
        self.go = trio.Event()

    async def open(self, inode, flags, ctx):
        fi = await super().open(inode, flags, ctx)
        fi.parallel_direct_writes = True  # else the kernel sends one write at a time
        return fi

    async def _park(self, what) -> None:
        released = pyfuse3.release_worker()
        again = pyfuse3.release_worker()  # no longer a worker
        self._note("parked", [what, released, again])
        await self.go.wait()

    async def read(self, fh, off, size):
        if fh == FILES[b"flush"]:
            self.go.set()
        elif fh == self.slow and not self.go.is_set():
            await self._park("read")
        return await super().read(fh, off, size)

    async def write(self, fh, off, buf):
        if fh == self.slow and not self.go.is_set():
            await self._park("write")
        return await super().write(fh, off, buf)


@contextlib.contextmanager
def _served(cls, tmp_path: Path):
    """Mount `cls` in a forked child at tmp_path/mnt; yield (mnt, status, deadline) once
    mounted; unmount and stop the child after."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager()
    status = manager.dict()
    proc = ctx.Process(target=_serve, args=(cls, str(mnt), status))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert proc.is_alive(), "the file system exited before mounting"
            assert time.monotonic() < deadline, "no mount"
            time.sleep(0.02)
        yield mnt, status, deadline
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        manager.shutdown()


def _read_while_one_waits(mnt: Path, status, deadline: float) -> None:
    """A read of `noflush` waits in its handler (a real wait) until `flush` is read: the
    second read is served meanwhile only if the waiting worker handed reading over."""
    got: dict[str, bytes | str] = {}

    def blocked() -> None:
        try:
            got["noflush"] = (mnt / "noflush").read_bytes()[:8]
        except OSError as exc:
            got["noflush"] = repr(exc)

    t = threading.Thread(target=blocked, daemon=True)
    t.start()
    while not status.get("waiting"):
        assert t.is_alive() and time.monotonic() < deadline + 30
        time.sleep(0.02)
    got["flush"] = (mnt / "flush").read_bytes()[:8]
    t.join(60)
    assert got == {"noflush": b"x" * 8, "flush": b"x" * 8}, got


def test_release_worker(tmp_path: Path) -> None:
    """More requests wait in handlers than `main` has workers, and the file system still
    answers: each waiting handler released its worker. A released write's data is what
    was written, though its request buffer was freed and others were read meanwhile."""
    results: dict[int, bytes | int | str] = {}
    with _served(ParkFs, tmp_path) as (mnt, status, deadline):
        slow = str(mnt / "noflush")

        def reader(i: int) -> None:
            fd = os.open(slow, os.O_RDONLY)
            try:
                results[i] = os.pread(fd, REGION, (PARKED + i) * REGION)
            except OSError as exc:
                results[i] = repr(exc)
        

# -- the reader ----------------------------------------------------------------------------

class ReaderFs(Fs):
    """Reads of `plain` note the worker task that served them; a read of `noflush`
    waits (without release_worker) until `flush` is read; `main` has two workers."""

    MAIN = {"max_tasks": 2}

    def __init__(self, status) -> None:
        super().__init__(status)
        self.go = trio.Event()

    async def read(self, fh, off, size):
        if fh == FILES[b"plain"]:
            self._note("served_by", trio.lowlevel.current_task().name)
        elif fh == FILES[b"flush"]:
            self.go.set()
        elif fh == FILES[b"noflush"]:
            self._note("waiting", off)
            await self.go.wait()
        return await super().read(fh, off, size)


def test_reader_keeps_reading_until_a_handler_blocks(tmp_path: Path) -> None:
    """Requests whose handlers complete without blocking are all read and served by
    one worker (no hand-over between workers per request: one step of the event loop
    each); a handler that blocks hands reading over to another worker, so the request
    that unblocks it is read and served meanwhile."""
    with _served(ReaderFs, tmp_path) as (mnt, status, deadline):
        fd = os.open(mnt / "plain", os.O_RDONLY)
        try:
            for i in range(20):
                assert os.pread(fd, 8, i) == b"x" * 8
        finally:
            os.close(fd)
        served_by = status["served_by"]
        assert len(served_by) == 20 and len(set(served_by)) == 1, served_by
        # The only worker that was reading waits in its handler.
        _read_while_one_waits(mnt, status, deadline)


# -- the checkpoint budget -----------------------------------------------------------------

class BudgetFs(ReaderFs):
    """Reads of `plain` pass three schedule points (two checkpoints and an uncontended
    Lock) after starting another task, and note whether that task ran in between."""

    MAIN = {"max_tasks": 2, "checkpoint_budget": 60.0}

    def __init__(self, status) -> None:
        super().__init__(status)
        self.lock = trio.Lock()

    async def read(self, fh, off, size):
        if fh == FILES[b"plain"]:
            ran: list[bool] = []

            async def other() -> None:
                ran.append(True)
            trio.lowlevel.spawn_system_task(other)
            await trio.lowlevel.checkpoint()
            async with self.lock:
                await trio.lowlevel.checkpoint()
            self._note("other_ran", bool(ran))
        return await super().read(fh, off, size)


class NoBudgetFs(BudgetFs):
    MAIN = {"max_tasks": 2}


class SpentBudgetFs(ReaderFs):
    """Reads of `plain` start another task, work for twice the budget (1 ms) before
    their first schedule point, and note whether that task ran by the second. (Two:
    trio runs a batch in either order, so the other task may run just after the first
    turn the handler gives back; it has run by the second. Answered at once, neither
    lets it run.)"""

    BUDGET = 1e-3
    MAIN = {"max_tasks": 2, "checkpoint_budget": BUDGET}

    async def read(self, fh, off, size):
        if fh == FILES[b"plain"]:
            ran: list[bool] = []

            async def other() -> None:
                ran.append(True)
            trio.lowlevel.spawn_system_task(other)
            start = time.perf_counter()
            while time.perf_counter() - start < 2 * self.BUDGET:
                pass
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            self._note("other_ran", bool(ran))
        return await super().read(fh, off, size)


@pytest.mark.parametrize("cls", [BudgetFs, NoBudgetFs, SpentBudgetFs],
                         ids=["budget", "none", "spent"])
def test_checkpoint_budget(tmp_path: Path, cls) -> None:
    """With a budget, a handler's schedule points do not give the event loop back: no
    other task runs in between and the worker keeps reading (one worker serves every
    read); a handler that really waits still hands reading over. Without one (trio's
    way, the default), every schedule point is a turn of the loop. The budget counts
    from the handler's start: a handler that worked past it before its first schedule
    point gives the loop back there."""
    with _served(cls, tmp_path) as (mnt, status, deadline):
        fd = os.open(mnt / "plain", os.O_RDONLY)
        try:
            for i in range(10):
                assert os.pread(fd, 8, i) == b"x" * 8
        finally:
            os.close(fd)
        if cls is BudgetFs:
            assert status["other_ran"] == [False] * 10
            assert len(set(status["served_by"])) == 1, status["served_by"]
        else:  # no budget, or one the handler spent before its schedule point
            assert status["other_ran"] == [True] * 10
        # A real wait (an Event) gives the loop back and hands reading over, budget or
        # not: the read that sets the event is served meanwhile.
        _read_while_one_waits(mnt, status, deadline)


# -- write payloads ----------------------------------------------------------------------

MiB = 1 << 20


def _address(mv: memoryview) -> int:
    """Where the memory `mv` views starts (read-only views too)."""
    import numpy as np
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


class KeepFs(Fs):
    """Writes of `plain` keep their payload (as write-behind keeps it after the reply)
    and note its type and contents; at `release` each kept payload is compared with
    what it held when it arrived, after every later request was read."""

    def __init__(self, status) -> None:
        super().__init__(status)
        self.kept: list[tuple[object, bytes]] = []

    async def write(self, fh, off, buf):
        if fh == FILES[b"plain"]:
            mv = memoryview(buf)
            self._note("payloads", [type(buf).__name__, mv.readonly, type(mv.obj).__name__,
                                    len(buf), off, _address(mv) % mmap.PAGESIZE])
            self.kept.append((buf, bytes(buf)))
        return await super().write(fh, off, buf)

    async def release(self, fh):
        if fh == FILES[b"plain"]:
            self.status["intact"] = [bytes(buf) == copy for buf, copy in self.kept]
        await super().release(fh)


def test_large_write_payloads_are_views_that_never_change(tmp_path: Path) -> None:
    """A write that fills at least half of the request buffer reaches the handler as a
    read-only view of a `bytes` object (no copy); a small one as `bytes`. Either may
    be kept after the handler returned: later requests are read into other buffers, so
    what a kept payload holds never changes. A view starts on a page boundary (the
    request is read 80 bytes before one), so an O_DIRECT write can take it as it is."""
    aligned = mmap.mmap(-1, MiB)  # page-aligned: one request of 1 MiB
    unaligned = bytearray(MiB + 16)  # as fio's: 1 MiB - k bytes, then k bytes
    pattern = [bytes([i]) * MiB for i in range(1, 5)]
    with _served(KeepFs, tmp_path) as (mnt, status, deadline):
        fd = os.open(mnt / "plain", os.O_WRONLY)
        try:
            for i, data in enumerate(pattern[:2]):
                aligned[:] = data
                assert os.pwrite(fd, aligned, i * MiB) == MiB
            for i, data in enumerate(pattern[2:], 2):
                unaligned[16:] = data
                assert os.pwrite(fd, memoryview(unaligned)[16:], i * MiB) == MiB
            assert os.pwrite(fd, b"tiny", 4 * MiB) == 4
        finally:
            os.close(fd)
        while "intact" not in status:  # RELEASE is asynchronous
            assert time.monotonic() < deadline + 30
            time.sleep(0.02)
        payloads = status["payloads"]
        assert all(status["intact"]) and len(status["intact"]) == len(payloads)
        views = [p for p in payloads if p[0] == "memoryview"]
        small = [p for p in payloads if p[0] == "bytes"]
        assert len(views) >= 4 and all(p[1] and p[2] == "bytes" for p in views), payloads
        assert all(p[3] >= MiB // 2 for p in views), payloads
        assert all(p[5] == 0 for p in views), payloads  # page-aligned payloads
        assert [4, 4 * MiB] in [p[3:5] for p in small], payloads
        assert sum(p[3] for p in payloads) == 4 * MiB + 4
        assert (mnt / "plain").read_bytes()[:4 * MiB] == b"".join(pattern)


# -- the fair intake -----------------------------------------------------------------------

class IntakeFs(Fs):
    """An intake hook that defers every request of uid 1000 (keyed by uid) and none of
    anyone else's; reads note (uid's key, offset) in the order they are served."""

    ALLOW_OTHER = True
    MAIN = {"max_tasks": 4}

    def __init__(self, status) -> None:
        super().__init__(status)
        self.deferred = 0
        pyfuse3.set_intake(self.hook)

    def hook(self, uid, pid, opcode, rnd):
        if uid == 1000:
            self.deferred += 1
            self.status["deferred"] = self.deferred
        return uid, uid == 1000

    async def read(self, fh, off, size):
        self._note("reads", off)
        return await super().read(fh, off, size)


def test_deferred_requests_are_all_served_in_their_order(tmp_path: Path) -> None:
    """Sluice's fair intake: requests the hook defers are copied out and served later,
    each key's in the order they came; a request of another key is served meanwhile."""
    base = Path(tempfile.mkdtemp(prefix="binding-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        with _served(IntakeFs, base) as (mnt, status, deadline):
            code = ("import os, sys\n"
                    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                    "got = [os.pread(fd, 8, 100 + i) for i in range(30)]\n"
                    "print(all(g == b'x' * 8 for g in got), len(got))\n")
            r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                                "/usr/bin/python3", "-c", code, str(mnt / "plain")],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stdout.split() == ["True", "30"], r.stderr
            assert status.get("deferred", 0) >= 30  # (each read, and its lookups)
            assert [o for o in status["reads"] if o >= 100] == [100 + i for i in range(30)]
            # root's requests are not deferred, and served with them in flight
            assert (mnt / "flush").read_bytes()[:8] == b"x" * 8
    finally:
        shutil.rmtree(base, ignore_errors=True)
