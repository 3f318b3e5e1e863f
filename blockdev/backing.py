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
runs fdatasync in a worker thread — and, opened with `direct_writes` (the device's
data), writes of DIRECT_MIN bytes or more, aligned, through an O_DIRECT descriptor in
a worker thread too (a checkpoint inside `write`: the device keeps such blocks claimed
until the write returns, so nothing reads them half-written). `pread` is the
synchronous read for opening a store and for offline tools, never for the data path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
from typing import Protocol, runtime_checkable

import numpy as np
import trio

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

#: at most this many fdatasyncs run in worker threads at once (all backings together)
FLUSH_LIMITER = trio.CapacityLimiter(4)
#: writes at least this large (and aligned to DIRECT_ALIGN) go around the host's page
#: cache when a FileBacking is opened with `direct_writes` (see FileBacking.write)
DIRECT_MIN = 256 << 10
#: the alignment of a direct write's offset and length (and of its bounce buffer)
DIRECT_ALIGN = 4096
#: the bounce buffer of direct writes: a larger write goes out in pieces of this size
DIRECT_CHUNK = 1 << 20
#: at most this many direct writes run in worker threads at once (all backings)
DIRECT_LIMITER = trio.CapacityLimiter(2)


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


def reserve_space(backing: object, offset: int, length: int) -> None:
    """Make the host allocate the range of the file under `backing` (through the
    wrappers' `inner`), keeping its contents: fallocate mode 0 never changes a byte
    (a hole reads as zeros before and after), so no wrapper or recording needs to see
    it. Blocks allocated by the filesystem are reserved before a write into them is
    acknowledged: a write-back that comes later cannot fail for lack of host space.
    No-op for a real block device, or where the host cannot fallocate (EOPNOTSUPP:
    there is then no reservation to make; a later ENOSPC is reported at fsync).
    OSError (ENOSPC) when the host has no room."""
    while not isinstance(backing, FileBacking):
        inner = getattr(backing, "inner", None)
        if inner is None:
            return
        backing = inner
    backing.reserve(offset, length)


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
                 direct_writes: bool = False) -> None:
        """Open `path`; with `create_size`, create (or truncate to) a sparse file of that
        many bytes first (formatting). With `direct_writes`, large aligned writes bypass
        the host's page cache (O_DIRECT, see `write`) where the host allows it."""
        self._path = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC
        if create_size is not None:
            flags |= os.O_CREAT
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
        #: a second descriptor of the same file opened O_DIRECT, for large aligned
        #: writes, and its page-aligned bounce buffer (opened at the first such write)
        self._want_direct = direct_writes
        self._dfd: int | None = None
        #: free bounce buffers (one per direct write in flight, at most DIRECT_LIMITER's):
        #: numpy views of page-aligned anonymous maps, freed with the last view
        self._bounces: list[tuple[mmap.mmap, np.ndarray]] = []

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
        got = os.preadv(self._fd, [out], offset)
        if got < len(out):
            out[got:] = bytes(len(out) - got)

    async def write(self, offset: int, data: memoryview) -> None:
        nbytes = memoryview(data).nbytes
        if (self._want_direct and nbytes >= DIRECT_MIN and not offset % DIRECT_ALIGN
                and not nbytes % DIRECT_ALIGN and self._open_direct()):
            # In a worker thread: the disk's time is not the event loop's (a write
            # larger than the page cache takes in microseconds).
            if await trio.to_thread.run_sync(self._write_direct, offset, data,
                                             limiter=DIRECT_LIMITER):
                return
        n = os.pwritev(self._fd, [data], offset)
        if n != nbytes:
            self._write_rest(offset, data, n)

    def _write_direct(self, offset: int, data: memoryview) -> bool:
        """Write through the O_DIRECT descriptor: the data goes to the disk without a
        copy into the host's page cache, which for a stream costs more than the write
        itself (a second copy of every byte, and all of it written out again at the
        next flush; on a VM, fresh page-cache pages are slow to touch). Durability is
        unchanged: only `flush` (fdatasync, which also flushes the disk's cache and
        the file's extent changes) makes anything durable; the kernel keeps the two
        descriptors coherent (a direct write writes back and drops cached pages of its
        range). Through a page-aligned bounce buffer, since the caller's memory
        (a FUSE request's payload) is not aligned. False, with direct writes turned
        off for good, when the host refuses them (no O_DIRECT, EINVAL): the caller
        then writes through the page cache. OSError as `write`."""
        dfd = self._dfd
        if dfd is None or not self._want_direct:
            return False
        try:
            bounce_map, bounce = self._bounces.pop()
        except IndexError:
            bounce_map = mmap.mmap(-1, DIRECT_CHUNK)
            bounce = np.frombuffer(bounce_map, dtype=np.uint8)
        out = memoryview(bounce_map)
        try:
            mv = memoryview(data).cast("B")
            # numpy copies with the GIL released (a slice assignment holds it, and the
            # event loop waits that long)
            src = np.frombuffer(mv, dtype=np.uint8)
            done = 0
            while done < len(mv):
                k = min(DIRECT_CHUNK, len(mv) - done)
                np.copyto(bounce[:k], src[done:done + k])
                try:
                    n = os.pwritev(dfd, [out[:k]], offset + done)
                except OSError as exc:
                    if exc.errno == errno.EINVAL and not done:
                        self._want_direct = False  # (the descriptor closes with the file)
                        return False
                    raise
                if n != k:  # short (the host filled up): the rest through the page cache
                    self._write_rest(offset, mv, done + n)
                    return True
                done += k
            return True
        finally:
            out.release()
            self._bounces.append((bounce_map, bounce))

    def _open_direct(self) -> bool:
        """The O_DIRECT descriptor, opened at the first large write; False (direct
        writes off for good) when the host cannot open one."""
        if self._dfd is None:
            try:
                self._dfd = os.open(self._path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self._want_direct = False
                return False
        return self._want_direct

    def _close_direct(self) -> None:
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None
        self._bounces.clear()

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

    async def flush(self) -> None:
        await trio.to_thread.run_sync(self.flush_sync, limiter=FLUSH_LIMITER)

    def flush_sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_direct()
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"FileBacking({self._path!r})"
