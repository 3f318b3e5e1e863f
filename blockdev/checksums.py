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

`block_checksums` computes the checksums of a run of blocks: in one call of the C
helper `_xxh3blocks` (blockdev/xxh3blocks.c, built by scripts/setup.sh into
.build/xxh3blocks) when it is there, else one python-xxhash call per block. Both give
xxHash's XXH3_64bits of each block (python-xxhash is the reference; a test compares
them), so the file's format does not depend on which one ran.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import logging
import os
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
import trio
import xxhash

from .backing import Backing, reserve_space
from .errors import FormatError

log = logging.getLogger(__name__)

#: the unit in which the checksum file is written (a host page)
PAGE = 4096
_ENTRY = 8
_DTYPE = np.dtype("<u8")
#: runs of fewer blocks are hashed with python-xxhash: below this the helper's call
#: (argument parsing, the output array) costs more than the calls it saves
NATIVE_MIN_BLOCKS = 4
#: where scripts/setup.sh builds the helper (blockdev/xxh3blocks.c)
HELPER_DIR = Path(__file__).resolve().parent.parent / ".build" / "xxh3blocks"

_xxh3 = xxhash.xxh3_64_intdigest


def _load_helper() -> ModuleType | None:
    """The `_xxh3blocks` extension module built by scripts/setup.sh, or None when it is
    not built (an install without the setup script): python-xxhash then does it all."""
    path = HELPER_DIR / ("_xxh3blocks" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if not path.exists():
        log.debug("%s is not built (scripts/setup.sh): checksums by python-xxhash", path)
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader("_xxh3blocks", str(path))
        spec = importlib.util.spec_from_file_location("_xxh3blocks", path, loader=loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
    except (ImportError, OSError) as exc:
        log.warning("cannot load %s (%s): checksums by python-xxhash", path, exc)
        return None
    return mod


_helper = _load_helper()
_native = _helper.hash_blocks if _helper is not None else None
#: which code computes the checksums of large writes and reads: "c-avx512", "c-avx2",
#: "c-sse2" (the helper) or "python-xxhash"
BLOCK_HASHER = f"c-{_helper.variant()}" if _helper is not None else "python-xxhash"


def block_checksums(data: bytes | bytearray | memoryview, block_size: int) -> np.ndarray:
    """XXH3_64 of each `block_size` block of `data` (its length a whole number of
    blocks), as a uint64 array; 0 stays 0 (the device maps it to 1)."""
    mv = memoryview(data).cast("B")
    count = len(mv) // block_size
    if _native is not None and count >= NATIVE_MIN_BLOCKS:
        out = np.empty(count, dtype=np.uint64)
        _native(mv, block_size, out)
        return out
    return np.fromiter((_xxh3(mv[o:o + block_size])
                        for o in range(0, count * block_size, block_size)),
                       dtype=np.uint64, count=count)


def block_checksums_reference(data: bytes | bytearray | memoryview,
                              block_size: int) -> np.ndarray:
    """`block_checksums` by python-xxhash alone, block by block (the reference)."""
    mv = memoryview(data).cast("B")
    return np.array([_xxh3(mv[o:o + block_size])
                     for o in range(0, len(mv) - len(mv) % block_size, block_size)],
                    dtype=np.uint64)


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

    def reserve(self, block: int, count: int) -> None:
        """Make the host allocate the file pages holding entries [block, block + count)
        (fallocate mode 0, see `backing.reserve_space`): a later `persist` of them
        cannot fail for lack of host space. OSError (ENOSPC) when there is no room."""
        if count <= 0:
            return
        p0, p1 = self._pages(block, count)
        reserve_space(self.backing, p0, p1 - p0)

    async def persist(self, block: int, count: int) -> None:
        """Write the file pages holding entries [block, block + count) as they are in
        memory now. Raises OSError from the backing."""
        if count <= 0:
            return
        await self._write_pages(*self._pages(block, count))

    def _pages(self, block: int, count: int) -> tuple[int, int]:
        """The byte range [p0, p1) of the whole file pages holding entries
        [block, block + count)."""
        start = self._offset + block * _ENTRY
        end = self._offset + (block + count) * _ENTRY
        return start - start % PAGE, min(len(self._image), end + (-end % PAGE))

    async def _write_pages(self, p0: int, p1: int) -> None:
        """Write bytes [p0, p1) of the file (whole pages) as they are in memory now."""
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

    async def persist_runs(self, runs: Sequence[tuple[int, int]]) -> None:
        """`persist` of every (block, count) of `runs` (sorted by block), with one write
        for the runs whose file pages touch or overlap: the same pages as one `persist`
        per run, in fewer calls (a commit's discards of scattered freed blocks)."""
        span: list[int] = []
        for block, count in runs:
            if count <= 0:
                continue
            start = self._offset + block * _ENTRY
            end = self._offset + (block + count) * _ENTRY
            p0 = start - start % PAGE
            p1 = min(len(self._image), end + (-end % PAGE))
            if span and p0 <= span[1]:
                span[1] = max(span[1], p1)
                continue
            if span:
                await self._write_pages(span[0], span[1])
            span = [p0, p1]
        if span:
            await self._write_pages(span[0], span[1])

    async def flush(self) -> None:
        await self.backing.flush()

    def close(self) -> None:
        self.backing.close()
