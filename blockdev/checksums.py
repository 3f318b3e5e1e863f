"""The per-block checksum store: a numpy array in memory, persisted through a Backing.

On disk the store is the `checksums` file of a device directory, unchanged since
format 1: a NumPy `.npy` file holding one little-endian uint64 per block (xxh3_64 of
the block, 0 for never written or discarded). In memory the whole file — header and
entries — is one bytearray, and `array` is a numpy view of its entries, so reads
verify against memory at numpy speed and a change is persisted by writing the file
pages that hold the changed entries, straight from that image, through the backing.
That is what makes the checksums visible to a recorder or a fault injector, which a
memory map hides (its writes reach the file whenever the kernel likes).

Writes go out in whole `PAGE`s of the file: the unit a page-cache writeback, and so a
power loss, keeps or drops. Two persists of the same page are serialised and each
sends the page as it is when its write starts, so the file never ends up older than
memory even when a backing takes time (latency injection) between the two.

Durability is the backing's `flush()` (the device calls it after flushing the data).
"""

from __future__ import annotations

import io
import os

import numpy as np
import trio

from .backing import Backing
from .errors import FormatError

#: the unit in which the checksum file is written (a host page)
PAGE = 4096
_ENTRY = 8
_DTYPE = np.dtype("<u8")


def format_checksum_file(path: str | os.PathLike[str], nblocks: int) -> None:
    """Create a checksum file of `nblocks` zero entries (sparse)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=_DTYPE, shape=(nblocks,))
    arr.flush()
    del arr


class ChecksumStore:
    """The checksums of a device's blocks. See the module docstring."""

    def __init__(self, backing: Backing, image: bytearray, data_offset: int,
                 nblocks: int) -> None:
        self.backing = backing
        self._image = image
        self._mv = memoryview(image)
        self._offset = data_offset
        self.nblocks = nblocks
        #: the entries: a view of the image (writes to it are persisted by `persist`)
        self.array: np.ndarray = np.frombuffer(image, dtype=_DTYPE, count=nblocks,
                                               offset=data_offset)
        self._busy = False
        self._waiters = trio.lowlevel.ParkingLot()

    @classmethod
    def load(cls, backing: Backing, nblocks: int) -> ChecksumStore:
        """Read the store from `backing`; FormatError unless it is a checksum file for
        exactly `nblocks` blocks."""
        head = backing.pread(0, min(backing.size, 64 << 10))
        f = io.BytesIO(head)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise FormatError(f"checksum file {backing.name} is not readable: {exc}") from None
        if dtype != _DTYPE or fortran or len(shape) != 1:
            raise FormatError(f"checksum file {backing.name} holds {dtype} {shape}, "
                              "not one little-endian uint64 per block")
        if shape[0] != nblocks:
            raise FormatError(f"checksum file holds {shape[0]} entries, "
                              f"device has {nblocks} blocks")
        offset = f.tell()
        end = offset + nblocks * _ENTRY
        if backing.size < end:
            raise FormatError(f"checksum file {backing.name} is truncated "
                              f"({backing.size} of {end} bytes)")
        image = bytearray(backing.pread(0, end))
        return cls(backing, image, offset, nblocks)

    async def persist(self, block: int, count: int) -> None:
        """Write the file pages holding entries [block, block + count) as they are in
        memory now. Raises OSError from the backing."""
        if count <= 0:
            return
        start = self._offset + block * _ENTRY
        end = self._offset + (block + count) * _ENTRY
        p0 = start - start % PAGE
        p1 = min(len(self._image), end + (-end % PAGE))
        # Persists are serialised, and each sends the page as it is when its write
        # starts. Uncontended (always, unless a backing checkpoints inside its write)
        # this costs two attribute writes and no checkpoint.
        while self._busy:
            await self._waiters.park()
        self._busy = True
        try:
            await self.backing.write(p0, self._mv[p0:p1])
        finally:
            self._busy = False
            if self._waiters:
                self._waiters.unpark()

    async def flush(self) -> None:
        await self.backing.flush()

    def close(self) -> None:
        self.backing.close()
