"""The backing-store seam: what the block device and its checksum store write to.

A `Backing` is a flat array of bytes with the four things a disk does — read, write,
forget a range (discard / hole punch) and a durability barrier (flush = fdatasync) —
and nothing else. `BlockDevice` and `ChecksumStore` talk only to this interface, so
the store under them can be swapped without touching any layer above:

- `FileBacking`: a sparse file or a real block device path (the normal case); its
  `reserve` (through `reserve_space`) allocates host space under newly allocated
  device blocks so that a later write of them cannot fail for lack of space;
- `FaultyBacking` (blockdev/faults.py): injects errors, torn writes and latency;
- `RecordingBacking` (blockdev/recording.py): logs every write and barrier so a crash
  harness can materialise the states a power loss could leave.

Error contract: a backing raises `OSError` with the errno the host gave (EIO, ENOSPC,
...), exactly as a file would; the device turns it into a `DeviceError` naming the
block. A write either stores every byte or raises (a short write is retried, and one
that makes no progress is EIO) — the caller never has to check a count.

Colour: `read_into`, `write`, `discard` and `flush` are async so a wrapper may take
time on the trio clock (latency injection); `FileBacking` does the data syscalls on
the event loop without a checkpoint (page-cache pread/pwrite take microseconds) and
runs fdatasync in a worker thread. A read that finds part of its range outside the
host's page cache (preadv2 RWF_NOWAIT says so) waits for the host's disk in a worker
thread instead while that disk is slow (`FileBacking.read_into`); the device claims
the range meanwhile. The exception is a large write from a buffer that
cannot change (`bytes`, or a view of it: a FUSE payload, which the binding places on
a page boundary), page-aligned in memory and in the file: it is written through a
second descriptor opened O_DIRECT, submitted with Linux AIO (blockdev/aio.py;
`DIRECT_MIN_BYTES`), so the daemon does not copy it into the host's page cache and
the commit's fdatasync has little left to write; the write awaits the disk. Such a
write is no more durable than a buffered one until the next `flush` (the disk's
write cache), and `flush` waits for the direct writes begun before it, so a barrier
covers every write that started before it, as the recording backing's log assumes. `pread` is the synchronous read for opening a store and for
offline tools, never for the data path.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import errno
import mmap
import math
import os
import stat
import time
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import trio

from .aio import DirectWriter
from .durable import open_store_file

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]

#: at most this many fdatasyncs run in worker threads at once (all backings together)
FLUSH_LIMITER = trio.CapacityLimiter(4)
#: ... and batches of hole punches (`FileBacking.discard_many`)
DISCARD_LIMITER = trio.CapacityLimiter(2)
#: O_DIRECT writes in flight per backing (`FileBacking.write`, its AIO context)
DIRECT_DEPTH = 16
#: at most this many reads that missed the host's page cache wait for its disk in
#: worker threads at once (all backings together); the rest wait for a thread
READ_LIMITER = trio.CapacityLimiter(16)
#: ... and at most this many of one tenant's (`DeviceRead.owner`: the principal below root
#: whose subtree makes the read), so that a tenant with many reads of a slow host in
#: flight does not hold every thread — however many child principals it reads as
#: (probe 23, F1: 16 children of 4 reads each held all 16, another tenant's reads fell
#: from 44 to 13 a second)
READS_PER_TENANT = 4


class DeviceRead(Protocol):
    """The device read the current task is making (`device_read`, BlockDevice sets it)."""

    #: the tenant making it (the principal below root whose subtree it is)
    owner: int

    def release(self) -> None:
        """Give up the read's claim on its blocks (no checkpoint): while a read waits for
        a worker thread, writes of its blocks need not wait for it."""

    def retake_nowait(self) -> bool:
        """Claim the blocks again if they are steady now (no write or discard claimed
        meanwhile still overlaps them) and the read's guard still passes
        (`check_read_guard`, which may raise); False, with nothing claimed, if not."""

    async def wait_steady(self) -> None:
        """Wait until no write or discard overlapping the blocks is in progress."""


#: the device read the current task is making, if any
device_read: contextvars.ContextVar[DeviceRead | None] = \
    contextvars.ContextVar("sluice_device_read", default=None)
#: a limiter that never waits (`FileBacking.read_into` holds READ_LIMITER itself)
_NO_LIMIT = trio.CapacityLimiter(math.inf)
#: each tenant's limiter while it has reads in threads or waiting for one
_owner_limiters: dict[int, trio.CapacityLimiter] = {}
#: a read that missed the host's page cache is made on the event loop while such reads
#: took less than this on average (`FileBacking.miss_s`) and none took longer within
#: SLOW_MISS_HOLD_SECONDS (`FileBacking.slow_until`), in a worker thread otherwise
MISS_ON_LOOP_SECONDS = 0.5e-3
#: after a read that missed the host's page cache took longer than
#: MISS_ON_LOOP_SECONDS, reads that miss go to worker threads for this long (renewed
#: by every such read, the threads' own included): an average alone let a tenant
#: dilute it with cheap reads a caching host cannot tell apart from misses (FUSE, NFS:
#: no RWF_NOWAIT), 19 of them to each cold one, and put its cold reads back on the
#: loop, 20 ms of everyone's time each (probe 23, F2)
SLOW_MISS_HOLD_SECONDS = 10.0
#: the weight of the latest miss in that average
MISS_WEIGHT = 1 / 8
#: A write of at least this many bytes, from a buffer that cannot change (`bytes` or a
#: view of it) and page-aligned in memory, at a page-aligned offset and of whole
#: pages, goes through the O_DIRECT descriptor (`FileBacking.write`); anything else
#: is copied into the host's page cache. 0 turns direct writes off.
DIRECT_MIN_BYTES = 256 << 10
_PAGE = mmap.PAGESIZE
#: host filesystems that accept O_DIRECT but copy the data into memory all the same
#: (tmpfs since Linux 6.6 — "trivial" O_DIRECT, a buffered write under another name —
#: and ramfs): there a direct write saves nothing and costs a loop pass, so every write
#: is buffered (statfs f_type: TMPFS_MAGIC, RAMFS_MAGIC)
_MEMORY_FILESYSTEMS = frozenset({0x01021994, 0x858458F6})
#: what a direct write may fail with when the host refuses the way, not the write
#: (nothing worth reporting was written; the page cache takes it): from then on every
#: write is buffered (an alignment the host wants larger than a page: EINVAL; a
#: filesystem or kernel without it: EOPNOTSUPP, ENOSYS) ...
_DIRECT_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})
#: ... or for this write only (io_submit's "no resources now", an interrupted
#: submission): the next large write tries direct again
_DIRECT_BUSY = frozenset({errno.EAGAIN, errno.EINTR})


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make a range of a file read as zeros, keeping its size: a hole punch, or written
    zeros where the host filesystem cannot punch (EOPNOTSUPP). OSError otherwise."""
    if not length:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, f"cannot punch a hole at {offset}+{length}: {os.strerror(err)}")
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, zeros[:end - offset], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"writing zeros at {offset} made no progress")
        offset += n


def _file_backing(backing: object) -> FileBacking | None:
    """The FileBacking under `backing` (through the wrappers' `inner`), or None."""
    while not isinstance(backing, FileBacking):
        backing = getattr(backing, "inner", None)
        if backing is None:
            return None
    return backing


def reserve_space(backing: object, offset: int, length: int) -> None:
    """Make the host allocate the range of the file under `backing` (through the
    wrappers' `inner`), keeping its contents: fallocate mode 0 never changes a byte
    (a hole reads as zeros before and after), so no wrapper or recording needs to see
    it. Blocks allocated by the filesystem are reserved before a write into them is
    acknowledged: a write-back that comes later cannot fail for lack of host space.
    No-op for a real block device, or where the host cannot fallocate (EOPNOTSUPP:
    there is then no reservation to make; a later ENOSPC is reported at fsync).
    OSError (ENOSPC) when the host has no room."""
    fb = _file_backing(backing)
    if fb is not None:
        fb.reserve(offset, length)


def release_space(backing: object, offset: int, length: int) -> None:
    """Give back the host space under a range `reserve_space` reserved and nothing has
    written since (a hole punch: it read as zeros before and after, so no wrapper or
    recording needs to see it). No-op where `reserve_space` is one. OSError from the
    host."""
    fb = _file_backing(backing)
    if fb is not None:
        fb.unreserve(offset, length)


def host_space(backing: object) -> tuple[int, int] | None:
    """(bytes free to unprivileged users, total bytes) of the host filesystem holding
    the file under `backing` (through the wrappers' `inner`); None for a real block
    device or a backing that is not a file."""
    fb = _file_backing(backing)
    return fb.host_space() if fb is not None else None


@runtime_checkable
class Backing(Protocol):
    """A flat, fixed-size array of bytes with a durability barrier."""

    @property
    def name(self) -> str:
        """What the store is, for messages and logs (a path, or a wrapper's label)."""
        ...

    @property
    def size(self) -> int:
        """Bytes addressable (reads past it give zeros, writes past it are an error of
        the caller: the device checks ranges first)."""
        ...

    @property
    def can_discard(self) -> bool:
        """Whether `discard` really forgets data (a hole punch in a file). A real block
        device keeps its data; the device then keeps the block's checksum too."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Read synchronously (opening a store, offline tools); zeros past the end."""
        ...

    async def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset`; zeros past the end."""
        ...

    async def write(self, offset: int, data: memoryview) -> None:
        """Store all of `data` at `offset`, or raise OSError."""
        ...

    async def discard(self, offset: int, length: int) -> None:
        """Forget a range: it reads as zeros afterwards. Raises OSError on failure
        (never silently keeps the data). Only called when `can_discard`."""
        ...

    async def flush(self) -> None:
        """Barrier: every write and discard that returned before this call is durable
        when it returns (fdatasync). Raises OSError (EIO) when the host says it is not."""
        ...

    def close(self) -> None:
        """Release the store (idempotent). Does not flush."""
        ...


class FileBacking:
    """A regular (sparse) file or a block device node, opened read-write."""

    def __init__(self, path: str | os.PathLike[str], *, create_size: int | None = None,
                 in_volume: bool = False, fd: int | None = None) -> None:
        """Open `path`; with `create_size`, create (or truncate to) a sparse file of that
        many bytes first (formatting). `in_volume`: a file of the volume directory,
        opened only if it is a regular file (not through a symbolic link, never a FIFO:
        StoreFileError naming it). `fd`: `path` already opened read-write (this backing
        owns it from now on)."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create_size is not None:
            flags |= os.O_CREAT
        self._path = os.fspath(path)
        if fd is not None:
            self._fd = fd
        elif in_volume:
            self._fd = open_store_file(self._path, flags)
        else:
            self._fd = os.open(self._path, flags, 0o600)
        try:
            st = os.fstat(self._fd)
            self._is_file = stat.S_ISREG(st.st_mode)
            if create_size is not None:
                os.ftruncate(self._fd, create_size)
            self._size = (os.fstat(self._fd).st_size if self._is_file
                          else os.lseek(self._fd, 0, os.SEEK_END))
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False
        #: the host filesystem cannot fallocate (EOPNOTSUPP): nothing to reserve
        self._no_fallocate = False
        #: how `read_into` reads: True, RWF_NOWAIT first; False, every read counts as
        #: a miss of the page cache; None, all on the loop (see `_no_nowait`)
        self._nowait: bool | None = True
        #: seconds a read that missed the page cache took, a moving average
        self.miss_s = 0.0
        #: until when (time.monotonic) misses go to threads whatever the average: a
        #: miss took longer than MISS_ON_LOOP_SECONDS before
        self.slow_until = -math.inf
        #: the descriptor for direct writes: opened at the first one (None), -1 when
        #: the host refuses O_DIRECT (then every write is buffered)
        self._direct_fd: int | None = None
        self._direct_opened = -1  # (what `close` closes)
        self._aio: DirectWriter | None = None
        #: direct writes in flight (numbered in order of start), which `flush` waits
        #: for, and where it waits
        self._direct_next = 0
        self._direct_inflight: set[int] = set()
        self._direct_landed = trio.lowlevel.ParkingLot()

    @property
    def name(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def can_discard(self) -> bool:
        return self._is_file

    def fileno(self) -> int:
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # past the end of a block device or a short file
            data += bytes(length - len(data))
        return data

    async def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out`; zeros past the end. From the host's page cache on the event
        loop, without a checkpoint; what the page cache does not have (preadv2
        RWF_NOWAIT says so: all of it where the host cannot say, FUSE or NFS) is read
        on the loop too while the host's disk answers such reads within
        `MISS_ON_LOOP_SECONDS` (a moving average, `miss_s`), else in a worker thread
        (`READ_LIMITER`), the loop serving everyone else meanwhile. A read that waited
        for a slow disk on the loop stopped every tenant's requests for as long (20 ms
        a read for a volume on a slow host filesystem); handing a read to a thread
        costs its reader ~0.3 ms on this VM, more than its fast disk takes. A file in
        memory (tmpfs, ramfs) is always read on the loop. The caller must keep the
        range from changing until this returns (BlockDevice claims it)."""
        n = len(out)
        got = 0
        if self._nowait:
            try:
                got = os.preadv(self._fd, [out], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                pass  # (none of it in the page cache)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = self._no_nowait()
            else:
                if got == n or offset + got >= self._size:
                    if got < n:  # past the end of the file: zeros
                        out[got:] = bytes(n - got)
                    return
        if self._nowait is None:
            got = os.preadv(self._fd, [out], offset)
        elif self.miss_s < MISS_ON_LOOP_SECONDS and time.monotonic() >= self.slow_until:
            t0 = time.perf_counter()
            got += os.preadv(self._fd, [out[got:]], offset + got)
            self._missed(time.perf_counter() - t0)
        else:
            rd = device_read.get()
            owner = -1 if rd is None else rd.owner
            mine = _owner_limiters.get(owner)
            if mine is None:
                mine = _owner_limiters[owner] = trio.CapacityLimiter(READS_PER_TENANT)
            # A read that must wait for a thread gives up its claim meanwhile and takes
            # it again once it has one: a tenant's backlog of reads of a shared file
            # held writes of those blocks, every tenant's, for as long as the backlog
            # lasted (probe 23), and a dead client's queued reads its owner's rewrites
            # for seconds. Its guard is checked again then (a grant revoked meanwhile),
            # and what the page cache gave it before the wait is read again: a write
            # of the range may have landed meanwhile, and old blocks beside new ones
            # fail the new checksums (probe 26, F1: a false ChecksumError). Whether it
            # must wait is the slots' own answer (`acquire_nowait`), not a look at the
            # free tokens, which every read of one batch saw free (review of stop 31,
            # 2); and it never waits for writes of its blocks holding a thread slot:
            # with the blocks not steady it gives the slots back, waits, and asks again
            # (review, 1: a writer at a 1 IOPS limit held readers' slots for seconds).
            me = trio.lowlevel.current_task()
            held: list[trio.CapacityLimiter] = []
            given_up = False
            try:
                while True:
                    for lim in (mine, READ_LIMITER):
                        if lim in held:
                            continue
                        try:
                            lim.acquire_on_behalf_of_nowait(me)
                        except trio.WouldBlock:
                            if rd is not None and not given_up:
                                rd.release()
                                given_up = True
                            await lim.acquire_on_behalf_of(me)
                        held.append(lim)
                    if not given_up or rd is None:
                        break
                    if rd.retake_nowait():  # steady: claimed again, the guard passed
                        got = 0  # (all of it again, under the claim)
                        break
                    while held:  # not steady: wait for the writes without the slots
                        held.pop().release_on_behalf_of(me)
                    await rd.wait_steady()
                done, took = await trio.to_thread.run_sync(
                    _timed_preadv, self._fd, out[got:], offset + got,
                    limiter=_NO_LIMIT)
            finally:
                while held:
                    held.pop().release_on_behalf_of(me)
                if mine.borrowed_tokens == 0 and not mine.statistics().tasks_waiting and \
                        _owner_limiters.get(owner) is mine:
                    del _owner_limiters[owner]  # (a tenant's children come and go)
            self._missed(took)
            got += done
        if got < n:
            out[got:] = bytes(n - got)

    def _missed(self, seconds: float) -> None:
        self.miss_s += (seconds - self.miss_s) * MISS_WEIGHT
        if seconds > MISS_ON_LOOP_SECONDS:
            self.slow_until = time.monotonic() + SLOW_MISS_HOLD_SECONDS

    def _no_nowait(self) -> bool | None:
        """What `read_into` does where the host refuses RWF_NOWAIT: None (always on the
        loop) for a file in memory (tmpfs, ramfs), False (every read counts as a miss)
        otherwise."""
        if self._is_file and _filesystem_type(self._fd) in _MEMORY_FILESYSTEMS:
            return None
        return False

    async def write(self, offset: int, data: memoryview) -> None:
        nbytes = memoryview(data).nbytes
        if (nbytes >= DIRECT_MIN_BYTES > 0 and self._direct_fd != -1
                and not (offset | nbytes) % _PAGE):
            address = _direct_address(data)
            if address >= 0 and await self._write_direct(offset, data, address, nbytes):
                return
        n = os.pwritev(self._fd, [data], offset)
        if n != nbytes:
            self._write_rest(offset, data, n)

    async def _write_direct(self, offset: int, data: memoryview, address: int,
                            nbytes: int) -> bool:
        """Write `data` (at `address`) through the O_DIRECT descriptor with Linux AIO
        (blockdev/aio.py: submitted from the loop, which goes on serving until the disk
        has it); False where the host refused the way rather than the data (O_DIRECT or
        AIO: `_DIRECT_REFUSED`, from then on every write is buffered; or a shortage of
        the moment: `_DIRECT_BUSY`): the caller then writes the whole range through
        the page cache. Shielded: like a buffered write, a
        direct write that began lands (the caller's claim on the blocks depends on it).
        The host keeps buffered reads coherent (it drops the page-cache pages of the
        range)."""
        if self._direct_fd is None and not self._open_direct():
            return False
        assert self._aio is not None and self._direct_fd is not None
        ticket = self._direct_next
        self._direct_next += 1
        self._direct_inflight.add(ticket)
        try:
            with trio.CancelScope(shield=True):
                n = await self._aio.pwrite(self._direct_fd, data, address, nbytes, offset)
        except OSError as exc:
            # A refusal or a transient shortage is not the device's failure: the range
            # is written again through the page cache (the caller still holds its
            # claim on the blocks; whatever part of it the disk took, the buffered
            # write stores the same bytes over it). Only the host's answer to the data
            # itself (EIO, ENOSPC, ...) is raised, as a buffered write's would be.
            if exc.errno in _DIRECT_REFUSED:
                self._direct_fd = -1  # (the descriptor is closed with the backing)
                return False
            if exc.errno in _DIRECT_BUSY:
                return False
            raise
        finally:
            self._direct_inflight.discard(ticket)
            self._direct_landed.unpark_all()
        if n != nbytes:
            self._write_rest(offset, data, n)
        return True

    def _open_direct(self) -> bool:
        """Open the O_DIRECT descriptor and the AIO context at the first direct write;
        False (and `_direct_fd` -1: never again) where the host has neither, or where
        its O_DIRECT would copy into memory anyway (tmpfs, ramfs)."""
        self._direct_fd = -1
        if self._is_file and _filesystem_type(self._fd) in _MEMORY_FILESYSTEMS:
            return False
        try:
            # The same open file as self._fd (no path lookup: the volume directory may
            # have changed since), with its own flags.
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            # (EINVAL: a filesystem without O_DIRECT; anything else — EMFILE — must
            # not fail the write either, which the page cache can take)
            return False
        try:
            self._aio = DirectWriter.open(depth=DIRECT_DEPTH)
        except OSError:
            os.close(fd)
            return False
        self._direct_opened = self._direct_fd = fd
        return True

    def _write_rest(self, offset: int, data: memoryview, done: int) -> None:
        """Finish a short write, or raise what the host says (ENOSPC) on the retry."""
        mv = memoryview(data).cast("B")
        while done < len(mv):
            # A short write happens when the host filesystem fills up part-way; the
            # retry of the rest then raises the real errno (ENOSPC).
            n = os.pwritev(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"write to {self._path} at offset {offset + done} "
                              "made no progress")
            done += n

    async def discard(self, offset: int, length: int) -> None:
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            raise OSError(exc.errno, f"{self._path}: {exc.strerror}") from None

    async def discard_many(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, OSError | None]:
        """`discard` of every (offset, length) of `ranges`, in order, in a worker thread:
        a hole punch is a blocking call that waits for the host filesystem's journal
        when its disk is busy (0.3 ms a 4 KiB punch and more, measured), and a commit's
        thousands of them must not stop the event loop meanwhile. Stops at the first
        failure. Returns (ranges discarded, the error of the next one or None)."""
        def punch_all() -> tuple[int, OSError | None]:
            for i, (offset, length) in enumerate(ranges):
                try:
                    punch_hole(self._fd, offset, length)
                except OSError as exc:
                    return i, OSError(exc.errno, f"{self._path}: {exc.strerror}")
            return len(ranges), None

        return await trio.to_thread.run_sync(punch_all, limiter=DISCARD_LIMITER)

    def host_space(self) -> tuple[int, int] | None:
        """(bytes free to unprivileged users, total bytes) of the host filesystem
        holding the file (`host_space`); None for a block device."""
        if not self._is_file:
            return None
        st = os.fstatvfs(self._fd)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def reserve(self, offset: int, length: int) -> None:
        """fallocate(2) mode 0 over the range (see `reserve_space`); a no-op for a
        block device. OSError with the host's errno (ENOSPC)."""
        if not self._is_file or length <= 0 or self._no_fallocate:
            return
        if _libc.fallocate(self._fd, 0, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            self._no_fallocate = True
            return
        raise OSError(err, f"{self._path}: cannot reserve {offset}+{length}: "
                      f"{os.strerror(err)}")

    def unreserve(self, offset: int, length: int) -> None:
        """Punch the range `reserve` reserved (see `release_space`); a no-op for a block
        device or a host that cannot fallocate."""
        if not self._is_file or length <= 0 or self._no_fallocate:
            return
        punch_hole(self._fd, offset, length)

    async def flush(self) -> None:
        if self._direct_inflight:
            # Direct writes begun before this barrier are covered by it, as buffered
            # writes are (they returned before it began): wait for them to land.
            begun = self._direct_next
            while self._direct_inflight and min(self._direct_inflight) < begun:
                await self._direct_landed.park()
        await trio.to_thread.run_sync(self.flush_sync, limiter=FLUSH_LIMITER)

    def flush_sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._aio is not None:
                self._aio.close()  # (waits for writes in flight)
            if self._direct_opened >= 0:
                os.close(self._direct_opened)
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"FileBacking({self._path!r})"


def set_miss_on_loop(seconds: float) -> None:
    """(Lab: SLUICE_MISS_ON_LOOP_S, fs/mount.py) Reads that miss the host's page cache
    are made on the event loop while they take less than `seconds` on average
    (`MISS_ON_LOOP_SECONDS`; math.inf: always, as before)."""
    global MISS_ON_LOOP_SECONDS
    MISS_ON_LOOP_SECONDS = seconds


def _timed_preadv(fd: int, out: memoryview, offset: int) -> tuple[int, float]:
    """preadv in a worker thread, and how long the host took."""
    t0 = time.perf_counter()
    got = os.preadv(fd, [out], offset)
    return got, time.perf_counter() - t0


def _filesystem_type(fd: int) -> int:
    """The magic number of the filesystem holding `fd` (statfs f_type), 0 if unknown."""
    buf = ctypes.create_string_buffer(256)  # (struct statfs: 120 bytes, f_type first)
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def _direct_address(data: memoryview) -> int:
    """Where the memory of `data` starts, if it may go to an O_DIRECT write that the
    disk reads while the loop goes on: memory that cannot change meanwhile (`bytes`,
    or a view of it: the binding's FUSE payloads; a pool frame or a client's shared
    memory may) starting on a page boundary. -1 otherwise."""
    mv = memoryview(data)
    if not isinstance(mv.obj, bytes) or not mv.c_contiguous:
        return -1
    address = int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)
    return -1 if address % _PAGE else address
