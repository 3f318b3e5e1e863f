"""Access traces: every request the pager serves, as compact numpy records.

A trace file is a 16-byte header (`MAGIC`, then the record size and the flags, each a
little-endian uint32) followed by `TRACE_DTYPE` records, 48 bytes each. With flag
`F_NAMES` (the daemon sets it when a recording ends: `name_principals`) a trailer
follows the records: the names of the principals as a JSON object (principal id, as a
string, to name), then `NAMES_MAGIC`, the JSON's length as a little-endian uint32 and
four reserved bytes. One record is one request (a run of `count` blocks), not one
block, so a 1 MiB read is one record. The hints in force for the file at the time (its
priority, discardable, sequential) ride in every record, so a replay under `hinted`
sees what the pager saw; `advise` calls are records of their own (op ADVISE) with
willneed/dontneed flags.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Union

import numpy as np

MAGIC = b"SLTRACE1"
#: ends the names trailer (see the module's docstring)
NAMES_MAGIC = b"SLNAMES1"
#: header flag: the records are followed by the names trailer
F_NAMES = 1

TRACE_DTYPE = np.dtype([
    ("time", "<f8"),       # trio clock, seconds
    ("principal", "<i4"),
    ("count", "<i4"),      # blocks in the request
    ("file", "<i8"),       # file identity (inode); 0 when unknown
    ("fblock", "<i8"),     # first file block of the request
    ("block", "<i8"),      # first device block
    ("op", "u1"),          # READ, WRITE, ... below
    ("flags", "u1"),       # F_* below
    ("priority", "<i2"),   # the file's (or the advised range's) priority
    ("_pad", "<u4"),
])

# ops
READ, WRITE, DISCARD, ADVISE, FORGET, FLUSH, WRITEBACK_FILE = range(7)
OP_NAMES = ("read", "write", "discard", "advise", "forget", "flush", "writeback_file")

# flags
F_DISCARDABLE = 1
F_SEQUENTIAL = 2
F_WILLNEED = 4
F_DONTNEED = 8
#: the record sets the priority (ADVISE) / the discardable bit (ADVISE)
F_SET_PRIORITY = 16
F_SET_DISCARDABLE = 32

Sink = Union[BinaryIO, Callable[[np.ndarray], object]]


def header() -> bytes:
    return MAGIC + struct.pack("<II", TRACE_DTYPE.itemsize, 0)


def name_principals(f: BinaryIO, names: Mapping[int, str]) -> None:
    """Append the names of the principals (id to name) to the trace in the file `f`,
    whose records are all written, and set `F_NAMES` in its header."""
    blob = json.dumps({str(k): v for k, v in sorted(names.items())}).encode()
    f.seek(0, os.SEEK_END)
    f.write(blob + NAMES_MAGIC + struct.pack("<II", len(blob), 0))
    f.seek(8)
    f.write(struct.pack("<II", TRACE_DTYPE.itemsize, F_NAMES))
    f.flush()


class TraceWriter:
    """Buffers records and hands them to a sink: a binary file (the header is written
    first) or a callable that takes a record array."""

    __slots__ = ("sink", "_rows", "_limit", "_is_file")

    def __init__(self, sink: Sink, *, buffer: int = 4096) -> None:
        self.sink = sink
        self._rows: list[tuple] = []
        self._limit = buffer
        self._is_file = hasattr(sink, "write")
        if self._is_file:
            sink.write(header())  # type: ignore[union-attr]

    def add(self, time: float, principal: int, count: int, file: int, fblock: int,
            block: int, op: int, flags: int, priority: int) -> None:
        self._rows.append((time, principal, count, file, fblock, block, op, flags,
                           priority, 0))
        if len(self._rows) >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        arr = np.array(self._rows, dtype=TRACE_DTYPE)
        self._rows = []
        if self._is_file:
            self.sink.write(arr.tobytes())  # type: ignore[union-attr]
        else:
            self.sink(arr)  # type: ignore[operator]


class TraceFormatError(ValueError):
    pass


def _open_trace(p: Path) -> tuple[int, int, dict[int, str]]:
    """Where a trace file's records end, how many there are, and the principals' names
    (TraceFormatError if it is not a trace)."""
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise TraceFormatError(f"{p} is not a sluice trace (no {MAGIC.decode()} header)")
        (size, flags) = struct.unpack("<II", head[8:])
        if size != TRACE_DTYPE.itemsize:
            raise TraceFormatError(f"{p}: records of {size} bytes, expected "
                                   f"{TRACE_DTYPE.itemsize}")
        end = os.fstat(f.fileno()).st_size
        names: dict[int, str] = {}
        if flags & F_NAMES:
            f.seek(max(16, end - 16))
            foot = f.read(16)
            length = struct.unpack("<I", foot[8:12])[0] if len(foot) == 16 else 0
            if foot[:8] != NAMES_MAGIC or end - 32 - length < 0:
                raise TraceFormatError(f"{p}: its names of principals are missing or cut "
                                       "short")
            end -= 16 + length
            f.seek(end)
            try:
                obj = json.loads(f.read(length))
                names = {int(k): str(v) for k, v in obj.items()}
            except (ValueError, AttributeError):
                raise TraceFormatError(f"{p}: its names of principals are not a JSON "
                                       "object of ids and names") from None
    body = end - 16
    if body % size:
        raise TraceFormatError(f"{p}: truncated record at the end")
    return end, body // size, names


def read_trace(path: str | os.PathLike[str]) -> np.ndarray:
    """The records of a trace file (TraceFormatError if it is not one)."""
    p = Path(path)
    _end, n, _names = _open_trace(p)
    return np.fromfile(p, dtype=TRACE_DTYPE, count=n, offset=16)


def read_trace_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """The names of the principals a trace file gives (principal id to name; empty for
    a trace without them, such as one of `write_trace`); TraceFormatError if it is not
    a trace."""
    return _open_trace(Path(path))[2]


def write_trace(path: str | os.PathLike[str], records: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(header())
        f.write(np.ascontiguousarray(records, dtype=TRACE_DTYPE).tobytes())


def make_records(rows: list[tuple]) -> np.ndarray:
    """Records from tuples (time, principal, count, file, fblock, block, op, flags,
    priority): for synthetic traces."""
    return np.array([r + (0,) for r in rows], dtype=TRACE_DTYPE)
