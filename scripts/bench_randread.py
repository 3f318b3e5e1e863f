#!/usr/bin/env python3
"""Random 4 KiB reads through a sluice mount of any commit: IOPS and daemon CPU per read.

A focused, self-contained harness for comparing commits like-for-like (issue 7's
bench_fs regression check): it imports nothing from the repository it measures, so
the same script runs against an old checkout. For the checkout at --repo it makes a
volume (`sluice mkfs --profile none`), mounts it with that checkout's defaults (plus
--mount-arg), writes a SIZE MiB file with 1 MiB writes and fsync, remounts (cold
pager), reads the file once sequentially (as bench_fs's cold read does before its
random reads), then runs 4 KiB reads at random aligned offsets for DURATION s per
configuration: buffered / O_DIRECT, 1 / 4 jobs (processes). For each it prints IOPS and
the daemon's CPU time (utime+stime of all its threads, /proc/PID/stat) per 1000 reads:
CPU per request moves much less with the machine's load than IOPS do. With --plain it
also runs the same reads on a plain file in the same directory (a yardstick of the
machine for this run).

Run as root:  python3 scripts/bench_randread.py --repo CHECKOUT [--size-mb 1024]
                  [--duration 5] [--rounds 1] [--only d1,d4,b1,b4] [--plain]
                  [--mount-arg=--writeback] [--json OUT]
Takes about 30 s plus 4 x DURATION x ROUNDS s (1 GiB file, default configurations).
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: perf counts the daemon's system calls (a software tracepoint: no PMU needed)
PERF = bool(shutil.which("perf"))
MiB = 1 << 20
BS = 4096
CONFIGS = {"b1": (False, 1), "b4": (False, 4), "d1": (True, 1), "d4": (True, 4)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of a process's threads."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:
                        total += int(line.split()[-1])
        except OSError:
            pass
    return total


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == real for line in f)


class Mount:
    def __init__(self, repo: Path, volume: Path, mnt: Path, extra: list[str]) -> None:
        self.repo, self.volume, self.mnt, self.extra = repo, volume, mnt, extra
        self.cli = [str(repo / ".venv/bin/python"), "-m", "fs.cli"]
        self.pid = 0

    def _run(self, args: list[str]) -> None:
        r = subprocess.run(self.cli + args, cwd=self.repo, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"sluice {' '.join(args)} failed: {r.stderr.strip()[-500:]}")

    def mkfs(self) -> None:
        self._run(["mkfs", str(self.volume), "--size", "16G", "--profile", "none", "-q"])

    def mount(self) -> None:
        self._run(["mount", str(self.volume), str(self.mnt), "--profile", "none",
                   *self.extra])
        self.pid = int(json.loads((self.volume / "mount.json").read_text())["pid"])

    def umount(self) -> None:
        if is_mounted(self.mnt):
            self._run(["umount", str(self.mnt)])
        # the daemon exits after the unmount; wait for it so it holds no CPU
        for _ in range(300):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def cleanup(self) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run(self.cli + ["umount", str(self.mnt)], cwd=self.repo,
                               capture_output=True)
            if r.returncode and is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)])
                if self.pid:
                    try:
                        os.kill(self.pid, 9)
                    except ProcessLookupError:
                        pass


def write_file(path: Path, size_mb: int) -> None:
    buf = mmap.mmap(-1, MiB)
    buf[:] = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_mb):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_seq(path: Path) -> None:
    buf = mmap.mmap(-1, MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def _job(path: str, direct: bool, seconds: float, seed: int, start, counts, idx: int) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, BS)
        rnd = random.Random(seed)
        nblocks = os.fstat(fd).st_size // BS
        offs = [rnd.randrange(nblocks) * BS for _ in range(1 << 16)]
        bufs = [buf]
        start.wait()
        n = 0
        t_end = time.perf_counter() + seconds
        while True:
            for k in range(64):
                if os.preadv(fd, bufs, offs[(n + k) & 0xFFFF]) != BS:
                    raise RuntimeError("short read")
            n += 64
            if time.perf_counter() >= t_end:
                break
        counts[idx] = n
    finally:
        os.close(fd)


def rand_read(path: Path, direct: bool, jobs: int, seconds: float, pid: int | None
              ) -> tuple[float, int, float, int, float]:
    """(IOPS, reads, daemon CPU seconds, its context switches, its system calls; the
    last three 0, 0, nan without `pid`, the system calls nan without perf)."""
    ctx = mp.get_context("fork")
    start = ctx.Barrier(jobs + 1)
    counts = ctx.Array("q", jobs)
    procs = [ctx.Process(target=_job, args=(str(path), direct, seconds, 1000 + i, start,
                                             counts, i)) for i in range(jobs)]
    for p in procs:
        p.start()
    perf = None
    if pid and PERF:
        # Attached before the jobs start: attached after, under load it missed the
        # first part of a short run, and counted fewer system calls than the reads
        # could have made (1.7 a read where each takes two).
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter",
                                 "-p", str(pid)], stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
    start.wait()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    cs0 = context_switches(pid) if pid else 0
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    dt = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    cs = (context_switches(pid) - cs0) if pid else 0
    syscalls = float("nan")
    if perf is not None:
        perf.send_signal(2)
        err = perf.communicate()[1]
        for line in err.splitlines():
            if "raw_syscalls:sys_enter" in line:
                syscalls = float(line.split(",")[0])
    if any(p.exitcode for p in procs):
        raise RuntimeError("a random-read job failed")
    n = sum(counts[:])
    return n / dt, n, cpu, cs, syscalls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="checkout with .venv to measure")
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", default="b1,b4,d1,d4")
    p.add_argument("--plain", action="store_true", help="also the same reads on a plain file")
    p.add_argument("--mount-arg", action="append", default=[])
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    configs = [c for c in a.only.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--only: unknown configuration {c!r} (b1, b4, d1, d4)")
    repo = a.repo.resolve()
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-randread-", dir=a.workdir))
    mnt = tmp / "mnt"
    mnt.mkdir()
    m = Mount(repo, tmp / "vol", mnt, a.mount_arg)
    rows: list[dict] = []
    log(f"{head}: load {loadavg()}")
    try:
        m.mkfs()
        m.mount()
        write_file(mnt / "big.bin", a.size_mb)
        if a.plain:
            write_file(tmp / "plain.bin", a.size_mb)
        m.umount()
        m.mount()
        read_seq(mnt / "big.bin")
        for rnd in range(a.rounds):
            for c in configs:
                direct, jobs = CONFIGS[c]
                if a.plain:
                    iops, n, *_ = rand_read(tmp / "plain.bin", direct, jobs, a.duration, None)
                    rows.append({"fs": "plain", "config": c, "round": rnd, "iops": iops})
                iops, n, cpu, cs, sc = rand_read(mnt / "big.bin", direct, jobs, a.duration,
                                                 m.pid)
                rows.append({"fs": "sluice", "config": c, "round": rnd, "iops": iops,
                             "reads": n, "cpu_s": cpu, "cpu_ms_per_1000": cpu / n * 1e6,
                             "cs_per_read": cs / n, "syscalls_per_read": sc / n})
                log(f"  {c} round {rnd}: {iops:8.0f} IOPS, daemon {cpu / n * 1e6:7.1f} ms CPU "
                    f"per 1000 reads, {cs / n:.2f} context switches and {sc / n:.2f} "
                    f"syscalls per read (load {loadavg()})")
    finally:
        m.cleanup()
        subprocess.run(["rm", "-rf", str(tmp)])
    print(f"# {head} size {a.size_mb} MiB, {a.duration:g} s per run, load {loadavg()}, "
          f"mount args {a.mount_arg}")
    print(f"{'config':12s} {'sluice IOPS':>12s} {'ms CPU/1000':>12s} {'cswitch/read':>12s} "
          f"{'syscall/read':>12s} {'plain IOPS':>12s}")
    for c in configs:
        s = [r for r in rows if r["config"] == c and r["fs"] == "sluice"]
        pl = [r for r in rows if r["config"] == c and r["fs"] == "plain"]
        med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
        print(f"{head} {c:4s} {med([r['iops'] for r in s]):12.0f} "
              f"{med([r['cpu_ms_per_1000'] for r in s]):12.1f} "
              f"{med([r['cs_per_read'] for r in s]):12.2f} "
              f"{med([r['syscalls_per_read'] for r in s]):12.2f} "
              f"{med([r['iops'] for r in pl]):12.0f}")
    if a.json:
        a.json.write_text(json.dumps({"head": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
