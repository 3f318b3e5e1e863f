"""The power-loss recorder: a log of every write and barrier below the block device, and
the materialiser that turns it into the states a power loss could leave.

`RecordLog.create(directory)` starts a recording; `log.attach(name, backing, unit=...)`
wraps a Backing in a `RecordingBacking` that appends one record per write, discard and
completed flush to the log (the device attaches its data as `device.img` and its
checksum store as `checksums`, so both land in one order). At attach time the
backing's current contents are copied (sparsely) to `base-<name>`: the state every
later record applies to.

The power-loss model (docs/dev/invariants.md, "Block device"): a backing's write that
was logged before the start of a flush of that same backing that completed is durable
and is kept. Every later write — after the last barrier of its backing, or racing with
it — may be kept or dropped, independently for each aligned `unit` it touches (a
device block for the data, a page for the checksum file), in any combination. A
dropped unit keeps what the writes before it left there. A discard is a write of zeros
for this purpose (a hole punch that is not durable may come undone). Writes are
applied in log order, so where several kept writes touch one unit the last one wins.

`Recording.load(directory)` reads a log (a torn last record, as a crash of the writer
leaves, is ignored); `recording.choices(crash_at)` lists the (record, unit) pieces a
power loss at that point may keep or drop; `recording.materialise(out, keep=... |
seed=..., crash_at=...)` writes one such state as `out/<name>` for every backing —
`device.img` and `checksums`, ready to be put into a copy of the volume. (The metadata
database is the crash harness's business.)

Log format (little-endian): records of a fixed header `kind:u8 backing:u8 pad:6
a:u64 b:u64` and a payload. ATTACH: a = unit, b = payload length, payload = JSON
{name, size}. WRITE: a = offset, b = length, payload = the bytes. DISCARD: a = offset,
b = length. BARRIER: a = number of records logged when the flush began (the writes it
covers are those before it), b = 0.

A mounted daemon records when the environment variable `SLUICE_RECORD_DIR` names a
directory that does not exist yet (read in one place: fs/mount.py) — a lab facility.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
from pathlib import Path
from typing import Collection, Iterator, NamedTuple

from .backing import Backing, FileBacking, punch_hole
from .errors import DeviceError

#: the environment variable a mounted daemon takes its recording directory from
RECORD_DIR_ENV = "SLUICE_RECORD_DIR"

LOG = "log"
ATTACH, WRITE, DISCARD, BARRIER = 1, 2, 3, 4
_HEAD = struct.Struct("<BB6xQQ")
_COPY_CHUNK = 1 << 20


class RecordLog:
    """An append-only log shared by the RecordingBackings of one device."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd = fd
        self._names: list[str] = []
        self._open = 0
        #: records appended so far (a record's index is its position in the log)
        self.records = 0

    @classmethod
    def create(cls, directory: str | os.PathLike[str]) -> RecordLog:
        """Start a recording in `directory`, which must not exist yet (one recording per
        directory: appending to an old one would mix two bases)."""
        d = Path(directory)
        try:
            d.mkdir(mode=0o700)
            fd = os.open(d / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeviceError(f"cannot start a recording in {d}: {exc.strerror} (it must be "
                              "a new directory)", errno=exc.errno) from None
        return cls(d, fd)

    def _append(self, kind: int, backing: int, a: int, b: int, payload: bytes | memoryview = b"") -> int:
        # One write(2) per record on an O_APPEND descriptor: a SIGKILL'd writer leaves
        # whole records; a host crash may leave a torn last one, which load() ignores.
        rec = _HEAD.pack(kind, backing, a, b) + bytes(payload)
        n = os.write(self._fd, rec)
        if n != len(rec):
            raise OSError(f"short write to the recording log ({n} of {len(rec)} bytes)")
        idx = self.records
        self.records += 1
        return idx

    def attach(self, name: str, inner: Backing, *, unit: int) -> RecordingBacking:
        """Record `inner` under `name` (a file name, e.g. `device.img`); copies its
        current contents to `base-<name>` first."""
        if name in self._names or "/" in name or len(self._names) >= 255:
            raise ValueError(f"cannot record a backing named {name!r}")
        if unit <= 0:
            raise ValueError("unit must be positive")
        _copy_sparse(inner, self.directory / f"base-{name}")
        idx = len(self._names)
        self._names.append(name)
        meta = json.dumps({"name": name, "size": inner.size}).encode()
        self._append(ATTACH, idx, unit, len(meta), meta)
        self._open += 1
        return RecordingBacking(inner, self, idx)

    def _detach(self) -> None:
        self._open -= 1
        if not self._open:
            self.close()

    def close(self) -> None:
        """Close the log once no attached backing is open (each closes it on its way
        out; call this when nothing was attached after all). Idempotent."""
        if not self._open and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _copy_sparse(src: Backing, dest: Path) -> None:
    """Copy `src` to a new sparse file: the data regions of a file backing (found with
    SEEK_DATA/SEEK_HOLE), or the non-zero chunks of anything else."""
    size = src.size
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        regions: list[tuple[int, int]] = []
        inner = src
        while not isinstance(inner, FileBacking) and hasattr(inner, "inner"):
            inner = inner.inner  # type: ignore[attr-defined]
        if isinstance(inner, FileBacking) and inner.can_discard:
            sfd = inner.fileno()
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = min(size, os.lseek(sfd, start, os.SEEK_HOLE))
                regions.append((start, end))
                pos = end
        else:
            regions.append((0, size))
        zero = bytes(_COPY_CHUNK)
        for start, end in regions:
            for off in range(start, end, _COPY_CHUNK):
                chunk = src.pread(off, min(_COPY_CHUNK, end - off))
                if chunk != zero[:len(chunk)]:
                    os.pwrite(fd, chunk, off)
    finally:
        os.close(fd)


class RecordingBacking:
    """A Backing that logs each write, discard and completed flush of `inner` before
    (writes) or after (flushes) passing it on."""

    def __init__(self, inner: Backing, log: RecordLog, index: int) -> None:
        self.inner = inner
        self.log = log
        self.index = index
        self._closed = False

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def can_discard(self) -> bool:
        return self.inner.can_discard

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self.inner.read_into(offset, out)

    async def write(self, offset: int, data: memoryview) -> None:
        # Logged first: a write that fails after reaching part of the store may have
        # changed it, and the materialiser may keep or drop it like any other.
        self.log._append(WRITE, self.index, offset, len(data), data)
        await self.inner.write(offset, data)

    async def discard(self, offset: int, length: int) -> None:
        self.log._append(DISCARD, self.index, offset, length)
        await self.inner.discard(offset, length)

    async def flush(self) -> None:
        # The barrier covers what was logged before the flush began, not writes that
        # race with the fdatasync in its worker thread.
        covers = self.log.records
        await self.inner.flush()
        self.log._append(BARRIER, self.index, covers, 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.inner.close()
            finally:
                self.log._detach()


# -- reading a log and materialising power-loss states ---------------------------------


class Unit(NamedTuple):
    """One piece a power loss may keep or drop: unit `unit` (offset // unit size) of
    backing `backing`, as written by record `record`."""

    record: int
    backing: str
    unit: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    kind: int
    backing: int
    a: int
    b: int
    #: where the payload starts in the log file
    at: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Attached:
    name: str
    size: int
    unit: int


class Recording:
    """A recording read back from its directory. See the module docstring."""

    def __init__(self, directory: Path, backings: list[_Attached], records: list[_Record]) -> None:
        self.directory = directory
        self.backings = backings
        self.records = records

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Recording:
        d = Path(directory)
        backings: list[_Attached] = []
        records: list[_Record] = []
        with open(d / LOG, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = 0
            while pos + _HEAD.size <= size:
                f.seek(pos)
                kind, idx, a, b = _HEAD.unpack(f.read(_HEAD.size))
                payload = b if kind in (ATTACH, WRITE) else 0
                if pos + _HEAD.size + payload > size:
                    break  # a torn last record
                at = pos + _HEAD.size
                if kind == ATTACH:
                    meta = json.loads(f.read(b))
                    backings.append(_Attached(meta["name"], meta["size"], a))
                elif kind not in (WRITE, DISCARD, BARRIER) or idx >= len(backings):
                    raise ValueError(f"{d / LOG}: bad record {kind} at byte {pos}")
                records.append(_Record(kind, idx, a, b, at))
                pos = at + payload
        return cls(d, backings, records)

    @property
    def barriers(self) -> int:
        return sum(1 for r in self.records if r.kind == BARRIER)

    def _durable_before(self, crash_at: int) -> list[int]:
        """Per backing: records with an index below this are durable (covered by the
        last completed barrier of that backing before `crash_at`)."""
        bound = [0] * len(self.backings)
        for r in self.records[:crash_at]:
            if r.kind == BARRIER:
                bound[r.backing] = max(bound[r.backing], r.a)
        return bound

    def _units(self, r: _Record) -> range:
        u = self.backings[r.backing].unit
        return range(r.a // u, -(-(r.a + r.b) // u))

    def choices(self, crash_at: int | None = None) -> list[Unit]:
        """The pieces a power loss after the first `crash_at` records (default: all)
        may keep or drop, in log order."""
        n = len(self.records) if crash_at is None else crash_at
        bound = self._durable_before(n)
        out: list[Unit] = []
        for i, r in enumerate(self.records[:n]):
            if r.kind in (WRITE, DISCARD) and i >= bound[r.backing]:
                name = self.backings[r.backing].name
                out.extend(Unit(i, name, u) for u in self._units(r))
        return out

    def crash_points(self) -> list[int]:
        """Values of `crash_at` worth trying: after each record (0 = before any)."""
        return list(range(len(self.records) + 1))

    def materialise(self, out: str | os.PathLike[str], *, keep: Collection[Unit] | None = None,
                    seed: int | None = None, keep_fraction: float = 0.5,
                    crash_at: int | None = None) -> dict[str, Path]:
        """Write the state of every backing after a power loss following the first
        `crash_at` records (default: all) to `out/<name>`; returns name -> path.

        Which of `choices(crash_at)` survive is `keep` (an explicit set), or else drawn
        with `random.Random(seed)`, each kept with probability `keep_fraction`."""
        n = len(self.records) if crash_at is None else crash_at
        if not 0 <= n <= len(self.records):
            raise ValueError(f"crash_at {n} is outside 0..{len(self.records)}")
        if keep is None:
            if seed is None:
                raise ValueError("give keep= or seed=")
            rng = random.Random(seed)
            keep = {c for c in self.choices(n) if rng.random() < keep_fraction}
        kept = set(keep)
        bound = self._durable_before(n)
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        fds: list[int] = []
        try:
            for b in self.backings:
                p = outdir / b.name
                p.unlink(missing_ok=True)
                base = FileBacking(self.directory / f"base-{b.name}")
                try:
                    _copy_sparse(base, p)
                finally:
                    base.close()
                paths[b.name] = p
                fds.append(os.open(p, os.O_RDWR | os.O_CLOEXEC))
            with open(self.directory / LOG, "rb") as log:
                for i, r in enumerate(self.records[:n]):
                    if r.kind not in (WRITE, DISCARD):
                        continue
                    att = self.backings[r.backing]
                    if i < bound[r.backing]:
                        pieces: Iterator[tuple[int, int]] = iter([(r.a, r.a + r.b)])
                    else:
                        u = att.unit
                        pieces = ((max(r.a, k * u), min(r.a + r.b, (k + 1) * u))
                                  for k in self._units(r) if Unit(i, att.name, k) in kept)
                    for start, end in pieces:
                        if r.kind == WRITE:
                            log.seek(r.at + start - r.a)
                            os.pwrite(fds[r.backing], log.read(end - start), start)
                        else:
                            punch_hole(fds[r.backing], start, end - start)
        finally:
            for fd in fds:
                os.close(fd)
        return paths
