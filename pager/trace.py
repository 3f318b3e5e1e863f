"""Access traces: every request the pager serves, as compact numpy records.

A trace file is a 16-byte header (`MAGIC`, then the record size and the flags, each a
little-endian uint32) followed by `TRACE_DTYPE` records, 48 bytes each. A trace the
daemon recorded ends with the names of the principals (`name_principals`, when the
recording ends): its header then says `MAGIC_NAMED` and flag `F_NAMES` (so that a
reader that knows only `MAGIC` refuses it rather than take the names for records), and
after the records come the names as a JSON object (principal id, in decimal, to name;
at most MAX_NAMES_BYTES), then `NAMES_MAGIC`, the JSON's length as a little-endian
uint32 and four reserved bytes. One record is one request (a run of `count` blocks), not one
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
#: the header's magic of a trace whose records are followed by the names trailer
MAGIC_NAMED = b"SLTRACE2"
#: ends the names trailer (see the module's docstring)
NAMES_MAGIC = b"SLNAMES1"
#: header flag: the records are followed by the names trailer (with MAGIC_NAMED only)
F_NAMES = 1
#: the largest names trailer read (the daemon's principals are far fewer)
MAX_NAMES_BYTES = 1 << 20
#: a principal's name as a trace may give it: printable, at most this long
MAX_NAME_CHARS = 255

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
    f.seek(0)
    f.write(MAGIC_NAMED + struct.pack("<II", TRACE_DTYPE.itemsize, F_NAMES))
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


def _open_trace(p: Path) -> tuple[int, dict[int, str]]:
    """How many records a trace file holds, and the principals' names it gives
    (TraceFormatError, one line, if it is not a trace or its names are not sound)."""
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] not in (MAGIC, MAGIC_NAMED):
            raise TraceFormatError(f"{p} is not a sluice trace (no {MAGIC.decode()} header)")
        (size, flags) = struct.unpack("<II", head[8:])
        if size != TRACE_DTYPE.itemsize:
            raise TraceFormatError(f"{p}: records of {size} bytes, expected "
                                   f"{TRACE_DTYPE.itemsize}")
        named = head[:8] == MAGIC_NAMED
        if flags != (F_NAMES if named else 0):
            raise TraceFormatError(f"{p}: unknown header flags {flags:#x}")
        end = os.fstat(f.fileno()).st_size
        names: dict[int, str] = {}
        if named:
            f.seek(max(16, end - 16))
            foot = f.read(16)
            length = struct.unpack("<I", foot[8:12])[0] if len(foot) == 16 else 0
            if foot[:8] != NAMES_MAGIC or end - 32 - length < 0:
                raise TraceFormatError(f"{p}: its names of principals are missing or cut "
                                       "short")
            if length > MAX_NAMES_BYTES:
                raise TraceFormatError(f"{p}: its names of principals take {length} bytes, "
                                       f"more than the {MAX_NAMES_BYTES} a trace may give")
            end -= 16 + length
            f.seek(end)
            names = _names(f.read(length), p)
    body = end - 16
    if body % size:
        raise TraceFormatError(f"{p}: truncated record at the end")
    return body // size, names


def _names(blob: bytes, p: Path) -> dict[int, str]:
    """The names trailer's JSON: principal ids (decimal) to printable names."""
    bad = TraceFormatError(f"{p}: its names of principals are not a JSON object of "
                           f"ids and printable names of at most {MAX_NAME_CHARS} "
                           "characters")
    try:
        obj = json.loads(blob)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise bad from None
    if not isinstance(obj, dict):
        raise bad
    out = {}
    for k, v in obj.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 19) or \
                not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_CHARS or \
                not v.isprintable():
            raise bad
        out[int(k)] = v
    return out


def load_trace(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[int, str]]:
    """The records of a trace file and the principals' names it gives (principal id
    to name; empty for a trace without them, such as one of `write_trace`);
    TraceFormatError if it is not a trace."""
    p = Path(path)
    n, names = _open_trace(p)
    return np.fromfile(p, dtype=TRACE_DTYPE, count=n, offset=16), names


def read_trace(path: str | os.PathLike[str]) -> np.ndarray:
    """The records of a trace file (TraceFormatError if it is not one)."""
    return load_trace(path)[0]


def write_trace(path: str | os.PathLike[str], records: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(header())
        f.write(np.ascontiguousarray(records, dtype=TRACE_DTYPE).tobytes())


def make_records(rows: list[tuple]) -> np.ndarray:
    """Records from tuples (time, principal, count, file, fblock, block, op, flags,
    priority): for synthetic traces."""
    return np.array([r + (0,) for r in rows], dtype=TRACE_DTYPE)
