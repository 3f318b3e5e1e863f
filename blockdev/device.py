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

Ordering: a write stores the data, then sets the blocks' checksums in memory with no
checkpoint in between (so a racing read verifies against the checksum of what it
reads), then persists the changed checksum pages. A daemon killed by SIGKILL loses at
most the request it was executing. `flush()` is the barrier: data backing first, then
the checksum store. Reads verify every block: a mismatch raises ChecksumError naming
the block, never returns wrong data.

Errors: every OSError of a backing becomes a DeviceError naming the first block of the
request and carrying the host's errno; ENOSPC (the host filesystem under a sparse
backing file is full) becomes DeviceFull, which the FUSE boundary answers with ENOSPC.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import uuid
from pathlib import Path
from typing import AsyncContextManager, Protocol

import numpy as np
import trio
import xxhash

from .backing import Backing, FileBacking
from .checksums import PAGE, ChecksumStore, format_checksum_file
from .errors import ChecksumError, DeviceError, DeviceFull, FormatError, OutOfRange
from .faults import FaultPlan, FaultyBacking
from .profiles import PROFILES, TimingProfile, parse_profile
from .recording import RecordLog
from .scheduler import FifoScheduler, PrincipalIOStats
from .types import BankTree, BlockNo, PrincipalId

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER = "device.json"
BACKING = "device.img"
CHECKSUMS = "checksums"

_xxh3 = xxhash.xxh3_64_intdigest


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


class Scheduler(Protocol):
    """What the device needs of a request scheduler (FifoScheduler; mClock later)."""

    name: str
    #: the I/O banks last configured
    banks: BankTree

    def slot(self, principal: PrincipalId, nbytes: int, *,
             write: bool) -> AsyncContextManager[None]: ...

    def record(self, principal: PrincipalId, nbytes: int, *, write: bool,
               latency_s: float) -> None: ...

    def statistics(self) -> list[PrincipalIOStats]: ...

    def configure_banks(self, tree: BankTree) -> None:
        """The principals' I/O banks (reservation, weight, limit) and their tree."""


class BlockDevice:
    """Fixed-size blocks with checksums and modeled timing. See the module docstring."""

    def __init__(self, geometry: DeviceGeometry, profile: TimingProfile, *, data: Backing,
                 checksums: ChecksumStore, scheduler: Scheduler | None = None,
                 directory: Path | None = None) -> None:
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
        self.scheduler: Scheduler = scheduler or FifoScheduler(profile.queue_depth)
        self._instant = profile.is_instant
        self._head = 0  # last block position, for the hdd seek model
        self.checksum_errors = 0
        self.io_errors = 0
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
            FileBacking(directory / BACKING, create_size=nblocks * block_size).close()
            backing_s = BACKING
        else:
            fd = os.open(backing, os.O_RDONLY)
            try:
                dev_size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            nblocks = min(size, dev_size) // block_size if size else dev_size // block_size
            backing_s = os.path.abspath(backing)
        format_checksum_file(directory / CHECKSUMS, nblocks)
        geo = DeviceGeometry(block_size, nblocks, backing_s, profile, str(uuid.uuid4()))
        header = {"format": FORMAT_VERSION, **dataclasses.asdict(geo)}
        tmp = directory / (HEADER + ".tmp")
        tmp.write_text(json.dumps(header, indent=2) + "\n")
        os.replace(tmp, directory / HEADER)
        return geo

    @staticmethod
    def read_geometry(directory: Path) -> DeviceGeometry:
        try:
            header = json.loads((directory / HEADER).read_text())
        except FileNotFoundError:
            raise FormatError(f"{directory} has no block device ({HEADER} missing)") from None
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot read {directory / HEADER}: {exc}") from None
        if header.get("format") != FORMAT_VERSION:
            raise FormatError(f"unsupported device format {header.get('format')!r}")
        header.pop("format")
        return DeviceGeometry(**header)

    @classmethod
    def open(cls, directory: Path, *, profile: str | None = None,
             scheduler: Scheduler | None = None, fault_plan: FaultPlan | None = None,
             recorder: RecordLog | None = None) -> BlockDevice:
        """Open the device in `directory` on its file backings; `profile` overrides the
        formatted one.

        Lab facilities (tests, crash and fault experiments; see blockdev/faults.py and
        blockdev/recording.py): `recorder` logs every write and barrier of the data and
        the checksum store; `fault_plan` injects faults, above the recorder, so the
        log holds what reached the store (a torn write as torn)."""
        geo = cls.read_geometry(directory)
        prof = parse_profile(profile or geo.profile)
        path = geo.backing if os.path.isabs(geo.backing) else str(directory / geo.backing)
        opened: list[Backing] = []
        try:
            data: Backing = FileBacking(path)
            opened.append(data)
            sums: Backing = FileBacking(directory / CHECKSUMS)
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
                       directory=directory)
        except BaseException:
            for b in opened:
                b.close()
            if recorder is not None:
                recorder.close()
            raise

    def configure_banks(self, tree: BankTree) -> None:
        """Hand the principals' I/O banks to the scheduler (at mount, on every change)."""
        self.scheduler.configure_banks(tree)

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

    async def _timed(self, principal: PrincipalId, block: int, nbytes: int, *, write: bool) -> float:
        """Wait for a service slot and the modeled service time; returns the start time."""
        start = trio.current_time()
        if self._instant:
            return start
        async with self.scheduler.slot(principal, nbytes, write=write):
            seek = abs(block - self._head) / self.nblocks if self.profile.full_seek_s else 0.0
            self._head = block + nbytes // self.block_size
            await trio.sleep(self.profile.service_time(nbytes, write=write, seek_fraction=seek))
        return start

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
        start = await self._timed(principal, block, count * bs, write=False)
        try:
            await self.data.read_into(block * bs, out)
        except OSError as exc:
            raise self._failed(exc, "read", block, count) from None
        self._verify(block, count, out)
        self.scheduler.record(principal, count * bs, write=False,
                              latency_s=0.0 if self._instant else trio.current_time() - start)

    def _verify(self, block: int, count: int, buf: bytearray | memoryview) -> None:
        bs = self.block_size
        mv = memoryview(buf)
        expected = self._csum[block:block + count].tolist()
        got = [_xxh3(mv[i * bs:(i + 1) * bs]) for i in range(count)]
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

    async def write(self, block: BlockNo, data: bytes | bytearray | memoryview, *,
                    principal: PrincipalId) -> None:
        """Write whole blocks starting at `block` (len(data) a multiple of the block size).
        On DeviceError the blocks hold undefined contents that fail their checksums
        rather than read back as data."""
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count, rem = divmod(len(mv), bs)
        if rem:
            raise ValueError(f"write of {len(mv)} bytes is not a whole number of blocks")
        self._check_range(block, count)
        start = await self._timed(principal, block, len(mv), write=True)
        sums = [_block_checksum(mv[i * bs:(i + 1) * bs]) for i in range(count)]
        try:
            await self.data.write(block * bs, mv)
        except OSError as exc:
            raise self._failed(exc, "write", block, count) from None
        # No checkpoint between the data write returning and this: a racing read of
        # these blocks verifies against the checksum of what it reads.
        self._csum[block:block + count] = sums
        await self._persist_checksums(block, count)
        self.scheduler.record(principal, len(mv), write=True,
                              latency_s=0.0 if self._instant else trio.current_time() - start)

    async def _persist_checksums(self, block: int, count: int) -> None:
        try:
            await self.checksums.persist(block, count)
        except OSError as exc:
            raise self._failed(exc, "checksum write", block, count) from None

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget the contents of blocks: they read as zeros afterwards (a hole is punched
        in a backing file; on a real device the data stays and keeps its checksum).
        A hole punch the host refuses is a DeviceError, never ignored: the blocks keep
        their data and checksums."""
        self._check_range(block, count)
        if not count or not self.data.can_discard:
            return
        bs = self.block_size
        try:
            await self.data.discard(block * bs, count * bs)
        except OSError as exc:
            raise self._failed(exc, "discard", block, count) from None
        self._csum[block:block + count] = 0
        await self._persist_checksums(block, count)

    async def flush(self) -> None:
        """Barrier: make every completed write and discard durable — the data first,
        then the checksums (so a durable checksum never describes data that is not).
        DeviceError (EIO) when the host reports that it could not."""
        try:
            await self.data.flush()
        except OSError as exc:
            raise self._failed(exc, "flush of the data", None) from None
        try:
            await self.checksums.flush()
        except OSError as exc:
            raise self._failed(exc, "flush of the checksums", None) from None

    # -- introspection -----------------------------------------------------------

    def written_blocks(self) -> np.ndarray:
        """Numbers of the blocks holding data (nonzero checksum); for fsck."""
        return np.flatnonzero(self._csum)

    def stored_checksum(self, block: BlockNo) -> int:
        return int(self._csum[block])

    def statistics(self) -> DeviceStatistics:
        return DeviceStatistics(self.block_size, self.nblocks, self.profile.name,
                                self.scheduler.name, self.checksum_errors, self.io_errors,
                                tuple(self.scheduler.statistics()))


__all__ = ["BlockDevice", "DeviceGeometry", "DeviceStatistics", "PROFILES"]
