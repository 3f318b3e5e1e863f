"""The simulated block device: fixed-size blocks on a backing store, an xxh3 checksum
per block kept in a checksum store beside it, a timing model and a request scheduler.

Layout of a device directory (made by `BlockDevice.format`):

- `device.json`   geometry and profile (format version, block size, block count,
                  backing path, timing profile)
- `device.img`    the backing store, sparse (unless a real device path is given)
- `checksums`     one little-endian uint64 per block: xxh3_64 of its contents, or 0
                  for a block that was never written or was discarded (reads as zeros)

The parts are injected: `BlockDevice(geometry, profile, data=..., checksums=...,
scheduler=...)` takes any `Backing` for the data (blockdev/backing.py: a file, a block
device, a fault-injecting or a recording wrapper) and a `ChecksumStore` over another
backing; `BlockDevice.open(directory, ...)` builds the usual ones from a directory.

Ordering: a write claims its blocks, stores the data, then sets the blocks' checksums in memory with no checkpoint in between and
releases the claim, then persists the changed checksum pages. A read, write or
discard of claimed blocks waits until the claim is released, so a racing read never
verifies new data against an old checksum, and writes of the same blocks land in the
order they were claimed (the pager claims a stream write when it acknowledges it and
writes it later: `claim`). A daemon killed by SIGKILL loses at most the requests it
was executing and the claimed writes not yet made (acknowledged, never flushed). `flush()` is the barrier: data backing first, then
the checksum store. Reads verify every block: a mismatch raises ChecksumError naming
the block, never returns wrong data.

Errors: every OSError of a backing becomes a DeviceError naming the first block of the
request and carrying the host's errno; ENOSPC (the host filesystem under a sparse
backing file is full) becomes DeviceFull, which the FUSE boundary answers with ENOSPC.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import heapq
import json
import logging
import math
import os
import stat
import uuid
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Collection, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import trio
import xxhash

from .backing import (Backing, FileBacking, device_read, host_space, release_space,
                      reserve_space)
from .durable import StoreFileError, read_json_file
from .checksums import (NATIVE_MIN_BLOCKS, PAGE, ChecksumStore, block_checksums,
                        format_checksum_file)
from .errors import ChecksumError, DeviceError, DeviceFull, FormatError, OutOfRange
from .faults import FaultPlan, FaultyBacking
from .profiles import PROFILES, Capacity, TimingProfile, parse_profile
from .places import Place
from .recording import RecordLog
from .scheduler import DISCARD, FLUSH, READ, WRITE, PrincipalIOStats, make_scheduler
from .types import ROOT_PRINCIPAL, BankTree, BlockNo, PrincipalId

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: the largest device a header may declare (8 EiB would overflow byte offsets)
MAX_DEVICE_BYTES = 1 << 60
HEADER = "device.json"
BACKING = "device.img"
CHECKSUMS = "checksums"

_xxh3 = xxhash.xxh3_64_intdigest
#: the scheduler a device gets unless told otherwise
DEFAULT_SCHEDULER = "mclock"
#: modeled time the device's timeline may run ahead of the trio clock before a request
#: sleeps (see BlockDevice._model); 0 sleeps every request to its exact completion
DEFAULT_TIMELINE_SLACK = 1e-3
#: host space under a sparse backing file is reserved (`BlockDevice.reserve`) in aligned
#: chunks of this many bytes: one fallocate per chunk, not one per allocation (a 1 MiB
#: fallocate cost the daemon 0.1-0.2 ms, a sixth of a sequential writer's request)
RESERVE_CHUNK_BYTES = 16 << 20
#: in a chunk a hole was punched in, a reservation takes the range asked for and this
#: much ahead of it (`BlockDevice._win_lo`), not the whole chunk again (only the range
#: on a host with less than 64 such windows free past the headroom)
RESERVE_WINDOW_BYTES = 1 << 20
#: host space `BlockDevice.reserve` leaves free for what no reservation covers — the
#: metadata database beside the device (its WAL grows with every commit) — at most
#: this, and at most an eighth of the host filesystem
HOST_HEADROOM_BYTES = 64 << 20
#: a discard of many runs (`discard_runs`) gives the event loop back between two hole
#: punches once it has held it this long
DISCARD_STEP_SECONDS = 1e-3
#: the modeled completion time of the last request this task saw return (a task that
#: got a request back early, inside the slack, lives at that time in the model: its
#: next request cannot start before it)
_task_model_time: ContextVar[float] = ContextVar("sluice_task_model_time", default=-math.inf)

#: a check every read of the current task runs once the scheduler has let it go and
#: just before the backing is read (`guard_reads`): one that raises stops the read
#: with nothing of it read into the caller's buffer
_read_guard: ContextVar[Callable[[], None] | None] = ContextVar("sluice_read_guard",
                                                                 default=None)


def check_read_guard() -> None:
    """Run the current task's read guard, if any (`guard_reads`): for a cache above
    the device that hands out data it holds, after any wait of its own."""
    guard = _read_guard.get()
    if guard is not None:
        guard()


@contextlib.contextmanager
def guard_reads(check: Callable[[], None]) -> Iterator[None]:
    """While inside, every device read of this task runs `check()` after its wait for
    the scheduler (a principal's I/O limit may hold it for seconds) and before its
    data is read: the shim kernel checks there that a direct client's grant was not
    revoked meanwhile, so that a read queued before a chmod cannot return what the
    owner wrote after it (hostile probe 12, F2)."""
    token = _read_guard.set(check)
    try:
        yield
    finally:
        _read_guard.reset(token)


class _DeviceRead:
    """A device read's claim on its blocks (`BlockDevice.read_into`), which the backing
    gives up while the read waits for a worker thread and takes again once it has one
    (`blockdev.backing.DeviceRead`)."""

    __slots__ = ("dev", "block", "count", "owner", "n")

    def __init__(self, dev: BlockDevice, block: int, count: int, owner: int) -> None:
        self.dev, self.block, self.count, self.owner = dev, block, count, owner
        self.n: int | None = dev.claim(BlockNo(block), count)
        dev._read_claims.add(self.n)

    def release(self) -> None:
        if self.n is not None:
            self.dev._read_claims.discard(self.n)
            self.dev.release_claim(self.n)
            self.n = None

    def retake_nowait(self) -> bool:
        dev = self.dev
        if (dev._claims or dev._punching) and \
                dev._unlanded(self.block, self.count, reads=False):
            return False
        check_read_guard()  # (a grant revoked while the read waited)
        self.n = dev.claim(BlockNo(self.block), self.count)
        dev._read_claims.add(self.n)
        return True

    async def wait_steady(self) -> None:
        dev = self.dev
        if dev._claims or dev._punching:
            await dev._wait_landed(self.block, self.count, reads=False)


def _block_checksum(data: memoryview | bytes) -> int:
    # 0 is reserved for "never written"; a real hash of 0 is stored as 1 (and 1 is
    # accepted for it on verify), which costs one in 2**64 of detection power.
    h = _xxh3(data)
    return h if h else 1


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceGeometry:
    block_size: int
    nblocks: int
    backing: str
    profile: str
    uuid: str

    @property
    def size(self) -> int:
        return self.block_size * self.nblocks


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceStatistics:
    block_size: int
    nblocks: int
    profile: str
    scheduler: str
    checksum_errors: int
    #: requests the backing store failed (EIO, ENOSPC, a failed flush)
    io_errors: int
    per_principal: tuple[PrincipalIOStats, ...]
    #: what the profile can serve: 4 KiB random reads/s, sequential bytes/s (None: unlimited)
    capacity_iops: float | None = None
    capacity_bps: float | None = None
    #: modeled seconds the device timeline ran ahead of the trio clock, at most and now
    #: (the precision of the modeled time; see BlockDevice)
    timeline_ahead_max_s: float = 0.0


class SchedulerSlot(Protocol):
    """`async with scheduler.slot(...) as chosen`: one of the device's channels, held;
    `chosen` is the modeled time the scheduler chose the request."""

    #: the holder sets it before leaving: the modeled time the channel is free again
    free_at: float | None
    #: once entered: by when the request must complete under its principal's
    #: reservation (None: none), for `Scheduler.record`
    deadline: float | None

    async def __aenter__(self) -> float: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Scheduler(Protocol):
    """What the device needs of a request scheduler (blockdev/scheduler.py: MClockScheduler,
    FifoScheduler)."""

    name: str
    #: the I/O banks last configured
    banks: BankTree

    def slot(self, principal: PrincipalId, nbytes: int, *, write: bool = False,
             kind: str | None = None,
             arrival: float | None = None) -> SchedulerSlot:
        """Hold one of the device's `queue_depth` channels; `kind` is read, write,
        discard or flush (default: read, or write if `write`). `arrival`: when the
        request reached the device in modeled time. Gives the modeled time the
        request was chosen; the holder sets `free_at` on the slot (the modeled time
        its channel is free again) before leaving."""

    def record(self, principal: PrincipalId, nbytes: int, *, write: bool = False,
               latency_s: float, kind: str | None = None, arrival: float | None = None,
               deadline: float | None = None) -> None:
        """Account a completed request; `deadline` (from its slot) with its `arrival`:
        whether it was served in time under its principal's reservation."""

    def statistics(self, principals: Collection[int] | None = None
                   ) -> list[PrincipalIOStats]:
        """Each principal's I/O (of `principals` only, if given)."""

    def configure_banks(self, tree: BankTree) -> None:
        """The principals' I/O banks (reservation, weight, limit) and their tree."""

    def check_banks(self, tree: BankTree) -> None:
        """Raise OverReserved if `tree`'s reservations exceed the device's capacity."""

    def expedite_writes(self) -> ContextManager[None]:
        """While inside, writes held back only by a limit are dispatched anyway."""

    def never_expedited(self) -> ContextManager[None]:
        """The current task's requests made inside are never expedited."""

    def past_limits(self) -> ContextManager[None]:
        """The current task's requests made inside are never held by a limit (their
        tags advance: the principal repays them)."""

    def limit_debt(self, principal: PrincipalId) -> float:
        """Seconds `principal` still owes for requests a barrier dispatched past its
        I/O limits: the largest debt of a limited node on its path of which it owes a
        part (0: nothing, and always 0 for a principal with no I/O under that node)."""

    def limit_pace(self, principal: PrincipalId, nbytes: int, slack: float,
                   step: float) -> float | None:
        """None when `principal` owes no limited node more than `slack`; else the time
        until which a request dirtying `nbytes` of its waits (paced at the limit)."""

    def limit_slot(self, principal: PrincipalId, nbytes: int, *,
                   ios: float = 1.0) -> Place | None:
        """The place at its limits of a request of `nbytes` of `principal`'s to be made
        past them (it may go at the place's `until`); None: no limit. Inside
        `place_scope()` it grows with the requests made beyond its price."""

    def place_scope(self) -> ContextManager[None]:
        """Places taken inside by the current task grow by the requests it makes past
        its limits inside it beyond their price."""

    def hold_place(self, most_ios: float) -> None:
        """Before a wait for a lock another holds: the current task's places are priced
        at `most_ios` requests at least until its place scope ends."""

    async def wait_place(self, place: Place) -> None:
        """Sleep until `place` may go (it moves when a limit changes, or a place before
        it grows)."""

    def limited(self, principal: PrincipalId) -> bool:
        """Whether an I/O limit is on `principal`'s path."""

    def limit_clear_at(self, principal: PrincipalId) -> float | None:
        """When a request of `principal` will no longer be held by a limit on its path,
        if later than now; else None."""



def outside_backing_fd(path: str, owner: int, *, private: bool = True) -> int:
    """An `O_PATH` descriptor of an absolute backing (what `mkfs --device` names), checked
    before anything opens it for I/O — opening a device node can act (a watchdog arms, a
    tape rewinds), and device.json is someone else's input. It must be a regular file or
    a block device; when the daemon runs as another user than `owner` (who wrote
    device.json: root mounting a user's volume), one `owner` owns, so that a volume
    cannot make the daemon read or write what its owner could not; a regular file must
    not be an active swap file, and with `private` it must be private to its owner, as
    the volume's own files are. (A block device is opened exclusively: `O_EXCL` refuses
    one that is mounted, swapped on or held by another daemon.) FormatError naming the
    backing otherwise."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"backing {path}: {exc.strerror}") from None
    try:
        st = os.fstat(pfd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise FormatError(f"backing {path} is neither a regular file nor a block device")
        if os.geteuid() != owner and st.st_uid != owner:
            raise FormatError(f"backing {path} belongs to uid {st.st_uid}, the volume to uid "
                              f"{owner}: a volume may only use a backing its owner owns")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            if (st.st_dev, st.st_ino) in _swap_files():
                raise FormatError(f"backing {path} is an active swap file")
            if private and mode & 0o077:
                raise FormatError(f"backing {path} is open to other users ({mode:04o}): "
                                  f"every tenant's data would be readable; run "
                                  f"'chmod go-rwx {path}'")
    except BaseException:
        os.close(pfd)
        raise
    return pfd


def open_outside_backing(pfd: int, path: str, flags: int) -> int:
    """Open the file `pfd` (from `outside_backing_fd`) for I/O: the same inode, whatever
    `path` names by now; a block device exclusively."""
    if stat.S_ISBLK(os.fstat(pfd).st_mode):
        flags |= os.O_EXCL
    try:
        return os.open(f"/proc/self/fd/{pfd}", flags | os.O_CLOEXEC)
    except OSError as exc:
        why = "in use (mounted, swap, or another volume's)" if exc.errno == errno.EBUSY \
            else exc.strerror
        raise FormatError(f"backing {path}: {why}") from None


def _swap_files() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the files swapped on (/proc/swaps)."""
    out: set[tuple[int, int]] = set()
    try:
        with open("/proc/swaps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "file":
            try:
                st = os.stat(parts[0].replace("\\040", " "))
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


class BlockDevice:
    """Fixed-size blocks with checksums and modeled timing. See the module docstring."""

    def __init__(self, geometry: DeviceGeometry, profile: TimingProfile, *, data: Backing,
                 checksums: ChecksumStore, scheduler: Scheduler | str | None = None,
                 directory: Path | None = None,
                 timeline_slack: float = DEFAULT_TIMELINE_SLACK) -> None:
        if checksums.nblocks != geometry.nblocks:
            raise FormatError(f"checksum store holds {checksums.nblocks} entries, "
                              f"device has {geometry.nblocks} blocks")
        if data.size < geometry.size and data.can_discard:
            raise FormatError(f"backing store {data.name} holds {data.size} bytes, "
                              f"the device needs {geometry.size}")
        self.directory = directory
        self.geometry = geometry
        self.block_size = geometry.block_size
        self.nblocks = geometry.nblocks
        self.profile = profile
        self.data = data
        self.checksums = checksums
        #: the checksum entries (hot path: a plain ndarray, a view of the store's image)
        self._csum = checksums.array
        if scheduler is None or isinstance(scheduler, str):
            scheduler = make_scheduler(scheduler or DEFAULT_SCHEDULER, profile)
        self.scheduler: Scheduler = scheduler
        self._instant = profile.is_instant
        self._head = 0  # last block position, for the hdd seek model
        #: the device's own timeline: when each channel and the shared bus are next free
        #: (modeled time on the trio clock); free channels in a heap by that time
        self._channels: list[tuple[float, int]] = [(-math.inf, i)
                                                   for i in range(profile.queue_depth)]
        self._bus_free = -math.inf
        self._chan_end = [-math.inf] * profile.queue_depth
        #: write cache: bytes absorbed since the last flush, and the access time owed
        self._wc_bytes = 0
        self._wc_owed = 0.0
        #: sleep only when the timeline runs more than this ahead of the clock
        self.timeline_slack = timeline_slack
        #: how late trio wakes us after a sleep (moving average; 0 on a MockClock)
        self._oversleep = 0.0
        self.timeline_ahead_max = 0.0
        #: requests that slept (the rest were accounted on the timeline only)
        self.timeline_sleeps = 0
        #: per principal: requests at the device now, and the latest modeled completion
        #: handed back (see _serve: sequential streams do not overlap on the model)
        self._outstanding: dict[PrincipalId, int] = {}
        self._last_end: dict[PrincipalId, float] = {}
        self.checksum_errors = 0
        self.io_errors = 0
        #: bytes written since the last flush started (what the next flush has to make
        #: durable; kernelshim's barrier flushes ahead when it is large)
        self.unflushed_bytes = 0
        #: writes claimed and not yet landed (see `claim`), and reads at the backing:
        #: claim number -> (block, count); a read, write or discard of an overlapping
        #: range waits for them
        self._claims: dict[int, tuple[int, int]] = {}
        #: of those, the reads' (a read waits for no other read)
        self._read_claims: set[int] = set()
        #: each principal's tenant (the principal below root on its path; root is its
        #: own): whose share of the host-read threads its reads take (`read_into`)
        self._tenants: dict[PrincipalId, int] = {}
        #: the runs `_discard_in_thread` is punching, each call's sorted (their starts,
        #: the runs): reads of them wait (`_wait_landed`)
        self._punching: list[tuple[list[int], list[tuple[int, int]]]] = []
        self._next_claim = 0
        self._landed = trio.lowlevel.ParkingLot()
        #: host space reserved under each RESERVE_CHUNK_BYTES chunk of the device (a
        #: discard in the chunk clears it: the hole punch gives the space back)
        self._chunk_blocks = max(1, RESERVE_CHUNK_BYTES // self.block_size)
        self._host_reserved = np.zeros(-(-self.nblocks // self._chunk_blocks), dtype=bool)
        #: the same memory, for scalar reads from Python (`host_reserved`)
        self._host_reserved_m = self._host_reserved.data
        #: chunks a hole was punched in since the device was opened: a reservation in
        #: one reserves just its range, not the whole chunk again, which refilled on the
        #: host the holes punched for freed blocks behind the allocator (a volume with
        #: no data kept 54 MiB to 1.3 GiB of the host after churn: probe 15, F1)
        self._host_punched = np.zeros(len(self._host_reserved), dtype=bool)
        #: in a punched chunk, the blocks [lo, hi) its last reservation took: a window
        #: of RESERVE_WINDOW_BYTES ahead of the range asked for (the
        #: allocator's next blocks), so that the allocations after it in the chunk find
        #: their space reserved in pure Python (`host_reserved`) instead of a statvfs
        #: and two fallocates each (0.6 -> 24 us: review of stop 25, 5). A discard in
        #: the chunk closes it.
        self._window_blocks = max(1, RESERVE_WINDOW_BYTES // self.block_size)
        self._win_lo = np.zeros(len(self._host_reserved), dtype=np.int64)
        self._win_hi = np.zeros(len(self._host_reserved), dtype=np.int64)
        self._win_lo_m = self._win_lo.data
        self._win_hi_m = self._win_hi.data
        self._closed = False

    # -- formatting and opening -------------------------------------------------

    @staticmethod
    def format(directory: Path, *, size: int, block_size: int = 4096, profile: str = "none",
               backing: str | None = None) -> DeviceGeometry:
        """Create a device in `directory` (which must exist). `backing` is a real block
        device path; by default a sparse file `device.img` is made."""
        if block_size < 512 or block_size & (block_size - 1) or block_size > 1 << 20:
            raise FormatError(f"block size {block_size} is not a power of two in 512..1M")
        parse_profile(profile)  # validate
        if backing is None:
            nblocks = size // block_size
            if nblocks < 16:
                raise FormatError(f"device size {size} is too small (at least 16 blocks)")
            FileBacking(directory / BACKING, create_size=nblocks * block_size,
                        in_volume=True).close()
            backing_s = BACKING
        else:
            pfd = outside_backing_fd(backing, os.stat(directory).st_uid, private=False)
            try:
                fd = open_outside_backing(pfd, backing, os.O_RDONLY)
            finally:
                os.close(pfd)
            try:
                st = os.fstat(fd)
                dev_size = os.lseek(fd, 0, os.SEEK_END)
            except BaseException:
                os.close(fd)
                raise
            nblocks = min(size, dev_size) // block_size if size else dev_size // block_size
            backing_s = os.path.abspath(backing)
            if nblocks < 16:
                os.close(fd)
                raise FormatError(f"backing {backing} is too small (at least 16 blocks)")
        try:
            format_checksum_file(directory / CHECKSUMS, nblocks)
            geo = DeviceGeometry(block_size, nblocks, backing_s, profile, str(uuid.uuid4()))
            header = {"format": FORMAT_VERSION, **dataclasses.asdict(geo)}
            tmp = directory / (HEADER + ".tmp")
            tmp.write_text(json.dumps(header, indent=2) + "\n")
            os.replace(tmp, directory / HEADER)
        except BaseException:
            if backing is not None:
                os.close(fd)
            raise
        if backing is not None:
            try:  # formatted: a file backing becomes private, as the volume's files
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISREG(st.st_mode) and mode & 0o077:
                    os.fchmod(fd, mode & 0o700)
            except OSError as exc:
                raise FormatError(f"backing {backing}: cannot make it private "
                                  f"(chmod go-rwx): {exc.strerror}") from None
            finally:
                os.close(fd)
        return geo

    @staticmethod
    def read_geometry(directory: Path) -> DeviceGeometry:
        """device.json, checked (FormatError naming the file and what is wrong). Keys
        this format does not know are ignored."""
        path = directory / HEADER
        try:
            header = read_json_file(path)
        except FileNotFoundError:
            raise FormatError(f"{directory} has no block device ({HEADER} missing)") from None
        except OSError as exc:
            raise FormatError(f"cannot read {path}: {exc.strerror}") from None
        except StoreFileError as exc:  # ("PATH is a FIFO, ...", "PATH is not valid JSON: ...")
            why = str(exc).removeprefix(f"{path} ").removeprefix("is ")
            raise FormatError(f"cannot read {path}: {why}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{path} is not a device header (a JSON object)")
        if header.get("format") != FORMAT_VERSION or type(header.get("format")) is not int:
            raise FormatError(f"unsupported device format {header.get('format')!r}")
        want = {"block_size": int, "nblocks": int, "backing": str, "profile": str,
                "uuid": str}
        for key, typ in want.items():
            if type(header.get(key)) is not typ:
                raise FormatError(f"{path}: {key} {header.get(key)!r} is not "
                                  f"{'an integer' if typ is int else 'a string'}")
        bs, nblocks = header["block_size"], header["nblocks"]
        if bs < 512 or bs & (bs - 1) or bs > 1 << 20:
            raise FormatError(f"{path}: block size {bs} is not a power of two in 512..1M")
        if not 16 <= nblocks <= MAX_DEVICE_BYTES // bs:
            raise FormatError(f"{path}: {nblocks} blocks is outside 16..{MAX_DEVICE_BYTES // bs}")
        if not header["backing"] or "\0" in header["backing"]:
            raise FormatError(f"{path}: backing {header['backing']!r} is not a path")
        return DeviceGeometry(**{k: header[k] for k in want})

    @classmethod
    def open(cls, directory: Path, *, profile: str | None = None,
             scheduler: Scheduler | str | None = None, fault_plan: FaultPlan | None = None,
             recorder: RecordLog | None = None,
             timeline_slack: float = DEFAULT_TIMELINE_SLACK) -> BlockDevice:
        """Open the device in `directory` on its file backings; `profile` overrides the
        formatted one; `scheduler` is "mclock" (default), "fifo" or a scheduler object.

        Lab facilities (tests, crash and fault experiments; see blockdev/faults.py and
        blockdev/recording.py): `recorder` logs every write and barrier of the data and
        the checksum store; `fault_plan` injects faults, above the recorder, so the
        log holds what reached the store (a torn write as torn)."""
        geo = cls.read_geometry(directory)
        prof = parse_profile(profile or geo.profile)
        inside = not os.path.isabs(geo.backing)
        if inside and geo.backing != BACKING:
            raise FormatError(f"{directory / HEADER}: backing {geo.backing!r} is neither "
                              f"{BACKING} nor an absolute path")
        opened: list[Backing] = []
        try:
            # Files in the volume directory are never followed through a symbolic link
            # (a crafted volume must not make root write elsewhere); an absolute backing
            # is what `mkfs --device` was given: it is checked before it is opened.
            data: Backing
            if inside:
                data = FileBacking(directory / geo.backing, in_volume=True)
            else:
                # (the owner: who wrote device.json, read through no symbolic link)
                owner = os.stat(directory / HEADER, follow_symlinks=False).st_uid
                pfd = outside_backing_fd(geo.backing, owner)
                try:
                    fd = open_outside_backing(pfd, geo.backing, os.O_RDWR)
                finally:
                    os.close(pfd)
                data = FileBacking(geo.backing, fd=fd)
            opened.append(data)
            sums: Backing = FileBacking(directory / CHECKSUMS, in_volume=True)
            opened.append(sums)
            if recorder is not None:
                data = recorder.attach(BACKING, data, unit=geo.block_size)
                sums = recorder.attach(CHECKSUMS, sums, unit=PAGE)
                opened[:] = [data, sums]
            if fault_plan is not None:
                if fault_plan.target in ("device", "both"):
                    data = FaultyBacking(data, fault_plan, block_size=geo.block_size)
                if fault_plan.target in ("checksums", "both"):
                    sums = FaultyBacking(sums, fault_plan, block_size=PAGE)
                opened[:] = [data, sums]
            store = ChecksumStore.load(sums, geo.nblocks)
            return cls(geo, prof, data=data, checksums=store, scheduler=scheduler,
                       directory=directory, timeline_slack=timeline_slack)
        except BaseException:
            for b in opened:
                b.close()
            if recorder is not None:
                recorder.close()
            raise

    def configure_banks(self, tree: BankTree) -> None:
        """Hand the principals' I/O banks to the scheduler (at mount, on every change),
        and note each principal's tenant (`_tenants`)."""
        self.scheduler.configure_banks(tree)
        tenants: dict[PrincipalId, int] = {}
        for pid in tree:
            q, seen = pid, set()
            while True:
                parent = tree[q].parent if q in tree else None
                if parent is None or parent == ROOT_PRINCIPAL or parent in seen:
                    break
                seen.add(q)
                q = parent
            tenants[pid] = int(q)
        self._tenants = tenants

    def check_banks(self, tree: BankTree) -> None:
        """OverReserved (one clear line) if `tree`'s I/O reservations add up to more than
        this device can serve; the principal table calls it before accepting a change."""
        self.scheduler.check_banks(tree)

    def capacity(self) -> Capacity:
        """What the device can serve per second under its profile: 4 KiB random reads
        and sequential (1 MiB) bytes, through the scheduler's cost function."""
        return self.profile.capacity()

    def close(self) -> None:
        """Release both backings. Does not flush: durability is `flush()`'s job (the
        owner flushes before closing; a SIGKILL'd daemon never closes at all)."""
        if not self._closed:
            self._closed = True
            try:
                self.data.close()
            finally:
                self.checksums.close()

    # -- errors ----------------------------------------------------------------------

    def _failed(self, exc: OSError, what: str, block: int | None, count: int = 0) -> DeviceError:
        """The DeviceError for an OSError of a backing (logged: it is the host's or the
        medium's failure, worth a line whoever asked)."""
        self.io_errors += 1
        code = exc.errno or errno.EIO
        where = ""
        if block is not None:
            where = f" at device block {block}" + (f"+{count}" if count > 1 else "")
        msg = f"{what}{where} failed: {exc.strerror or exc}"
        cls = DeviceFull if code == errno.ENOSPC else DeviceError
        if cls is DeviceFull:
            msg += " (the host filesystem under the backing store is full)"
        log.error("%s", msg)
        return cls(msg, block=block, errno=code)

    # -- data path -------------------------------------------------------------

    def _check_range(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.nblocks:
            raise OutOfRange(f"blocks {block}+{count} are outside the device "
                             f"(0..{self.nblocks - 1})")

    async def _serve(self, principal: PrincipalId, block: int, nbytes: int,
                     kind: str) -> tuple[float, float, float | None]:
        """One request's way to the backing: wait for the scheduler's slot and spend the
        modeled service time on the device's timeline. Returns (arrival, modeled
        completion, the reservation's deadline) for `_done`, which the caller calls
        after its backing I/O."""
        start = trio.current_time()
        if self._instant:
            slot = self.scheduler.slot(principal, nbytes, kind=kind)
            async with slot:
                pass
            return start, 0.0, getattr(slot, "deadline", None)
        arrival = start
        seen = _task_model_time.get()
        if seen > arrival:
            arrival = seen
        out = self._outstanding
        if not out.get(principal):
            # Nothing of this principal's is at the device: if it is a sequential
            # stream (one program through FUSE, served by ever other tasks), its
            # previous request completes, in the model, before this one is issued.
            last = self._last_end.get(principal, -math.inf)
            if last > arrival:
                arrival = last
        out[principal] = out.get(principal, 0) + 1
        try:
            slot = self.scheduler.slot(principal, nbytes, kind=kind, arrival=arrival)
            async with slot as chosen:
                end = await self._model(block, nbytes, kind, chosen)
                slot.free_at = end
        finally:
            out[principal] -= 1
        if end > self._last_end.get(principal, -math.inf):
            self._last_end[principal] = end
        return arrival, end, getattr(slot, "deadline", None)

    def _done(self, principal: PrincipalId, nbytes: int, kind: str,
              times: tuple[float, float, float | None]) -> None:
        """Record the request's latency: arrival to the later of its modeled and its
        real completion (and whether that was within its reservation's deadline)."""
        start, end, deadline = times
        now = trio.current_time()
        if end:
            _task_model_time.set(end)
        self.scheduler.record(principal, nbytes, kind=kind,
                              latency_s=(end if end > now else now) - start,
                              arrival=start, deadline=deadline)

    async def _model(self, block: int, nbytes: int, kind: str, chosen: float) -> float:
        """Account the request's service time on the timeline of a free channel and the
        shared bus (blockdev/profiles.py has the model) and return its modeled
        completion time. Sleeps only when the timeline has run more than
        `timeline_slack` ahead of the clock: a trio sleep shorter than about a
        millisecond costs more than it models, so short requests are accounted, not
        slept, and the debt is slept off in one piece; the sleep aims early by the
        measured oversleep. Throughput over any period longer than the slack is exact;
        a single request may return up to the slack before its modeled completion (its
        recorded latency is the modeled one).

        Causality: the request's arrival (see `_serve`) is when it was issued in model
        time — never before the modeled completion of the last request the same task
        got back, nor, when its principal has nothing else at the device, before the
        last one that principal got back (a program reading through FUSE is served by
        a different task per request). So requests issued in sequence do not overlap
        on the model however early they returned; requests issued in parallel do, as
        they should.

        `chosen` is the modeled time the scheduler chose the request (at or after its
        arrival): when the channel it takes was free again, even if the task holding
        that channel gave it back later — the event loop's lateness is the
        simulator's, not the device's, and must not idle the modeled device (the
        scheduler makes its choice as of that time, see MClockScheduler._dispatch).
        The request may then start before the clock; it still never completes for
        its caller before the clock (`_done` records the later of the two)."""
        prof = self.profile
        clock = trio.current_time()
        now = chosen
        chan_free, ch = heapq.heappop(self._channels)
        end = now
        try:
            begin = chan_free if chan_free > now else now
            if kind == FLUSH:
                # a barrier: after everything queued on every channel, then the cache
                last = max(max(self._chan_end), begin, self._bus_free)
                end = last + prof.latency_s + self._wc_owed
                self._wc_owed, self._wc_bytes = 0.0, 0
                self._bus_free = end
            elif kind == DISCARD:
                end = begin + prof.latency_s
            else:
                write = kind == WRITE
                seek = 0.0
                if prof.full_seek_s:
                    seek = abs(block - self._head) / self.nblocks
                    self._head = block + nbytes // self.block_size
                access = prof.access_time(write=write, seek_fraction=seek)
                if write and prof.write_cache_bytes:
                    if self._wc_bytes + nbytes <= prof.write_cache_bytes:
                        self._wc_bytes += nbytes
                        self._wc_owed += access - prof.latency_s
                        access = prof.latency_s
                    else:  # cache full: this write destages what is owed
                        access += self._wc_owed
                        self._wc_owed, self._wc_bytes = 0.0, 0
                xfer = prof.transfer_time(nbytes)
                t = begin + access
                if self._bus_free > t:
                    t = self._bus_free
                end = self._bus_free = t + xfer
            self._chan_end[ch] = end
            ahead = end - clock
            if ahead > self.timeline_ahead_max:
                self.timeline_ahead_max = ahead
            if ahead > self.timeline_slack:
                target = end - self._oversleep
                self.timeline_sleeps += 1
                await trio.sleep_until(target)
                late = trio.current_time() - target
                self._oversleep = min(1e-3, max(0.0, 0.9 * self._oversleep + 0.1 * late))
        finally:
            heapq.heappush(self._channels, (end, ch))
        return end

    async def read(self, block: BlockNo, count: int, *, principal: PrincipalId) -> bytearray:
        """Read `count` blocks, verifying each block's checksum."""
        self._check_range(block, count)
        buf = bytearray(count * self.block_size)
        await self.read_into(block, count, memoryview(buf), principal=principal)
        return buf

    async def read_into(self, block: BlockNo, count: int, out: memoryview, *,
                        principal: PrincipalId) -> None:
        """Read `count` blocks into `out` (exactly count * block_size bytes), verifying
        each block's checksum. On ChecksumError or DeviceError `out` holds unverified
        data: discard it."""
        self._check_range(block, count)
        bs = self.block_size
        if len(out) != count * bs:
            raise ValueError(f"buffer of {len(out)} bytes for {count} blocks")
        times = await self._serve(principal, block, count * bs, READ)
        if self._claims or self._punching:
            await self._wait_landed(block, count, reads=False)
        check_read_guard()  # (no checkpoint from here to the backing's read)
        # Claimed while the backing reads: a read that missed the host's page cache
        # waits for the host's disk in a worker thread while the loop goes on
        # (FileBacking.read_into), and a write or discard of the range meanwhile would
        # mix new data or checksums into what this one verifies (other reads do not
        # wait for it). Seen by nobody when the read comes from the page cache (no
        # checkpoint before the release). Not while it waits for a thread
        # (`_DeviceRead.release`).
        rd = _DeviceRead(self, block, count, self._tenants.get(principal, int(principal)))
        token = device_read.set(rd)
        try:
            await self.data.read_into(block * bs, out)
            self._verify(block, count, out)
        except OSError as exc:
            raise self._failed(exc, "read", block, count) from None
        finally:
            device_read.reset(token)
            rd.release()
        self._done(principal, count * bs, READ, times)

    def _verify(self, block: int, count: int, buf: bytearray | memoryview) -> None:
        bs = self.block_size
        mv = memoryview(buf)
        expected = self._csum[block:block + count].tolist()
        got = (block_checksums(mv, bs).tolist() if count >= NATIVE_MIN_BLOCKS
               else [_xxh3(mv[i * bs:(i + 1) * bs]) for i in range(count)])
        if got == expected:
            return
        for i, (g, w) in enumerate(zip(got, expected)):
            if g == w or (g == 0 and w == 1):
                continue
            if w == 0 and not np.frombuffer(mv[i * bs:(i + 1) * bs], dtype=np.uint64).any():
                continue  # never written, reads as zeros
            self._checksum_failed(block + i, count)

    def _checksum_failed(self, block: int, count: int) -> None:
        self.checksum_errors += 1
        log.error("checksum mismatch in device block %d: the backing store was changed "
                  "behind sluice's back or the medium is bad", block)
        raise ChecksumError(block, count)

    def claim(self, block: BlockNo, count: int) -> int:
        """Reserve the order of a write that will be made later (write-behind): from
        now until `write(..., claim=)` with the number returned has landed (or
        `release_claim`), reads, writes and discards of blocks it overlaps wait for it.
        Never blocks."""
        self._check_range(block, count)
        n = self._next_claim
        self._next_claim += 1
        self._claims[n] = (block, count)
        return n

    def release_claim(self, claim: int) -> None:
        """Give up a claim (its write will not be made, or has been)."""
        if self._claims.pop(claim, None) is not None and self._landed:
            self._landed.unpark_all()

    async def _wait_landed(self, block: int, count: int, *, before: int | None = None,
                           reads: bool = True) -> None:
        """Wait until no claim (numbered below `before`, if given; not a read's unless
        `reads`) overlaps [block, block + count), nor, for a read (`reads` False), a
        run a discard is punching. Returns with no checkpoint after the last check."""
        while self._unlanded(block, count, before=before, reads=reads):
            await self._landed.park()

    def _unlanded(self, block: int, count: int, *, before: int | None = None,
                  reads: bool = True) -> bool:
        """Whether `_wait_landed` would wait now: a claim (numbered below `before`, if
        given; not a read's unless `reads`) overlaps [block, block + count), or, for a
        read (`reads` False), a run a discard is punching (its runs are in a thread)."""
        end = block + count
        skip = () if reads else self._read_claims
        for n, (b, c) in self._claims.items():
            if (before is None or n < before) and b < end and block < b + c \
                    and n not in skip:
                return True
        return not reads and bool(self._punching) and self._punching_meets(block, end)

    def _punching_meets(self, block: int, end: int) -> bool:
        """Whether [block, end) meets a run `_discard_in_thread` is punching."""
        for starts, runs in self._punching:
            i = bisect.bisect_right(starts, block) - 1
            if i >= 0 and runs[i][0] + runs[i][1] > block:
                return True
            if i + 1 < len(runs) and runs[i + 1][0] < end:
                return True
        return False

    async def write(self, block: BlockNo, data: bytes | bytearray | memoryview, *,
                    principal: PrincipalId, claim: int | None = None) -> None:
        """Write whole blocks starting at `block` (len(data) a multiple of the block size).
        On DeviceError the blocks hold undefined contents that fail their checksums
        rather than read back as data. `claim` (from `claim`): the write that claim
        reserved; it lands after every overlapping write claimed before it, and
        before every request that came after the claim.

        While the backing writes (a wrapper may take time on the trio clock), the
        blocks are claimed: a read of them waits until the data and its checksums are
        in place, so it never verifies new data against an old checksum."""
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count, rem = divmod(len(mv), bs)
        if rem:
            if claim is not None:
                self.release_claim(claim)
            raise ValueError(f"write of {len(mv)} bytes is not a whole number of blocks")
        if claim is None:
            self._check_range(block, count)
            if self._claims:
                await self._wait_landed(block, count)
            claim = self.claim(block, count)  # (no checkpoint since the wait)
        try:
            times = await self._serve(principal, block, len(mv), WRITE)
            await self._wait_landed(block, count, before=claim)
            sums: np.ndarray | list[int]
            if count >= NATIVE_MIN_BLOCKS:  # (one call of the C helper)
                sums = block_checksums(mv, bs)
                if not sums.all():  # (as _block_checksum: 0 means never written)
                    sums[sums == 0] = 1
            else:
                sums = [_xxh3(mv[o:o + bs]) or 1 for o in range(0, len(mv), bs)]
            try:
                await self.data.write(block * bs, mv)
            except OSError as exc:
                raise self._failed(exc, "write", block, count) from None
            # No checkpoint between the data write returning and this: once the claim
            # is released, a read of these blocks verifies against their new checksums.
            self._csum[block:block + count] = sums
            self.unflushed_bytes += len(mv)
        finally:
            self.release_claim(claim)
        await self._persist_checksums(block, count)
        self._done(principal, len(mv), WRITE, times)

    async def _persist_checksums(self, block: int, count: int) -> None:
        try:
            await self.checksums.persist(block, count)
        except OSError as exc:
            raise self._failed(exc, "checksum write", block, count) from None

    def reserve(self, block: BlockNo, count: int, *, relocation: bool = False) -> None:
        """Make the host allocate the space under blocks [block, block + count) of a
        sparse backing file (fallocate mode 0: contents unchanged), so that a write of
        them later cannot fail for lack of host space. Reserves the whole aligned
        chunks (RESERVE_CHUNK_BYTES) the range touches, once each until a discard in
        the chunk punches a hole; if the host has no room for whole chunks, just the
        range. The checksum pages of the blocks are reserved too, and the host
        filesystem keeps a headroom (HOST_HEADROOM_BYTES, at most an eighth of it) for
        the metadata database. OSError (ENOSPC) when the host has no room for the range
        either, or it would leave less than the headroom free. A `relocation` (fresh
        blocks for committed ones the same transaction frees: an overwrite, the last
        block of a shrinking truncate) may use half of the headroom: it takes about
        as much as it gives back once the old blocks are discarded, and refusing it
        left a user of a full host unable even to truncate (review of probe 5, P5).
        Never blocks (no checkpoint)."""
        if self.host_reserved(block, count):
            return  # (the common case, in pure Python: R6)
        self._check_range(block, count)
        if count <= 0:
            return
        cb = self._chunk_blocks
        c0, c1 = block // cb, (block + count - 1) // cb + 1
        have = self._host_reserved
        if have[c0:c1].all():
            return
        bs = self.block_size
        # The checksum pages of the blocks are reserved with them, and the host keeps
        # a headroom for the metadata database: a tenant that filled a host smaller
        # than the device turned the volume read-only for everyone, at the next
        # commit's checksum write (hostile probe 5, H1). Conservative: what the
        # reservation needs is counted as if none of it were allocated yet.
        room = self._host_headroom()
        avail, full = room if room is not None else (0, 0)
        keep = full // 2 if relocation else full

        def fits(nblocks: int, keep: int = keep) -> bool:
            return room is None or avail - nblocks * (bs + 8) >= keep

        punched = self._host_punched
        try:
            # Whole chunks only under the full headroom, relocation or not: a flagged
            # chunk lets later new data in it past every check, so a relocation that
            # flagged one within half the headroom let new data use the relocations'
            # half (second review of probe 5, R4); it reserves just its range then.
            # A chunk with holes punched in it reserves just the range's part in it.
            whole = ~have[c0:c1] & ~punched[c0:c1]
            # (the window only on a host with room for 64 of them past the headroom:
            # near full, a punched chunk takes just its range)
            win = self._window_blocks if room is None or \
                avail - full >= 64 * self._window_blocks * bs else 0
            if not fits(int(np.count_nonzero(whole)) * cb + count + win, full):
                raise OSError(errno.ENOSPC, "no room for whole chunks")
            c = c0
            while c < c1:  # each run of chunks not reserved yet, in one call
                if have[c]:
                    c += 1
                    continue
                e = c + 1
                while e < c1 and not have[e] and punched[e] == punched[c]:
                    e += 1
                lo, hi = c * cb, min(e * cb, self.nblocks)
                if punched[c]:
                    # the range, and a window ahead of it in its last chunk
                    lo = max(lo, block)
                    hi = min(hi, max(block + count, lo + win))
                reserve_space(self.data, lo * bs, (hi - lo) * bs)
                self.checksums.reserve(lo, hi - lo)
                if not punched[c]:
                    have[c:e] = True
                else:
                    last = (hi - 1) // cb
                    self._win_lo[last] = max(lo, last * cb)
                    self._win_hi[last] = hi
                c = e
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # No room for whole chunks: what is asked for may still fit.
            if not fits(count):
                raise OSError(errno.ENOSPC, f"{self.data.name}: the host filesystem keeps "
                                            f"{keep} bytes free for the volume's metadata"
                              ) from None
            reserve_space(self.data, block * bs, count * bs)
            self.checksums.reserve(block, count)

    def _punched(self, chunks: slice) -> None:
        """A hole was punched in `chunks`: none is wholly reserved any more, each is
        reserved a range (and window) at a time from now on, its window closed."""
        self._host_reserved[chunks] = False
        self._host_punched[chunks] = True
        self._win_lo[chunks] = 0
        self._win_hi[chunks] = 0

    def host_blocks_avail(self) -> int | None:
        """How many blocks of new data the host filesystem under the backing file has
        room for beyond the headroom `reserve` keeps (a block and its checksum each):
        what `df` can promise when the host is fuller than the device (probe 19, F13).
        Blocks inside chunks reserved already need none and are not counted, so it may
        say up to a chunk (RESERVE_CHUNK_BYTES) less than fits. None for a block device
        (the device's own free blocks are all there is). One fstatvfs; never blocks
        for long."""
        room = self._host_headroom()
        if room is None:
            return None
        avail, full = room
        return max(0, avail - full) // (self.block_size + 8)

    def host_metadata_room(self) -> int | None:
        """Bytes the host filesystem under the backing file has free beyond half the
        headroom `reserve` keeps for the volume's metadata (negative: into that half).
        New data stops at the whole headroom; metadata changes (names, attributes)
        use the first half of it, so that the commits of what was accepted still fit
        (probe 22, F3: 8 MiB of attributes into one transaction on a host with 6 MiB
        left failed the commit, and the volume went read-only for every tenant).
        None for a block device (what holds the metadata is not this file's host)."""
        room = self._host_headroom()
        if room is None:
            return None
        avail, full = room
        return avail - full // 2

    def _host_headroom(self) -> tuple[int, int] | None:
        """(bytes free to unprivileged users on the host filesystem under the backing
        file, the headroom kept there for the metadata: HOST_HEADROOM_BYTES, at most
        an eighth of it); None for a block device. One fstatvfs."""
        room = host_space(self.data)
        if room is None:
            return None
        return room[0], min(HOST_HEADROOM_BYTES, room[1] // 8)

    def host_reserved(self, block: int, count: int) -> bool:
        """Whether blocks [block, block + count) lie inside one chunk whose host space
        is reserved, so that `reserve` of them has nothing to do: the common case of
        every allocation (a file's next blocks), checked in pure Python — the numpy
        slice of `reserve` cost about 2.4 µs per allocation, under write-through too
        (second review of probe 5, R6). Never blocks."""
        cb = self._chunk_blocks
        c = block // cb
        return (count > 0 and block >= 0 and block + count <= self.nblocks
                and (block + count - 1) // cb == c
                and (bool(self._host_reserved_m[c])
                     or self._win_lo_m[c] <= block and block + count <= self._win_hi_m[c]))

    def unreserve(self, block: BlockNo, count: int) -> None:
        """Give back the host space under blocks [block, block + count) that `reserve`
        reserved and nothing has written (a reservation of several runs that failed
        at a later run: their blocks go back to the free list, and their host space
        stayed taken and was counted again when they were reserved again: second
        review of probe 5, R5): punch the range and forget its chunks' flags (a
        flagged chunk must have host space under every block). Never blocks."""
        self._check_range(block, count)
        if count <= 0:
            return
        cb = self._chunk_blocks
        release_space(self.data, block * self.block_size, count * self.block_size)
        self._punched(slice(block // cb, (block + count - 1) // cb + 1))

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget the contents of blocks: they read as zeros afterwards (a hole is punched
        in a backing file; on a real device the data stays and keeps its checksum).
        A hole punch the host refuses is a DeviceError, never ignored: the blocks keep
        their data and checksums."""
        await self.discard_runs([(block, count)], principal=principal)

    async def discard_runs(self, runs: Sequence[tuple[int, int]], *,
                           principal: PrincipalId) -> None:
        """`discard` of every (block, count) of `runs` (sorted by block, not overlapping)
        as one request: one pass through the scheduler, one hole punch per run, the
        checksum pages written once each (`ChecksumStore.persist_runs`). A commit frees
        scattered single blocks (each random overwrite relocates one): one request per
        block cost more than its hole punch (docs/BENCHMARKS.md, "4 KiB writes: what a
        commit's discards cost"). On a refused punch the runs before it are discarded
        (their checksums zeroed and written), that run and the rest keep their data and
        checksums, and the DeviceError is raised."""
        for block, count in runs:
            self._check_range(block, count)
        runs = [(b, c) for b, c in runs if c]
        if not runs or not self.data.can_discard:
            return
        bs = self.block_size
        times = await self._serve(principal, runs[0][0], 0, DISCARD)
        if isinstance(self.data, FileBacking):  # (a wrapper sees each run: the loop below)
            await self._discard_in_thread(self.data, runs)
            self._done(principal, 0, DISCARD, times)
            return
        cb = self._chunk_blocks
        done = 0
        step = trio.current_time()
        try:
            for block, count in runs:
                # A hole punch is a blocking system call (10-40 us for one block): the
                # event loop is given back every DISCARD_STEP_SECONDS, as the request
                # per run gave it back before (a commit may free thousands of blocks).
                now = trio.current_time()
                if now - step >= DISCARD_STEP_SECONDS:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    step = trio.current_time()
                if self._claims:
                    await self._wait_landed(block, count)
                # Claimed until its checksums are zeroed (no checkpoint from the wait):
                # a read of the run that began during the punch (a wrapper's may take
                # time) would verify zeros against the old checksums.
                claim = self.claim(BlockNo(block), count)
                # The hole punch gives back the host space under the range: its chunks
                # are reserved again at their next allocation (cleared before and after
                # it, so a reserve that runs while the punch is under way is not
                # trusted afterwards).
                chunks = slice(block // cb, (block + count - 1) // cb + 1)
                self._host_reserved[chunks] = False
                try:
                    await self.data.discard(block * bs, count * bs)
                    self._csum[block:block + count] = 0
                except OSError as exc:
                    raise self._failed(exc, "discard", block, count) from None
                finally:
                    self._punched(chunks)
                    self.release_claim(claim)
                done += 1
        finally:
            await self._persist_discarded(runs[:done])
        self._done(principal, 0, DISCARD, times)

    async def _persist_discarded(self, runs: list[tuple[int, int]]) -> None:
        """Write the zeroed checksums of the discarded `runs` (none: nothing)."""
        if not runs:
            return
        try:
            await self.checksums.persist_runs(runs)
        except OSError as exc:
            raise self._failed(exc, "checksum write", runs[0][0],
                               runs[-1][0] + runs[-1][1] - runs[0][0]) from None

    async def _discard_in_thread(self, data: FileBacking, runs: list[tuple[int, int]]) -> None:
        """`discard_runs`' punches in one worker thread (`FileBacking.discard_many`), the
        event loop serving everyone else meanwhile: a punch waits for the host's
        journal when its disk is busy, and a commit that froze the loop for the 4,000
        punches of a second of random overwrites (1.5 s, docs/BENCHMARKS.md) stalled
        every tenant. Safe to leave the loop: the blocks are freed and not yet given
        back to the allocator, no grant maps them (the commit waited for quiescence),
        the pager dropped their frames, and no write claims them (waited for first; no
        read begins on them while the thread punches)."""
        bs = self.block_size
        cb = self._chunk_blocks
        # Held for reads until their checksums are zeroed: a read of a run (the
        # pager's read-ahead of freed blocks) that began during the punches verified
        # zeros against the old checksums (review of stop 28, 5). Not as claims, which
        # every read scans (a commit frees thousands of runs): a sorted list that a
        # read looks up (`_punching_meets`), put in place before the waits below, so
        # that no read of a run begins once they are over.
        ordered = sorted(runs)
        entry = ([b for b, _c in ordered], ordered)
        self._punching.append(entry)
        try:
            if self._claims:
                for block, count in runs:
                    await self._wait_landed(block, count)
            # Each run's chunks are forgotten before and after its punch (see
            # discard_runs): a reserve that runs meanwhile is not trusted afterwards.
            chunks = [slice(b // cb, (b + c - 1) // cb + 1) for b, c in runs]
            for ch in chunks:
                self._host_reserved[ch] = False
            try:
                done, err = await data.discard_many([(b * bs, c * bs) for b, c in runs])
            finally:
                for ch in chunks:
                    self._punched(ch)
            for block, count in runs[:done]:
                self._csum[block:block + count] = 0
        finally:
            self._punching.remove(entry)
            if self._landed:
                self._landed.unpark_all()
        await self._persist_discarded(runs[:done])
        if err is not None:
            raise self._failed(err, "discard", runs[done][0], runs[done][1])

    async def flush(self, *, principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """Barrier: make every completed write and discard durable — the data first,
        then the checksums (so a durable checksum never describes data that is not).
        DeviceError (EIO) when the host reports that it could not. Charged to
        `principal` (root by default: the metadata server's commits)."""
        times = await self._serve(principal, 0, 0, FLUSH)
        self.unflushed_bytes = 0  # (what is written from here on, the next flush covers)
        try:
            await self.data.flush()
        except OSError as exc:
            raise self._failed(exc, "flush of the data", None) from None
        try:
            await self.checksums.flush()
        except OSError as exc:
            raise self._failed(exc, "flush of the checksums", None) from None
        self._done(principal, 0, FLUSH, times)

    # -- introspection -----------------------------------------------------------

    def written_blocks(self) -> np.ndarray:
        """Numbers of the blocks holding data (nonzero checksum); for fsck."""
        return np.flatnonzero(self._csum)

    def stored_checksum(self, block: BlockNo) -> int:
        return int(self._csum[block])

    def statistics(self, principals: Collection[int] | None = None) -> DeviceStatistics:
        """The device's statistics, with the rows of `principals` only if given."""
        cap = self.profile.capacity()
        return DeviceStatistics(self.block_size, self.nblocks, self.profile.name,
                                self.scheduler.name, self.checksum_errors, self.io_errors,
                                tuple(self.scheduler.statistics(principals)),
                                capacity_iops=cap.iops, capacity_bps=cap.bps,
                                timeline_ahead_max_s=self.timeline_ahead_max)


__all__ = ["BlockDevice", "DeviceGeometry", "DeviceStatistics", "PROFILES"]
