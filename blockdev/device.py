"""The simulated block device: a backing file (or real block device) of fixed-size
blocks, an xxh3 checksum per block kept beside it, and a timing model.

Layout of a device directory (made by `BlockDevice.format`):

- `device.json`   geometry and profile (format version, block size, block count,
                  backing path, timing profile)
- `device.img`    the backing store, sparse (unless a real device path is given)
- `checksums`     one little-endian uint64 per block: xxh3_64 of its contents, or 0
                  for a block that was never written or was discarded (reads as zeros)

Ordering: a write updates the backing store first and its checksum right after, with
no checkpoint in between, so a daemon killed by SIGKILL loses at most the request it
was executing. Both files are written through the host page cache; `flush()` makes
them durable (fsync both). Reads verify every block: a mismatch raises ChecksumError
naming the block, never returns wrong data.

The data syscalls (pread/pwrite of page-cache-resident files) take microseconds and
run on the event loop; fsync, which can take milliseconds, runs in a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import trio
import xxhash

from .errors import ChecksumError, FormatError, OutOfRange
from .profiles import PROFILES, TimingProfile, parse_profile
from .scheduler import FifoScheduler, PrincipalIOStats
from .types import BlockNo, PrincipalId

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER = "device.json"
BACKING = "device.img"
CHECKSUMS = "checksums"

_xxh3 = xxhash.xxh3_64_intdigest
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

#: at most this many fsyncs run in worker threads at once
_FSYNC_LIMITER = trio.CapacityLimiter(4)


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
    per_principal: tuple[PrincipalIOStats, ...]


class BlockDevice:
    """Fixed-size blocks with checksums and modeled timing. See the module docstring."""

    def __init__(self, directory: Path, geometry: DeviceGeometry, profile: TimingProfile,
                 fd: int, checksums: np.memmap) -> None:
        self.directory = directory
        self.geometry = geometry
        self.block_size = geometry.block_size
        self.nblocks = geometry.nblocks
        self.profile = profile
        self._fd = fd
        #: the checksum file's mapping (flushed by flush()), and a plain ndarray view of
        #: it for the hot paths (slicing a np.memmap runs Python code on every slice)
        self._csum_map = checksums
        self._csum = checksums.view(np.ndarray)
        self._is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        self.scheduler = FifoScheduler(profile.queue_depth)
        self._instant = profile.is_instant
        self._head = 0  # last block position, for the hdd seek model
        self.checksum_errors = 0
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
            path = directory / BACKING
            with open(path, "wb") as f:
                f.truncate(nblocks * block_size)
            backing_s = BACKING
        else:
            fd = os.open(backing, os.O_RDONLY)
            try:
                dev_size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            nblocks = min(size, dev_size) // block_size if size else dev_size // block_size
            backing_s = os.path.abspath(backing)
        csum = np.lib.format.open_memmap(directory / CHECKSUMS, mode="w+", dtype="<u8",
                                         shape=(nblocks,))
        csum.flush()
        del csum
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
    def open(cls, directory: Path, *, profile: str | None = None) -> BlockDevice:
        """Open the device in `directory`; `profile` overrides the formatted one."""
        geo = cls.read_geometry(directory)
        prof = parse_profile(profile or geo.profile)
        backing = geo.backing if os.path.isabs(geo.backing) else str(directory / geo.backing)
        fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        try:
            csum = np.load(directory / CHECKSUMS, mmap_mode="r+")
            if csum.shape != (geo.nblocks,):
                raise FormatError(f"checksum file holds {csum.shape[0]} entries, "
                                  f"device has {geo.nblocks} blocks")
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, geo, prof, fd, csum)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._csum_map.flush()
            os.close(self._fd)

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
        each block's checksum. On ChecksumError `out` holds unverified data: discard it."""
        self._check_range(block, count)
        bs = self.block_size
        if len(out) != count * bs:
            raise ValueError(f"buffer of {len(out)} bytes for {count} blocks")
        start = await self._timed(principal, block, count * bs, write=False)
        got = os.preadv(self._fd, [out], block * bs)
        if got < len(out):  # short read on a block device past its end: zeros
            out[got:] = bytes(len(out) - got)
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
        """Write whole blocks starting at `block` (len(data) a multiple of the block size)."""
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count, rem = divmod(len(mv), bs)
        if rem:
            raise ValueError(f"write of {len(mv)} bytes is not a whole number of blocks")
        self._check_range(block, count)
        start = await self._timed(principal, block, len(mv), write=True)
        sums = [_block_checksum(mv[i * bs:(i + 1) * bs]) for i in range(count)]
        written = os.pwritev(self._fd, [mv], block * bs)
        if written != len(mv):
            raise OSError(f"short write to backing store at block {block}")
        self._csum[block:block + count] = sums
        self.scheduler.record(principal, len(mv), write=True,
                              latency_s=0.0 if self._instant else trio.current_time() - start)

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget the contents of blocks: they read as zeros afterwards (a hole is punched
        in a backing file; on a real device the data stays and keeps its checksum)."""
        self._check_range(block, count)
        if not count or not self._is_file:
            return
        bs = self.block_size
        r = _libc.fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                            block * bs, count * bs)
        if r != 0:
            err = ctypes.get_errno()
            log.warning("cannot punch hole at block %d+%d: %s", block, count, os.strerror(err))
            return
        self._csum[block:block + count] = 0

    async def flush(self) -> None:
        """Make every completed write durable (data and checksums)."""
        await trio.to_thread.run_sync(self.flush_sync, limiter=_FSYNC_LIMITER)

    def flush_sync(self) -> None:
        self._csum_map.flush()  # msync
        os.fsync(self._fd)

    # -- introspection -----------------------------------------------------------

    def written_blocks(self) -> np.ndarray:
        """Numbers of the blocks holding data (nonzero checksum); for fsck."""
        return np.flatnonzero(self._csum)

    def stored_checksum(self, block: BlockNo) -> int:
        return int(self._csum[block])

    def statistics(self) -> DeviceStatistics:
        return DeviceStatistics(self.block_size, self.nblocks, self.profile.name,
                                self.scheduler.name, self.checksum_errors,
                                tuple(self.scheduler.statistics()))


__all__ = ["BlockDevice", "DeviceGeometry", "DeviceStatistics", "PROFILES"]
