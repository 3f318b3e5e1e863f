"""A randomized file tester in the style of fsx (Avadis Tevanian's, as in xfstests): one
file on a real default-mode mount, a seeded stream of operations, each checked against
an in-memory model of the file's bytes.

Operations: read, write (also past EOF), truncate up and down, mapped reads and writes
(shared mappings, msync or not), fallocate in every supported mode (0, KEEP_SIZE,
PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ZERO_RANGE|KEEP_SIZE), SEEK_DATA/SEEK_HOLE (what they
call a hole must read as zeros), close and reopen, and O_DIRECT reads and writes. After
every operation the size is checked; after every read the bytes; at the end, the whole
file and `sluice fsck`.

A short seeded run is part of the normal suite; `-m slow` runs long ones. A failure
prints the seed and the last operations, to be kept below as a plain test.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from pathlib import Path

import pytest

from conftest import sluice

pytestmark = pytest.mark.mounted

BS = 4096
MAX_SIZE = 256 * 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Mismatch(AssertionError):
    pass


class Fsx:
    """One file, a model of its bytes, and a seeded stream of checked operations."""

    OPS = ("read", "write", "write_past_eof", "truncate", "map_read", "map_write",
           "falloc", "falloc_keep", "punch", "zero", "zero_keep", "seek", "reopen",
           "direct_read", "direct_write")

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.seed = seed
        self.model = bytearray()
        self.log: list[str] = []
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    # -- helpers -----------------------------------------------------------------------

    def _range(self, limit: int, *, align: int = 1) -> tuple[int, int]:
        off = self.rng.randrange(0, max(min(limit, MAX_SIZE - align), 1)) // align * align
        n = self.rng.randrange(1, max(2, min(64 * 1024, MAX_SIZE - off))) if align == 1 \
            else align * self.rng.randrange(1, 9)
        return off, min(n, MAX_SIZE - off)

    def _data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _check(self, what: str, got: bytes, off: int) -> None:
        want = bytes(self.model[off:off + len(got)])
        if got != want:
            bad = next(i for i in range(len(got)) if got[i:i + 1] != want[i:i + 1])
            raise Mismatch(f"{what}: byte {off + bad} is {got[bad:bad + 1]!r}, the model "
                           f"says {want[bad:bad + 1]!r}")

    def _set_size(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def _zero(self, off: int, end: int) -> None:
        end = min(end, len(self.model))
        if end > off:
            self.model[off:end] = bytes(end - off)

    # -- operations ------------------------------------------------------------------------

    def read(self) -> str:
        off, n = self._range(len(self.model) + BS)
        got = os.pread(self.fd, n, off)
        self._check("read", got, off)
        if len(got) != max(0, min(n, len(self.model) - off)):
            raise Mismatch(f"read returned {len(got)} bytes")
        return f"read {off}+{n}"

    def write(self, past_eof: bool = False) -> str:
        base = len(self.model) if past_eof else 0
        off, n = self._range(len(self.model) + (64 * 1024 if past_eof else BS))
        off = min(MAX_SIZE - 1, base + off if past_eof else off)
        n = max(1, min(n, MAX_SIZE - off))
        data = self._data(n)
        assert os.pwrite(self.fd, data, off) == n
        if off > len(self.model):
            self._set_size(off)
        self.model[off:off + n] = data
        return f"write {off}+{n}"

    def write_past_eof(self) -> str:
        return self.write(past_eof=True)

    def truncate(self) -> str:
        size = self.rng.randrange(0, MAX_SIZE)
        os.ftruncate(self.fd, size)
        self._set_size(size)
        return f"truncate {size}"

    def _map(self) -> mmap.mmap | None:
        if not self.model:
            return None
        return mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED)

    def map_read(self) -> str:
        m = self._map()
        if m is None:
            return "map_read (empty)"
        try:
            off = self.rng.randrange(len(self.model))
            n = self.rng.randrange(1, len(self.model) - off + 1)
            self._check("mapped read", m[off:off + n], off)
        finally:
            m.close()
        return f"map_read {off}+{n}"

    def map_write(self) -> str:
        m = self._map()
        if m is None:
            return "map_write (empty)"
        sync = self.rng.random() < 0.5
        try:
            off = self.rng.randrange(len(self.model))
            n = self.rng.randrange(1, min(32 * 1024, len(self.model) - off) + 1)
            data = self._data(n)
            m[off:off + n] = data
            self.model[off:off + n] = data
            if sync:
                m.flush()
        finally:
            m.close()
        return f"map_write {off}+{n}{' msync' if sync else ''}"

    def _falloc(self, mode: int, name: str) -> str:
        off, n = self._range(len(self.model) + 16 * 1024)
        _fallocate(self.fd, mode, off, n)
        end = off + n
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self._zero(off, end)
        if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.model):
            self._set_size(end)
        return f"{name} {off}+{n}"

    def falloc(self) -> str:
        return self._falloc(0, "falloc")

    def falloc_keep(self) -> str:
        return self._falloc(FALLOC_FL_KEEP_SIZE, "falloc_keep")

    def punch(self) -> str:
        return self._falloc(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punch")

    def zero(self) -> str:
        return self._falloc(FALLOC_FL_ZERO_RANGE, "zero")

    def zero_keep(self) -> str:
        return self._falloc(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "zero_keep")

    def seek(self) -> str:
        size = len(self.model)
        if not size:
            return "seek (empty)"
        off = self.rng.randrange(size)
        hole = os.lseek(self.fd, off, os.SEEK_HOLE)
        if not off <= hole <= size:
            raise Mismatch(f"SEEK_HOLE from {off} gave {hole} (size {size})")
        if hole < size and self.model[hole] != 0:
            raise Mismatch(f"SEEK_HOLE from {off} gave {hole}, which holds data")
        try:
            data = os.lseek(self.fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        if any(self.model[off:data]):
            raise Mismatch(f"SEEK_DATA from {off} gave {data}, skipping data")
        return f"seek {off}: hole {hole} data {data}"

    def reopen(self) -> str:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        return "reopen"

    def _direct_buf(self, n: int) -> mmap.mmap:
        return mmap.mmap(-1, n)  # page aligned, as O_DIRECT wants

    def direct_read(self) -> str:
        off, n = self._range(len(self.model) + BS, align=BS)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = self._direct_buf(n)
            got = os.preadv(fd, [buf], off)
            self._check("O_DIRECT read", buf[:got], off)
            if got != max(0, min(n, len(self.model) - off)):
                raise Mismatch(f"O_DIRECT read returned {got} bytes")
            buf.close()
        finally:
            os.close(fd)
        return f"direct_read {off}+{n}"

    def direct_write(self) -> str:
        off, n = self._range(len(self.model) + BS, align=BS)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = self._direct_buf(n)
            data = self._data(n)
            buf[:] = data
            assert os.pwritev(fd, [buf], off) == n
            buf.close()
        finally:
            os.close(fd)
        if off > len(self.model):
            self._set_size(off)
        self.model[off:off + n] = data
        return f"direct_write {off}+{n}"

    # -- the run ---------------------------------------------------------------------------------

    def step(self) -> None:
        op = self.rng.choice(self.OPS)
        self.log.append(f"{op} (failed)")
        self.log[-1] = getattr(self, op)()
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Mismatch(f"size is {size}, the model says {len(self.model)}")

    def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                self.step()
            whole = self.path.read_bytes()
            self._check("final read", whole, 0)
            if len(whole) != len(self.model):
                raise Mismatch(f"final size {len(whole)}, model {len(self.model)}")
        except (Mismatch, OSError) as exc:
            tail = "\n  ".join(self.log[-25:])
            raise AssertionError(f"fsx seed {self.seed}, after {len(self.log)} operations: "
                                 f"{exc}\nlast operations:\n  {tail}") from exc
        finally:
            os.close(self.fd)


def test_fsx_short(mnt: Path, volume: Path) -> None:
    for seed in (1, 2, 3):
        Fsx(mnt / f"fsx{seed}", seed).run(500)


def test_fsx_with_parts_of_two_extents(volume: Path, mount_factory, monkeypatch) -> None:
    """The same operations with the daemon's parts cut at two extents
    (SLUICE_EXTENTS_PER_STEP=2): every truncate, punch, zero range and allocation over
    more than two extents goes through its parts, checked against the model."""
    monkeypatch.setenv("SLUICE_EXTENTS_PER_STEP", "2")
    m = mount_factory(volume)
    for seed in (7, 8, 9):
        Fsx(m.path / f"fsx{seed}", seed).run(500)
    m.stop()
    assert "lab setting SLUICE_EXTENTS_PER_STEP: 2" in m.log.read_text()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 106))
def test_fsx_long(seed: int, volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    Fsx(m.path / "fsx", seed).run(4000)
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# -- cases the randomized runs found, kept as plain tests ------------------------------------
#
# None so far: seeds 1-3 (500 operations each) and 100-105 (4,000 each) found no
# difference from the model. The one failure on the way was the tester's own (a range
# past its maximum size, fallocate's EINVAL for a zero length); add a plain test here
# for the next real one, with the operations the failure message lists.
