"""Linux native AIO for `FileBacking`'s O_DIRECT writes: submitted from the event loop
with io_submit(2) and reaped when an eventfd the loop waits on says one completed.

Why not a worker thread: on the two CPUs this daemon is measured on, a thread per
write (trio.to_thread) cost the event loop more than the page-cache copy it saved — the
hand-off, the GIL going back and forth, and the thread's own Python (docs/BENCHMARKS.md,
"O_DIRECT write-behind"). An O_DIRECT write submitted with io_submit on a file whose
blocks are allocated (the device's reservations) and inside its size does not wait for
the disk: the call pins the buffer's pages, builds the bios and returns; the disk's
completion is counted on the eventfd (IOCB_FLAG_RESFD). Nothing runs in another
thread, and no Python runs anywhere but on the loop.

x86-64 and arm64 only (the syscall numbers); `DirectWriter.open` raises OSError where
the kernel has no AIO (ENOSYS) or no room for another context (EAGAIN: aio-max-nr),
and the caller then writes through the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import platform

import trio

# (io_setup, io_destroy, io_getevents, io_submit) per architecture
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PWRITE = 1
_IOCB_FLAG_RESFD = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _IOCB(ctypes.Structure):
    """struct iocb of <linux/aio_abi.h> (little-endian layout)."""

    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    """struct io_event of <linux/aio_abi.h>."""

    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_NO_WAIT = _Timespec(0, 0)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class DirectWriter:
    """At most `depth` writes in flight on one AIO context; each `pwrite` waits (a
    checkpoint) until its own write completed. Whichever waiting task finds nobody
    reaping reaps for all of them (one task at a time waits on the eventfd)."""

    def __init__(self, ctx: int, efd: int, depth: int, calls: tuple[int, int, int, int]) -> None:
        self._ctx = ctx
        self._efd = efd
        self._depth = depth
        self._destroy, self._getevents, self._submit = calls[1], calls[2], calls[3]
        self._events = (_Event * depth)()
        self._tickets = itertools.count(1)
        #: ticket -> the iocb (and buffer) the kernel uses until the write completes
        self._pending: dict[int, tuple[_IOCB, object]] = {}
        #: ticket -> result (bytes written, or -errno) of completed writes not yet taken
        self._results: dict[int, int] = {}
        self._reaping = False
        self._reaped = trio.lowlevel.ParkingLot()
        self._closed = False

    @classmethod
    def open(cls, *, depth: int = 16) -> DirectWriter:
        """A new AIO context and its eventfd. OSError where there is none to be had."""
        calls = _SYSCALLS.get(platform.machine())
        if calls is None:
            raise OSError(errno.ENOSYS, f"no AIO syscall numbers for {platform.machine()}")
        ctx = ctypes.c_ulong(0)
        _check(_syscall(ctypes.c_long(calls[0]), ctypes.c_long(depth), ctypes.byref(ctx)),
               "io_setup")
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            _syscall(ctypes.c_long(calls[1]), ctypes.c_ulong(ctx.value))
            raise
        return cls(ctx.value, efd, depth, calls)

    async def pwrite(self, fd: int, data: object, address: int, nbytes: int,
                     offset: int) -> int:
        """Write `nbytes` at `address` (the memory of `data`, kept alive meanwhile) to
        `fd` at `offset`; the byte count written. OSError with the host's errno;
        `trio.ClosedResourceError` if the writer is closed before the write completed
        (`close`: whether it landed is then unknown)."""
        if self._closed:
            raise trio.ClosedResourceError("the direct writer is closed")
        while len(self._pending) >= self._depth:
            await self._reap_or_wait()
        ticket = next(self._tickets)
        cb = _IOCB(aio_data=ticket, aio_lio_opcode=_IOCB_CMD_PWRITE, aio_fildes=fd,
                   aio_buf=address, aio_nbytes=nbytes, aio_offset=offset,
                   aio_flags=_IOCB_FLAG_RESFD, aio_resfd=self._efd)
        cbs = (ctypes.POINTER(_IOCB) * 1)(ctypes.pointer(cb))
        _check(_syscall(ctypes.c_long(self._submit), ctypes.c_ulong(self._ctx),
                        ctypes.c_long(1), cbs), "io_submit")
        self._pending[ticket] = (cb, data)
        while ticket not in self._results:
            await self._reap_or_wait()
        res = self._results.pop(ticket)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res

    async def _reap_or_wait(self) -> None:
        """Reap the completed writes (waiting for one on the eventfd), or, while another
        task does, wait until it has. `trio.ClosedResourceError` once closed."""
        if self._closed:
            # (the eventfd is gone: waiting on its number would wait on nothing, or
            # on whatever descriptor reuses it)
            raise trio.ClosedResourceError("the direct writer was closed with writes "
                                           "waiting for their completion")
        if self._reaping:
            await self._reaped.park()
            return
        self._reaping = True
        try:
            await trio.lowlevel.wait_readable(self._efd)
            if self._closed:
                # (closed after the eventfd's readiness woke this task and before it
                # ran: notify_closing found no waiter, and the descriptor's number may
                # be another's by now; review of tidy5, R1)
                raise trio.ClosedResourceError("the direct writer was closed with "
                                               "writes waiting for their completion")
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
            n = _check(_syscall(ctypes.c_long(self._getevents), ctypes.c_ulong(self._ctx),
                                ctypes.c_long(0), ctypes.c_long(self._depth), self._events,
                                ctypes.byref(_NO_WAIT)), "io_getevents")
            for ev in self._events[:n]:
                self._pending.pop(ev.data, None)
                self._results[ev.data] = ev.res
        finally:
            self._reaping = False
            self._reaped.unpark_all()

    def close(self) -> None:
        """Destroy the context (the kernel waits for writes still in flight) and close
        the eventfd. Idempotent. A task still waiting for a write's completion gets
        `trio.ClosedResourceError` (the reaper from its `wait_readable`, through
        `notify_closing`; the others when it wakes them), never a wait on a closed
        descriptor. (Not reached by the mount, which closes the device after every
        write returned: review of fio4, V7.)"""
        if not self._closed:
            self._closed = True
            if self._reaping:
                # The reaper waits in wait_readable on the eventfd: trio must forget
                # the descriptor before it is closed (else that task never wakes, or
                # wakes for a descriptor that reuses the number). A reaper exists only
                # inside the trio run this is called from (no other threads).
                trio.lowlevel.notify_closing(self._efd)
            _syscall(ctypes.c_long(self._destroy), ctypes.c_ulong(self._ctx))
            os.close(self._efd)
