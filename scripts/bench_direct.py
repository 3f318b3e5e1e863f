#!/usr/bin/env python3
"""Benchmark sluice's direct data path against FUSE and a plain directory.

In one run, with the same file contents, measures
  (a) plain   a plain directory on the same disk (os.write / os.preadv on an fd)
  (b) fuse    a freshly made sluice volume (timing profile `none`) through its FUSE mount
  (c) direct  the direct client library (kernelshim.client) on that same mount

Workloads (sizes shrink with --quick):
  seq write 4M+fsync   SIZE MiB in 4 MiB requests (plain/FUSE: os.write on an fd;
                       direct: File.pwrite + commit), fsync at the end, inside the time
  hot seq read 1M/4M   the file read back with 1 MiB / 4 MiB requests into one
                       preallocated buffer (os.preadv; direct: File.readinto) while the
                       plain file and the volume's backing file are in the page cache
  cold seq read 1M/4M  the same after `sync; echo 3 > /proc/sys/vm/drop_caches`; sluice
                       is remounted before each cold read, so its pager is cold too
  rand read 4K         4 KiB reads at random aligned offsets for DURATION s, 1 job (IOPS)
  rand write 4K        4 KiB writes at random aligned offsets of the existing file for
                       DURATION s, 1 job (IOPS; no fsync: plain writes stay in the page
                       cache, sluice writes go through to the backing file's page cache;
                       direct: one commit at the end, inside the time). FUSE overwrites
                       data.bin, the direct path the file its own last sequential write
                       made: the same offsets in the same order, each on a file of its
                       own, so neither finds blocks the other's copy-on-write already
                       split out of their extents
  rand read 4K xN      N processes (--clients, default 4) at once, each doing 4 KiB
                       random reads for DURATION s on its own: through the FUSE mount
                       (O_DIRECT preadv) and through the direct path (a Client each);
                       the figure is the sum of their IOPS
  metadata latency     create (open O_CREAT|O_EXCL + close), stat (statx with
                       AT_STATX_FORCE_SYNC, which makes FUSE ask the daemon instead of
                       answering from the kernel's attribute cache) and unlink of N files
                       on the FUSE mount: p50/p99 alone, then again while another process
                       streams 4 MiB reads of the data file through the direct path;
                       alone and streaming rounds alternate (--meta-rounds each) and the
                       samples of each kind are pooled

Sequential workloads run --reps times (the best is reported; all samples go to the
JSON); the random ones once. Before each sequential write the script writes and
deletes a scratch file of the same size: in a VM that returns freed memory to its host
(virtio-balloon free page reporting, as on this machine) the first touch of a page
costs more than the filesystem under test, and this puts all three on the same footing.

Run as root:  .venv/bin/python scripts/bench_direct.py [--size-mb 1024] [--quick]
              [--json out.json] [--duration 5] [--files 2000] [--reps 3] [--meta-rounds 3]
              [--phases write,hot,cold,random,concurrent,metadata] [--clients 4]
              [--no-pace]

Progress goes to stderr, the tables to stdout. Everything made (mounts, volume, files,
the streaming process) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import mmap
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import (BS, REPO, MiB, SluiceMount, cpu_seconds, drop_caches, io_until, loadavg,
                      log, random_offsets, read_to_end, signals_held, stop_processes,
                      warm_memory)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHUNK = 4 * MiB
#: distinct 4 MiB chunks of random data; chunk i of every file is POOL[i % POOL_CHUNKS]
POOL_CHUNKS = 16
SYSTEMS = ("plain", "fuse", "direct")


def other_fuse_mounts(ours: Path) -> list[str]:
    real = os.path.realpath(ours)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return [line.split()[1] for line in f
                if line.split()[2].startswith("fuse.") and line.split()[1] != real]


# -- statx(AT_STATX_FORCE_SYNC): a stat that reaches the FUSE daemon ------------------------

_AT_FDCWD = -100
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_statx_fn = getattr(_libc, "statx", None)
if _statx_fn is not None:
    _statx_fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                          ctypes.c_void_p]
    _statx_fn.restype = ctypes.c_int
_STATX_BUF = ctypes.create_string_buffer(256)


def stat_sync(path: bytes) -> None:
    """statx forcing a fresh GETATTR (FUSE otherwise answers from its 300 s attr cache)."""
    if _statx_fn is None:
        os.stat(path)
        return
    if _statx_fn(_AT_FDCWD, path, _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, _STATX_BUF) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


# -- data ---------------------------------------------------------------------------------

class Pool:
    """The file contents: SIZE MiB made of POOL_CHUNKS random 4 MiB chunks (seeded)."""

    def __init__(self, seed: int = 12345) -> None:
        rnd = random.Random(seed)
        self.buf = mmap.mmap(-1, POOL_CHUNKS * CHUNK)
        self.buf[:] = rnd.randbytes(POOL_CHUNKS * CHUNK)
        self.mv = memoryview(self.buf)

    def chunk(self, i: int) -> memoryview:
        j = i % POOL_CHUNKS
        return self.mv[j * CHUNK:(j + 1) * CHUNK]

    def chunks(self, size: int) -> Iterator[memoryview]:
        """The chunks of a file of `size` bytes, in order."""
        return (self.chunk(i) for i in range(size // CHUNK))

    def expected(self, off: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            i, r = divmod(off, CHUNK)
            take = min(n, CHUNK - r)
            out += self.chunk(i)[r:r + take]
            off += take
            n -= take
        return bytes(out)


# -- workloads: plain and FUSE (fd based) -------------------------------------------------

def fd_seq_write(path: Path, size: int, pool: Pool) -> tuple[float, float]:
    """(seconds in all, seconds of them in the final fsync)"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for i in range(size // CHUNK):
            if os.write(fd, pool.chunk(i)) != CHUNK:
                raise RuntimeError("short write")
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return t2 - t0, t2 - t1


def fd_seq_read(path: Path, size: int, req: int) -> float:
    buf = mmap.mmap(-1, req)
    fd = os.open(path, os.O_RDONLY)
    try:
        total, dt = read_to_end(fd, buf, positional=True)
    finally:
        os.close(fd)
    if total != size:
        raise RuntimeError(f"read {total} bytes of {path}, expected {size}")
    return dt


def fd_rand(path: Path, size: int, seconds: float, *, write: bool,
            pool: Pool) -> tuple[int, float]:
    offs = random_offsets(size, 777 if write else 555)
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    buf = mmap.mmap(-1, BS)
    buf[:] = pool.chunk(3)[:BS]
    bufs = [buf]
    op = os.pwritev if write else os.preadv
    now = time.perf_counter
    try:
        t0 = now()
        n = io_until(op, fd, bufs, offs, seconds, batch=32, error="short I/O")
        dt = now() - t0
    finally:
        os.close(fd)
    return n, dt


# -- workloads: the direct client ---------------------------------------------------------

def direct_seq_write(client, rel: str, size: int, pool: Pool) -> tuple[float, float]:
    """(seconds in all, seconds of them in the final fsync)"""
    t0 = time.perf_counter()
    f = client.open(rel, "w")
    try:
        for i in range(size // CHUNK):
            f.pwrite(pool.chunk(i), i * CHUNK)
        f.commit()
        t1 = time.perf_counter()
        f.fsync()
        t2 = time.perf_counter()
    finally:
        f.close()
    return t2 - t0, t2 - t1


def direct_seq_read(client, rel: str, size: int, req: int) -> float:
    buf = mmap.mmap(-1, req)
    f = client.open(rel, "r")
    try:
        total = 0
        t0 = time.perf_counter()
        while True:
            n = f.readinto(buf, total)
            if not n:
                break
            total += n
        dt = time.perf_counter() - t0
    finally:
        f.close()
    if total != size:
        raise RuntimeError(f"direct read {total} bytes of {rel}, expected {size}")
    return dt


def direct_rand(client, rel: str, size: int, seconds: float, *, write: bool,
                pool: Pool) -> tuple[int, float]:
    offs = random_offsets(size, 777 if write else 555)
    buf = bytearray(pool.chunk(3)[:BS])
    f = client.open(rel, "r+" if write else "r")
    now = time.perf_counter
    try:
        op = f.pwrite if write else f.readinto
        n = 0
        t0 = now()
        t_end = t0 + seconds
        while True:
            for k in range(32):
                if op(buf, offs[(n + k) & 0xFFFF]) != BS:
                    raise RuntimeError("short I/O")
            n += 32
            if now() >= t_end:
                break
        if write:
            f.commit()
        dt = now() - t0
    finally:
        f.close()
    return n, dt


def verify_direct(client, rel: str, size: int, pool: Pool) -> None:
    """The file read through the direct path holds the expected bytes (not timed)."""
    f = client.open(rel, "r")
    try:
        step = 16 * MiB
        for off in range(0, size, step):
            n = min(step, size - off)
            if bytes(f.pread(n, off)) != pool.expected(off, n):
                raise RuntimeError(f"{rel}: wrong data in [{off}, {off + n})")
    finally:
        f.close()


def verify_fd(path: Path, size: int, pool: Pool) -> None:
    with open(path, "rb") as fh:
        step = 16 * MiB
        for off in range(0, size, step):
            n = min(step, size - off)
            if fh.read(n) != pool.expected(off, n):
                raise RuntimeError(f"{path}: wrong data in [{off}, {off + n})")


# -- metadata latency -----------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def meta_round(d: Path, n: int) -> dict[str, list[float]]:
    """Per-operation latencies (seconds) of n creates, n stats, n unlinks in `d`."""
    d.mkdir()
    names = [os.fsencode(d / f"f{i:06d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    now = time.perf_counter
    lat: dict[str, list[float]] = {"create": [], "stat": [], "unlink": []}
    rec = lat["create"].append
    for p in names:
        t = now()
        os.close(os.open(p, flags, 0o644))
        rec(now() - t)
    rec = lat["stat"].append
    for p in names:
        t = now()
        stat_sync(p)
        rec(now() - t)
    rec = lat["unlink"].append
    for p in names:
        t = now()
        os.unlink(p)
        rec(now() - t)
    d.rmdir()
    return lat


def rand_worker(mountpoint: str, system: str, size: int, seconds: float, seed: int) -> int:
    """One process of the concurrent phase: prints ops, seconds, CPU seconds."""
    offs = random_offsets(size, seed)
    n = 0
    if system == "direct":
        from kernelshim.client import Client
        with Client.connect(mountpoint) as c:
            f = c.open("data.bin", "r")
            buf = bytearray(BS)
            t0 = time.perf_counter()
            t_end = t0 + seconds
            while True:
                for k in range(32):
                    if f.readinto(buf, offs[(n + k) & 0xFFFF]) != BS:
                        raise RuntimeError("short read")
                n += 32
                if time.perf_counter() >= t_end:
                    break
            dt = time.perf_counter() - t0
            f.close()
    else:
        fd = os.open(os.path.join(mountpoint, "data.bin"), os.O_RDONLY | os.O_DIRECT)
        mbuf = mmap.mmap(-1, BS)
        t0 = time.perf_counter()
        n = io_until(os.preadv, fd, [mbuf], offs, seconds, batch=32, error="short read")
        dt = time.perf_counter() - t0
        os.close(fd)
    print(n, dt, time.process_time())
    return 0


def stream_worker(mountpoint: str, rel: str, req: int) -> int:
    """Child process: stream reads of `rel` through the direct path until SIGTERM; prints
    one JSON line {bytes, seconds} at the end."""
    from kernelshim.client import Client
    stop = False

    def _stop(*_a) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, _stop)
    buf = mmap.mmap(-1, req)
    total = 0
    with Client.connect(mountpoint) as c:
        f = c.open(rel, "r")
        size = int(f.stat()["size"])
        print("ready", flush=True)
        t0 = time.perf_counter()
        off = 0
        while not stop:
            n = f.readinto(buf, off)
            total += n
            off = off + n if n and off + n < size else 0
        dt = time.perf_counter() - t0
        f.close()
    print(json.dumps({"bytes": total, "seconds": dt}), flush=True)
    return 0


# -- driver ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.size = args.size_mb * MiB
        self.plain_dir = tmp / "plain"
        self.plain_dir.mkdir()
        vol_size = max(8 << 30, 3 * self.size + (1 << 30))
        self.mnt = SluiceMount(tmp / "vol", tmp / "mnt", vol_size)
        (tmp / "mnt").mkdir()
        self.pool = Pool()
        self.client = None
        #: the direct path's random writes go to the file its last sequential write made
        self.direct_rand_file = "data.bin"
        self.streamer: subprocess.Popen | None = None
        #: workload -> system -> samples (MB/s or IOPS)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.units: dict[str, str] = {}
        #: workload -> system -> CPU seconds per GB (or per 1000 ops) of client and daemon
        self.cpu: dict[str, dict[str, dict[str, float]]] = {}
        self.meta: dict[str, dict[str, dict[str, float]]] = {}
        #: workload -> system -> seconds spent in the final fsync, per sample
        self.fsync_s: dict[str, dict[str, list[float]]] = {}
        self.loadavg: list[tuple[str, str]] = []
        self.extra: dict[str, object] = {}

    # -- helpers ----------------------------------------------------------------------

    @property
    def fuse_file(self) -> Path:
        return self.mnt.mountpoint / "data.bin"

    def plain_file(self) -> Path:
        return self.plain_dir / "data.bin"

    def connect(self) -> None:
        from kernelshim.client import Client
        self.close_client()
        self.client = Client.connect(self.mnt.mountpoint, pace=not self.args.no_pace)

    def close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    def remount(self) -> None:
        self.close_client()
        self.mnt.remount()
        self.connect()

    def record(self, workload: str, unit: str, system: str, value: float,
               cpu_client: float, cpu_daemon: float, work: float) -> None:
        self.units[workload] = unit
        self.samples.setdefault(workload, {}).setdefault(system, []).append(value)
        # keep the CPU figures of the best sample
        best = max(self.samples[workload][system])
        if value == best:
            self.cpu.setdefault(workload, {})[system] = {
                "client_s": cpu_client / work, "daemon_s": cpu_daemon / work}
        log(f"  {workload:24} {system:6} {value:10.0f} {unit}   (client cpu "
            f"{cpu_client:.2f}s, daemon cpu {cpu_daemon:.2f}s)")

    @staticmethod
    def _waits(clock) -> list[int]:
        return [clock.paced, clock.early, clock.caught, clock.late] if clock else [0] * 4

    def measure(self, workload: str, unit: str, system: str, fn, amount: float) -> None:
        """Run fn() -> seconds, (seconds, fsync seconds) or (ops, seconds) when `unit` is
        IOPS; record amount/seconds (MB/s) or ops/seconds."""
        pid = self.mnt.pid if system != "plain" else None
        clock = self.client.clock if system == "direct" and self.client else None
        w0 = self._waits(clock)
        c0, d0 = time.process_time(), cpu_seconds(pid)
        r = fn()
        c1, d1 = time.process_time(), cpu_seconds(pid)
        if clock is not None:
            # How the client waited for its replies (kernelshim/hybridwait.py): waits
            # paced, of which the reply was there after the sleep, caught by polling,
            # or late (waited for in recv).
            w = [b - a for a, b in zip(w0, self._waits(clock))]
            self.extra.setdefault("paced_waits", {}).setdefault(workload, []).append(w)
            if w[0]:
                log(f"  {'':24} {'':6} paced waits {w[0]}: early {w[1]}, caught {w[2]}, "
                    f"late {w[3]}")
        if unit == "IOPS":
            ops, dt = r
            value = ops / dt
            work = ops / 1000.0  # CPU per 1000 ops
        else:
            if isinstance(r, tuple):
                dt, fsync_s = r
                self.fsync_s.setdefault(workload, {}).setdefault(system, []).append(fsync_s)
            else:
                dt = r
            value = amount / dt / 1e6
            work = amount / 1e9  # CPU per GB
        self.record(workload, unit, system, value, c1 - c0, d1 - d0, work)

    # -- phases -----------------------------------------------------------------------

    def seq_write(self) -> None:
        a, size, pool = self.args, self.size, self.pool
        scratch = self.plain_dir / "scratch.bin"
        for rep in range(a.reps):
            log(f"seq write, round {rep + 1}/{a.reps}")
            for system in SYSTEMS:
                last = rep == a.reps - 1
                if system == "plain":
                    target = self.plain_file()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target)
                    warm_memory(scratch, pool.chunks(size), fsync=True)
                    self.measure("seq write 4M+fsync", "MB/s", system,
                                 lambda: fd_seq_write(target, size, pool), size)
                elif system == "fuse":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.fuse_file)
                    os.sync()
                    warm_memory(scratch, pool.chunks(size), fsync=True)
                    self.measure("seq write 4M+fsync", "MB/s", system,
                                 lambda: fd_seq_write(self.fuse_file, size, pool), size)
                else:
                    # A fresh name each round, never looked up through the mount before
                    # it exists (builds before ecbdd5f did not invalidate the kernel's
                    # negative dentry on a direct create, which hid the file).
                    rel = f"direct-{rep}.bin"
                    os.sync()
                    warm_memory(scratch, pool.chunks(size), fsync=True)
                    self.measure("seq write 4M+fsync", "MB/s", system,
                                 lambda: direct_seq_write(self.client, rel, size, pool), size)
                    if last:
                        log("verifying the contents (not timed)")
                        verify_direct(self.client, rel, size, pool)
                        verify_direct(self.client, "data.bin", size, pool)
                        verify_fd(self.plain_file(), size, pool)
                    # The reads below use data.bin (written through FUSE) for FUSE and
                    # direct alike: the same file, the same extents. The random writes
                    # do not: each path overwrites a file of its own (data.bin, and the
                    # direct path's last file), so that neither inherits the layout the
                    # other's copy-on-write overwrites leave (the same offsets in the
                    # same order: the second path would find its blocks already split
                    # out of their extents, a cheaper overwrite).
                    if last:
                        self.direct_rand_file = rel
                    else:
                        os.unlink(self.mnt.mountpoint / rel)

    def _reads(self, mode: str, req: int) -> None:
        size = self.size
        name = f"{mode} seq read {req // MiB}M"
        for system in SYSTEMS:
            if mode == "cold":
                if system != "plain":
                    self.remount()
                drop_caches()
            if system == "plain":
                self.measure(name, "MB/s", system,
                             lambda: fd_seq_read(self.plain_file(), size, req), size)
            elif system == "fuse":
                self.measure(name, "MB/s", system,
                             lambda: fd_seq_read(self.fuse_file, size, req), size)
            else:
                self.measure(name, "MB/s", system,
                             lambda: direct_seq_read(self.client, "data.bin", size, req), size)

    def hot_reads(self) -> None:
        log("hot sequential reads (warming the page cache first)")
        fd_seq_read(self.plain_file(), self.size, 4 * MiB)
        fd_seq_read(self.fuse_file, self.size, 4 * MiB)
        for rep in range(self.args.reps + 1):
            for req in (1 * MiB, 4 * MiB):
                self._reads("hot", req)

    def cold_reads(self) -> None:
        for rep in range(self.args.reps):
            log(f"cold sequential reads, round {rep + 1}/{self.args.reps}")
            for req in (1 * MiB, 4 * MiB):
                self._reads("cold", req)

    def random_io(self) -> None:
        a, size = self.args, self.size
        log("random 4K I/O (warming the page cache first)")
        fd_seq_read(self.plain_file(), size, 4 * MiB)
        fd_seq_read(self.fuse_file, size, 4 * MiB)
        for write in (False, True):
            name = "rand write 4K" if write else "rand read 4K"
            for system in SYSTEMS:
                def fn(system: str = system, write: bool = write) -> tuple[int, float]:
                    if system == "direct":
                        rel = self.direct_rand_file if write else "data.bin"
                        return direct_rand(self.client, rel, size, a.duration,
                                           write=write, pool=self.pool)
                    path = self.plain_file() if system == "plain" else self.fuse_file
                    return fd_rand(path, size, a.duration, write=write, pool=self.pool)
                self.measure(name, "IOPS", system, fn, 0)

    def concurrent(self) -> None:
        """--clients processes at once doing 4 KiB random reads for DURATION s, each on
        its own: through the FUSE mount (os.preadv with O_DIRECT) and through the
        direct path (one Client each). The figure is the sum of their IOPS."""
        a, size, k = self.args, self.size, self.args.clients
        name = f"rand read 4K x{k}"
        log(f"{name}: {k} processes at once")
        for system in ("fuse", "direct"):
            pid = self.mnt.pid
            d0 = cpu_seconds(pid)
            procs: list[subprocess.Popen] = []
            ops = 0.0
            cpu_c = 0.0
            try:
                for i in range(k):
                    # (started and recorded, or not started: every one is stopped below
                    # when a client fails or the benchmark is stopped)
                    with signals_held() as unblock:
                        procs.append(subprocess.Popen(
                            [sys.executable, __file__, "--_rand", str(self.mnt.mountpoint),
                             system, str(size), str(a.duration), str(1000 + i)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=unblock))
                for pr in procs:
                    out, _ = pr.communicate(timeout=a.duration * 10 + 60)
                    if pr.returncode != 0:
                        raise RuntimeError(f"{name} {system}: a client failed")
                    n, dt, cpu = out.split()
                    ops += int(n) / float(dt)
                    cpu_c += float(cpu)
            finally:
                stop_processes(procs)
            d1 = cpu_seconds(pid)
            self.record(name, "IOPS", system, ops, cpu_c, d1 - d0, ops * a.duration / 1000)

    def metadata(self) -> None:
        """Alone and streaming, alternated (--meta-rounds times each) so that load from
        outside the benchmark hits both alike; the samples of each kind are pooled."""
        a = self.args
        d = self.mnt.mountpoint / "meta"
        meta_round(d, max(50, a.files // 10))  # warm the daemon's caches and the database
        pooled: dict[str, dict[str, list[float]]] = {"alone": {}, "streaming": {}}
        streams: list[dict] = []
        share: list[float] = []
        for rnd in range(a.meta_rounds):
            log(f"metadata latency on the FUSE mount ({a.files} files), alone "
                f"[{rnd + 1}/{a.meta_rounds}]")
            for op, xs in meta_round(d, a.files).items():
                pooled["alone"].setdefault(op, []).extend(xs)
            log("metadata latency while a direct client streams 4 MiB reads "
                f"[{rnd + 1}/{a.meta_rounds}]")
            self.streamer = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_stream",
                 str(self.mnt.mountpoint), "data.bin", str(4 * MiB)],
                stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert self.streamer.stdout is not None
            line = self.streamer.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"streaming process failed to start: {line!r}")
            time.sleep(1.0)  # let it reach its steady state
            d0 = cpu_seconds(self.mnt.pid)
            t0 = time.perf_counter()
            for op, xs in meta_round(d, a.files).items():
                pooled["streaming"].setdefault(op, []).extend(xs)
            dt = time.perf_counter() - t0
            d1 = cpu_seconds(self.mnt.pid)
            self.streamer.send_signal(signal.SIGTERM)
            out, _ = self.streamer.communicate(timeout=60)
            rc = self.streamer.returncode
            self.streamer = None
            if rc != 0:
                raise RuntimeError(f"streaming process exited with {rc}")
            streams.append(json.loads(out.strip().splitlines()[-1]))
            share.append((d1 - d0) / dt)
        for label, ops in pooled.items():
            for op, xs in ops.items():
                self.meta.setdefault(op, {})[label] = {
                    "p50_us": pct(xs, 0.50) * 1e6, "p99_us": pct(xs, 0.99) * 1e6,
                    "mean_us": statistics.fmean(xs) * 1e6, "max_us": max(xs) * 1e6,
                    "n": len(xs)}
                log(f"  {op:7} {label:9} p50 {pct(xs, .5) * 1e6:8.0f} us  "
                    f"p99 {pct(xs, .99) * 1e6:8.0f} us")
        self.extra["stream_MBps_during_metadata"] = (
            sum(s["bytes"] for s in streams) / sum(s["seconds"] for s in streams) / 1e6)
        self.extra["daemon_cpu_share_during_metadata"] = statistics.fmean(share)
        log(f"  the direct stream ran at {self.extra['stream_MBps_during_metadata']:.0f} MB/s; "
            f"daemon CPU {100 * statistics.fmean(share):.0f}% of one core")

    def run(self) -> None:
        log(f"work directory {self.tmp}; load average {loadavg()}")
        others = other_fuse_mounts(self.mnt.mountpoint)
        if others:
            log(f"note: other FUSE mounts are live ({', '.join(others)}); their daemons "
                "share the 2 CPUs")
        self.extra["other_fuse_mounts_at_start"] = len(others)
        self.mnt.mkfs()
        self.mnt.mount()
        self.connect()
        phases = {"write": self.seq_write, "hot": self.hot_reads, "cold": self.cold_reads,
                  "random": self.random_io, "concurrent": self.concurrent,
                  "metadata": self.metadata}
        wanted = [w for w in self.args.phases.split(",") if w != "write"]
        unknown = set(wanted) - set(phases)
        if unknown:
            raise SystemExit(f"bench_direct: unknown phases {sorted(unknown)}")
        wanted = ["write", *wanted]  # it makes the data file every other phase reads
        for name in wanted:
            phase = phases[name]
            self.loadavg.append((phase.__name__, loadavg()))
            phase()
        self.loadavg.append(("end", loadavg()))
        self.extra["sluice_stats"] = self.client.call("stats") if self.client else None

    def cleanup(self) -> None:
        if self.streamer is not None and self.streamer.poll() is None:
            self.streamer.kill()  # our own child, by its Popen handle (pid)
            with contextlib.suppress(Exception):
                self.streamer.wait(timeout=10)
        self.close_client()
        self.mnt.cleanup()

    # -- report -------------------------------------------------------------------------

    def best(self, workload: str, system: str) -> float | None:
        xs = self.samples.get(workload, {}).get(system)
        return max(xs) if xs else None

    def median(self, workload: str, system: str) -> float | None:
        xs = self.samples.get(workload, {}).get(system)
        return statistics.median(xs) if xs else None

    @staticmethod
    def _md(head: str, rows: list[str]) -> str:
        """A markdown table: `head`, the rule under it, `rows`."""
        rule = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
        return "\n".join([head, rule, *rows])

    def table(self) -> str:
        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}" if a and b else "-"

        order = ["seq write 4M+fsync", "hot seq read 1M", "hot seq read 4M",
                 "cold seq read 1M", "cold seq read 4M", "rand read 4K", "rand write 4K",
                 f"rand read 4K x{self.args.clients}"]
        head = (f"| {'workload':20} | {'unit':4} | {'plain':>8} | {'FUSE':>8} | {'direct':>8} "
                f"| {'FUSE/plain':>10} | {'direct/plain':>12} | {'direct/FUSE':>11} "
                f"| {'direct/FUSE, medians':>20} |")
        lines: list[str] = []
        for w in order:
            if w not in self.samples:
                continue
            p, f, d = (self.best(w, s) for s in SYSTEMS)
            fm, dm = (self.median(w, s) for s in ("fuse", "direct"))
            def cell(v: float | None) -> str:
                return "-" if v is None else f"{v:.0f}"  # (not run: '-', never 0)
            lines.append(
                f"| {w:20} | {self.units[w]:4} | {cell(p):>8} | {cell(f):>8} | {cell(d):>8} "
                f"| {ratio(f, p):>10} | {ratio(d, p):>12} | {ratio(d, f):>11} "
                f"| {ratio(dm, fm):>20} |")
        return self._md(head, lines)

    def cpu_table(self) -> str:
        head = (f"| {'workload':20} | {'per':8} | {'FUSE client':>11} | {'FUSE daemon':>11} "
                f"| {'direct client':>13} | {'direct daemon':>13} |")
        lines: list[str] = []
        for w, per in self.cpu.items():
            f, d = per.get("fuse", {}), per.get("direct", {})
            unit = "GB" if self.units[w] == "MB/s" else "1000 ops"
            lines.append(f"| {w:20} | {unit:8} | {f.get('client_s', 0):11.3f} | "
                         f"{f.get('daemon_s', 0):11.3f} | {d.get('client_s', 0):13.3f} | "
                         f"{d.get('daemon_s', 0):13.3f} |")
        return self._md(head, lines)

    def meta_table(self) -> str:
        head = (f"| {'op':6} | {'p50 alone':>9} | {'p50 streaming':>13} | {'ratio':>5} "
                f"| {'p99 alone':>9} | {'p99 streaming':>13} | {'ratio':>5} |")
        lines: list[str] = []
        for op, r in self.meta.items():
            a, s = r.get("alone"), r.get("streaming")
            if not a or not s:
                continue
            lines.append(
                f"| {op:6} | {a['p50_us']:7.0f}us | {s['p50_us']:11.0f}us | "
                f"{s['p50_us'] / a['p50_us']:5.1f} | {a['p99_us']:7.0f}us | "
                f"{s['p99_us']:11.0f}us | {s['p99_us'] / a['p99_us']:5.1f} |")
        return self._md(head, lines)

    def report(self) -> str:
        a = self.args
        out = [f"sluice direct path vs FUSE vs plain directory — {self.size // MiB} MiB file, "
               f"{a.duration:g} s random phases, best of {a.reps} (hot reads: of {a.reps + 1})",
               "load average (1/5/15 min) at the start of each phase: " +
               ", ".join(f"{k} {v}" for k, v in self.loadavg),
               "", self.table(), ""]
        fs = self.fsync_s.get("seq write 4M+fsync")
        if fs:
            out += ["seconds in the final fsync of the seq write (median of rounds): " +
                    ", ".join(f"{s} {statistics.median(fs[s]):.2f}" for s in SYSTEMS if s in fs),
                    ""]
        if self.meta:
            out += [f"metadata latency on the FUSE mount ({a.files} files), alone vs while a "
                    f"direct client streams 4 MiB reads "
                    f"({self.extra.get('stream_MBps_during_metadata', 0):.0f} MB/s):", "",
                    self.meta_table(), ""]
        out += ["CPU seconds per GB moved (sequential) or per 1000 ops (random), best sample:",
                "", self.cpu_table()]
        return "\n".join(out)

    def json_doc(self) -> dict:
        return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "host": platform.node(), "kernel": platform.release(),
                "cpus": os.cpu_count(), "size_mb": self.args.size_mb,
                "duration_s": self.args.duration, "files": self.args.files,
                "reps": self.args.reps, "units": self.units, "samples": self.samples,
                "best": {w: {s: self.best(w, s) for s in SYSTEMS} for w in self.samples},
                "median": {w: {s: self.median(w, s) for s in SYSTEMS} for w in self.samples},
                "cpu": self.cpu, "metadata": self.meta, "fsync_s": self.fsync_s,
                "loadavg": self.loadavg, "meta_rounds": self.args.meta_rounds,
                "extra": {k: v for k, v in self.extra.items() if k != "sluice_stats"},
                "sluice_stats": self.extra.get("sluice_stats")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=None, help="file size in MiB (default 1024; "
                   "256 with --quick); a multiple of 4")
    p.add_argument("--quick", action="store_true", help="small sizes and short phases")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per random I/O phase (default 5; 2 with --quick)")
    p.add_argument("--files", type=int, default=None,
                   help="files per metadata round (default 2000; 500 with --quick)")
    p.add_argument("--reps", type=int, default=None,
                   help="rounds of each sequential workload (default 3; 1 with --quick)")
    p.add_argument("--meta-rounds", type=int, default=None,
                   help="alone/streaming metadata rounds, alternated (default 3; 1 with --quick)")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    p.add_argument("--phases", default="write,hot,cold,random,concurrent,metadata",
                   help="comma-separated phases to run (default: all; the write phase "
                        "makes the data file the others read, so it always runs)")
    p.add_argument("--clients", type=int, default=4,
                   help="concurrent clients (processes) of the concurrent phase (default 4)")
    p.add_argument("--no-pace", action="store_true",
                   help="the direct client waits for queued replies in recv, not paced "
                        "(Client.connect(pace=False); kernelshim/hybridwait.py)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the plain directory and the volume go (default /var/tmp)")
    p.add_argument("--_stream", nargs=3, metavar=("MNT", "REL", "REQ"), help=argparse.SUPPRESS)
    p.add_argument("--_rand", nargs=5, metavar=("MNT", "SYSTEM", "SIZE", "SECONDS", "SEED"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._rand:
        m, system, size, secs, seed = args._rand
        return rand_worker(m, system, int(size), float(secs), int(seed))
    if args._stream:
        return stream_worker(args._stream[0], args._stream[1], int(args._stream[2]))
    q = args.quick
    args.size_mb = args.size_mb or (256 if q else 1024)
    args.duration = args.duration or (2.0 if q else 5.0)
    args.files = args.files or (500 if q else 2000)
    args.reps = args.reps or (1 if q else 3)
    args.meta_rounds = args.meta_rounds or (1 if q else 3)
    if args.size_mb % 4:
        p.error("--size-mb must be a multiple of 4")
    if os.geteuid() != 0:
        p.error("run as root (drop_caches, mounting)")
    tmp = Path(tempfile.mkdtemp(prefix="sluice-direct-bench-", dir=args.workdir))
    bench = Bench(args, tmp)
    try:
        bench.run()
    finally:
        bench.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print(bench.report())
    if args.json:
        args.json.write_text(json.dumps(bench.json_doc(), indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
