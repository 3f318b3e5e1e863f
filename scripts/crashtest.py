#!/usr/bin/env python3
"""Crash harness: SIGKILL the sluice daemon (`--model process`, the default), or take
power-loss states from a recording of its device and database (`--model power`), under
a seeded mixed workload; mount what is left and check it against a log of what was
acknowledged.

Crash model: process crash — SIGKILL of the daemon; the host page cache survives (so
whatever the daemon wrote to `device.img`, `checksums` and the SQLite files before it
died is still there; only what it held in its own memory is gone).

A round:

1. `sluice mkfs` a fresh volume, `sluice mount --foreground` it (this process owns the
   daemon's PID);
2. start the workload in its own process (`crashtest.py worker`, seeded): creates,
   writes at random offsets, appends, fsync of files and of directories, renames (over
   existing files, across directories), replace-by-rename (write a temporary, fsync,
   rename over the target, fsync the directory), truncates up and down (to sizes that
   are not block multiples too), unlink, link, mkdir/rmdir, set/remove xattrs,
   direct-client writes (kernelshim.client.Client) with and without fsync, and a
   direct client killed mid-write (a forked child that SIGKILLs itself with a write
   request on the wire). Each operation is logged to this process on a pipe before it
   starts (`B`) and after it returned (`A`) or failed (`E`). Every byte written is a
   recognisable pattern: 16-byte cells `OOOOOO@AAAAAAAA\\n` naming the operation (hex
   id) and the file offset of the cell, so stale or foreign bytes can be named;
3. the seeded crash point (`CrashPoint`) decides when this process sends SIGKILL to
   the daemon: after N acknowledged operations, or when an operation of a chosen kind
   begins or is acknowledged after that, plus a short busy-wait of a seeded number of
   microseconds — never a random sleep; the workload keeps running meanwhile, so the
   kill lands between or inside operations;
4. `sluice mount` again (it cleans the dead mount), then `Oracle.check` walks the
   recovered tree and compares it with the log; `Oracle.probe_growth` grows every file
   and checks the new range reads as zeros; `sluice umount`; `sluice fsck
   --verify-data` must be clean without repairs.

The oracle (`Oracle`) is a separate class that only needs the log and a directory tree
to look at: a power-loss model can materialise device states, mount them, and run the
same checks. Its rules:

- a file fsync'd and not changed since has exactly its fsync'd size, bytes and xattrs;
- a file changed after its last fsync has a size that is its fsync'd size or one a
  later acknowledged (or the in-flight) operation left, and every byte holds its
  fsync'd value, or a value a later write put there (acknowledged, in flight, or from
  a killed direct client), or zero where a later size change put zeros — judged
  against a prefix of the later operations consistent with the size found ("cut"), so
  a byte zeroed by a truncate whose size change was lost is a violation;
- names: a name made durable by a directory fsync is bound to what it was bound to at
  that fsync or to what a later operation bound it to (absent included only if a later
  operation removed it); replace-by-rename thus leaves the old or the new target,
  never neither; names never made durable may be there or not; nothing else may be
  there; a file's link count equals the names found for it;
- no read gives an error (EIO); growing a file shows zeros past its old end.

Power-loss model (`--model power`, `PowerRun`): power loss — writes after the last
barrier kept or dropped per device block / checksum page; WAL cut at a commit boundary.
Each recorded run: a fresh volume, `sluice mount --foreground` with SLUICE_RECORD_DIR
set (blockdev/recording.py logs every write, discard and barrier of `device.img` and
`checksums`; fs/metadata.py's MetaRecorder logs each commit and WAL fsync with the
device log's size then), the same seeded workload, whose every record also carries the
device log's size ("at"), and SIGKILL of the daemon after a seeded number of
acknowledged operations; the WAL it left (no checkpoint ran while recording) holds
every commit. Then for each of `--states` seeded states: a crash point in the device
log (right after a barrier, just before one completed, between a commit and its WAL
fsync, right after an acknowledgement, or anywhere), each piece written after the last
barrier kept or dropped, and a WAL cut W with last durable <= W <= last commit before
that point (`wal_cuts`); a copy of the volume made of it (`build_state`) is mounted,
judged by the same Oracle with the operations acknowledged before the crash point
(`records_before`: an fsync acknowledged before it is durable, everything after it may
be lost), unmounted, and `fsck --verify-data` must be clean (`check_state`).

The extended workload (`--extended`, both models) adds fallocate (mode 0, KEEP_SIZE,
PUNCH_HOLE, ZERO_RANGE, each with its own oracle step: zeros per piece, sizes kept or
grown), shared-mmap writes with and without msync(MS_SYNC) (which is an fdatasync: the
operation is then acknowledged as a write and an fsync), O_TMPFILE files written,
sometimes fsync'd and given a name with linkat (each step its own operation: a crash
before the linkat leaves an orphan, never a name), renameat2(RENAME_EXCHANGE) of two
files, and `sluice hint --discardable` / `--no-discardable` of existing files (a file
may come back emptied and marked while it was discardable at its last fsync or since).
With write-back and a small pool (`--writeback --cache-size 256K`) the pager may drop a
discardable file while the workload runs: after each operation the workload reads the
pager's count of discardable frames let go, and when it moved logs a "D" record with
the sizes of the discardable files then; the oracle follows each such file as it is
and as a drop there would have left it (empty, then the later steps), and accepts
either — never half of the old contents.

Run as root:

    .venv/bin/python scripts/crashtest.py --rounds 100 --seed 1 --json out.json
    .venv/bin/python scripts/crashtest.py --model power --rounds 50 --states 10 --seed 1
    .venv/bin/python scripts/crashtest.py --rounds 100 --seed 30000 --extended \
        --writeback --cache-size 256K

Round i uses seed S+i: `--rounds 1 --seed S+i --keep` reruns one round (the crash
point is the same; where exactly inside an operation the kill lands depends on timing)
and keeps its volume, logs and workload record under --workdir.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import numpy as np

from blockdev import Recording
from blockdev.recording import ATTACH, BARRIER, WRITE

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]
#: extra `sluice mount` arguments of every mount of a campaign (--mount-args, e.g.
#: "--writeback" to run the campaign with write-back caching)
MOUNT_ARGS: list[str] = []
#: the extended workload in every round of a campaign (--extended; Round(extended=))
EXTENDED = False
#: directories made discardable (user.sluice.discardable=1) at setup: files created in
#: them are a cache by contract (crash rule 4) and may come back empty and marked
#: user.sluice.discarded, never partial
DISCARDABLE_DIRS = ("cache",)
DISCARDED_XATTR = "user.sluice.discarded"
MODEL = "process crash: SIGKILL of the daemon; the host page cache survives"

#: bytes per pattern cell: "%06x@%08x\n" % (op id, file offset of the cell)
CELL = 16
_CELL_RE = re.compile(rb"([0-9a-f]{6})@([0-9a-f]{8})\n")
#: the volume's block size (the harness makes its volumes with the default)
BLOCK = 4096
#: xattrs the workload sets (the oracle judges every user.ct.* name it finds)
XATTR_PREFIX = "user.ct."
#: errnos a file operation gets once the daemon is gone
DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.ECONNRESET, errno.EPIPE}


class HarnessError(Exception):
    """The harness itself could not run a round (not a finding about sluice)."""


# -- byte patterns ----------------------------------------------------------------------

def pattern(op: int, off: int, n: int) -> bytes:
    """The `n` bytes operation `op` writes at file offset `off`."""
    if n <= 0:
        return b""
    a0 = off - off % CELL
    cells = b"".join(b"%06x@%08x\n" % (op & 0xFFFFFF, a & 0xFFFFFFFF)
                     for a in range(a0, off + n, CELL))
    s = off - a0
    return cells[s:s + n]


def _pattern_array(op: int, off: int, n: int) -> np.ndarray:
    return np.frombuffer(pattern(op, off, n), dtype=np.uint8)


def describe_bytes(data: bytes, off: int) -> str:
    """Name what `data` (found at file offset `off`) is: zeros, cells of which
    operations (and whether they sit at the offset they were written for), or other."""
    if not data.strip(b"\0"):
        return f"{len(data)} zero bytes"
    ops: dict[int, int] = {}
    misplaced = 0
    a0 = off - off % CELL
    for a in range(a0, off + len(data), CELL):
        lo = max(a, off) - off
        chunk = data[lo:lo + CELL]
        full = data[a - off:a - off + CELL] if a >= off else b""
        m = _CELL_RE.fullmatch(full) if len(full) == CELL else None
        if m:
            op = int(m.group(1), 16)
            ops[op] = ops.get(op, 0) + 1
            if int(m.group(2), 16) != a:
                misplaced += 1
        elif len(full) == CELL and chunk.strip(b"\0"):
            ops.setdefault(-1, 0)
            ops[-1] += 1
    parts = [f"op {o} ({k} cells)" if o >= 0 else f"{k} cells of unknown bytes"
             for o, k in sorted(ops.items())]
    if misplaced:
        parts.append(f"{misplaced} cells written for another offset")
    return ", ".join(parts) or "partial cells"


# -- the crash point ----------------------------------------------------------------------

#: operation kinds a crash point may wait for
TRIGGER_KINDS = ("truncate", "append", "write", "dwrite", "dkill", "rename", "fsync",
                 "unlink", "setx", "create", "link", "fsyncdir")
#: and those of the extended workload (`--extended`)
EXTENDED_TRIGGER_KINDS = (*TRIGGER_KINDS, "falloc", "falloc", "mmap", "mmap", "tmpfile",
                          "exchange", "hint")


@dataclasses.dataclass(frozen=True, slots=True)
class CrashPoint:
    """When the driver SIGKILLs the daemon: once `after_acks` operations were
    acknowledged, at the next event `trigger` names ("ack": at once; "begin:K": when an
    operation of kind K begins; "ack:K": when one is acknowledged), then after busy-
    waiting `spin_us` microseconds. Chosen from the round's seed."""

    after_acks: int
    trigger: str
    spin_us: int

    @classmethod
    def from_rng(cls, rng: random.Random, nops: int, setup_ops: int,
                 kinds: tuple[str, ...] = TRIGGER_KINDS) -> CrashPoint:
        after = rng.randint(setup_ops, max(setup_ops, nops - 5))
        r = rng.random()
        if r < 0.4:
            trigger = "ack"
        elif r < 0.7:
            trigger = "begin:" + rng.choice(kinds)
        else:
            trigger = "ack:" + rng.choice(kinds)
        return cls(after, trigger, rng.choice((0, 0, 0, 30, 100, 300, 1000, 3000)))

    def fires(self, rec: dict[str, Any], acks: int, kinds: dict[int, str]) -> bool:
        if acks < self.after_acks:
            return False
        if self.trigger == "ack":
            return True
        when, kind = self.trigger.split(":")
        if when == "begin":
            return rec.get("k") == "B" and rec.get("op") == kind
        return rec.get("k") == "A" and kinds.get(rec.get("id", -1)) == kind

    def __str__(self) -> str:
        return f"after {self.after_acks} acks, {self.trigger}, +{self.spin_us}us"


# -- the workload (runs in its own process) --------------------------------------------------

def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _split(path: str) -> tuple[str, str]:
    d, _, name = path.rpartition("/")
    return d, name


FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10
RENAME_EXCHANGE = 2
_libc: Any = None


def _libc_fn() -> Any:
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                    ctypes.c_int64]
        _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_uint]
        _libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_char_p, ctypes.c_int]
    return _libc


def _fallocate(fd: int, mode: int, off: int, n: int) -> None:
    import ctypes
    if _libc_fn().fallocate(fd, mode, off, n) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode {mode:#x}, {off}, {n}): {os.strerror(e)}")


def _linkat_fd(fd: int, dst: str) -> None:
    """linkat(AT_FDCWD, "/proc/self/fd/FD", AT_FDCWD, dst, AT_SYMLINK_FOLLOW): give an
    O_TMPFILE file a name (os.link calls link(2), which would link the /proc symlink)."""
    import ctypes
    AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400
    if _libc_fn().linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD,
                         os.fsencode(dst), AT_SYMLINK_FOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"linkat(fd {fd}, {dst}): {os.strerror(e)}")


def _renameat2(a: str, b: str, flags: int) -> None:
    import ctypes
    AT_FDCWD = -100
    if _libc_fn().renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"renameat2({a}, {b}, {flags}): {os.strerror(e)}")


class DaemonGone(Exception):
    """A file operation failed because the daemon is gone: the workload stops."""


class Workload:
    """The seeded mixed workload. Logs every operation as JSON lines on `out`:
    {"k": "B", "id", "op", args...} before it starts, {"k": "A", "id", results...} after
    it returned, {"k": "E", "id", "errno", "msg"} if it failed (then the workload stops:
    its model of the tree would no longer be exact)."""

    FIXED_DIRS = ("d0", "d1", "d2", *DISCARDABLE_DIRS)
    TARGETS = ("s0", "d1/s1")

    def __init__(self, root: str, seed: int, nops: int, out: Any, *,
                 direct: bool = True, record_log: str | None = None,
                 extended: bool = False, track_drops: bool = False) -> None:
        self.root = root
        #: the extended workload (`--extended`): fallocate (mode 0, KEEP_SIZE,
        #: PUNCH_HOLE, ZERO_RANGE), shared-mmap writes (+ msync), O_TMPFILE + linkat,
        #: RENAME_EXCHANGE and discardable hints on existing files, and after each
        #: operation a look at the pager's discard counter (a "D" record: a discardable
        #: file may have been dropped while mounted)
        self.extended = extended
        #: look for drops ("D" records) in the base workload too (a mount with
        #: write-back: only then does the pager drop discardable files)
        self.track_drops = track_drops
        self.disc: dict[int, bool] = {}         # ino -> discardable now
        self._pager_discarded: int | None = None
        #: the power-loss recording's device log: each record then carries its size
        #: ("at"), so a crash point in that log tells which operations came before it
        self.record_log = record_log
        self.direct = direct  # False: no direct-client operations (a plain directory)
        self.rng = random.Random(seed * 7919 + 17)
        self.nops = nops
        self.out = out
        self.next_id = 1
        self.counter = 0
        self.dirs: dict[str, int] = {}          # relative path -> ino ("" is the root)
        self.names: dict[str, int] = {}         # relative path of a file name -> ino
        self.sizes: dict[int, int] = {}         # ino -> size
        self.xattrs: dict[int, set[str]] = {}   # ino -> xattr names set
        self.churn: list[str] = []              # empty directories made by mkdir
        self.client: Any = None
        self.bs = 4096
        self.tmpfiles: dict[int, tuple[int, str]] = {}  # O_TMPFILE ino -> (fd, dir)

    # logging and running one operation

    def _emit(self, rec: dict[str, Any]) -> None:
        rec["t"] = round(time.monotonic(), 6)
        if self.record_log is not None:
            # Taken before a "B" is written and after the operation returned for an "A":
            # everything the operation made the daemon log lies between the two sizes.
            try:
                rec["at"] = os.stat(self.record_log).st_size
            except FileNotFoundError:
                rec["at"] = 0
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.out.flush()

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def op(self, kind: str, fn: Callable[[int], dict[str, Any] | None], **args: Any
           ) -> dict[str, Any]:
        oid = self.next_id
        self.next_id += 1
        self._emit({"k": "B", "id": oid, "op": kind, **args})
        try:
            res = fn(oid) or {}
        except OSError as exc:
            self._emit({"k": "E", "id": oid, "errno": exc.errno or 0,
                        "msg": f"{type(exc).__name__}: {exc}"})
            raise DaemonGone(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - typed client errors: stop, logged
            self._emit({"k": "E", "id": oid, "errno": getattr(exc, "errno", 0) or 0,
                        "msg": f"{type(exc).__name__}: {exc}"})
            raise DaemonGone(str(exc)) from None
        self._emit({"k": "A", "id": oid, **res})
        if self.extended or self.track_drops:
            self._check_drops(oid)
        return res

    def _check_drops(self, oid: int) -> None:
        """The pager's count of discardable frames it let go (clean ones too): when it
        moved since the last look, a discardable file may have been dropped while
        mounted — emptied, its later writes landing in an empty file — during or
        before operation `oid`. Logged as a "D" record with the sizes the discardable
        files have now; the workload goes on from those sizes."""
        if not self.direct or not (any(self.disc.values()) or
                                   (self.extended and oid % 16 == 0)):
            return
        try:
            pg = self._client().call("stats")["pager"]
            n = int(pg["discarded"])
        except Exception:  # noqa: BLE001 - the daemon is gone: the next operation says so
            return
        if oid % 16 == 0:  # how much reclaim and write-back the pool saw so far
            self._emit({"k": "S", "id": oid, **{k: pg.get(k) for k in (
                "evictions", "discarded", "writeback_bytes", "dirty", "frames")}})
        if self._pager_discarded is not None and n != self._pager_discarded:
            sizes: dict[str, int] = {}
            for path, ino in sorted(self.names.items()):
                if self.disc.get(ino) and str(ino) not in sizes:
                    try:
                        sizes[str(ino)] = os.stat(self._p(path)).st_size
                    except OSError:
                        return
                    self.sizes[ino] = sizes[str(ino)]
            for ino, (fd, _n) in self.tmpfiles.items():
                if self.disc.get(ino):
                    sizes[str(ino)] = os.fstat(fd).st_size
                    self.sizes[ino] = sizes[str(ino)]
            self._emit({"k": "D", "id": oid, "sizes": sizes})
        self._pager_discarded = n

    # choices

    def _files(self) -> list[str]:
        return sorted(p for p in self.names if p not in self.TARGETS)

    def _pick_dir(self) -> str:
        if self.extended:  # more discardable files: cache/ twice as likely
            return self.rng.choice(["", *self.FIXED_DIRS, *DISCARDABLE_DIRS])
        return self.rng.choice(["", *self.FIXED_DIRS])

    def _new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(1, 4096)
        if r < 0.85:
            return self.rng.randint(4097, 24000)
        return self.rng.randint(100_000, 180_000)  # several FUSE requests

    # operations

    def run(self) -> None:
        self._emit({"k": "hello", "root_ino": os.stat(self.root).st_ino, "pid": os.getpid()})
        try:
            self.setup()
            for _ in range(self.nops):
                self.step()
        except DaemonGone:
            return
        finally:
            if self.client is not None:
                try:
                    self.client.close()
                except OSError:
                    pass

    def setup(self) -> None:
        self.dirs[""] = os.stat(self.root).st_ino
        for d in self.FIXED_DIRS:
            self.do_mkdir(d)
            if d in DISCARDABLE_DIRS:
                # Not a logged operation: user.sluice.* xattrs are the volume's, not the
                # oracle's; files created here inherit it (a crash before it was
                # committed leaves them ordinary files, judged by the stricter rules).
                os.setxattr(self._p(d), "user.sluice.discardable", b"1")
        for t in self.TARGETS:
            ino = self.do_create(t)
            self.do_write(t, ino, 0, self.rng.randint(3000, 9000))
            self.do_fsync(t, ino)
        self.do_fsyncdir("")
        self.do_fsyncdir("d1")

    SETUP_OPS = len(FIXED_DIRS) + 3 * 2 + 2

    def step(self) -> None:
        rng = self.rng
        files = self._files()
        kinds = ["create", "write", "append", "fsync", "fsyncdir", "rename", "replace",
                 "truncate", "unlink", "link", "mkdir", "rmdir", "setx", "rmx", "dwrite",
                 "dkill"]
        weights = [8, 16, 10, 9, 5, 6, 3, 11, 4, 4, 3, 3, 5, 2, 6, 2]
        if self.extended:
            kinds += ["falloc", "mmap", "tmpfile", "exchange", "hint"]
            weights += [9, 6, 3, 3, 3]
        kind = rng.choices(kinds, weights)[0]
        if not self.direct and kind in ("dwrite", "dkill"):
            kind = "write"
        if not files or (kind == "create" and len(self.names) > 40):
            kind = "create" if len(self.names) <= 40 else "unlink"
        if kind == "create":
            self.do_create(_join(self._pick_dir(), self._new_name("f")))
        elif kind == "tmpfile":
            self.do_tmpfile(self._pick_dir())
        elif kind in ("falloc", "mmap", "hint"):
            path = rng.choice(files)
            ino = self.names[path]
            size = self.sizes[ino]
            if kind == "falloc":
                mode = rng.choice((0, FALLOC_KEEP_SIZE, FALLOC_KEEP_SIZE,
                                   FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                                   FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE,
                                   FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE))
                off = rng.randint(0, size + 8192)
                if rng.random() < 0.4:
                    off -= off % 4096
                self.do_fallocate(path, ino, mode, off, rng.randint(1, 40000))
            elif kind == "mmap" and size and not self.disc.get(ino):
                # (not a discardable file: the pager may drop it under the mapping, and
                # a store past its new end is SIGBUS)
                off = rng.randint(0, size - 1)
                self.do_mmap(path, ino, off, rng.randint(1, min(size - off, 20000)),
                             msync=rng.random() < 0.6)
            elif kind == "hint":
                self.do_hint(path, ino, not self.disc.get(ino, False)
                             if rng.random() < 0.7 else True)
        elif kind == "exchange":
            a = rng.choice(files)
            others = [p for p in files if self.names[p] != self.names[a]]
            if others:
                self.do_exchange(a, rng.choice(others))
        elif kind in ("write", "append", "dwrite", "truncate", "fsync", "setx", "rmx",
                      "dkill"):
            path = rng.choice(files + list(self.TARGETS) if kind in ("fsync", "setx")
                              else files)
            ino = self.names[path]
            size = self.sizes[ino]
            if kind == "write":
                self.do_write(path, ino, rng.randint(0, size + 16384), self._length())
            elif kind == "append":
                self.do_append(path, ino, self._length())
            elif kind == "dwrite":
                self.do_dwrite(path, ino, rng.randint(0, size + 16384), self._length(),
                               fsync=rng.random() < 0.35)
            elif kind == "truncate":
                if size and rng.random() < 0.6:
                    new = rng.randint(0, size - 1)
                else:
                    new = size + rng.randint(1, 20000)
                self.do_truncate(path, ino, new)
            elif kind == "fsync":
                self.do_fsync(path, ino)
            elif kind == "setx":
                name = XATTR_PREFIX + rng.choice("abc")
                self.do_setx(path, ino, name, (b"v%d-" % self.next_id) * rng.randint(1, 12))
            elif kind == "rmx":
                have = sorted(self.xattrs.get(ino, ()))
                if have:
                    self.do_rmx(path, ino, rng.choice(have))
            else:
                self.do_dkill(path, ino)
        elif kind == "fsyncdir":
            self.do_fsyncdir(rng.choice(sorted(self.dirs)))
        elif kind == "rename":
            src = rng.choice(files)
            d = self._pick_dir()
            over = [p for p in files if _split(p)[0] == d and self.names[p] != self.names[src]]
            dst = rng.choice(over) if over and rng.random() < 0.5 else \
                _join(d, self._new_name("f"))
            self.do_rename(src, dst)
        elif kind == "replace":
            self.do_replace(rng.choice(self.TARGETS))
        elif kind == "unlink":
            self.do_unlink(rng.choice(files))
        elif kind == "link":
            self.do_link(rng.choice(files), _join(self._pick_dir(), self._new_name("l")))
        elif kind == "mkdir":
            self.do_mkdir(_join(self._pick_dir(), self._new_name("e")), churn=True)
        elif kind == "rmdir":
            if self.churn:
                self.do_rmdir(rng.choice(sorted(self.churn)))

    def do_mkdir(self, path: str, churn: bool = False) -> None:
        def fn(_oid: int) -> dict[str, Any]:
            os.mkdir(self._p(path), 0o755)
            return {"ino": os.stat(self._p(path)).st_ino}
        res = self.op("mkdir", fn, path=path)
        self.dirs[path] = res["ino"]
        if churn:
            self.churn.append(path)

    def do_rmdir(self, path: str) -> None:
        self.op("rmdir", lambda _o: os.rmdir(self._p(path)), path=path, dino=self.dirs[path])
        del self.dirs[path]
        self.churn.remove(path)

    def do_create(self, path: str) -> int:
        def fn(_oid: int) -> dict[str, Any]:
            fd = os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                return {"ino": os.fstat(fd).st_ino}
            finally:
                os.close(fd)
        ino = int(self.op("create", fn, path=path)["ino"])
        self.names[path] = ino
        self.sizes[ino] = 0
        self.disc[ino] = _split(path)[0] in DISCARDABLE_DIRS
        self.xattrs[ino] = set()  # a plain directory's file system may reuse inode numbers
        return ino

    def _pwrite_all(self, fd: int, data: bytes, off: int) -> None:
        n = os.pwrite(fd, data, off)
        if n != len(data):
            raise OSError(errno.EIO, f"short write: {n} of {len(data)} bytes")

    def do_write(self, path: str, ino: int, off: int, n: int) -> None:
        def fn(oid: int) -> None:
            fd = os.open(self._p(path), os.O_WRONLY)
            try:
                self._pwrite_all(fd, pattern(oid, off, n), off)
            finally:
                os.close(fd)
        self.op("write", fn, path=path, ino=ino, off=off, n=n)
        self.sizes[ino] = max(self.sizes[ino], off + n)

    def do_append(self, path: str, ino: int, n: int) -> None:
        off = self.sizes[ino]

        def fn(oid: int) -> None:
            fd = os.open(self._p(path), os.O_WRONLY | os.O_APPEND)
            try:
                w = os.write(fd, pattern(oid, off, n))
                if w != n:
                    raise OSError(errno.EIO, f"short append: {w} of {n}")
            finally:
                os.close(fd)
        self.op("append", fn, path=path, ino=ino, off=off, n=n)
        self.sizes[ino] = off + n

    def do_truncate(self, path: str, ino: int, size: int) -> None:
        self.op("truncate", lambda _o: os.truncate(self._p(path), size), path=path, ino=ino,
                size=size)
        self.sizes[ino] = size

    def do_fsync(self, path: str, ino: int) -> None:
        def fn(_oid: int) -> None:
            fd = os.open(self._p(path), os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.op("fsync", fn, path=path, ino=ino, via="fuse")

    def do_fsyncdir(self, path: str) -> None:
        def fn(_oid: int) -> None:
            fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.op("fsyncdir", fn, path=path, dino=self.dirs[path])

    def do_rename(self, src: str, dst: str) -> None:
        ino = self.names[src]
        old = self.names.get(dst)
        self.op("rename", lambda _o: os.rename(self._p(src), self._p(dst)), src=src, dst=dst,
                ino=ino, over=old)
        del self.names[src]
        self.names[dst] = ino

    def do_link(self, src: str, dst: str) -> None:
        ino = self.names[src]
        self.op("link", lambda _o: os.link(self._p(src), self._p(dst)), src=src, dst=dst,
                ino=ino)
        self.names[dst] = ino

    def do_unlink(self, path: str) -> None:
        self.op("unlink", lambda _o: os.unlink(self._p(path)), path=path, ino=self.names[path])
        del self.names[path]

    def do_setx(self, path: str, ino: int, name: str, value: bytes) -> None:
        self.op("setx", lambda _o: os.setxattr(self._p(path), name, value), path=path, ino=ino,
                name=name, value=value.hex())
        self.xattrs.setdefault(ino, set()).add(name)

    def do_rmx(self, path: str, ino: int, name: str) -> None:
        self.op("rmx", lambda _o: os.removexattr(self._p(path), name), path=path, ino=ino,
                name=name)
        self.xattrs[ino].discard(name)

    def do_replace(self, target: str) -> None:
        """Replace-by-rename, each step its own operation (a crash may land between)."""
        d, _ = _split(target)
        tmp = _join(d, self._new_name("t") + ".tmp")
        ino = self.do_create(tmp)
        self.do_write(tmp, ino, 0, self.rng.randint(1000, 12000))
        self.do_fsync(tmp, ino)
        old = self.names[target]
        self.op("rename", lambda _o: os.rename(self._p(tmp), self._p(target)), src=tmp,
                dst=target, ino=ino, over=old, replace=True)
        del self.names[tmp]
        self.names[target] = ino
        self.do_fsyncdir(d)

    # the extended workload

    def do_fallocate(self, path: str, ino: int, mode: int, off: int, n: int) -> None:
        def fn(_oid: int) -> None:
            fd = os.open(self._p(path), os.O_WRONLY)
            try:
                _fallocate(fd, mode, off, n)
            finally:
                os.close(fd)
        self.op("falloc", fn, path=path, ino=ino, mode=mode, off=off, n=n)
        if not mode & FALLOC_KEEP_SIZE:
            self.sizes[ino] = max(self.sizes[ino], off + n)

    def do_mmap(self, path: str, ino: int, off: int, n: int, *, msync: bool) -> None:
        """A shared mapping written and unmapped; with `msync`, msync(MS_SYNC) first (an
        fdatasync of the file: the operation is then a write and an fsync). Without it
        the kernel writes the dirty pages back at the latest when the file is closed."""
        import mmap

        def fn(oid: int) -> None:
            # In a child: a page fault the daemon cannot answer (killed meanwhile) is
            # SIGBUS, which would end the workload without its last records.
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    fd = os.open(self._p(path), os.O_RDWR)
                    a0 = off - off % mmap.ALLOCATIONGRANULARITY
                    m = mmap.mmap(fd, off + n - a0, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=a0)
                    m[off - a0:off - a0 + n] = pattern(oid, off, n)
                    if msync:
                        m.flush()
                    m.close()
                    os.close(fd)
                except OSError as exc:
                    code = min(exc.errno or 1, 200)
                except BaseException:  # noqa: BLE001 - reported through the exit code
                    code = 201
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return
            try:
                os.statvfs(self.root)
            except OSError as exc:
                raise OSError(exc.errno, f"mmap write: the daemon is gone ({exc})") from None
            what = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                    else f"errno {os.WEXITSTATUS(status)}")
            raise OSError(errno.EIO, f"mmap write failed with the mount alive: {what}")
        self.op("mmap", fn, path=path, ino=ino, off=off, n=n, msync=msync)

    def do_tmpfile(self, d: str) -> None:
        """open(O_TMPFILE), write it, sometimes fsync it, linkat() it to a new name:
        each step its own operation."""
        def fn(_oid: int) -> dict[str, Any]:
            fd = os.open(self._p(d), os.O_TMPFILE | os.O_RDWR, 0o644)
            ino = os.fstat(fd).st_ino
            self.tmpfiles[ino] = (fd, d)
            return {"ino": ino}
        ino = int(self.op("tmpfile", fn, path=d)["ino"])
        fd = self.tmpfiles[ino][0]
        self.sizes[ino] = 0
        self.xattrs[ino] = set()
        self.disc[ino] = d in DISCARDABLE_DIRS
        try:
            n = self._length()

            def wr(oid: int) -> None:
                self._pwrite_all(fd, pattern(oid, 0, n), 0)
            self.op("write", wr, path=f"<tmpfile {ino}>", ino=ino, off=0, n=n)
            self.sizes[ino] = n
            if self.rng.random() < 0.6:
                self.op("fsync", lambda _o: os.fsync(fd), path=f"<tmpfile {ino}>", ino=ino,
                        via="tmpfile")
            dst = _join(d, self._new_name("o"))
            self.op("link", lambda _o: _linkat_fd(fd, self._p(dst)),
                    src=f"<tmpfile {ino}>", dst=dst, ino=ino)
            self.names[dst] = ino
        finally:
            del self.tmpfiles[ino]
            os.close(fd)

    def do_exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE) of two names of files: one metadata step."""
        ia, ib = self.names[a], self.names[b]
        self.op("exchange", lambda _o: _renameat2(self._p(a), self._p(b), RENAME_EXCHANGE),
                src=a, dst=b, ino=ia, other=ib)
        self.names[a], self.names[b] = ib, ia

    def do_hint(self, path: str, ino: int, on: bool) -> None:
        """`sluice hint --discardable` / `--no-discardable` of an existing file (the
        xattr it sets)."""
        self.op("hint", lambda _o: os.setxattr(self._p(path), "user.sluice.discardable",
                                               b"1" if on else b"0"),
                path=path, ino=ino, on=on)
        self.disc[ino] = on

    def _client(self) -> Any:
        if self.client is None:
            from kernelshim.client import Client
            try:
                self.client = Client.connect(self.root, shm_size=1 << 20)
            except Exception as exc:  # noqa: BLE001 - the daemon was killed meanwhile
                # As a failed operation: the round stops here, nothing was acknowledged.
                raise DaemonGone(f"connecting the direct client: {exc}") from None
            self.bs = int(self.client.info.get("block_size") or 4096)
        return self.client

    def do_dwrite(self, path: str, ino: int, off: int, n: int, *, fsync: bool) -> None:
        c = self._client()
        holder: list[Any] = []

        def fn(oid: int) -> dict[str, Any]:
            f = c.open(path, "r+")
            holder.append(f)
            try:
                # The whole blocks of the range go as pipelined writes of one block each
                # (the edges on their own): over committed blocks the daemon relocates
                # them as a burst (docs/dev/protocol.md, "Bursts of overwrites"). The
                # same bytes at the same places as one write: the log says one range.
                data = pattern(oid, off, n)
                bs = self.bs
                lo, hi = -(-off // bs) * bs, (off + n) // bs * bs
                if hi - lo >= 2 * bs:
                    cuts = [off, *range(lo, hi + 1, bs), off + n]
                    for start, stop in zip(cuts, cuts[1:]):
                        if stop > start:
                            f.pwrite(data[start - off:stop - off], start)
                else:
                    f.pwrite(data, off)
                return {"size": f.commit()}
            except Exception as exc:  # noqa: BLE001 - only GrantRevoked is answered
                if not self._dropped_under(exc, ino):
                    raise
                return {"revoked": True, "size": os.stat(self._p(path)).st_size}
        try:
            res = self.op("dwrite", fn, path=path, ino=ino, off=off, n=n)
            self.sizes[ino] = int(res["size"]) if res.get("revoked") else \
                max(self.sizes[ino], off + n)
            if fsync and not res.get("revoked"):
                f = holder[0]

                def sync(_o: int) -> dict[str, Any] | None:
                    try:
                        f.fsync()
                    except Exception as exc:  # noqa: BLE001 - only GrantRevoked
                        if not self._dropped_under(exc, ino):
                            raise
                        return {"revoked": True}
                    return None
                self.op("fsync", sync, path=path, ino=ino, via="direct")
        finally:
            for f in holder:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - a revoked or dead grant: nothing to close
                    pass

    def _dropped_under(self, exc: Exception, ino: int) -> bool:
        """A direct client's GrantRevoked on a discardable file: the pager dropped it
        and the daemon emptied it (a truncate, which revokes every grant: README,
        "Direct clients"); the client's uncommitted range is dropped with the grant.
        Any other failure stays one."""
        return type(exc).__name__ == "GrantRevoked" and bool(self.disc.get(ino))

    def _caps(self) -> int | None:
        """Capability slots root's connections hold (only direct clients hold slots, and
        this process holds none between operations): the killed client's connection
        was released, its last request done, when they are back to what they were."""
        try:
            for p in self._client().call("principal_ls").get("principals", ()):
                if p.get("name") == "root":
                    return int(p.get("usage", {}).get("caps", -1))
        except (OSError, ConnectionError, KeyError, TypeError, ValueError):
            return None
        return None

    def do_dkill(self, path: str, ino: int) -> None:
        """A direct client killed mid-write: a forked child writes some ranges through
        its grant and SIGKILLs itself with one more write request on the wire; nothing
        is committed. Then wait (bounded) until the daemon released its connection."""
        rng = self.rng
        size = self.sizes[ino]
        writes = [(rng.randint(0, size + 8192), rng.randint(1, 20000))
                  for _ in range(rng.randint(1, 3))]
        before = self._caps()

        def fn(oid: int) -> dict[str, Any]:
            # The child says on this pipe why it failed, if it did: a child that exits
            # instead of being killed has no write in flight, and the round says so
            # (`_dkill_violations`) instead of testing less in silence.
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(rfd)
                try:
                    from kernelshim.client import Client
                    c = Client.connect(self.root, shm_size=64 << 10)
                    f = c.open(path, "r+")
                    for off, n in writes[:-1]:
                        f.pwrite(pattern(oid, off, n), off)
                    off, n = writes[-1]
                    n = min(n, 64 << 10)
                    c.call("layout_get", slot=f.slot, offset=off, length=n)
                    c.shmview[:n] = pattern(oid, off, n)
                    from kernelshim.clientcore import SendData
                    from kernelshim.protocol import WRITE as DATA_WRITE
                    # (put on the wire, its reply never waited for; `c._send`, used
                    # here before, no longer exists: the child exited before the
                    # kill, with no request on the wire, since the data path changed)
                    c._send_step(SendData(DATA_WRITE, f.slot, off, n, 0))
                    os.kill(os.getpid(), signal.SIGKILL)
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    try:
                        os.write(wfd, f"{type(exc).__name__}: {exc}"[:500].encode())
                    except OSError:
                        pass
                finally:
                    os._exit(3)
            os.close(wfd)
            _, status = os.waitpid(pid, 0)
            with os.fdopen(rfd, "rb") as ef:
                child_error = ef.read().decode(errors="replace")
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            released = False
            if before is not None:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    caps = self._caps()
                    if caps is not None and caps <= before:
                        released = True
                        break
                    time.sleep(0.002)
            if not killed and self._caps() is None:
                raise OSError(errno.ENOTCONN, "the daemon is gone")
            # The client library commits by itself when a write touches a partial block
            # an uncommitted one touched: the killed client may have grown the file.
            with self._client().open(path, "r") as f:
                now = int(f.stat()["size"])
            return {"killed": killed, "released": released, "size": now,
                    **({} if killed else {"child_error": child_error or f"status {status}"})}
        res = self.op("dkill", fn, path=path, ino=ino,
                      writes=[[o, min(n, 64 << 10) if i == len(writes) - 1 else n]
                              for i, (o, n) in enumerate(writes)])
        self.sizes[ino] = int(res["size"])


def worker_main(args: argparse.Namespace) -> int:
    w = Workload(args.mountpoint, args.seed, args.ops, sys.stdout,
                 record_log=args.record_log, extended=args.extended,
                 track_drops=args.track_drops)
    w.run()
    return 0


# -- the oracle ------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class Violation:
    kind: str      # size, content, name, xattr, eio, past-eof, nlink, fsck, daemon, workload
    path: str
    detail: str
    suspect: str = ""  # a known defect this looks like ("defect 5", "defect 6")

    def __str__(self) -> str:
        s = f"[{self.kind}] {self.path}: {self.detail}"
        return s + (f" (looks like {self.suspect})" if self.suspect else "")


@dataclasses.dataclass(slots=True)
class Alt:
    """Bytes a killed direct client may have put at [off, off+len(val)): `mask` says
    which are still possible. `sticky`: its connection was not seen released, so the
    write may land at any later moment until a shrinking truncate revokes its grant."""

    op: int
    off: int
    val: np.ndarray
    mask: np.ndarray
    sticky: bool

    def copy(self) -> Alt:
        return Alt(self.op, self.off, self.val, self.mask.copy(), self.sticky)

    def clear(self, lo: int, hi: int) -> None:
        a, b = max(lo - self.off, 0), min(hi - self.off, len(self.val))
        if a < b:
            self.mask[a:b] = False


@dataclasses.dataclass(slots=True)
class Step:
    """An operation on a file after its last fsync: the size it left, the range it
    wrote (if any), the xattr it changed (if any)."""

    op: int
    kind: str
    size: int
    write: tuple[int, int] | None = None
    xattr: tuple[str, bytes | None] | None = None
    shrink_to: int | None = None
    #: in flight at the crash: the sizes it may have left (lo..hi)
    sizes: tuple[int, int] | None = None
    #: a killed client's write: data that may be there, but no size the file had
    sizeless: bool = False
    #: the write puts zeros (fallocate PUNCH_HOLE, ZERO_RANGE), not its pattern
    zero: bool = False
    #: the bytes are the pattern made for this offset, not for `write[0]` (an append
    #: that found its file dropped while mounted lands at the new end, 0)
    src: int | None = None


@dataclasses.dataclass(slots=True)
class Durable:
    op: int  # the fsync (0: the create)
    content: np.ndarray
    alts: list[Alt]
    xattrs: dict[str, bytes]


class FileModel:
    """What the log says about one file (inode): its exact state now, the state its
    last acknowledged fsync made durable, and the steps since."""

    def __init__(self, ino: int, created: int, *, discardable: bool = False) -> None:
        self.ino = ino
        #: created in a discardable directory: whole by the rules below, or empty and
        #: marked discarded (crash rule 4)
        self.discardable = discardable
        self.content = np.zeros(0, dtype=np.uint8)
        self.alts: list[Alt] = []
        self.xattrs: dict[str, bytes] = {}
        self.durable = Durable(created, self.content.copy(), [], {})
        self.steps: list[Step] = []
        self.inflight: Step | None = None
        #: every write of a killed direct client, uncut (to name what is found)
        self.killed_writes: list[tuple[int, int, int]] = []
        #: discardable now (inherited at create, or a hint since), and at its last
        #: fsync or at any moment since (then it may be found emptied and marked)
        self.disc_now = discardable
        #: models of the file as if the pager had dropped it while mounted at a point
        #: the workload saw the pager's discard counter move ("D" records): emptied
        #: there, then every later step; each is judged as an alternative
        self.forks: list[FileModel] = []
        #: a fork before its first fsync: its durable state (empty) is no state of
        #: its own, only the start of its steps
        self.no_base = False
        #: this model is a fork: its size is not the one the workload believed
        self.is_fork = False

    @property
    def size(self) -> int:
        return len(self.content)

    def write(self, op: int, off: int, n: int, *, zero: bool = False,
              src: int | None = None) -> None:
        end = off + n
        if end > self.size:
            self.content = np.concatenate([self.content,
                                           np.zeros(end - self.size, dtype=np.uint8)])
        self.content[off:end] = 0 if zero else \
            _pattern_array(op, off if src is None else src, n)
        for a in self.alts:
            if not a.sticky:
                a.clear(off, end)
        self.steps.append(Step(op, "write", self.size, write=(off, n), zero=zero, src=src))

    def fork(self, op: int, size: int) -> FileModel:
        """The file as if the pager dropped it at `op`: empty, then grown to `size`
        (the size the workload found after `op`) by zeros or by `op`'s own write,
        which may have landed whole, in part or not at all."""
        f = FileModel(self.ino, op, discardable=True)
        f.is_fork = True
        f.xattrs = dict(self.xattrs)
        f.durable = Durable(op, f.content.copy(), [], dict(self.xattrs))
        # Emptied there, it is marked discarded in the same commit (found so: allowed
        # anyway); empty and unmarked only if a later step left it so.
        f.no_base = True
        if size:
            f.content = np.zeros(size, dtype=np.uint8)
            f.steps.append(Step(op, "dropped", size))
        return f

    def maybe_writes(self, op: int, writes: list[tuple[int, int]], sticky: bool,
                     size: int | None, *, zero: bool = False, src: int | None = None) -> None:
        """A killed direct client's writes: each may have landed, whole or in part.
        `size`: the size found after it (the client library commits on its own when a
        write touches a partial block an uncommitted write touched); None: unknown (it
        was in flight). Its bytes at or past that size were never committed: they are
        its own lost writes past EOF and must never show, however the file grows."""
        if size is not None and size > self.size:  # committed: its data (an alt) or zeros
            self.content = np.concatenate([self.content,
                                           np.zeros(size - self.size, dtype=np.uint8)])
            self.steps.append(Step(op, "dkill", size))
        self.killed_writes += [(op, off, n) for off, n in writes]
        limit = size if size is not None else max([self.size, *(o + n for o, n in writes)])
        for off, n in writes:
            n = min(n, limit - off)
            if n <= 0:
                continue
            val = np.zeros(n, dtype=np.uint8) if zero else \
                _pattern_array(op, off if src is None else src, n)
            self.alts.append(Alt(op, off, val, np.ones(n, dtype=bool), sticky))
            self.steps.append(Step(op, "dkill", self.size, write=(off, n), sizeless=True,
                                   zero=zero, src=src))
        if size is None:
            self.inflight = Step(op, "dkill", self.size, sizes=(self.size, limit))

    def truncate(self, op: int, size: int) -> None:
        old = self.size
        if size < old:
            self.content = self.content[:size].copy()
            for a in self.alts:
                a.clear(size, a.off + len(a.val))
                a.sticky = False  # the shrink revoked every grant: fenced from now on
            self.steps.append(Step(op, "truncate", size, shrink_to=size))
        else:
            self.content = np.concatenate([self.content,
                                           np.zeros(size - old, dtype=np.uint8)])
            self.steps.append(Step(op, "truncate", size))

    def setx(self, op: int, name: str, value: bytes | None) -> None:
        if value is None:
            self.xattrs.pop(name, None)
        else:
            self.xattrs[name] = value
        self.steps.append(Step(op, "xattr", self.size, xattr=(name, value)))

    def fsync(self, op: int) -> None:
        self.discardable = self.disc_now  # whole from now on, unless discardable
        self.no_base = False
        self.alts = [a for a in self.alts if a.mask.any()]
        self.durable = Durable(op, self.content.copy(), [a.copy() for a in self.alts],
                               dict(self.xattrs))
        self.steps = []

    # judging a recovered file

    def sizes(self) -> list[int]:
        return [len(self.durable.content)] + [s.size for s in self.steps]

    def _bad(self, data: np.ndarray, c: int, sizes: list[int]) -> np.ndarray:
        """Bytes of `data` (the whole recovered file) no rule explains, if the metadata
        that survived is that of steps[:c] (c = len(steps)+1: the in-flight one too).

        Each possible source of a byte — the fsync'd content, zeros (past a size the
        file had), each later write — gives a mask of the bytes it explains. The file is
        cut at every point where the source may legitimately change (block boundaries,
        sizes, the edges of writes and their 4 KiB grid) and each piece must be
        explained by one source alone, so foreign bytes do not pass for a patchwork of
        single bytes that happen to be equal (cells share '@', newlines, digits). The
        write in flight may have landed in pieces cut where the kernel split it, which
        the log does not know: it may complete any one source within a piece."""
        S = len(data)
        bs = BLOCK
        t = np.full(S, -1, dtype=np.int32)
        steps = self.steps + ([self.inflight] if self.inflight else [])
        for j in range(c + 1):
            if sizes[j] < S and not (j and j <= len(steps) and steps[j - 1].sizeless):
                t[sizes[j]:] = j
        D = self.durable.content
        n0 = min(S, len(D))
        bounds: set[int] = set(range(0, S, bs)) | set(sizes) | {len(D)}
        m = np.zeros(S, dtype=bool)
        m[:n0] = (t[:n0] == -1) & (data[:n0] == D[:n0])
        sources = [m, (t >= 0) & (data == 0)]
        for a in self.durable.alts:
            lo, hi = a.off, min(a.off + len(a.val), S)
            if lo < hi:
                m = np.zeros(S, dtype=bool)
                m[lo:hi] = (t[lo:hi] == -1) & a.mask[:hi - lo] & (data[lo:hi] == a.val[:hi - lo])
                sources.append(m)
                bounds.update(range(lo, a.off + len(a.val), bs))
                bounds.add(a.off + len(a.val))
                # where later writes cleared it: D's pieces from those writes end there
                bounds.update((np.flatnonzero(np.diff(a.mask.view(np.int8))) + 1 + a.off)
                              .tolist())
        wild = np.zeros(S, dtype=bool)
        for j, st in enumerate(steps, start=1):
            if st.write is None:
                continue
            off, n = st.write
            lo, hi = off, min(off + n, S)
            if lo >= hi:
                continue
            m = np.zeros(S, dtype=bool)
            want = 0 if st.zero else _pattern_array(
                st.op, off if st.src is None else st.src, hi - off)
            m[lo:hi] = (t[lo:hi] < j) & (data[lo:hi] == want)
            if st is self.inflight:
                wild = m
            else:
                sources.append(m)
            bounds.update(range(off, off + n, bs))
            bounds.add(off + n)
        edges = sorted(x for x in bounds if 0 < x < S)
        bad = np.zeros(S, dtype=bool)
        for lo, hi in zip([0] + edges, edges + [S]):
            if not any((src[lo:hi] | wild[lo:hi]).all() for src in sources):
                bad[lo:hi] = True
        if bad.any():  # narrow each bad piece to the bytes no source explains, if any
            alone = ~np.logical_or.reduce(sources + [wild]) & bad
            if alone.any():
                return alone
        return bad

    def judge(self, path: str, data: np.ndarray, unreadable: np.ndarray,
              xattrs: dict[str, bytes]) -> list[Violation]:
        out: list[Violation] = []
        S = len(data)
        sizes = self.sizes()
        m = len(self.steps)
        cuts = [c for c in range(m + 1) if sizes[c] == S and not (c == 0 and self.no_base)]
        inf = self.inflight
        if inf is not None:
            lo, hi = inf.sizes or (inf.size, inf.size)
            if lo <= S <= hi:
                cuts.append(m + 1)
        if not cuts:
            cand = sorted(set(sizes) | ({*range(inf.sizes[0], inf.sizes[1] + 1)}
                                        if inf and inf.sizes and
                                        inf.sizes[1] - inf.sizes[0] < 8 else set()))
            extra = f", in flight {inf.sizes}" if inf and inf.sizes else ""
            out.append(Violation("size", path, f"size {S}; fsync'd size {sizes[0]} (op "
                                 f"{self.durable.op}), later sizes {cand}{extra}"))
            cuts = list(range(m + 1)) + ([m + 1] if inf else [])
        best: tuple[int, int, np.ndarray] | None = None
        for c in cuts:
            sz = sizes + [S]
            bad = self._bad(data, c, sz) & ~unreadable
            k = int(bad.sum())
            if best is None or k < best[0]:
                best = (k, c, bad)
            if k == 0:
                break
        assert best is not None
        if best[0]:
            k, c, bad = best
            idx = np.flatnonzero(bad)
            a = int(idx[0])
            b = a
            while b < S and bad[b]:
                b += 1
            found = bytes(data[a:b][:4096])
            D = self.durable.content
            want = bytes(D[a:min(b, len(D))][:4096]) if a < len(D) else b""
            detail = (f"{k} bytes no acknowledged state explains (each piece between block, "
                      f"size and write edges must come from one source), first run [{a},{b}): found "
                      f"{describe_bytes(found, a)}; fsync'd (op {self.durable.op}) there: "
                      f"{describe_bytes(want, a) if want else 'nothing (past its end)'}; "
                      f"steps since: {self._brief_steps()}")
            out.append(Violation("content", path, detail, self._suspect(data, bad)))
        out.extend(self._judge_xattrs(path, xattrs))
        return out

    def _brief_steps(self) -> str:
        steps = self.steps + ([self.inflight] if self.inflight else [])
        parts = []
        for st in steps[:12]:
            what = st.kind
            if st.write:
                what += f"@{st.write[0]}+{st.write[1]}"
            if st.kind == "truncate":
                what += f"->{st.size}"
            parts.append(f"{st.op}:{what}" + ("?" if st is self.inflight else ""))
        return " ".join(parts) + (" ..." if len(steps) > 12 else "") if parts else "none"

    def _suspect(self, data: np.ndarray, bad: np.ndarray) -> str:
        """Defect 5: bytes past a later non-block-multiple shrink, within its block, read
        as zeros although that truncate's size change did not survive."""
        idx = np.flatnonzero(bad)
        if not len(idx):
            return ""
        if data[idx].any():
            for op, off, n in self.killed_writes:
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                if off <= lo and hi <= off + n and \
                        bytes(data[lo:hi]) == pattern(op, lo, hi - lo):
                    return "finding D1: a killed direct client's uncommitted write past EOF"
            return ""
        steps = self.steps + ([self.inflight] if self.inflight else [])
        for st in steps:
            ts = st.shrink_to
            if ts is not None and ts % BLOCK:
                end = ts - ts % BLOCK + BLOCK
                if idx[0] >= ts and idx[-1] < end:
                    return "defect 5"
        return ""

    def _judge_xattrs(self, path: str, found: dict[str, bytes]) -> list[Violation]:
        out = []
        steps = self.steps + ([self.inflight] if self.inflight else [])
        keys = set(self.durable.xattrs) | set(found) | \
            {s.xattr[0] for s in steps if s.xattr is not None}
        for k in sorted(keys):
            allowed = {self.durable.xattrs.get(k)} | \
                {s.xattr[1] for s in steps if s.xattr is not None and s.xattr[0] == k}
            got = found.get(k)
            if got not in allowed:
                out.append(Violation("xattr", path, f"{k} = {got!r}; allowed "
                                     f"{sorted(map(repr, allowed))}"))
        return out


NEW = -1  # a name an in-flight create/mkdir made: its inode number was never logged
#: operations that write a file's bytes (the extended workload's falloc only with zeros)
WRITE_KINDS = ("write", "append", "dwrite", "mmap", "falloc")
#: forks kept per file (the latest: an earlier drop's state is a later one's too, or
#: it was made durable since)
MAX_FORKS = 6


@dataclasses.dataclass(slots=True)
class DirModel:
    ino: int
    created: int
    #: name -> [(op, target inode or None or NEW)] in log order
    bindings: dict[str, list[tuple[int, int | None]]] = dataclasses.field(default_factory=dict)
    fsyncs: list[int] = dataclasses.field(default_factory=list)

    def bind(self, op: int, name: str, target: int | None) -> None:
        self.bindings.setdefault(name, []).append((op, target))

    def allowed(self, name: str) -> set[int | None]:
        hist = self.bindings.get(name, [])
        T = max(self.fsyncs, default=-1)
        at_t: int | None = None
        for op, target in hist:
            if op < T:
                at_t = target
        return {at_t} | {target for op, target in hist if op > T}


@dataclasses.dataclass
class CheckStats:
    files: int = 0
    bytes: int = 0
    names: int = 0
    dirs: int = 0
    xattrs: int = 0
    probes: int = 0
    #: discardable files found emptied and marked (allowed; not counted as checks)
    discarded: int = 0
    #: discardable files found as a drop while mounted would have left them ("D")
    forked: int = 0

    def total(self) -> int:
        return self.files + self.names + self.dirs + self.xattrs + self.probes


class Oracle:
    """Replays a workload log into a model of what must, may and must not be found, and
    judges a recovered tree against it (see the module docstring for the rules).
    Reusable: it needs only the log records and a directory to look at."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        self.files: dict[int, FileModel] = {}
        self.dirs: dict[int, DirModel] = {}
        self.root_ino = 1
        self.ops: dict[int, dict[str, Any]] = {}
        self.acked: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, dict[str, Any]] = {}
        order: list[int | dict[str, Any]] = []
        for rec in records:
            k = rec.get("k")
            if k == "hello":
                self.root_ino = int(rec["root_ino"])
            elif k == "B":
                self.ops[rec["id"]] = rec
                order.append(rec["id"])
            elif k == "D":
                order.append(rec)
            elif k == "A":
                self.acked[rec["id"]] = rec
            elif k == "E":
                self.failed[rec["id"]] = rec
        #: inode -> paths, of the regular files the last `check` found
        self.found_files: dict[int, list[str]] = {}
        self.dirs[self.root_ino] = DirModel(self.root_ino, 0)
        self._dir_paths: dict[str, int] = {"": self.root_ino}
        self.inflight: dict[str, Any] | None = None
        for oid in order:
            if isinstance(oid, dict):
                self._dropped(oid)
            elif oid in self.acked:
                self._apply(self.ops[oid], self.acked[oid], maybe=False)
            else:  # began, never acknowledged: the operation the crash interrupted
                self.inflight = self.ops[oid]
                self._apply(self.ops[oid], {}, maybe=True)

    @property
    def acked_ops(self) -> int:
        return len(self.acked)

    def _dropped(self, rec: dict[str, Any]) -> None:
        """A "D" record: the pager let discardable frames go during or before operation
        `rec["id"]`; each discardable file may have been dropped there (emptied, then
        `rec["id"]`'s write, if it was this file's, landing whole, in part or not at
        all). Each gets a fork: the file as that drop would have left it."""
        oid = int(rec["id"])
        op = self.ops.get(oid, {})
        for ino_s, size in rec.get("sizes", {}).items():
            f = self.files.get(int(ino_s))
            if f is None:
                continue
            fk = f.fork(oid, int(size))
            if int(op.get("ino", -1)) == f.ino and op.get("op") in WRITE_KINDS and \
                    not (op.get("op") == "falloc" and not int(op["mode"]) & FALLOC_ZERO_RANGE):
                off, n = int(op["off"]), int(op["n"])
                fk.maybe_writes(oid, [(off, n)], sticky=False, size=int(size),
                                zero=op.get("op") == "falloc")
                if op.get("op") == "append" and off:
                    # O_APPEND writes at the end the kernel knows: 0 once dropped
                    fk.maybe_writes(oid, [(0, n)], sticky=False, size=int(size), src=off)
            f.forks.append(fk)
            del f.forks[:-MAX_FORKS]

    def _models(self, ino: int) -> list[FileModel]:
        f = self.files[ino]
        return [f, *f.forks]

    def _dir_of(self, path: str) -> tuple[DirModel, str]:
        d, name = _split(path)
        return self.dirs[self._dir_paths[d]], name

    def _apply(self, op: dict[str, Any], res: dict[str, Any], *, maybe: bool) -> None:
        kind, oid = op["op"], op["id"]
        if kind in ("mkdir", "create"):
            ino = int(res["ino"]) if not maybe else NEW
            parent, name = self._dir_of(op["path"])
            parent.bind(oid, name, ino)
            if ino != NEW:
                if kind == "mkdir":
                    self.dirs[ino] = DirModel(ino, oid)
                    self._dir_paths[op["path"]] = ino
                else:
                    self.files[ino] = FileModel(
                        ino, oid, discardable=_split(op["path"])[0] in DISCARDABLE_DIRS)
        elif kind in ("rmdir", "unlink"):
            parent, name = self._dir_of(op["path"])
            parent.bind(oid, name, None)
            if kind == "rmdir" and not maybe:
                del self._dir_paths[op["path"]]
        elif kind == "rename":
            sp, sn = self._dir_of(op["src"])
            dp, dn = self._dir_of(op["dst"])
            sp.bind(oid, sn, None)
            dp.bind(oid, dn, int(op["ino"]))
        elif kind == "link":
            dp, dn = self._dir_of(op["dst"])
            dp.bind(oid, dn, int(op["ino"]))
        elif kind == "fsyncdir":
            if not maybe:
                self.dirs[int(op["dino"])].fsyncs.append(oid)
        elif kind == "tmpfile":  # no name yet: a crash leaves an orphan, never a name
            if not maybe:
                ino = int(res["ino"])
                self.files[ino] = FileModel(ino, oid,
                                            discardable=op["path"] in DISCARDABLE_DIRS)
        elif kind == "exchange":  # both names swap in one step, or neither
            sp, sn = self._dir_of(op["src"])
            dp, dn = self._dir_of(op["dst"])
            sp.bind(oid, sn, int(op["other"]))
            dp.bind(oid, dn, int(op["ino"]))
        elif kind == "hint":
            f = self.files[int(op["ino"])]
            if op["on"]:
                f.discardable = True  # at once: an in-flight hint may have taken effect
            if not maybe:
                f.disc_now = bool(op["on"])
        else:
            for f in self._models(int(op["ino"])):
                self._apply_file(f, op, res, maybe=maybe)

    def _apply_file(self, f: FileModel, op: dict[str, Any], res: dict[str, Any], *,
                    maybe: bool) -> None:
        kind, oid = op["op"], op["id"]
        if kind == "falloc":
            mode, off, n = int(op["mode"]), int(op["off"]), int(op["n"])
            zero = bool(mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE))
            end = off + n if not mode & FALLOC_KEEP_SIZE else min(off + n, f.size)
            new = max(f.size, off + n) if not mode & FALLOC_KEEP_SIZE else f.size
            if maybe:
                f.inflight = Step(oid, kind, new, sizes=(f.size, new),
                                  write=(off, end - off) if zero and end > off else None,
                                  zero=zero)
            elif zero and end > off:
                f.write(oid, off, end - off, zero=True)
            elif new > f.size:
                f.truncate(oid, new)
            else:  # reserved blocks: nothing to see, until the file grows over them
                f.steps.append(Step(oid, kind, f.size))
        elif kind == "mmap":
            off, n = int(op["off"]), int(op["n"])
            if maybe:
                f.inflight = Step(oid, kind, f.size, write=(off, n), sizes=(f.size, f.size))
            else:
                f.write(oid, off, n)
                if op.get("msync"):
                    f.fsync(oid)  # msync(MS_SYNC) is an fdatasync of the file
        elif kind == "dwrite" and res.get("revoked"):
            # revoked by a drop's emptying: commits nothing (its bytes may have been
            # written to blocks the emptying freed: never shown), but as a maybe
            f.maybe_writes(oid, [(int(op["off"]), int(op["n"]))], sticky=False,
                           size=f.size)
        elif kind in ("write", "append", "dwrite"):
            off, n = int(op["off"]), int(op["n"])
            src = None
            if kind == "append" and f.is_fork and off != f.size:
                # O_APPEND lands at the end the file has, which in a fork (dropped while
                # mounted) is not the end the workload believed: its bytes are the
                # pattern made for that offset (campaign seed 51204, branch crash4)
                src, off = off, f.size
            if maybe:
                f.inflight = Step(oid, kind, max(f.size, off + n), write=(off, n),
                                  sizes=(f.size, max(f.size, off + n)), src=src)
            else:
                f.write(oid, off, n, src=src)
        elif kind == "truncate":
            size = int(op["size"])
            if maybe:  # the size either changed or not; its zeroing only with it
                f.inflight = Step(oid, kind, size, sizes=(size, size),
                                  shrink_to=size if size < f.size else None)
            else:
                f.truncate(oid, size)
        elif kind == "fsync":
            if not maybe and not res.get("revoked"):
                f.fsync(oid)
        elif kind in ("setx", "rmx"):
            value = bytes.fromhex(op["value"]) if kind == "setx" else None
            if maybe:
                f.inflight = Step(oid, "xattr", f.size, xattr=(op["name"], value))
            else:
                f.setx(oid, op["name"], value)
        elif kind == "dkill":
            writes = [(int(a), int(b)) for a, b in op["writes"]]
            f.maybe_writes(oid, writes, sticky=maybe or not res.get("released", False),
                           size=None if maybe else int(res.get("size", f.size)))

    # -- judging a tree -------------------------------------------------------------------

    def check(self, root: Path, stats: CheckStats | None = None) -> list[Violation]:
        """Judge the tree at `root` (the recovered mount)."""
        st = stats if stats is not None else CheckStats()
        out: list[Violation] = []
        found_files: dict[int, list[str]] = {}
        nlinks: dict[int, int] = {}
        self.found_files = found_files
        self._walk(root, "", self.dirs[self.root_ino], out, found_files, nlinks, st)
        for ino, paths in sorted(found_files.items()):
            f = self.files.get(ino)
            path = paths[0]
            if nlinks[ino] != len(paths):
                out.append(Violation("nlink", path, f"link count {nlinks[ino]} but "
                                     f"{len(paths)} names found: {paths}"))
            data, unreadable, errs = _read_all(root / path)
            for off, e in errs:
                out.append(Violation("eio", path, f"read at offset {off}: {e}"))
            xattrs = _read_xattrs(root / path, out, path)
            st.files += 1
            st.bytes += len(data)
            st.xattrs += len(xattrs)
            if f is None:  # made by the in-flight create: must be empty
                if len(data) or xattrs:
                    out.append(Violation("content", path, f"a file the interrupted create "
                                         f"made holds {len(data)} bytes, xattrs {xattrs}"))
                continue
            if f.discardable and not len(data) and _discarded(root / path):
                st.discarded += 1  # a cache emptied as a whole: allowed (rule 4)
                continue
            found = f.judge(path, data, unreadable, xattrs)
            for fk in f.forks if found else ():  # dropped while mounted, at a "D" record
                if not fk.judge(path, data, unreadable, xattrs):
                    st.forked += 1
                    found = []
                    break
            out.extend(found)
        return out

    def _walk(self, root: Path, rel: str, d: DirModel, out: list[Violation],
              found_files: dict[int, list[str]], nlinks: dict[int, int],
              st: CheckStats) -> None:
        st.dirs += 1
        try:
            entries = sorted(os.listdir(root / rel) if rel else os.listdir(root))
        except OSError as exc:
            out.append(Violation("eio", rel or "/", f"listdir: {exc}"))
            return
        names = set(entries) | set(d.bindings)
        for name in sorted(names):
            path = _join(rel, name)
            st.names += 1
            allowed = d.allowed(name)
            ino: int | None = None
            is_dir = False
            if name in entries:
                try:
                    s = os.lstat(root / path)
                except OSError as exc:
                    out.append(Violation("eio", path, f"lstat: {exc}"))
                    continue
                ino, is_dir = s.st_ino, os.path.isdir(root / path) and not os.path.islink(
                    root / path)
                known = ino in self.files or ino in self.dirs
                if not known and NEW in allowed:
                    pass  # the interrupted create/mkdir
                elif ino not in allowed:
                    out.append(Violation("name", path, f"bound to inode {ino}; allowed: "
                                         f"{_fmt_allowed(allowed)} "
                                         f"(history {self._history(d, name)})"))
                    continue
                if is_dir:
                    sub = self.dirs.get(ino)
                    if sub is None:
                        if os.listdir(root / path):
                            out.append(Violation("name", path, "the directory the "
                                                 "interrupted mkdir made is not empty"))
                        continue
                    self._walk(root, path, sub, out, found_files, nlinks, st)
                else:
                    found_files.setdefault(ino, []).append(path)
                    nlinks[ino] = s.st_nlink
            elif None not in allowed:
                out.append(Violation("name", path, f"missing; allowed: {_fmt_allowed(allowed)}"
                                     f" (history {self._history(d, name)})"))

    def _history(self, d: DirModel, name: str) -> str:
        T = max(d.fsyncs, default=-1)
        h = " ".join(f"{op}:{'-' if t is None else 'new' if t == NEW else t}"
                     for op, t in d.bindings.get(name, []))
        return f"{h}; dir fsync'd at op {T}" if T >= 0 else f"{h}; dir never fsync'd"

    def probe_growth(self, root: Path, rng: random.Random,
                     stats: CheckStats | None = None) -> list[Violation]:
        """Grow every file found by `check` (truncate up, or a write further on) and
        check that the range between its old end and the new data reads as zeros.
        Changes the files: run it after `check`."""
        out: list[Violation] = []
        for ino, paths in sorted(self.found_files.items()):
            p = root / paths[0]
            try:
                size = os.stat(p).st_size
                gap = rng.randint(1, 3 * 4096)
                if rng.random() < 0.5:
                    os.truncate(p, size + gap)
                    how = f"truncate {size}->{size + gap}"
                else:
                    fd = os.open(p, os.O_WRONLY)
                    try:
                        os.pwrite(fd, b"END", size + gap)
                    finally:
                        os.close(fd)
                    how = f"write at {size + gap}"
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = os.pread(fd, gap, size)
                finally:
                    os.close(fd)
            except OSError as exc:
                out.append(Violation("eio", paths[0], f"growth probe: {exc}"))
                continue
            if stats is not None:
                stats.probes += 1
            if got.strip(b"\0") or len(got) != gap:
                arr = np.frombuffer(got, dtype=np.uint8)
                nzi = np.flatnonzero(arr)
                lo, hi = (int(nzi[0]), int(nzi[-1]) + 1) if len(nzi) else (len(got), len(got))
                out.append(Violation("past-eof", paths[0],
                                     f"after {how}: {len(nzi)} non-zero bytes in [{size + lo},"
                                     f"{size + hi}) of the new range [{size},{size + gap}): "
                                     f"{describe_bytes(got[lo:hi], size + lo)} "
                                     f"(read {len(got)} of {gap} bytes)", "defect 6"))
        return out


def _pager_seen(records: list[dict[str, Any]]) -> dict[str, int]:
    """The pager's figures the extended workload last saw ("S" records): evictions,
    discardable frames let go, bytes written back."""
    last = next((r for r in reversed(records) if r.get("k") == "S"), None)
    if last is None:
        return {}
    return {"pager_evictions": int(last.get("evictions") or 0),
            "pager_discarded": int(last.get("discarded") or 0),
            "pager_writeback_bytes": int(last.get("writeback_bytes") or 0),
            "drops_seen": sum(1 for r in records if r.get("k") == "D")}


def _dkill_figures(records: list[dict[str, Any]]) -> dict[str, int]:
    """The killed direct clients of a workload log: begun, acknowledged, acknowledged
    with the child really SIGKILLed (its last write on the wire), and with its
    connection seen released afterwards."""
    begun = {r["id"] for r in records if r.get("k") == "B" and r.get("op") == "dkill"}
    acks = [r for r in records if r.get("k") == "A" and r.get("id") in begun]
    return {"dkill_begun": len(begun), "dkill_acked": len(acks),
            "dkill_killed": sum(1 for r in acks if r.get("killed")),
            "dkill_released": sum(1 for r in acks if r.get("released"))}


def _dkill_violations(records: list[dict[str, Any]], oracle: Oracle) -> list[Violation]:
    """A killed direct client acknowledged but not killed: its child failed before the
    SIGKILL (`child_error` says why), so no write was in flight when it went; the round
    did not test what it claims (the campaigns before the dkill fix of branch crash3 did
    exactly this, silently). Allowed only where the pager had dropped a discardable file
    (the grant is revoked: `GrantRevoked`)."""
    out = []
    for r in records:
        if r.get("k") != "A" or r.get("killed", True):
            continue
        op = oracle.ops.get(r["id"], {})
        if op.get("op") != "dkill":
            continue
        err = str(r.get("child_error", ""))
        f = oracle.files.get(int(op.get("ino", -1)))
        if err.startswith("GrantRevoked") and f is not None and f.discardable:
            continue
        out.append(Violation("harness", op.get("path", "?"), f"op {r['id']} dkill: the "
                             f"client was not killed with a write in flight: {err or '?'}"))
    return out


def _fmt_allowed(allowed: set[int | None]) -> str:
    return "{" + ", ".join("absent" if a is None else "new file" if a == NEW else f"inode {a}"
                           for a in sorted(allowed, key=lambda a: -2 if a is None else a)) + "}"


def _read_all(path: Path) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """The file's bytes up to its size, a mask of bytes that could not be read, and the
    read errors (offset, message): a failed block is skipped, not the rest."""
    size = os.stat(path).st_size
    data = np.zeros(size, dtype=np.uint8)
    unreadable = np.zeros(size, dtype=bool)
    errs: list[tuple[int, str]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            n = min(1 << 16, size - off)
            try:
                chunk = os.pread(fd, n, off)
            except OSError as exc:
                step = 4096 - off % 4096
                unreadable[off:off + step] = True
                if len(errs) < 4:
                    errs.append((off, f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                                      f"{exc.strerror}"))
                off += step
                continue
            if not chunk:
                errs.append((off, f"short read: EOF at {off}, size {size}"))
                unreadable[off:] = True
                break
            data[off:off + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            off += len(chunk)
    finally:
        os.close(fd)
    return data, unreadable, errs


def _discarded(path: Path) -> bool:
    try:
        return os.getxattr(path, DISCARDED_XATTR) == b"1"
    except OSError:
        return False


def _read_xattrs(path: Path, out: list[Violation], rel: str) -> dict[str, bytes]:
    res: dict[str, bytes] = {}
    try:
        for name in os.listxattr(path):
            if name.startswith("user.") and not name.startswith("user.sluice."):
                res[name] = os.getxattr(path, name)
    except OSError as exc:
        out.append(Violation("eio", rel, f"xattrs: {exc}"))
    return res


# -- the driver --------------------------------------------------------------------------------

def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == real for line in f)


def _answers(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fsck_clean(vol: Path) -> list[Violation]:
    """`sluice fsck --verify-data` of a volume just unmounted cleanly: exit 0, verdict
    "clean", and not a single "note:" either — a clean unmount drains the reaper and
    closes every file, so a leaked block or an orphan left for the next mount (which
    fsck reports as notes, exit 0) is a finding here too."""
    r = _sluice("fsck", str(vol), "--verify-data", "-q")
    lines = (r.stdout + r.stderr).strip()
    noted = [ln for ln in lines.splitlines() if ln.startswith(("note:", "error:"))]
    if r.returncode != 0 or not lines.endswith("clean") or noted:
        return [Violation("fsck", str(vol), f"exit {r.returncode}: {lines[-1500:]}")]
    return []


def _sluice(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SLUICE, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@dataclasses.dataclass
class RoundResult:
    seed: int
    crash: str
    ops_begun: int = 0
    ops_acked: int = 0
    inflight: str = ""
    checks: int = 0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    violations: list[Violation] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: seconds per phase: mkfs+mount, workload, recovery mount, check, umount+fsck
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    workdir: str = ""

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["violations"] = [dataclasses.asdict(v) for v in self.violations]
        return d


class Round:
    """One round: fresh volume, mount, workload, SIGKILL, mount, check, umount, fsck."""

    def __init__(self, seed: int, workdir: Path, *, nops: int | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 extended: bool | None = None) -> None:
        self.seed = seed
        self.extended = EXTENDED if extended is None else extended
        self.rng = random.Random(seed)
        self.nops = nops if nops is not None else self.rng.randint(100, 260)
        self.crash = CrashPoint.from_rng(self.rng, self.nops + Workload.SETUP_OPS,
                                         Workload.SETUP_OPS,
                                         EXTENDED_TRIGGER_KINDS if self.extended
                                         else TRIGGER_KINDS)
        self.dir = workdir
        self.volume = workdir / "vol"
        self.mnt = workdir / "mnt"
        self.records: list[dict[str, Any]] = []
        self.log = log
        self._daemon: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._bg_pid: int | None = None
        #: environment of the first daemon (None: this process's) and extra arguments
        #: of the workload process: the power-loss model records through them
        self.daemon_env: dict[str, str] | None = None
        self.worker_extra: list[str] = []

    def run(self) -> RoundResult:
        t0 = time.monotonic()
        res = RoundResult(self.seed, str(self.crash), workdir=str(self.dir))
        try:
            self._run(res)
        finally:
            self._cleanup()
            res.seconds = round(time.monotonic() - t0, 2)
        return res

    def _run(self, res: RoundResult) -> None:
        clock = [time.monotonic()]

        def phase(name: str) -> None:
            now = time.monotonic()
            res.phases[name] = round(now - clock[0], 2)
            clock[0] = now
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        r = _sluice("mkfs", str(self.volume), "--size", "1G", "-q")
        if r.returncode:
            raise HarnessError(f"mkfs failed: {r.stderr.strip()}")
        self._start_daemon()
        phase("setup")
        killed_at = self._workload()
        assert self._daemon is not None
        self._daemon.wait(timeout=30)
        phase("workload")
        (self.dir / "workload.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in self.records))
        oracle = Oracle(self.records)
        res.ops_begun = len(oracle.ops)
        res.ops_acked = oracle.acked_ops
        if oracle.inflight is not None:
            res.inflight = f"{oracle.inflight['id']}:{oracle.inflight['op']}"
        res.violations += self._workload_errors(oracle, killed_at)
        res.violations += _dkill_violations(self.records, oracle)
        res.violations += self._daemon_log("daemon1.log", "the killed daemon")
        # Recovery: `sluice mount` over the dead mount point.
        r = _sluice("mount", str(self.volume), str(self.mnt), *MOUNT_ARGS)
        if r.returncode:
            res.violations.append(Violation("daemon", "/", f"recovery mount failed: "
                                            f"{r.stderr.strip()}"))
            return
        self._bg_pid = int(json.loads((self.volume / "mount.json").read_text())["pid"])
        phase("remount")
        stats = CheckStats()
        res.violations += oracle.check(self.mnt, stats)
        res.violations += oracle.probe_growth(self.mnt, random.Random(self.seed ^ 0xBEEF),
                                              stats)
        phase("check")
        r = _sluice("umount", str(self.mnt), timeout=90)
        if r.returncode:
            res.violations.append(Violation("daemon", "/", f"umount failed: {r.stderr.strip()}"))
            return
        self._wait_gone(self._bg_pid)
        self._bg_pid = None
        res.violations += self._daemon_log("vol/sluice.log", "the recovered daemon")
        res.violations += fsck_clean(self.volume)
        phase("fsck")
        stats_d = dataclasses.asdict(stats)
        stats_d["fsck"] = 1
        stats_d.update(_pager_seen(self.records))
        stats_d.update(_dkill_figures(self.records))
        res.stats = stats_d
        res.checks = stats.total() + 1

    def _start_daemon(self) -> None:
        logf = open(self.dir / "daemon1.log", "ab")
        self._daemon = subprocess.Popen([*SLUICE, "mount", str(self.volume), str(self.mnt),
                                         "--foreground", *MOUNT_ARGS], stdout=logf, stderr=logf, cwd=REPO,
                                        start_new_session=True, env=self.daemon_env)
        logf.close()
        deadline = time.monotonic() + 30
        while not (_is_mounted(self.mnt) and _answers(self.mnt)):
            if self._daemon.poll() is not None:
                raise HarnessError(f"daemon exited ({self._daemon.returncode}) before "
                                   f"mounting: {(self.dir / 'daemon1.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise HarnessError("the mount did not appear in 30 s")
            time.sleep(0.01)

    def _workload(self) -> int | None:
        """Run the workload; SIGKILL the daemon at the crash point. Returns the number
        of records read when the kill was sent (None: the workload ended first)."""
        assert self._daemon is not None
        errf = open(self.dir / "worker.err", "wb")
        self._worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "worker", str(self.mnt),
             "--seed", str(self.seed), "--ops", str(self.nops), *self.worker_extra,
             *(["--extended"] if self.extended else []),
             *(["--track-drops"] if "--writeback" in MOUNT_ARGS else [])],
            stdout=subprocess.PIPE, stderr=errf, cwd=REPO, text=True, bufsize=1)
        errf.close()
        assert self._worker.stdout is not None
        acks = 0
        kinds: dict[int, str] = {}
        killed_at: int | None = None
        deadline = time.monotonic() + 60
        for line in iter(self._worker.stdout.readline, ""):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            self.records.append(rec)
            if rec.get("k") == "B":
                kinds[rec["id"]] = rec["op"]
            elif rec.get("k") == "A":
                acks += 1
            if killed_at is None and (self.crash.fires(rec, acks, kinds)
                                      or time.monotonic() > deadline):
                if self.crash.spin_us:
                    t = time.perf_counter() + self.crash.spin_us / 1e6
                    while time.perf_counter() < t:
                        pass
                os.kill(self._daemon.pid, signal.SIGKILL)
                killed_at = len(self.records)
        self._worker.stdout.close()
        self._worker.wait(timeout=60)
        if killed_at is None:  # the workload finished (or stopped) before the crash point
            os.kill(self._daemon.pid, signal.SIGKILL)
        self._worker_rc = self._worker.returncode
        self._worker = None
        return killed_at

    def _workload_errors(self, oracle: Oracle, killed_at: int | None) -> list[Violation]:
        out = []
        for pos, rec in enumerate(self.records):
            if rec.get("k") != "E":
                continue
            before_kill = killed_at is None or pos < killed_at
            if before_kill or rec.get("errno") not in DEAD_ERRNOS | {0}:
                op = oracle.ops.get(rec["id"], {})
                # ConnectionError subclasses carry no errno from the client: msg says
                if not before_kill and ("Connection" in rec.get("msg", "")
                                        or "BrokenPipe" in rec.get("msg", "")):
                    continue
                out.append(Violation("workload", op.get("path", op.get("src", "?")),
                                     f"op {rec['id']} {op.get('op')} failed "
                                     f"{'with the daemon alive' if before_kill else 'at the crash'}"
                                     f": {rec.get('msg')}"))
        err = (self.dir / "worker.err").read_text(errors="replace")
        if self._worker_rc != 0 or "Traceback" in err:
            out.append(Violation("workload", "-", f"the workload process failed "
                                 f"({self._worker_rc}): {err[-1500:]}"))
        return out

    def _daemon_log(self, name: str, who: str) -> list[Violation]:
        p = self.dir / name
        text = p.read_text(errors="replace") if p.exists() else ""
        if "Traceback" in text or "unexpected error" in text:
            i = max(text.find("Traceback"), text.find("unexpected error"))
            return [Violation("daemon", name, f"{who} logged an unexpected error: "
                              f"{text[max(0, i - 300):i + 1500]}")]
        return []

    def _wait_gone(self, pid: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                raise HarnessError(f"daemon {pid} did not exit after umount")
            time.sleep(0.02)

    def _cleanup(self) -> None:
        """Whatever happened: no process of this round left, nothing mounted."""
        if self._worker is not None:
            if self._worker.poll() is None:
                self._worker.kill()
                self._worker.wait()
            if self._worker.stdout is not None:
                self._worker.stdout.close()
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.kill()
            self._daemon.wait()
        if _is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if _is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self._bg_pid is not None and _pid_alive(self._bg_pid):
            try:
                self._wait_gone(self._bg_pid, 30)
            except HarnessError:
                os.kill(self._bg_pid, signal.SIGKILL)


def run_campaign(seed: int, rounds: int, workdir: Path, *, keep: bool = False,
                 nops: int | None = None, progress: Callable[[str], None] = print
                 ) -> list[RoundResult]:
    results = []
    for i in range(rounds):
        s = seed + i
        rd = workdir / f"round-{s}"
        try:
            res = Round(s, rd, nops=nops).run()
        except HarnessError as exc:
            res = RoundResult(s, "-", violations=[Violation("harness", "-", str(exc))],
                              workdir=str(rd))
        results.append(res)
        mark = "ok" if not res.violations else f"{len(res.violations)} VIOLATIONS"
        progress(f"round {i + 1}/{rounds} seed {s}: {res.ops_acked} ops acked, crash "
                 f"{res.crash}, in flight {res.inflight or '-'}, {res.checks} checks, "
                 f"{res.seconds:.1f}s {res.phases}: {mark}")
        for v in res.violations[:6]:
            progress(f"    {v}")
        if not res.violations and not keep:
            shutil.rmtree(rd, ignore_errors=True)
    return results


def _dkill_row(stats: list[dict[str, int]]) -> str:
    n = {k: sum(s.get(k, 0) for s in stats)
         for k in ("dkill_acked", "dkill_killed", "dkill_released")}
    return f"{n['dkill_acked']}: {n['dkill_killed']}, {n['dkill_released']}"


def summary_table(results: list[RoundResult]) -> str:
    n = len(results)
    ops = sum(r.ops_acked for r in results)
    checks = sum(r.checks for r in results)
    viol = sum(len(r.violations) for r in results)
    failed = [r for r in results if r.violations]
    by_kind: dict[str, int] = {}
    for r in results:
        for v in r.violations:
            key = v.kind + (f" ({v.suspect})" if v.suspect else "")
            by_kind[key] = by_kind.get(key, 0) + 1
    rows = [("crash model", MODEL), ("rounds", str(n)), ("rounds with violations", str(len(failed))),
            ("operations acknowledged", str(ops)),
            ("checks (files, names, dirs, xattrs, growth probes, fsck)", str(checks)),
            ("discardable files found emptied (allowed, rule 4)",
             str(sum(r.stats.get("discarded", 0) for r in results))),
            ("discardable files found as dropped while mounted",
             str(sum(r.stats.get("forked", 0) for r in results))),
            ("pager while the workload ran (extended: last look)",
             f"{sum(r.stats.get('pager_evictions', 0) for r in results)} evictions, "
             f"{sum(r.stats.get('pager_discarded', 0) for r in results)} discardable "
             f"frames let go, {sum(r.stats.get('pager_writeback_bytes', 0) for r in results) >> 20}"
             f" MiB written back, {sum(r.stats.get('drops_seen', 0) for r in results)} "
             "possible drops (D records)"),
            ("killed direct clients (acknowledged: killed with a write on the wire, "
             "connection released)", _dkill_row([r.stats for r in results])),
            ("violations", str(viol))]
    rows += [(f"  {k}", str(c)) for k, c in sorted(by_kind.items())]
    if failed:
        rows.append(("failing seeds", " ".join(str(r.seed) for r in failed)))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


# -- the power-loss model --------------------------------------------------------------------

POWER_MODEL = ("power loss: writes after the last barrier kept or dropped per device block "
               "/ checksum page; WAL cut at a commit boundary")

#: files of a volume directory a power-loss state replaces or leaves out of its copy:
#: the device and checksums (materialised), the database (base + cut WAL), and the
#: state of the daemon that died (mount.json, its lock, its log)
_STATE_FILES = {"device.img", "checksums", "meta.db", "meta.db-wal", "meta.db-shm",
                "mount.json", "lock", "sluice.log"}


@dataclasses.dataclass(frozen=True, slots=True)
class MetaEvent:
    """A line of the recording's `meta-log`: a commit or an fsync of the WAL ("durable",
    `wal` = the size that fsync surely covers), with the device log's size then."""

    event: str
    wal: int
    at: int


def load_meta_log(path: Path) -> list[MetaEvent]:
    out = []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # a torn last line
        out.append(MetaEvent(str(d["event"]), int(d["wal"]), int(d["at"])))
    return out


def wal_cuts(events: list[MetaEvent], position: int, *, early: bool = False) -> list[int]:
    """The WAL sizes a power loss at device-log byte `position` may leave: commit
    boundaries W with (last durable before it) <= W <= (last commit before it). 0 (no
    WAL: the base database alone) counts as a boundary — the recording starts with the
    WAL checkpointed away. A "durable" size may include frames of a transaction not yet
    committed (SQLite spills large ones), so the lower end is the last commit boundary
    at or below it.

    Several events share one position (a commit and the WAL fsync after it touch no
    device block in between). `early`: the power failed before the events logged at
    exactly `position` were done — the fsyncs there do not count, the commits there may
    or may not have reached the WAL; otherwise (the default) all of them were done."""
    bounds = sorted({0} | {e.wal for e in events if e.event == "commit"})
    durable = max((e.wal for e in events if e.event == "durable" and
                   (e.at < position if early else e.at <= position)), default=0)
    upper = max((e.wal for e in events if e.event == "commit" and e.at <= position),
                default=0)
    lower = max(b for b in bounds if b <= durable)
    return [b for b in bounds if lower <= b <= upper] or [lower]


def records_before(records: list[dict[str, Any]], position: int, *, early: bool = False
                   ) -> list[dict[str, Any]]:
    """The workload log as it stood when the device log was `position` bytes long: an
    operation begun at or before it is there, its acknowledgement only if that came at or
    before it too (at most one operation is in flight: the workload is sequential, so an
    operation began after the previous one's acknowledgement). The sizes are taken
    before an operation starts and after it returned, so an operation counted as
    acknowledged surely was; one counted in flight may already have returned (a looser
    judgement, never a false violation).

    `early` (see `wal_cuts`): the power failed while the log was `position` bytes long,
    before the WAL fsyncs logged there were done. Events at one position cannot be
    ordered across the two logs (a timer commit there may hold operations begun there),
    so every operation stays as it is, but an operation that claims durability — an
    fsync, a directory fsync, a shared-mmap write with msync(MS_SYNC) — acknowledged at
    exactly `position` no longer counts as acknowledged: its durability is not claimed
    (the mmap write is then in flight: its bytes may or may not be there). The msync
    was missing here until campaign seed 320603 (stop 32) took one for durable in a
    state cut before the WAL fsync it had waited for."""
    out = []
    pending: int | None = None  # an operation begun and not acknowledged by then
    syncs: set[int] = set()  # the operations that claim durability when acknowledged
    for rec in records:
        k = rec.get("k")
        at = int(rec.get("at", 1 << 62))
        if k == "B" and at <= position:
            if pending is not None:
                break  # the next operation began after that acknowledgement: later
            pending = rec["id"]
            if rec["op"] in ("fsync", "fsyncdir") or (rec["op"] == "mmap" and
                                                      rec.get("msync")):
                syncs.add(rec["id"])
            out.append(rec)
        elif k == "A" and at <= position:
            pending = None
            if not (early and at == position and rec["id"] in syncs):
                out.append(rec)
        elif k == "D" and at <= position:
            out.append(rec)
        elif k == "hello":
            out.append(rec)
    return out


@dataclasses.dataclass
class PowerState:
    """One materialised power-loss state of a recorded run and what its check found."""

    index: int
    seed: int
    #: the power loss follows the first `crash_at` records of the device log,
    #: `position` bytes of it; `how` the crash point was chosen
    crash_at: int = 0
    position: int = 0
    how: str = ""
    #: the events logged at exactly `position` had not happened yet (see `wal_cuts`)
    early: bool = False
    #: pieces (device blocks, checksum pages) written after the last barrier, and kept
    pending: int = 0
    kept: int = 0
    keep_fraction: float = 0.0
    #: the WAL cut and the range it was chosen from (bytes)
    wal: int = 0
    wal_range: tuple[int, int] = (0, 0)
    ops_acked: int = 0
    inflight: str = ""
    checks: int = 0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    violations: list[Violation] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"state {self.index} (seed {self.seed}): crash after record {self.crash_at} "
                f"({self.how}{', early' if self.early else ''}, byte {self.position}), kept {self.kept}/{self.pending} "
                f"pending pieces, WAL cut {self.wal} of {self.wal_range[0]}.."
                f"{self.wal_range[1]}, {self.ops_acked} ops acked"
                f"{', in flight ' + self.inflight if self.inflight else ''}")


@dataclasses.dataclass
class PowerRunResult:
    seed: int
    nops: int
    ops_acked: int = 0
    #: records and barriers of the device log, commits and fsyncs of the WAL
    records: int = 0
    barriers: int = 0
    commits: int = 0
    durables: int = 0
    #: violations of the recorded run itself (the workload, the recording daemon)
    violations: list[Violation] = dataclasses.field(default_factory=list)
    states: list[PowerState] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    workdir: str = ""
    #: the recorded run's killed direct clients (`_dkill_figures`)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def all_violations(self) -> list[Violation]:
        return self.violations + [v for s in self.states for v in s.violations]

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


class PowerRun(Round):
    """One recorded run and the power-loss states taken from it.

    The run: a fresh volume, `sluice mount --foreground` with SLUICE_RECORD_DIR set, the
    seeded workload (each record carries the device log's size), SIGKILL of the daemon
    once the seeded number of operations was acknowledged, then a copy of the WAL it
    left. Each state: a crash point in the device log (right after a barrier, just
    before one completed, right after an acknowledgement, or anywhere), the pieces
    written after the last barrier each kept or dropped (seeded), a WAL cut between the
    last durable and the last commit before that point; a copy of the volume made of
    it is mounted (recovery), judged by the Oracle with the operations acknowledged
    before the crash point, unmounted, and `fsck --verify-data` must be clean."""

    def __init__(self, seed: int, workdir: Path, *, states: int = 10, nops: int | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 extended: bool | None = None) -> None:
        super().__init__(seed, workdir, nops=nops, log=log, extended=extended)
        # The kill only ends the recording: states are taken from anywhere in it.
        self.crash = CrashPoint(self.rng.randint(Workload.SETUP_OPS + 20,
                                                 self.nops + Workload.SETUP_OPS), "ack", 0)
        self.nstates = states
        self.rec_dir = workdir / "rec"
        self.daemon_env = {**os.environ, "SLUICE_RECORD_DIR": str(self.rec_dir)}
        self.worker_extra = ["--record-log", str(self.rec_dir / "log")]
        self.wal_copy = workdir / "recorded.wal"

    def run_power(self, progress: Callable[[str], None] = lambda s: None) -> PowerRunResult:
        t0 = time.monotonic()
        res = PowerRunResult(self.seed, self.nops, workdir=str(self.dir))
        try:
            self._record(res)
            if not any(v.kind == "harness" for v in res.violations):
                for k in range(self.nstates):
                    st = self._state(k)
                    res.states.append(st)
                    mark = "ok" if not st.violations else f"{len(st.violations)} VIOLATIONS"
                    progress(f"  {st}: {st.checks} checks, {st.seconds:.1f}s: {mark}")
                    for v in st.violations[:6]:
                        progress(f"      {v}")
        finally:
            self._cleanup()
            self._cleanup_state()
            res.seconds = round(time.monotonic() - t0, 2)
        return res

    # the recording

    def _record(self, res: PowerRunResult) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        r = _sluice("mkfs", str(self.volume), "--size", "1G", "-q")
        if r.returncode:
            raise HarnessError(f"mkfs failed: {r.stderr.strip()}")
        self._start_daemon()
        killed_at = self._workload()
        assert self._daemon is not None
        self._daemon.wait(timeout=30)
        # The dead daemon's mount: nobody remounts this volume, so unmount it here.
        for extra in ([], ["-z"]):
            if _is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", *extra, str(self.mnt)],
                               capture_output=True)
        wal = self.volume / "meta.db-wal"
        shutil.copyfile(wal, self.wal_copy) if wal.exists() else self.wal_copy.write_bytes(b"")
        (self.dir / "workload.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in self.records))
        oracle = Oracle(self.records)
        res.ops_acked = oracle.acked_ops
        res.violations += self._workload_errors(oracle, killed_at)
        res.violations += _dkill_violations(self.records, oracle)
        res.violations += self._daemon_log("daemon1.log", "the recording daemon")
        res.stats = _dkill_figures(self.records)
        self.recording = Recording.load(self.rec_dir)
        self.events = load_meta_log(self.rec_dir / "meta-log")
        recs = self.recording.records
        self.ends = [r.at + (r.b if r.kind in (ATTACH, WRITE) else 0) for r in recs]
        self.barrier_idx = [i for i, r in enumerate(recs) if r.kind == BARRIER]
        res.records = len(recs)
        res.barriers = len(self.barrier_idx)
        res.commits = sum(1 for e in self.events if e.event == "commit")
        res.durables = sum(1 for e in self.events if e.event == "durable")
        wal_size = self.wal_copy.stat().st_size
        if any(e.wal > wal_size for e in self.events if e.event == "commit"):
            res.violations.append(Violation("harness", str(self.wal_copy), f"the WAL left "
                                            f"behind ({wal_size} bytes) is shorter than a "
                                            "recorded commit: was it checkpointed?"))
        hello = next((r for r in self.records if r.get("k") == "hello"), None)
        self.hello_at = int(hello.get("at", 0)) if hello else 0
        self.ack_ats = [int(r["at"]) for r in self.records
                        if r.get("k") == "A" and int(r.get("at", -1)) >= self.hello_at]

    # one state

    def _crash_point(self, rng: random.Random) -> tuple[int, str, bool]:
        """(crash_at, how it was chosen, early: see `wal_cuts`)."""
        n, how = self._crash_record(rng)
        if how.startswith("between"):
            return n, how, True
        return n, how, rng.random() < 0.5

    def _crash_record(self, rng: random.Random) -> tuple[int, str]:
        n_all = len(self.ends)
        n0 = min(bisect.bisect_left(self.ends, self.hello_at) + 1, n_all)
        bars = [i for i in self.barrier_idx if i >= n0]
        r = rng.random()
        if r < 0.25 and bars:
            return rng.choice(bars) + 1, "after a barrier"
        if r < 0.4 and bars:
            return rng.choice(bars), "before a barrier completed"
        commits = [e.at for e in self.events if e.event == "commit" and e.at >= self.hello_at]
        if r < 0.6 and commits:
            # between a commit and the fsync that makes it durable: the WAL may be cut
            # before it, so the metadata rolls back while the device keeps its barrier
            return bisect.bisect_right(self.ends, rng.choice(commits)), \
                "between a commit and its WAL fsync"
        if r < 0.8 and self.ack_ats:
            return bisect.bisect_right(self.ends, rng.choice(self.ack_ats)), \
                "after an acknowledgement"
        return rng.randint(n0, n_all), "anywhere"

    def _state(self, k: int) -> PowerState:
        t0 = time.monotonic()
        seed = self.seed * 1000 + k
        rng = random.Random(seed)
        st = PowerState(k, seed)
        sdir = self.dir / f"state-{k}"
        try:
            st.crash_at, st.how, st.early = self._crash_point(rng)
            st.position = self.ends[st.crash_at - 1] if st.crash_at else 0
            choices = self.recording.choices(st.crash_at)
            st.keep_fraction = rng.choice((0.0, 0.5, 0.5, 0.9, 1.0, round(rng.random(), 2)))
            keep = {c for c in choices if rng.random() < st.keep_fraction}
            st.pending, st.kept = len(choices), len(keep)
            cuts = wal_cuts(self.events, st.position, early=st.early)
            st.wal_range = (cuts[0], cuts[-1])
            r = rng.random()
            st.wal = cuts[0] if r < 0.3 else cuts[-1] if r < 0.6 else rng.choice(cuts)
            vol = build_state(sdir / "vol", self.volume, self.recording, self.wal_copy,
                              crash_at=st.crash_at, keep=keep, wal=st.wal)
            recs = records_before(self.records, st.position, early=st.early)
            (sdir / "workload.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
            oracle = Oracle(recs)
            st.ops_acked = oracle.acked_ops
            if oracle.inflight is not None:
                st.inflight = f"{oracle.inflight['id']}:{oracle.inflight['op']}"
            stats = CheckStats()
            st.violations += check_state(vol, self.mnt, oracle, seed, stats)
            st.stats = {**dataclasses.asdict(stats), "fsck": 1}
            st.checks = stats.total() + 1
        except HarnessError as exc:
            st.violations.append(Violation("harness", str(sdir), str(exc)))
        except Exception:  # noqa: BLE001 - a bug of the harness: this state's finding
            st.violations.append(Violation("harness", str(sdir), traceback.format_exc()))
        finally:
            self._cleanup_state()
            st.seconds = round(time.monotonic() - t0, 2)
        if not st.violations:
            shutil.rmtree(sdir, ignore_errors=True)
        return st

    def _cleanup_state(self) -> None:
        if _is_mounted(self.mnt):  # a state's check always unmounts; a dead mount stays
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def build_state(vol: Path, volume: Path, recording: Recording, wal_copy: Path, *,
                crash_at: int, keep: Collection[Any], wal: int) -> Path:
    """Make `vol`, a copy of `volume` holding one power-loss state: the device and
    checksums `recording` materialises for (crash_at, keep), base-meta.db as meta.db
    with the recorded WAL (`wal_copy`) cut to `wal` bytes beside it, the other files as
    they are, and no state of the daemon that died (mount.json, lock, log)."""
    vol.mkdir(parents=True, mode=0o700)
    os.chmod(vol, 0o700)
    for p in volume.iterdir():
        if p.name not in _STATE_FILES and p.is_file():
            shutil.copyfile(p, vol / p.name)
    recording.materialise(vol, keep=keep, crash_at=crash_at)
    shutil.copyfile(recording.directory / "base-meta.db", vol / "meta.db")
    if wal:
        with open(wal_copy, "rb") as src, open(vol / "meta.db-wal", "wb") as dst:
            data = src.read(wal)
            if len(data) != wal:
                raise HarnessError(f"the recorded WAL has {len(data)} bytes, not {wal}")
            dst.write(data)
    for p in vol.iterdir():
        os.chmod(p, 0o600)
    return vol


def check_state(vol: Path, mnt: Path, oracle: Oracle, seed: int,
                stats: CheckStats) -> list[Violation]:
    """Mount the volume `vol` at `mnt` (recovery), judge it with `oracle` (check, then
    the growth probe), unmount it, then `fsck --verify-data` must be clean: the
    violations found. Leaves nothing mounted and no daemon running."""
    out: list[Violation] = []
    r = _sluice("mount", str(vol), str(mnt), *MOUNT_ARGS)
    if r.returncode:
        return [Violation("daemon", "/", f"recovery mount failed: {r.stderr.strip()}")]
    pid: int | None = int(json.loads((vol / "mount.json").read_text())["pid"])
    try:
        out += oracle.check(mnt, stats)
        out += oracle.probe_growth(mnt, random.Random(seed ^ 0xBEEF), stats)
        r = _sluice("umount", str(mnt), timeout=90)
        if r.returncode:
            out.append(Violation("daemon", "/", f"umount failed: {r.stderr.strip()}"))
            return out
    finally:
        for extra in ([], ["-z"]):
            if _is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", *extra, str(mnt)], capture_output=True)
        deadline = time.monotonic() + 30
        while pid is not None and _pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # this harness started it (`sluice mount`)
                pid = None
            time.sleep(0.02)
    log = vol / "sluice.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if "Traceback" in text or "unexpected error" in text:
        i = max(text.find("Traceback"), text.find("unexpected error"))
        out.append(Violation("daemon", "sluice.log", "the recovered daemon logged an "
                             f"unexpected error: {text[max(0, i - 300):i + 1500]}"))
    out += fsck_clean(vol)
    return out


def run_power_campaign(seed: int, runs: int, states: int, workdir: Path, *,
                       keep: bool = False, nops: int | None = None,
                       progress: Callable[[str], None] = print) -> list[PowerRunResult]:
    results = []
    for i in range(runs):
        s = seed + i
        rd = workdir / f"run-{s}"
        run = PowerRun(s, rd, states=states, nops=nops)
        progress(f"run {i + 1}/{runs} seed {s}: recording {run.nops} ops, daemon killed "
                 f"after {run.crash.after_acks} acks")
        try:
            res = run.run_power(progress)
        except HarnessError as exc:
            res = PowerRunResult(s, run.nops, workdir=str(rd),
                                 violations=[Violation("harness", "-", str(exc))])
        results.append(res)
        bad = res.all_violations()
        progress(f"run {i + 1}/{runs} seed {s}: {res.ops_acked} ops acked, {res.records} "
                 f"device-log records, {res.barriers} barriers, {res.commits} commits, "
                 f"{res.durables} WAL fsyncs, {len(res.states)} states, {res.seconds:.1f}s: "
                 f"{'ok' if not bad else f'{len(bad)} VIOLATIONS'}")
        for v in res.violations[:6]:
            progress(f"    {v}")
        if not bad and not keep:
            shutil.rmtree(rd, ignore_errors=True)
    return results


def power_summary_table(results: list[PowerRunResult]) -> str:
    states = [s for r in results for s in r.states]
    viol = [v for r in results for v in r.all_violations()]
    by_kind: dict[str, int] = {}
    for v in viol:
        key = v.kind + (f" ({v.suspect})" if v.suspect else "")
        by_kind[key] = by_kind.get(key, 0) + 1
    rolled = sum(1 for s in states if s.wal < s.wal_range[1])
    dropped = sum(1 for s in states if s.kept < s.pending)
    hows: dict[str, int] = {}
    for s in states:
        hows[s.how] = hows.get(s.how, 0) + 1
    rows = [("crash model", POWER_MODEL), ("recorded runs", str(len(results))),
            ("power-loss states", str(len(states))),
            ("crash points", ", ".join(f"{k} {v}" for k, v in sorted(hows.items()))
             + f"; early {sum(1 for s in states if s.early)}"),
            ("states with violations", str(sum(1 for s in states if s.violations))),
            ("operations acknowledged (recorded runs)", str(sum(r.ops_acked for r in results))),
            ("operations acknowledged before the crash points",
             str(sum(s.ops_acked for s in states))),
            ("states that dropped pending pieces", f"{dropped} "
             f"({sum(s.pending - s.kept for s in states)} of {sum(s.pending for s in states)} "
             "pieces dropped)"),
            ("states with the WAL cut before its last commit", str(rolled)),
            ("checks (files, names, dirs, xattrs, growth probes, fsck)",
             str(sum(s.checks for s in states))),
            ("discardable files found emptied (allowed, rule 4)",
             str(sum(s.stats.get("discarded", 0) for s in states))),
            ("discardable files found as dropped while mounted",
             str(sum(s.stats.get("forked", 0) for s in states))),
            ("killed direct clients of the recorded runs (acknowledged: killed with a "
             "write on the wire, connection released)", _dkill_row([r.stats for r in results])),
            ("violations", str(len(viol)))]
    rows += [(f"  {k}", str(c)) for k, c in sorted(by_kind.items())]
    failing = [f"{r.seed}" + (f":{','.join(str(s.index) for s in r.states if s.violations)}"
                              if any(s.violations for s in r.states) else "")
               for r in results if r.all_violations()]
    if failing:
        rows.append(("failing runs (seed:states)", " ".join(failing)))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the workload process the driver starts (internal)
        w = argparse.ArgumentParser(prog="crashtest.py worker")
        w.add_argument("mountpoint")
        w.add_argument("--seed", type=int, required=True)
        w.add_argument("--ops", type=int, required=True)
        w.add_argument("--record-log", default=None)
        w.add_argument("--extended", action="store_true")
        w.add_argument("--track-drops", action="store_true")
        return worker_main(w.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("process", "power"), default="process",
                    help="process: SIGKILL of the daemon (default); power: power-loss "
                         "states materialised from recorded runs")
    ap.add_argument("--rounds", type=int, default=10,
                    help="rounds (process) or recorded runs (power) (default 10)")
    ap.add_argument("--states", type=int, default=10,
                    help="power-loss states per recorded run (default 10)")
    ap.add_argument("--seed", type=int, default=None, help="campaign seed (round i: S+i)")
    ap.add_argument("--ops", type=int, default=None, help="operations per round (default: seeded, 100-260)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where rounds run (default: a new directory in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep every round's directory")
    ap.add_argument("--mount-args", default="",
                    help="extra arguments of every `sluice mount`, e.g. \"--writeback\"")
    ap.add_argument("--extended", action="store_true",
                    help="the extended workload: fallocate (mode 0, KEEP_SIZE, PUNCH_HOLE, "
                         "ZERO_RANGE), shared-mmap writes and msync, O_TMPFILE + linkat, "
                         "RENAME_EXCHANGE, discardable hints on existing files, and drops of "
                         "discardable files while mounted followed in the model")
    ap.add_argument("--writeback", action="store_true",
                    help="mount every volume with write-back caching (`sluice mount "
                         "--writeback`): dirty pages stay in the pager until a barrier, "
                         "aging, reclaim or an fsync writes them")
    ap.add_argument("--cache-size", default=None, metavar="SIZE",
                    help="`sluice mount --cache-size` of every mount, e.g. 2M: a small pool "
                         "makes reclaim write back and drop pages during the workload")
    args = ap.parse_args(argv)
    MOUNT_ARGS[:] = args.mount_args.split()
    if args.writeback and "--writeback" not in MOUNT_ARGS:
        MOUNT_ARGS.append("--writeback")
    if args.cache_size:
        MOUNT_ARGS.extend(["--cache-size", args.cache_size])
    global EXTENDED
    EXTENDED = args.extended
    if os.geteuid() != 0:
        print("crashtest: run as root (it mounts FUSE volumes)", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C, so each round's cleanup (kill its daemons, unmount)
    # runs on the way out.
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(128 + signal.SIGTERM))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sluice-crash-"))
    t0 = time.monotonic()
    if args.model == "power":
        return power_main(args, seed, workdir, t0)
    print(f"crash model: {MODEL}" + (f"; mount {' '.join(MOUNT_ARGS)}" if MOUNT_ARGS else "")
          + ("; extended workload" if EXTENDED else ""))
    print(f"campaign seed {seed}, {args.rounds} rounds (round i uses seed {seed}+i), "
          f"workdir {workdir}", flush=True)
    results = run_campaign(seed, args.rounds, workdir, keep=args.keep, nops=args.ops,
                           progress=lambda s: print(s, flush=True))
    print()
    print(summary_table(results))
    print(f"{time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "model": MODEL, "seed": seed, "rounds": len(results),
            "operations": sum(r.ops_acked for r in results),
            "checks": sum(r.checks for r in results),
            "violations": sum(len(r.violations) for r in results),
            "results": [r.as_json() for r in results]}, indent=1))
    if not any(r.violations for r in results) and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.violations for r in results) else 0


def power_main(args: argparse.Namespace, seed: int, workdir: Path, t0: float) -> int:
    print(f"crash model: {POWER_MODEL}"
          + (f"; mount {' '.join(MOUNT_ARGS)}" if MOUNT_ARGS else "")
          + ("; extended workload" if EXTENDED else ""))
    print(f"campaign seed {seed}, {args.rounds} recorded runs (run i uses seed {seed}+i, "
          f"its state k seed 1000*({seed}+i)+k), {args.states} states each, "
          f"workdir {workdir}", flush=True)
    results = run_power_campaign(seed, args.rounds, args.states, workdir, keep=args.keep,
                                 nops=args.ops, progress=lambda s: print(s, flush=True))
    print()
    print(power_summary_table(results))
    print(f"{time.monotonic() - t0:.0f} s")
    bad = any(r.all_violations() for r in results)
    if args.json:
        states = [s for r in results for s in r.states]
        args.json.write_text(json.dumps({
            "model": POWER_MODEL, "seed": seed, "runs": len(results),
            "states": len(states),
            "operations": sum(r.ops_acked for r in results),
            "operations_before_crash_points": sum(s.ops_acked for s in states),
            "checks": sum(s.checks for s in states),
            "violations": sum(len(r.all_violations()) for r in results),
            "results": [r.as_json() for r in results]}, indent=1))
    if not bad and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
