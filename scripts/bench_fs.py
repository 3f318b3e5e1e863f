#!/usr/bin/env python3
"""Benchmark sluice against a plain directory on the same disk.

Runs the same workloads, in one run, on (a) a plain directory and (b) a freshly made
and mounted sluice volume (timing profile `none`), and prints one table with both
results, the ratio sluice/plain and the sluice target for each workload.

Workloads (sizes shrink with --quick):
  seq write     SIZE MiB written with 1 MiB os.write calls of random data, fsync at the
                end (the time includes the fsync)
  cold read     the same file read back with 1 MiB requests after `sync; echo 3 >
                /proc/sys/vm/drop_caches` (sluice is also remounted: its pager is cold)
  rand read     4 KiB reads at random aligned offsets of that file for DURATION s,
                buffered and O_DIRECT, 1 and 4 jobs (processes); total IOPS
  create/stat/unlink   N empty files in one directory; stat warm (right after the
                creates, the kernel's caches are warm) and cold (after drop_caches)
  untar/find/rm tar -xf of a tarball of /usr/include, `find . | wc -l`, `rm -rf`; the
                untar also through libfuse's C passthrough_hp without caching (the
                reference: sluice/passthrough_hp is printed beside sluice/plain)
  fio write     fio's sequential write, as issue 8 measures it: `fio --rw=write --bs=1M
                --size=SIZE --ioengine=psync --end_fsync=1 --fallocate=none` (MB/s
                from fio's JSON, the final fsync included); the goal is at least
                FIO_RATIO_GOAL times the plain directory's figure of the same run.
                fio is installed with apt-get if missing (--only fio runs just this).
                Also counted: the FUSE WRITE requests sluice answered per fio write
                (2: fio's buffer is not page-aligned, see Bench.workloads), and the
                daemon's CPU seconds per GiB written, all threads and its event-loop
                thread alone. With --fio-aligned, fio once more with a page-aligned
                buffer (--iomem_align=4096): one FUSE request per write, which is
                what raising the host's fs.fuse.max_pages_limit above 256 would give
                (the kernel splits a 1 MiB write from an unaligned buffer, 257 pages,
                at max_pages).

  fsync cost    what one tenant's fsync costs another (data=ordered: a commit writes
                back every file's dirty pages first): the median latency of a 4 KiB
                write + fsync of a small file, alone and while another process keeps
                64 MiB of cached (dirty) data in flight with 64 KiB writes, no fsync
                (--only fsync runs just this)

sluice is mounted with write-back (--writeback, the default here) or without
(--no-writeback: write-through, for comparison).

Before the sequential write and the cold read, a scratch file of the same size is
written and deleted outside the mount (untimed; --no-warmup skips it): see
Bench.warm_memory. With --repeat N each round runs plain then sluice (fresh volume)
and the table shows medians and sluice's range: on a shared 2-CPU machine single runs
move by tens of percent.

Run as root:  .venv/bin/python scripts/bench_fs.py [--size-mb 1024] [--quick] [--json out.json]
                  [--repeat N] [--only seq|rand|meta|tar|fio|fsync] [--skip-plain]
                  [--py-spy DIR] [--no-writeback] [--fio-aligned] [--idle-poll USEC]

Progress goes to stderr, the table to stdout. Everything made (mounts, volume, files)
is removed in `finally`. With --py-spy DIR, py-spy samples the sluice daemon during
each sluice workload and writes DIR/<workload>.txt (collapsed stacks, idle included);
sampling slows the daemon, so numbers of such a run are not benchmark numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BS, REPO, SLUICE, MiB, SluiceMount, cpu_seconds, drop_caches, io_until, is_mounted,
                      loadavg, log, random_offsets, read_to_end, run, warm_memory)

VENV_BIN = Path(sys.executable).parent

#: untar time on sluice as a multiple of the plain directory's, in the same run
UNTAR_RATIO_GOAL = 2.5
#: fio's sequential write on sluice (write-back) as a fraction of the plain directory's
FIO_RATIO_GOAL = 0.5
FIO_WRITE = "fio write 1M psync+end_fsync"
FIO_REQUESTS = "fio FUSE writes per 1M write"
FIO_CPU = "fio daemon CPU per GiB"
FIO_LOOP_CPU = "fio event-loop CPU per GiB"
FIO_ALIGNED = "fio write, page-aligned buffer"
FSYNC_ALONE = "4K write+fsync, alone"
FSYNC_LOADED = "4K write+fsync, other writer"
#: the untar's reference FUSE daemon: libfuse's C example, no caching (Bench.passthrough_hp)
PASSTHROUGH = "passthrough_hp"

# name -> (unit, higher is better, sluice target or None)
WORKLOADS: dict[str, tuple[str, bool, float | None]] = {
    "seq write 1M+fsync": ("MB/s", True, 400.0),
    "cold seq read 1M": ("MB/s", True, 700.0),
    "rand read 4K buffered 1 job": ("IOPS", True, None),
    "rand read 4K buffered 4 jobs": ("IOPS", True, None),
    "rand read 4K O_DIRECT 1 job": ("IOPS", True, None),
    "rand read 4K O_DIRECT 4 jobs": ("IOPS", True, 8000.0),
    "create": ("ops/s", True, 2500.0),
    "stat (warm)": ("ops/s", True, 8000.0),
    "stat (cold)": ("ops/s", True, 8000.0),
    "unlink": ("ops/s", True, None),
    "untar /usr/include": ("s", False, 12.0),
    "untar FUSE requests/file": ("req", False, None),
    "find | wc -l": ("s", False, None),
    "rm -rf": ("s", False, 3.0),
    FIO_WRITE: ("MB/s", True, None),
    FIO_REQUESTS: ("req", False, None),
    FIO_CPU: ("s", False, None),
    FIO_LOOP_CPU: ("s", False, None),
    FIO_ALIGNED: ("MB/s", True, None),
    FSYNC_ALONE: ("ms", False, None),
    FSYNC_LOADED: ("ms", False, None),
}


def thread_cpu_seconds(pid: int | None, tid: int | None) -> float:
    """utime + stime of one thread of a process (the daemon's event loop: tid == pid)."""
    if pid is None or tid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def other_fuse_mounts() -> list[str]:
    """FUSE mounts other than ours (their daemons compete for the 2 CPUs)."""
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return [line.split()[1] for line in f
                if line.split()[2].startswith("fuse.") and "sluice-bench-" not in line]


class Sampler:
    """py-spy on the daemon during one workload (optional)."""

    def __init__(self, outdir: Path | None, pid: int | None, name: str) -> None:
        self.proc = None
        if outdir is None or pid is None:
            return
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        self.out = outdir / f"{slug}.txt"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
             "--idle", "--rate", "250", "--nonblocking", "-o", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BenchMount(SluiceMount):
    """SluiceMount with write-back on or off (`sluice mount --writeback`) and idle
    polling as asked (`--idle-poll USEC`; None: the mount's default)."""

    def __init__(self, volume: Path, mountpoint: Path, *, writeback: bool,
                 idle_poll: str | None = None) -> None:
        super().__init__(volume, mountpoint)
        self.writeback = writeback
        self.idle_poll = idle_poll

    def mount(self) -> None:
        run([*SLUICE, "mount", str(self.volume), str(self.mountpoint), "--profile", "none",
             "--writeback" if self.writeback else "--no-writeback",
             *(["--idle-poll", self.idle_poll] if self.idle_poll is not None else [])],
            cwd=REPO)
        self.pid = int(json.loads((self.volume / "mount.json").read_text())["pid"])


def daemon_build() -> str:
    """What the fio figure depends on besides the code: the FUSE binding's build (its
    payload views came with 3.5.0+sluice.6) and what computes the block checksums
    (blockdev/xxh3blocks.c, built by scripts/setup.sh, or python-xxhash)."""
    import importlib.metadata
    try:
        binding = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        binding = "?"
    try:
        from blockdev.checksums import BLOCK_HASHER as hasher
    except ImportError:
        hasher = "python-xxhash"
    return f"pyfuse3 {binding}, block checksums by {hasher}"


def ensure_fio() -> str:
    """The fio binary; installed with apt-get when missing (the benchmark's job)."""
    found = shutil.which("fio")
    if found:
        return found
    log("fio is not installed: installing it with apt-get (apt-get install -y fio)")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "fio"], capture_output=True,
                       text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("fio")
    if r.returncode != 0 or not found:
        raise SystemExit("bench_fs: fio is needed for the fio workload and `apt-get install "
                         f"-y fio` failed ({r.returncode}): {r.stderr.strip()[-300:]}; install "
                         "it, or leave the workload out (--only seq --only rand ...)")
    return found


def fio_write(fio: str, path: Path, size_mb: int, *, aligned: bool = False) -> float:
    """MB/s (10^6 bytes) fio reports for a sequential 1 MiB psync write of size_mb MiB
    with a final fsync (included in its runtime), no preallocation; `aligned`: from a
    page-aligned buffer (one FUSE request per write)."""
    r = run([fio, "--name=seqwrite", f"--filename={path}", "--rw=write", "--bs=1M",
             f"--size={size_mb}M", "--ioengine=psync", "--end_fsync=1", "--fallocate=none",
             *(["--iomem_align=4096"] if aligned else []), "--output-format=json"])
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    path.unlink()
    return job["bw_bytes"] / 1e6


# -- workloads ---------------------------------------------------------------------------

def _dirtier(path: str, stop, ready) -> None:
    """The other tenant: rewrites 64 MiB of `path` with 64 KiB writes, never fsyncs."""
    buf = os.urandom(64 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        ready.set()
        while not stop.is_set():
            for off in range(0, 64 * MiB, len(buf)):
                os.pwrite(fd, buf, off)
                if stop.is_set():
                    break
    finally:
        os.close(fd)


def fsync_latency(path: Path, n: int = 30) -> float:
    """Median ms of a 4 KiB pwrite + fsync of `path`, n times."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, os.urandom(BS), (i % 16) * BS)
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times) * 1000


def fsync_loaded(root: Path, n: int = 30) -> float:
    """fsync_latency while another process keeps dirty data coming (see _dirtier)."""
    stop, ready = mp.Event(), mp.Event()
    other = mp.Process(target=_dirtier, args=(str(root / "other.bin"), stop, ready))
    other.start()
    try:
        ready.wait(30)
        time.sleep(1.0)  # let its dirty data build up
        return fsync_latency(root / "mine.bin", n)
    finally:
        stop.set()
        other.join(60)
        (root / "other.bin").unlink(missing_ok=True)
        (root / "mine.bin").unlink(missing_ok=True)

def seq_write(path: Path, size_mb: int, data: mmap.mmap) -> float:
    """MB/s (10^6 bytes) of writing size_mb MiB with 1 MiB writes, fsync included."""
    mv = memoryview(data)
    chunks = len(data) // MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for i in range(size_mb):
            j = i % chunks
            n = os.write(fd, mv[j * MiB:(j + 1) * MiB])
            assert n == MiB, n
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return size_mb * MiB / dt / 1e6


def seq_read(path: Path, size_mb: int) -> float:
    buf = mmap.mmap(-1, MiB)  # page aligned: one FUSE request per read (as dd's)
    fd = os.open(path, os.O_RDONLY)
    try:
        total, dt = read_to_end(fd, buf, positional=False)
    finally:
        os.close(fd)
    if total != size_mb * MiB:
        raise RuntimeError(f"read {total} bytes, expected {size_mb * MiB}")
    return total / dt / 1e6


def _rand_job(path: str, direct: bool, seconds: float, seed: int, start, counts, idx: int
              ) -> None:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        buf = mmap.mmap(-1, BS)  # page aligned, as O_DIRECT needs
        offs = random_offsets(os.fstat(fd).st_size, seed)
        start.wait()
        counts[idx] = io_until(os.preadv, fd, [buf], offs, seconds, batch=64,
                               error="short read")
    finally:
        os.close(fd)


def rand_read(path: Path, *, direct: bool, jobs: int, seconds: float) -> float:
    ctx = mp.get_context("fork")
    start = ctx.Barrier(jobs + 1)
    counts = ctx.Array("q", jobs)
    procs = [ctx.Process(target=_rand_job, args=(str(path), direct, seconds, 1000 + i,
                                                  start, counts, i)) for i in range(jobs)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    dt = time.perf_counter() - t0
    for p in procs:
        if p.exitcode != 0:
            raise RuntimeError(f"random read job failed with exit code {p.exitcode}")
    return sum(counts) / dt


def meta_create(d: Path, n: int) -> float:
    d.mkdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    names = [str(d / f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, flags, 0o644))
    return n / (time.perf_counter() - t0)


def meta_stat(d: Path, n: int) -> float:
    names = [str(d / f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        os.stat(p)
    return n / (time.perf_counter() - t0)


def meta_unlink(d: Path, n: int) -> float:
    names = [str(d / f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    dt = time.perf_counter() - t0
    d.rmdir()
    return n / dt


def timed_shell(cmd: str, cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = run(cmd, cwd=cwd)
    return time.perf_counter() - t0, r.stdout.strip()


# -- driver ------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.size_mb = args.size_mb
        self.nfiles = args.files
        self.seconds = args.duration
        #: fs -> workload -> one value per round
        self.results: dict[str, dict[str, list[float]]] = {"plain": {}, "sluice": {},
                                                           PASSTHROUGH: {}}
        #: workload -> daemon CPU seconds per wall second, one per round
        self.daemon_cpu: dict[str, list[float]] = {}
        self.extra: dict[str, object] = {}
        # Random data in a page-aligned buffer (as dd's): the kernel splits a write from
        # an unaligned buffer into max_pages-sized FUSE requests that are not block
        # aligned, which is a different (and slower) workload.
        n = 64 * MiB if self.size_mb >= 64 else self.size_mb * MiB
        self.data = mmap.mmap(-1, n)
        self.data[:] = os.urandom(n)
        self.tarball = tmp / "include.tar"
        self.mount: SluiceMount | None = None

    def make_tarball(self) -> None:
        log("making the tarball of /usr/include")
        run(["tar", "-C", "/usr", "-cf", str(self.tarball), "include"])
        n = run(f"tar -tf {self.tarball} | wc -l").stdout.strip()
        self.extra["tar_entries"] = int(n)
        self.extra["tar_bytes"] = self.tarball.stat().st_size

    def warm_memory(self) -> None:
        """Write and delete a scratch file as big as the test file (untimed, outside the
        mount; see benchlib.warm_memory). Without it, a sequential write or cold read into
        the page cache measures the hypervisor (250-550 MiB/s instead of 1.3-1.7 GiB/s for
        a plain 1 GiB write measured on this machine)."""
        if self.args.no_warmup:
            return
        mv = memoryview(self.data)
        chunks = len(self.data) // MiB
        warm_memory(self.tmp / "scratch.bin",
                    (mv[i % chunks * MiB:(i % chunks + 1) * MiB] for i in range(self.size_mb)))

    def warm_for_untar(self) -> None:
        """Before each untar (plain, sluice, passthrough_hp alike): the tarball in the
        page cache and guest memory touched (warm_memory) for what the untar writes.
        Without it the plain directory's untar took 0.16 s in one run and 2.6-3.6 s in
        the next three on a quiet machine (2026-12-01, stop 11): first touches of
        memory the VM had returned to its host, or the tarball read from the disk,
        counted to whichever ran first."""
        with open(self.tarball, "rb") as f:
            while f.read(MiB):
                pass
        self.warm_memory()

    def record(self, fs: str, name: str, value: float, *, cpu0: float | None = None,
               t0: float | None = None) -> None:
        self.results[fs].setdefault(name, []).append(value)
        unit = WORKLOADS[name][0]
        extra = ""
        if cpu0 is not None and t0 is not None and self.mount and self.mount.pid:
            cpu = cpu_seconds(self.mount.pid) - cpu0
            wall = time.perf_counter() - t0
            self.daemon_cpu.setdefault(name, []).append(round(cpu / wall, 3) if wall else 0.0)
            extra = f" (daemon CPU {cpu:.2f} s in {wall:.2f} s)"
        log(f"  {fs:6s} {name:30s} {value:12.1f} {unit}{extra}")

    def workloads(self, fs: str, root: Path) -> None:
        """Run every workload in directory `root` of filesystem `fs`."""
        sl = fs == "sluice"
        big = root / "big.bin"

        def step(name: str, fn):
            os.sync()
            pid = self.mount.pid if sl and self.mount else None
            sampler = Sampler(self.args.py_spy, pid, name) if sl else Sampler(None, None, name)
            cpu0 = cpu_seconds(pid) if pid else None
            t0 = time.perf_counter()
            try:
                value = fn()
            finally:
                sampler.stop()
            self.record(fs, name, value, cpu0=cpu0, t0=t0)

        want = self.args.only
        if not want or "seq" in want:
            self.warm_memory()
            step("seq write 1M+fsync", lambda: seq_write(big, self.size_mb, self.data))

            log(f"  {fs}: dropping caches" + (" and remounting" if sl else ""))
            if sl:
                assert self.mount is not None
                self.mount.umount()
                drop_caches()
                self.mount.mount()
            else:
                drop_caches()
            self.warm_memory()
            step("cold seq read 1M", lambda: seq_read(big, self.size_mb))

        if not want or "rand" in want:
            if not big.exists():
                seq_write(big, self.size_mb, self.data)
            for direct in (False, True):
                for jobs in (1, 4):
                    name = (f"rand read 4K {'O_DIRECT' if direct else 'buffered'} "
                            f"{jobs} job{'s' if jobs > 1 else ''}")
                    step(name, lambda d=direct, j=jobs: rand_read(big, direct=d, jobs=j,
                                                                  seconds=self.seconds))
        if big.exists():
            big.unlink()

        if not want or "meta" in want:
            d = root / "meta"
            n = self.nfiles
            step("create", lambda: meta_create(d, n))
            step("stat (warm)", lambda: meta_stat(d, n))
            drop_caches()
            step("stat (cold)", lambda: meta_stat(d, n))
            step("unlink", lambda: meta_unlink(d, n))

        if not want or "fio" in want:
            fio = ensure_fio()
            self.warm_memory()
            before = self.fuse_requests() if sl else {}
            pid = self.mount.pid if sl and self.mount else None
            cpu0, loop0 = cpu_seconds(pid), thread_cpu_seconds(pid, pid)
            step(FIO_WRITE, lambda: fio_write(fio, root / "fio.bin", self.size_mb))
            if sl:
                gib = self.size_mb / 1024
                self.results["sluice"].setdefault(FIO_CPU, []).append(
                    (cpu_seconds(pid) - cpu0) / gib)
                self.results["sluice"].setdefault(FIO_LOOP_CPU, []).append(
                    (thread_cpu_seconds(pid, pid) - loop0) / gib)
                # fio writes from a malloc'd buffer that is not page-aligned: each 1 MiB
                # write spans 257 pages and the kernel (max_pages 256) sends it as two
                # WRITE requests, 1 MiB - 16 B and 16 B (page-aligned buffers, as
                # seq_write's, give one): what the daemon sees per fio write.
                n = self.fuse_requests().get("write", 0) - before.get("write", 0)
                self.results["sluice"].setdefault(FIO_REQUESTS, []).append(n / self.size_mb)
            if self.args.fio_aligned:
                self.warm_memory()
                step(FIO_ALIGNED, lambda: fio_write(fio, root / "fio.bin", self.size_mb,
                                                    aligned=True))

        if not want or "fsync" in want:
            step(FSYNC_ALONE, lambda: fsync_latency(root / "mine.bin"))
            step(FSYNC_LOADED, lambda: fsync_loaded(root))

        if not want or "tar" in want:
            t = root / "untar"
            t.mkdir()
            self.warm_for_untar()
            before = self.fuse_requests() if sl else {}
            step("untar /usr/include",
                 lambda: timed_shell(f"tar -xf {self.tarball}", t)[0])
            if sl:
                # Every request the daemon answered during the untar, per file untarred.
                after = self.fuse_requests()
                diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                diff = {k: v for k, v in sorted(diff.items()) if v > 0}
                n = max(1, int(self.extra.get("tar_entries", 1)))
                self.results["sluice"].setdefault("untar FUSE requests/file", []).append(
                    sum(diff.values()) / n)
                self.extra["untar_requests"] = diff
                log("  sluice untar requests: " + ", ".join(f"{k} {v}" for k, v in diff.items()))
            found: list[str] = []

            def find() -> float:
                dt, out = timed_shell("find . | wc -l", t)
                found.append(out)
                return dt
            step("find | wc -l", find)
            self.extra[f"find_count_{fs}"] = int(found[0])
            step("rm -rf", lambda: timed_shell(f"rm -rf {t}", root)[0])

    def passthrough_hp(self, rnd: int) -> None:
        """The untar once more through libfuse's C example passthrough_hp over a plain
        directory, without caching (--nocache: no attribute or entry timeouts;
        --nopassthrough: every read and write reaches the daemon, as in sluice's
        default direct mode): what a FUSE daemon costs at all, in the same run. Built
        by binding/build_passthrough_hp.sh from the libfuse source of the binding."""
        r = subprocess.run(["bash", str(REPO / "binding" / "build_passthrough_hp.sh")],
                           capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            log(f"passthrough_hp left out: {r.stderr.strip()}")
            return
        binary = r.stdout.strip().splitlines()[-1]
        src, mp = self.tmp / f"ph-src{rnd}", self.tmp / "ph-mnt"
        src.mkdir()
        mp.mkdir(exist_ok=True)
        log(f"passthrough_hp {src} at {mp}")
        proc = subprocess.Popen([binary, "--foreground", "--nocache", "--nopassthrough",
                                 str(src), str(mp)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mp):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log("passthrough_hp did not mount: left out")
                    return
                time.sleep(0.05)
            t = mp / "untar"
            t.mkdir()
            self.warm_for_untar()
            os.sync()
            self.record(PASSTHROUGH, "untar /usr/include",
                        timed_shell(f"tar -xf {self.tarball}", t)[0])
            timed_shell(f"rm -rf {t}", mp)
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            shutil.rmtree(src, ignore_errors=True)

    def fuse_requests(self) -> dict[str, int]:
        """FUSE requests the mounted daemon has answered so far, by handler."""
        assert self.mount is not None
        out = run([str(VENV_BIN / "sluice"), "stats", "--json", str(self.mount.mountpoint)])
        return json.loads(out.stdout).get("fuse_requests", {})

    def run(self) -> None:
        self.make_tarball()
        mnt = self.tmp / "mnt"
        mnt.mkdir()
        for rnd in range(1, self.args.repeat + 1):
            log(f"round {rnd} of {self.args.repeat}")
            if not self.args.skip_plain:
                plain = self.tmp / f"plain{rnd}"
                plain.mkdir()
                log(f"plain directory {plain}")
                self.workloads("plain", plain)
                shutil.rmtree(plain)
            if (not self.args.only or "tar" in self.args.only) and self.args.passthrough_hp:
                self.passthrough_hp(rnd)
            vol = self.tmp / f"vol{rnd}"
            self.mount = BenchMount(vol, mnt, writeback=self.args.writeback,
                                    idle_poll=self.args.idle_poll)
            log(f"sluice: mkfs {vol}, mount at {mnt}")
            self.mount.mkfs()
            self.mount.mount()
            self.workloads("sluice", mnt)
            self.mount.umount()
            shutil.rmtree(vol)


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def table(b: Bench) -> str:
    rounds = b.args.repeat
    rows = [("workload", "unit", "plain", "sluice", "sluice/plain", "target", "meets")]
    if rounds > 1:
        rows[0] = rows[0][:4] + ("sluice min-max",) + rows[0][4:]
    for name, (unit, higher, target) in WORKLOADS.items():
        p = median(b.results["plain"].get(name))
        s = median(b.results["sluice"].get(name))
        if p is None and s is None:
            continue
        ratio = f"{s / p:.2f}" if p and s is not None else "-"
        if target is None:
            tgt, ok = "-", "-"
        else:
            tgt = f"{'>=' if higher else '<'} {fmt(target)}"
            ok = "-" if s is None else ("yes" if (s >= target if higher else s < target)
                                        else "**no**")
        row: tuple[str, ...] = (name, unit, fmt(p), fmt(s))
        if rounds > 1:
            sv = b.results["sluice"].get(name) or []
            row += (f"{fmt(min(sv))}-{fmt(max(sv))}" if sv else "-",)
        rows.append(row + (ratio, tgt, ok))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":")
                                      for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=None,
                   help="size of the sequential file in MiB (default 1024, quick 128)")
    p.add_argument("--files", type=int, default=None,
                   help="files for create/stat/unlink (default 10000, quick 2000)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per random-read run (default 5, quick 2)")
    p.add_argument("--quick", action="store_true", help="small sizes: runs in a few minutes")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds (plain then sluice each round, fresh volume each round); "
                        "the table shows medians (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write results as JSON here")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the plain directory, the volume and the tarball go "
                        "(default /var/tmp)")
    p.add_argument("--skip-plain", action="store_true", help="only run on sluice")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not write+delete a scratch file before the sequential write and "
                        "the cold read (see Bench.warm_memory)")
    p.add_argument("--writeback", action=argparse.BooleanOptionalAction, default=True,
                   help="mount sluice with write-back (default) or write-through")
    p.add_argument("--idle-poll", default=None, metavar="USEC",
                   help="mount sluice with --idle-poll USEC (0: off; default: the mount's "
                        "default): how long the daemon polls for the next request before "
                        "it sleeps")
    p.add_argument("--only", action="append",
                   choices=["seq", "rand", "meta", "tar", "fio", "fsync"],
                   help="run only these workload groups (repeatable)")
    p.add_argument("--passthrough-hp", action=argparse.BooleanOptionalAction, default=True,
                   help="also untar through libfuse's C passthrough_hp (built on first use "
                        "by binding/build_passthrough_hp.sh) as the reference (default on)")
    p.add_argument("--fio-aligned", action="store_true",
                   help="also run fio from a page-aligned buffer (one FUSE request per "
                        "write: what a host max_pages above 256 would give)")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="sample the daemon with py-spy per sluice workload into DIR")
    args = p.parse_args()
    args.size_mb = args.size_mb or (128 if args.quick else 1024)
    args.files = args.files or (2000 if args.quick else 10_000)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    if os.geteuid() != 0:
        print("bench_fs.py must run as root (drop_caches, FUSE mounts)", file=sys.stderr)
        return 1
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)

    load0 = loadavg()
    others = other_fuse_mounts()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-", dir=args.workdir))
    b = Bench(args, tmp)
    started = datetime.datetime.now().astimezone()
    try:
        b.run()
    finally:
        if b.mount is not None:
            b.mount.cleanup()
        if is_mounted(tmp / "mnt"):
            log("WARNING: mount still present; lazy unmount")
            subprocess.run(["fusermount3", "-u", "-z", str(tmp / "mnt")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"cleaned up {tmp}")
    load1 = loadavg()
    others = sorted(set(others) | set(other_fuse_mounts()))

    cmd = " ".join([".venv/bin/python", "scripts/bench_fs.py", *sys.argv[1:]])
    if args.idle_poll is None:
        from fs.idlepoll import DEFAULT_WINDOW
        cmd += f"  (idle polling: the default, {DEFAULT_WINDOW * 1e6:g} us)"
    head = (f"sluice benchmark, {started:%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs, "
            f"{platform.platform()}; file {args.size_mb} MiB, {args.files} files, "
            f"{args.duration:g} s per random-read run; workdir {args.workdir}")
    print(head)
    print(f"command: {cmd}")
    print(f"tarball: {b.extra.get('tar_entries')} entries, "
          f"{int(b.extra.get('tar_bytes', 0)) / MiB:.0f} MiB; "
          f"find counted plain={b.extra.get('find_count_plain')} "
          f"sluice={b.extra.get('find_count_sluice')}")
    print()
    print(table(b))
    up = median(b.results["plain"].get("untar /usr/include"))
    us = median(b.results["sluice"].get("untar /usr/include"))
    uh = median(b.results[PASSTHROUGH].get("untar /usr/include"))
    if up and us:
        print(f"\nuntar: sluice/plain {us / up:.2f}x (goal: at most {UNTAR_RATIO_GOAL}x, what C "
              f"passthrough_hp without cache reaches); FUSE requests per file: "
              f"{fmt(median(b.results['sluice'].get('untar FUSE requests/file')))}")
    if uh and us:
        print(f"untar: passthrough_hp (C, --nocache --nopassthrough) {fmt(uh)} s: "
              f"sluice/passthrough_hp {us / uh:.2f}x"
              + (f", passthrough_hp/plain {uh / up:.2f}x" if up else ""))
    fp = median(b.results["plain"].get(FIO_WRITE))
    fs_ = median(b.results["sluice"].get(FIO_WRITE))
    if fp and fs_:
        print(f"\nfio write: sluice/plain {fs_ / fp:.2f}x with "
              f"{'write-back' if args.writeback else 'write-through'} (goal: at least "
              f"{FIO_RATIO_GOAL}x with write-back)")
        print(f"fio write: the daemon's {daemon_build()}")
    if b.extra.get("untar_requests"):
        print("untar requests by kind: " + ", ".join(
            f"{k} {v}" for k, v in b.extra["untar_requests"].items()))
        frac = b.daemon_cpu.get("untar /usr/include")
        if us and frac:
            # What the daemon spent per request: steadier than the times on a loaded
            # machine, where the wall clock mostly measures waiting for a CPU.
            cpu = statistics.median(frac) * us
            print(f"untar: sluice daemon CPU {cpu:.2f} s, "
                  f"{cpu / sum(b.extra['untar_requests'].values()) * 1e6:.0f} us per request")
    if b.daemon_cpu:
        print()
        print("sluice daemon CPU (median fraction of one core while the workload ran):")
        for k, v in b.daemon_cpu.items():
            print(f"  {k:30s} {statistics.median(v):.2f}")
    print()
    print(f"load average before {load0}, after {load1}; "
          f"other FUSE mounts during the run: {others or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started.isoformat(), "command": cmd, "cpus": os.cpu_count(),
            "platform": platform.platform(), "size_mb": args.size_mb, "files": args.files,
            "duration_s": args.duration, "results": b.results,
            "units": {k: v[0] for k, v in WORKLOADS.items()},
            "targets": {k: v[2] for k, v in WORKLOADS.items() if v[2] is not None},
            "rounds": args.repeat, "daemon_cpu_fraction": b.daemon_cpu,
            "loadavg_before": load0, "loadavg_after": load1, "other_fuse_mounts": others,
            **b.extra}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
