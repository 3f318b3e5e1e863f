"""O_DIRECT writes of `FileBacking` (blockdev/backing.py, blockdev/aio.py): which writes
go around the host's page cache, that a barrier covers the direct writes begun before
it, and the fallback to buffered writes where the host refuses O_DIRECT or AIO."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from blockdev import BlockDevice, FileBacking, PrincipalId
from blockdev import aio as aio_mod
from blockdev import backing as backing_mod
from blockdev.recording import BARRIER, WRITE, Recording, RecordLog

MiB = 1 << 20
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of [offset, offset + length) of the file are in the host's page
    cache (mincore of a shared read-only mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer(length // PAGE)
            assert _libc.mincore(addr, length, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


def aligned_view(data: bytes) -> memoryview:
    """A read-only view of a `bytes` object holding `data`, starting on a page (as the
    binding hands a large FUSE write's payload over)."""
    owner = bytes(len(data) + PAGE)
    address = int(np.frombuffer(owner, dtype=np.uint8).ctypes.data)
    skip = -address % PAGE
    ctypes.memmove(address + skip, data, len(data))  # (before anything else sees it)
    return memoryview(owner)[skip:skip + len(data)]


def backing(tmp_path: Path, size: int = 8 * MiB) -> tuple[FileBacking, Path]:
    path = tmp_path / "store"
    return FileBacking(path, create_size=size), path


def fill(n: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(256)) * (n // 256)


MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def on_memory_fs(path: Path) -> bool:
    """Whether `path` is on tmpfs or ramfs (statfs f_type): no page cache to go around
    there (the suite and CI may put tmp_path on tmpfs)."""
    buf = ctypes.create_string_buffer(256)
    assert _libc.statfs(os.fsencode(path), buf) == 0, ctypes.get_errno()
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF in MEMORY_FILESYSTEMS


@pytest.fixture
def direct_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct writes even on tmpfs (which takes O_DIRECT since Linux 6.6), for the tests
    of what the direct path does rather than of what it saves; skipped where the
    host has no O_DIRECT at all."""
    monkeypatch.setattr(backing_mod, "_MEMORY_FILESYSTEMS", frozenset(), raising=False)
    probe = tmp_path / "o_direct-probe"
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on {tmp_path}: {exc.strerror}")
    finally:
        probe.unlink(missing_ok=True)


async def test_large_aligned_immutable_writes_bypass_the_page_cache(tmp_path: Path) -> None:
    """A write of DIRECT_MIN_BYTES or more from `bytes` memory on a page boundary, at a
    page offset and of whole pages, reaches the file without leaving its pages in the
    host's page cache (O_DIRECT); writes from memory that may change (a bytearray: a
    pool frame, a client's shared memory), unaligned ones and small ones are buffered.
    Every one reads back. (On the code before direct writes, the first range was
    resident like the others.)"""
    if on_memory_fs(tmp_path):
        pytest.skip("tmpfs/ramfs: every page is in memory, there is no cache to go around")
    b, path = backing(tmp_path)
    try:
        direct = aligned_view(fill(MiB, 1))
        await b.write(MiB, direct)
        assert resident_pages(path, MiB, MiB) == 0
        mutable = bytearray(fill(MiB, 2))
        await b.write(2 * MiB, memoryview(mutable))
        small = aligned_view(fill(backing_mod.DIRECT_MIN_BYTES // 2, 3))
        await b.write(4 * MiB, small)
        unaligned = memoryview(bytes(fill(MiB + PAGE, 4)))[PAGE // 2:PAGE // 2 + MiB]
        await b.write(5 * MiB, unaligned)
        for off, mv in ((2 * MiB, mutable), (4 * MiB, small), (5 * MiB, unaligned)):
            assert resident_pages(path, off, len(mv) // PAGE * PAGE) == len(mv) // PAGE
        for off, mv in ((MiB, direct), (2 * MiB, mutable), (4 * MiB, small),
                        (5 * MiB, unaligned)):
            assert b.pread(off, len(mv)) == bytes(mv)
        # A buffered read of the range after the direct write sees the new data (the
        # host drops the range's cached pages), and so does the next direct write.
        out = bytearray(MiB)
        await b.read_into(MiB, memoryview(out))
        assert out == direct
        again = aligned_view(fill(MiB, 5))
        await b.write(MiB, again)
        await b.read_into(MiB, memoryview(out))
        assert out == again
        await b.flush()
    finally:
        b.close()


async def test_flush_waits_for_the_direct_writes_begun_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_anywhere: None) -> None:
    """A barrier covers every write that began before it (the recording's power-loss
    model: a write logged before a flush began survives it), so `flush` waits for a
    direct write still on its way before it runs fdatasync; a write begun after the
    flush does not hold it up."""
    gate = trio.Event()
    order: list[str] = []
    real = aio_mod.DirectWriter.pwrite

    async def slow_pwrite(self, fd, data, address, nbytes, offset):  # type: ignore[no-untyped-def]
        if offset == 0:
            await gate.wait()
        n = await real(self, fd, data, address, nbytes, offset)
        order.append(f"write {offset // MiB}")
        return n

    monkeypatch.setattr(aio_mod.DirectWriter, "pwrite", slow_pwrite)
    real_flush = FileBacking.flush_sync
    monkeypatch.setattr(FileBacking, "flush_sync",
                        lambda self: (order.append("fdatasync"), real_flush(self))[1])
    b, _ = backing(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.write, 0, aligned_view(fill(MiB, 1)))
            await trio.testing.wait_all_tasks_blocked()

            async def flush() -> None:
                await b.flush()
                order.append("flushed")

            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()
            await b.write(MiB, aligned_view(fill(MiB, 2)))  # begun after: not waited for
            assert order == ["write 1"]
            gate.set()
        assert order == ["write 1", "write 0", "fdatasync", "flushed"]
        assert b.pread(0, MiB) == fill(MiB, 1)
    finally:
        b.close()


async def test_recording_logs_direct_writes_before_the_barrier_covering_them(
        tmp_path: Path, direct_anywhere: None) -> None:
    """Through a recording backing, a device write of a FUSE-like payload goes direct
    and is logged, and the barrier after it covers it; the device reads it back
    verified."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=4 * MiB, block_size=4096, profile="none")
    rec = tmp_path / "rec"
    dev = BlockDevice.open(d, timeline_slack=0.0, recorder=RecordLog.create(rec))
    try:
        data = fill(MiB, 7)
        await dev.write(16, aligned_view(data), principal=PrincipalId(0))  # type: ignore[arg-type]
        await dev.flush()
        assert bytes(await dev.read(16, 256, principal=PrincipalId(0))) == data
        inner = dev.data.inner  # type: ignore[attr-defined]
        assert isinstance(inner, FileBacking) and inner._direct_fd is not None \
            and inner._direct_fd >= 0
    finally:
        dev.close()
    records = [r for r in Recording.load(rec).records if r.backing == 0]
    kinds = [r.kind for r in records]
    assert WRITE in kinds and kinds.index(WRITE) < kinds.index(BARRIER)


@pytest.mark.parametrize("refusal", ["open", "setup", "submit", "submit-eopnotsupp"])
async def test_a_host_that_refuses_direct_writes_gets_buffered_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    """Where the host refuses O_DIRECT at open (EINVAL: a filesystem without it), has
    no AIO context to give (EAGAIN: aio-max-nr) or refuses the alignment at submission
    (EINVAL; EOPNOTSUPP: a filesystem whose write path has no direct I/O), the write
    is made through the page cache, and so is every later one. (EOPNOTSUPP failed
    the write on the branch as first reviewed.)"""
    if refusal == "open":
        real_open = os.open

        def refusing_open(path, flags, *args):  # type: ignore[no-untyped-def]
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "no O_DIRECT here")
            return real_open(path, flags, *args)

        monkeypatch.setattr(backing_mod.os, "open", refusing_open)
    elif refusal == "setup":
        def no_context(*, depth: int = 16) -> aio_mod.DirectWriter:
            raise OSError(errno.EAGAIN, "io_setup: no room")

        monkeypatch.setattr(aio_mod.DirectWriter, "open", staticmethod(no_context))
    else:
        code = errno.EINVAL if refusal == "submit" else errno.EOPNOTSUPP

        async def refusing_pwrite(self, fd, data, address, nbytes, offset):  # type: ignore[no-untyped-def]
            raise OSError(code, "refused")

        monkeypatch.setattr(aio_mod.DirectWriter, "pwrite", refusing_pwrite)
    b, path = backing(tmp_path)
    try:
        for i in range(2):
            await b.write(i * MiB, aligned_view(fill(MiB, i)))
            assert b.pread(i * MiB, MiB) == fill(MiB, i)
        assert resident_pages(path, 0, 2 * MiB) == 2 * MiB // PAGE
        assert b._direct_fd == -1
    finally:
        b.close()


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EINTR])
async def test_a_transient_refusal_of_a_direct_write_writes_it_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_anywhere: None,
        code: int) -> None:
    """io_submit's EAGAIN (no room in the AIO ring now) or an interrupted submission is
    the host declining the way, not failing the data: the write is made through the
    page cache (it used to fail, and a failed write-behind turns the volume
    read-only), and the next large write goes direct again. A medium error (EIO) is
    still the write's error."""
    real = aio_mod.DirectWriter.pwrite
    refusals = [code, errno.EIO]

    async def flaky_pwrite(self, fd, data, address, nbytes, offset):  # type: ignore[no-untyped-def]
        if offset == 0 and refusals:
            raise OSError(refusals.pop(0), "refused")
        return await real(self, fd, data, address, nbytes, offset)

    monkeypatch.setattr(aio_mod.DirectWriter, "pwrite", flaky_pwrite)
    b, _ = backing(tmp_path)
    try:
        await b.write(0, aligned_view(fill(MiB, 1)))  # refused for the moment: buffered
        assert b.pread(0, MiB) == fill(MiB, 1)
        assert b._direct_fd is not None and b._direct_fd >= 0  # still direct for the next
        with pytest.raises(OSError) as err:
            await b.write(0, aligned_view(fill(MiB, 2)))  # the medium's error: raised
        assert err.value.errno == errno.EIO
        await b.write(MiB, aligned_view(fill(MiB, 3)))  # direct
        assert b.pread(MiB, MiB) == fill(MiB, 3)
        assert b._direct_fd >= 0
        await b.flush()
    finally:
        b.close()


async def test_memory_filesystems_get_buffered_writes(tmp_path: Path) -> None:
    """tmpfs takes O_DIRECT since Linux 6.6 but copies into its page cache anyway: there
    a large aligned write is a buffered one (no AIO context, no loop pass for it), and
    reads back. (On the branch as first reviewed it went through O_DIRECT and AIO,
    and the test of the page cache it saves failed on tmpfs.)"""
    where = tmp_path
    if not on_memory_fs(where):
        shm = Path("/dev/shm")
        if not (shm.is_dir() and os.access(shm, os.W_OK) and on_memory_fs(shm)):
            pytest.skip("no tmpfs to try")
        where = Path(tempfile.mkdtemp(prefix="sluice-direct-", dir=shm))
    try:
        b, _ = backing(where)
        try:
            await b.write(MiB, aligned_view(fill(MiB, 1)))
            assert b._direct_fd == -1 and b._aio is None
            assert b.pread(MiB, MiB) == fill(MiB, 1)
        finally:
            b.close()
    finally:
        if where is not tmp_path:
            shutil.rmtree(where)


async def test_closing_the_direct_writer_wakes_the_writers_waiting_on_it(
        autojump_clock) -> None:
    """Review of fio4, V7: `DirectWriter.close` with tasks still waiting for a
    completion closed the eventfd under the reaper's `wait_readable` without
    `trio.lowlevel.notify_closing`, so the reaper (and every task parked behind it)
    never woke; and a write after the close went to io_submit on a destroyed context.
    Now each gets `trio.ClosedResourceError` at once."""
    try:
        w = aio_mod.DirectWriter.open(depth=2)
    except OSError as exc:
        pytest.skip(f"no Linux AIO context here: {exc}")
    woken: list[str] = []

    async def waiter(name: str) -> None:
        with pytest.raises(trio.ClosedResourceError):
            while True:  # (as `pwrite` waits for its completion; nothing is in
                await w._reap_or_wait()  # flight, so the reaper waits on the eventfd)
        woken.append(name)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, "reaper")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waiter, "parked")
                await trio.testing.wait_all_tasks_blocked()
                assert w._reaping
                w.close()
    finally:
        w.close()
    assert woken == ["reaper", "parked"]
    buf = aligned_view(b"x" * PAGE)
    with pytest.raises(trio.ClosedResourceError):
        await w.pwrite(0, buf, 0, PAGE, 0)


async def test_a_close_after_the_reaper_was_woken_gives_it_closed_resource() -> None:
    """Review of tidy5 (R1): `close` between the eventfd's readiness waking the reaper
    and the reaper running (a completion racing the close) found no waiter for
    `notify_closing` to wake, so the reaper went on to read the closed eventfd's
    number (EBADF as an OSError, the host's answer to the data; or 8 bytes of
    whatever descriptor reused the number) and io_getevents on the destroyed context.
    It must get `trio.ClosedResourceError`, whichever task the scheduler runs first."""
    raced = 0
    for _trial in range(24):
        try:
            w = aio_mod.DirectWriter.open(depth=2)
        except OSError as exc:
            pytest.skip(f"no Linux AIO context here: {exc}")
        got: list[BaseException] = []

        async def reaper() -> None:
            try:
                await w._reap_or_wait()
            except BaseException as exc:  # (recorded: the assertion is below)
                got.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reaper)
                await trio.testing.wait_all_tasks_blocked()
                assert w._reaping
                os.eventfd_write(w._efd, 1)  # a completion's signal
                await trio.sleep(0)  # (the poll wakes the reaper; either runs next)
                w.close()
        finally:
            w.close()
        # (the reaper ran first: it reaped, and the close found no waiter)
        assert all(isinstance(e, trio.ClosedResourceError) for e in got), got
        raced += len(got)
    assert raced  # (trio runs a batch in random order: 2^-24 of missing it always)
