#!/usr/bin/env python3
"""I/O quality of service under contention: real programs on a mounted volume, run as
principals with `sluice run`, under the `fifo` and the `mclock` scheduler in one
invocation, on timing profiles where the simulated device is the bottleneck.

Cases (each under each scheduler, each profile):

  audio        a reader doing small (4 KiB) random reads at a fixed rate, each with a
               deadline (the period), alone ("solo") and then beside a bulk writer
               streaming large writes from several processes; the reader holds an I/O
               reservation above its rate. Under mclock its p99 should stay within 2x
               of solo with < 1% deadlines missed; under fifo it should be >= 5x that.
  reservation  a principal reserved at 50% of the device's capacity, flooding, beside
               two other flooding principals: it should get >= 95% of its reservation.
  weights      two flooding principals at weights 1:3: throughput within 5% of 1:3.
  limits       a flooding principal limited to 25% of capacity (50% on `hdd`, whose
               capacity is small), beside another flood: over any one-second window
               it should not exceed its limit by more than 5%.

Every flood is several threads of a real process doing synchronous reads or writes
through the mount, so the device queue really fills. The reads go to a file far
larger than the pager's pool (random offsets; the pool is a few MiB), so they reach
the device. Figures come from two places, side by side: what the programs measured
(end-to-end through FUSE) and what the scheduler recorded (queue + service, per
principal, from `sluice stats`): the scheduler's figures are the gate.

Profiles: `hdd` (one request at a time, seeks) and a custom one, `slow4`
(`10000,400,0,4`: 10 ms a request, 400 MB/s, four channels, no seek; 4 KiB random
capacity 400 IOPS), slow enough that the daemon saturates it through FUSE even on a
busy two-core machine, so the device, not the daemon, is the bottleneck. (With eight
channels, 800 IOPS, it did not: the floods then got what they asked for and weights
had nothing to share.) The bulk writer is 2 processes x 4 threads writing 256 KiB
through the mount plus 64 threads writing 256 KiB as direct clients (the mount admits
16 requests of one principal at a time; direct clients are how it queues more), all
as one principal; the table shows what it wrote while the reader ran (under mclock on
`hdd`, anticipation keeps the head idle for the reader: blockdev/anticipation.py).
`--profile hdd-noantic` (not run by default) is `hdd` with anticipation off, for an
A/B of it.

    .venv/bin/python scripts/bench_qos.py [--quick] [--json FILE] [--plot FILE.png]

prints a table, draws latency over time (matplotlib, the `bench` extra: installed into
the running environment if missing), and writes the figures to --json. `--quick` runs
every case briefly on the custom profile only (the test suite runs it once).
Internal: `bench_qos.py --load KIND ...` is the workload program the principals run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]
MiB = 1 << 20
KiB = 1 << 10

#: the custom profile: latency_us,MBps,full_seek_ms,queue_depth
CUSTOM = ("slow4", "10000,400,0,4")
PROFILES = {"hdd": "hdd", CUSTOM[0]: CUSTOM[1]}
#: not run by default: `hdd` with anticipation off (the same numbers, antic=0), to see
#: what anticipation does (`--profile hdd --profile hdd-noantic`)
EXTRA_PROFILES = {"hdd-noantic": "lat=4200,bw=180,seek=15,qd=1"}


# -- the workload programs (run as principals through `sluice run`) --------------------------

def load_main(argv: list[str]) -> int:
    """`--load reader|flood ...`: one workload program; prints its figures as JSON."""
    ap = argparse.ArgumentParser(prog="bench_qos.py --load")
    ap.add_argument("kind", choices=["reader", "flood"])
    ap.add_argument("--file", required=True)
    ap.add_argument("--size", type=int, default=4096, help="bytes per request")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--rate", type=float, default=0, help="reader: reads per second")
    ap.add_argument("--deadline", type=float, default=0, help="reader: seconds per read")
    ap.add_argument("--threads", type=int, default=1, help="flood: threads")
    ap.add_argument("--write", action="store_true", help="flood: write (else read)")
    ap.add_argument("--direct", action="store_true",
                    help="flood write: through direct clients (one connection per thread) "
                         "instead of the mount")
    ap.add_argument("--span", type=int, default=64 * MiB, help="flood write: bytes of each thread's file, "
                    "overwritten in a loop (0: stream, always past the end)")
    ap.add_argument("--stop", default=None, help="flood: stop once this file exists")
    ap.add_argument("--mnt", default=None, help="direct flood: the mount point")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    if a.kind == "reader":
        out = _reader(a)
    elif a.direct:
        out = _direct_flood(a)
    else:
        out = _flood(a)
    json.dump(out, sys.stdout)
    return 0


def _reader(a: argparse.Namespace) -> dict[str, Any]:
    """Reads of `size` bytes at random aligned offsets, one every 1/rate seconds on a
    fixed schedule; a read misses its deadline if it completes later than `deadline`
    after it was due."""
    fd = os.open(a.file, os.O_RDONLY)
    nblocks = os.fstat(fd).st_size // a.size
    rng = random.Random(a.seed)
    samples: list[tuple[float, float, float]] = []  # (due, latency, completion - due)
    t0 = time.perf_counter()
    i = 0
    while True:
        due = t0 + i / a.rate
        if due - t0 >= a.seconds:
            break
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        start = time.perf_counter()
        os.pread(fd, a.size, rng.randrange(nblocks) * a.size)
        end = time.perf_counter()
        samples.append((due - t0, end - start, end - due))
        i += 1
    os.close(fd)
    return {"samples": samples}


def _flood(a: argparse.Namespace) -> dict[str, Any]:
    """`threads` threads doing synchronous requests back to back until time is up or
    the stop file appears: random aligned reads of an existing file, or sequential
    writes over the first `span` bytes of a file of their own (FILE.k), overwritten in
    a loop. (Writes to one file take its inode's lock one at a time; the point is to
    fill the device queue.)"""
    fds = [os.open(f"{a.file}.{k}", os.O_RDWR | os.O_CREAT, 0o644) if a.write
           else os.open(a.file, os.O_RDONLY) for k in range(a.threads)]
    size = os.fstat(fds[0]).st_size
    end = time.perf_counter() + a.seconds
    counts = [0] * a.threads
    buf = os.urandom(a.size)
    stop = a.stop

    def going() -> bool:
        return time.perf_counter() < end and not (stop and os.path.exists(stop))

    def work(k: int) -> None:
        rng = random.Random(a.seed * 1000 + k)
        fd = fds[k]
        n = 0
        if a.write:
            off = 0
            while going():
                os.pwrite(fd, buf, off)
                off = (off + a.size) % a.span if a.span else off + a.size
                n += 1
        else:
            nblocks = size // a.size
            while going():
                os.pread(fd, a.size, rng.randrange(nblocks) * a.size)
                n += 1
        counts[k] = n

    threads = [threading.Thread(target=work, args=(k,)) for k in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    return {"ops": sum(counts)}


def _direct_flood(a: argparse.Namespace) -> dict[str, Any]:
    """Like a write flood, through direct clients: each thread its own connection
    (acting for this process's principal), writing FILE.k over and over. Direct
    clients are not held to the mount's per-principal request admission, so a few
    dozen threads keep a few dozen device requests queued."""
    sys.path.insert(0, str(REPO))
    from kernelshim.client import Client
    from kernelshim.errors import Sealed
    mnt = Path(a.mnt)
    end = time.perf_counter() + a.seconds
    counts = [0] * a.threads
    buf = os.urandom(a.size)
    errors: list[str] = []

    def work(k: int) -> None:
        n = 0
        try:
            with Client.connect(mnt, shm_size=a.size) as c:
                with c.open(f"{Path(a.file).name}.{k}", "w") as f:
                    off = 0
                    while time.perf_counter() < end and not (a.stop and os.path.exists(a.stop)):
                        try:
                            f.pwrite(buf, off)
                        except Sealed:
                            # A commit sealed the blocks again between the library's
                            # retry's layout and its write (likely on a slow device):
                            # the next pwrite asks for a layout afresh.
                            continue
                        off = (off + a.size) % a.span if a.span else off + a.size
                        n += 1
                        if off == 0 or (not a.span and n % 32 == 0):
                            f.commit()
        except Exception as exc:  # noqa: BLE001 - reported to the harness
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
        counts[k] = n

    threads = [threading.Thread(target=work, args=(k,)) for k in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("; ".join(errors[:3]))
    return {"ops": sum(counts)}


# -- the harness ------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sluice(*args: str) -> str:
    r = subprocess.run([*SLUICE, *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"bench_qos: sluice {' '.join(args)} failed: "
                         f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == real for line in f)


class Volume:
    """A volume with one profile, mounted under one scheduler at a time."""

    def __init__(self, work: Path, name: str, profile: str, size: str, cache: str) -> None:
        self.dir = work / name
        self.dir.mkdir()
        self.volume = self.dir / "vol"
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir()
        self.profile = profile
        self.cache = cache
        self.pid: int | None = None
        self.added: list[str] = []
        sluice("mkfs", str(self.volume), "--size", size, "--profile", profile, "-q")

    def mount(self, scheduler: str) -> None:
        sluice("mount", str(self.volume), str(self.mnt), "--scheduler", scheduler,
               "--cache-size", self.cache)
        self.pid = int(json.loads((self.volume / "mount.json").read_text())["pid"])

    def umount(self) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run([*SLUICE, "umount", str(self.mnt)], capture_output=True,
                               text=True, cwd=REPO)
            if r.returncode != 0:
                log(f"umount failed ({r.stderr.strip()}): unmounting lazily")
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.pid is not None:
            deadline = time.monotonic() + 30
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.pid):
                log(f"daemon {self.pid} did not exit: killing it")
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
            self.pid = None

    def stats(self) -> dict[str, Any]:
        from kernelshim.client import Client
        with Client.connect(str(self.mnt), shm_size=0) as c:
            return c.call("stats")

    def principal(self, name: str, **banks: Any) -> None:
        """Add a principal (as `sluice principal add` does, without starting a CLI)."""
        from kernelshim.client import Client
        with Client.connect(str(self.mnt), shm_size=0) as c:
            c.call("principal_add", name=name, parent="root", owner_uid=None, **banks)
        self.added.append(name)

    def forget(self) -> None:
        """Remove the principals added since the last call (their reservations would
        otherwise add up over the cases past what the device can serve); what they
        stored goes to `setup`."""
        from kernelshim.client import Client
        with Client.connect(str(self.mnt), shm_size=0) as c:
            for name in self.added:
                c.call("principal_rm", name=name, move_to="setup")
        self.added = []

    def start(self, principal: str, *load_args: str) -> subprocess.Popen:
        """Start a workload program as `principal` (sluice run)."""
        return subprocess.Popen([*SLUICE, "run", str(self.mnt), "--principal", principal,
                                 "--", sys.executable, str(Path(__file__).resolve()),
                                 "--load", *load_args],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(procs: list[subprocess.Popen], timeout: float) -> list[dict[str, Any]]:
    """Wait for workload programs (killing, by pid, any that overrun) and parse their
    output; a failed program stops the benchmark with its error."""
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            raise SystemExit(f"bench_qos: a workload program overran: {se.strip()[-500:]}")
        if p.returncode != 0:
            raise SystemExit(f"bench_qos: a workload program failed: {se.strip()[-800:]}")
        out.append(json.loads(so))
    return out


def io_of(st: dict[str, Any], name: str):
    from fs.metrics import io_rows
    return io_rows(st).get(name)


def capacity_iops(st: dict[str, Any]) -> float:
    from fs.metrics import capacity
    iops, _ = capacity(st)
    if not iops:
        raise SystemExit("bench_qos: the daemon does not report the device's capacity "
                         "(sluice stats: device.capacity)")
    return iops


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]


# -- the cases ----------------------------------------------------------------------------

class Settings:
    def __init__(self, quick: bool, profile: str) -> None:
        hdd = profile.startswith("hdd")
        self.quick = quick
        #: the reader: reads per second; its deadline per read is the period
        self.rate = 10.0 if hdd else 25.0
        self.deadline = 1.0 / self.rate
        self.audio_seconds = 2.0 if quick else (20.0 if hdd else 10.0)
        #: seconds each flood case is measured, after `warmup` seconds of flooding
        self.flood_seconds = 1.5 if quick else (8.0 if hdd else 6.0)
        self.warmup = 0.3 if quick else 1.0
        #: the bulk writer: processes x threads writing through the mount, threads of
        #: one process writing as direct clients, bytes per write
        self.writers, self.writer_threads, self.write_size = 2, 4, 256 * KiB
        self.direct_writers = 64
        #: bytes each writer thread overwrites in a loop, through the mount and as a
        #: direct client. (0 would stream into ever longer files instead, with no
        #: copy-on-write relocation and so no discards: tried, and the reader fared
        #: worse under mclock — every write then allocates — see docs/BENCHMARKS.md.)
        self.write_span, self.direct_span = 16 * MiB, 8 * MiB
        self.flood_threads = 8
        #: the limited principal's limit, as a fraction of capacity: high enough that
        #: a one-second window holds many requests (on `hdd`, 25% is 20 IOPS, and one
        #: request more is already 5%), low enough that it binds (its fair share beside
        #: the other flood is more)
        self.limit_fraction = 0.5 if hdd else 0.25
        self.data_bytes = (32 if quick else 128) * MiB


def prepare(v: Volume, s: Settings) -> None:
    """The data file every reader reads (written by a principal of its own, so that
    writing it is charged to nobody measured)."""
    v.principal("setup")
    v.added = []
    subprocess.run([*SLUICE, "run", str(v.mnt), "--principal", "setup", "--", "dd",
                    "if=/dev/urandom", f"of={v.mnt / 'data'}", "bs=1M",
                    f"count={s.data_bytes // MiB}", "conv=fsync", "status=none"],
                   check=True, cwd=REPO)


class Floods:
    """Flooding workload programs, one per (principal, args), stopped together through a
    stop file (outside the mount) once the measurement is over."""

    def __init__(self, v: Volume, stop: Path) -> None:
        self.v = v
        self.stop = stop
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []

    def start(self, principal: str, *args: str) -> None:
        self.procs.append(self.v.start(principal, "flood", "--stop", str(self.stop),
                                       "--seconds", "600", *args))
        self.names.append(principal)

    def wait_busy(self, timeout: float = 60) -> None:
        """Until the scheduler has served every flooding principal (the programs are
        up and their requests are reaching the device)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.v.stats()
            if all((r := io_of(st, n)) is not None and r.ops > 0 for n in self.names):
                return
            for p in self.procs:
                if p.poll() is not None:
                    finish([p], 1)
            if time.monotonic() > deadline:
                raise SystemExit("bench_qos: the floods did not start in time")
            time.sleep(0.05)

    def __enter__(self) -> Floods:
        self.stop.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.touch()
        try:
            finish(self.procs, 120)
        finally:
            self.stop.unlink(missing_ok=True)


def case_audio(v: Volume, s: Settings, tag: str, stop: Path) -> dict[str, Any]:
    """The reader alone, then beside the bulk writer; reserved above its rate."""
    res = f"{int(s.rate * 1.5)}iops"
    data = str(v.mnt / "data")
    out: dict[str, Any] = {}
    for phase, name in (("solo", f"audio-solo-{tag}"), ("busy", f"audio-{tag}")):
        v.principal(name, io_reserve=res)
        with Floods(v, stop) as fl:
            if phase == "busy":
                # (root may let it hold more connections than the default 64)
                v.principal(f"bulk-{tag}", connections=128)
                for k in range(s.writers):
                    fl.start(f"bulk-{tag}", "--write", "--file", str(v.mnt / f"bulk{k}-{tag}"),
                             "--threads", str(s.writer_threads), "--size", str(s.write_size),
                             "--span", str(s.write_span), "--seed", str(k + 1))
                fl.start(f"bulk-{tag}", "--write", "--direct", "--mnt", str(v.mnt),
                         "--file", f"bulkd-{tag}", "--threads", str(s.direct_writers),
                         "--size", str(s.write_size), "--span", str(s.direct_span))
                fl.wait_busy()
                time.sleep(s.warmup)  # the writers have filled the queue
            bulk0 = io_of(v.stats(), f"bulk-{tag}") if phase == "busy" else None
            t0 = time.monotonic()
            # Offsets of its own (a seed per phase): the pool must not hold them already.
            reader = v.start(name, "reader", "--file", data, "--rate", str(s.rate),
                             "--seconds", str(s.audio_seconds), "--deadline", str(s.deadline),
                             "--seed", str(_seed(name)))
            (r,) = finish([reader], s.audio_seconds + 120)
            st = v.stats()
            if bulk0 is not None:
                # what the bulk writer got meanwhile (anticipation takes from it)
                bulk1 = io_of(st, f"bulk-{tag}")
                dt = time.monotonic() - t0
                out["bulk_mbps"] = (bulk1.write_bytes - bulk0.write_bytes) / dt / 1e6
                out["bulk_iops"] = (bulk1.ops - bulk0.ops) / dt
        row = io_of(st, name)
        lat = [x[1] for x in r["samples"]]
        late = [x[2] for x in r["samples"]]
        out[phase] = {
            "sched_p50_ms": row.p50_s * 1e3 if row else 0.0,
            "sched_p99_ms": row.p99_s * 1e3 if row else 0.0,
            "sched_max_ms": row.max_s * 1e3 if row else 0.0,
            "sched_ops": row.ops if row else 0,
            "prog_p50_ms": pct(lat, 0.5) * 1e3, "prog_p99_ms": pct(lat, 0.99) * 1e3,
            "reads": len(lat),
            "deadline_misses": sum(1 for x in late if x > s.deadline),
            "samples": r["samples"],
        }
    solo, busy = out["solo"], out["busy"]
    return {
        "p99_ms": busy["sched_p99_ms"], "p99_ms_solo": solo["sched_p99_ms"],
        "p50_ms": busy["sched_p50_ms"], "p50_ms_solo": solo["sched_p50_ms"],
        "max_ms": busy["sched_max_ms"], "max_ms_solo": solo["sched_max_ms"],
        "deadline_miss_ratio": busy["deadline_misses"] / max(1, busy["reads"]),
        "deadline_miss_ratio_solo": solo["deadline_misses"] / max(1, solo["reads"]),
        "program_p50_ms": busy["prog_p50_ms"], "program_p50_ms_solo": solo["prog_p50_ms"],
        "program_p99_ms": busy["prog_p99_ms"], "program_p99_ms_solo": solo["prog_p99_ms"],
        "reads": busy["reads"], "reads_served_by_device": busy["sched_ops"],
        "rate_per_s": s.rate, "deadline_ms": s.deadline * 1e3, "reserve": res,
        "bulk_write_mbps": out.get("bulk_mbps", 0.0), "bulk_iops": out.get("bulk_iops", 0.0),
        "samples": busy["samples"], "samples_solo": solo["samples"],
    }


def _seed(name: str) -> int:
    """A seed of the principal's own, so that no workload reads the offsets another
    one left in the pool."""
    return zlib.crc32(name.encode())


def _measure(v: Volume, s: Settings, stop: Path, names: list[str], *, sample: float = 0.0
             ) -> tuple[float, dict[str, int], list[tuple[float, dict[str, int]]]]:
    """Flood 4 KiB random reads of the data file as each of `names`; once all reach the
    device and `warmup` has passed, count each principal's device requests (the
    scheduler's figures) over `flood_seconds`, and every `sample` seconds if asked."""
    def ops(st: dict[str, Any]) -> dict[str, int]:
        return {n: (r.ops if (r := io_of(st, n)) is not None else 0) for n in names}

    with Floods(v, stop) as fl:
        for k, n in enumerate(names):
            fl.start(n, "--file", str(v.mnt / "data"), "--threads", str(s.flood_threads),
                     "--seed", str(_seed(n)))
        fl.wait_busy()
        time.sleep(s.warmup)
        t0 = time.monotonic()
        series = [(0.0, ops(v.stats()))]
        while series[-1][0] < s.flood_seconds:
            time.sleep(sample or s.flood_seconds)
            st = v.stats()
            series.append((time.monotonic() - t0, ops(st)))
    dt, last = series[-1]
    return dt, {n: last[n] - series[0][1][n] for n in names}, series


def case_reservation(v: Volume, s: Settings, tag: str, cap: float, stop: Path
                     ) -> dict[str, Any]:
    want = round(cap * 0.5)
    r, f1, f2 = f"res-{tag}", f"res-f1-{tag}", f"res-f2-{tag}"
    v.principal(r, io_reserve=f"{want}iops")
    v.principal(f1)
    v.principal(f2)
    dt, ops, _ = _measure(v, s, stop, [r, f1, f2])
    got = ops[r] / dt
    return {"achieved_ratio": got / want, "reserved_iops": want, "achieved_iops": got,
            "others_iops": [ops[f1] / dt, ops[f2] / dt]}


def case_weights(v: Volume, s: Settings, tag: str, stop: Path) -> dict[str, Any]:
    w1, w3 = f"w1-{tag}", f"w3-{tag}"
    v.principal(w1, io_weight=100)
    v.principal(w3, io_weight=300)
    dt, ops, _ = _measure(v, s, stop, [w1, w3])
    return {"ratio": ops[w3] / max(1, ops[w1]), "target": 3.0,
            "iops": [ops[w1] / dt, ops[w3] / dt]}


def case_limit(v: Volume, s: Settings, tag: str, cap: float, stop: Path) -> dict[str, Any]:
    limit = round(cap * s.limit_fraction)
    lim, other = f"lim-{tag}", f"lim-f-{tag}"
    v.principal(lim, io_limit=f"{limit}iops")
    v.principal(other)
    dt, ops, series = _measure(v, s, stop, [lim, other], sample=0.1)
    # Every window from one sample to the first sample at least a second later.
    worst = 0.0
    for i, (ti, oi) in enumerate(series):
        j = next((j for j in range(i + 1, len(series)) if series[j][0] - ti >= 1.0), None)
        if j is None:
            break
        tj, oj = series[j]
        worst = max(worst, (oj[lim] - oi[lim]) / (limit * (tj - ti)))
    return {"max_window_ratio": worst, "limit_iops": limit, "mean_iops": ops[lim] / dt,
            "other_iops": ops[other] / dt}


def run_profile(work: Path, pname: str, spec: str, schedulers: list[str], quick: bool
                ) -> dict[str, Any]:
    s = Settings(quick, pname)
    v = Volume(work, pname, spec, "2G", "4M")
    stop = v.dir / "stop"
    out: dict[str, Any] = {}
    try:
        v.mount(schedulers[0])
        log(f"{pname}: writing the {s.data_bytes // MiB} MiB data file")
        prepare(v, s)
        for i, sched in enumerate(schedulers):
            if i:
                v.umount()
                v.mount(sched)
            st = v.stats()
            cap = capacity_iops(st)
            log(f"{pname}/{sched}: capacity {cap:,.0f} IOPS; audio case")
            res: dict[str, Any] = {"capacity_iops": cap}
            res["audio"] = case_audio(v, s, sched, stop)
            v.forget()
            log(f"{pname}/{sched}: reservation case")
            res["reservation"] = case_reservation(v, s, sched, cap, stop)
            v.forget()
            log(f"{pname}/{sched}: weights case")
            res["weights"] = case_weights(v, s, sched, stop)
            v.forget()
            log(f"{pname}/{sched}: limit case")
            res["limit"] = case_limit(v, s, sched, cap, stop)
            v.forget()
            out[sched] = res
    finally:
        v.umount()
    fsck = subprocess.run([*SLUICE, "fsck", str(v.volume), "-q"], capture_output=True,
                          text=True, cwd=REPO)
    if fsck.returncode != 0:
        log(f"{pname}: fsck found errors:\n{fsck.stdout}")
    out["settings"] = {"profile": spec, "rate": s.rate, "deadline_ms": s.deadline * 1e3,
                       "audio_seconds": s.audio_seconds, "flood_seconds": s.flood_seconds,
                       "writers": f"{s.writers} processes x {s.writer_threads} threads, "
                                  f"{s.write_size // KiB} KiB writes",
                       "floods": f"{s.flood_threads} threads of 4 KiB random reads each",
                       "data_file_mib": s.data_bytes // MiB, "pool": "4M",
                       "fsck_clean": fsck.returncode == 0}
    return out


# -- report -------------------------------------------------------------------------------

GOALS = {
    "audio.p99 vs solo (mclock)": "<= 2x",
    "audio.deadline misses (mclock)": "< 1%",
    "audio.p99 fifo / mclock": ">= 5x",
    "reservation achieved (mclock)": ">= 0.95",
    "weights ratio (mclock)": "3 +- 5%",
    "limit worst 1 s window (mclock)": "<= 1.05",
}


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    m, f = r["mclock"], r["fifo"]
    a = m["audio"]
    return {
        "audio.p99 vs solo (mclock)": a["p99_ms"] <= 2 * a["p99_ms_solo"],
        "audio.deadline misses (mclock)": a["deadline_miss_ratio"] < 0.01,
        "audio.p99 fifo / mclock": f["audio"]["p99_ms"] >= 5 * a["p99_ms"],
        "reservation achieved (mclock)": m["reservation"]["achieved_ratio"] >= 0.95,
        "weights ratio (mclock)": abs(m["weights"]["ratio"] / 3 - 1) <= 0.05,
        "limit worst 1 s window (mclock)": m["limit"]["max_window_ratio"] <= 1.05,
    }


def table(pname: str, r: dict[str, Any]) -> str:
    scheds = [k for k in ("fifo", "mclock") if k in r]
    rows = [("audio p99 ms, scheduler (solo)", lambda x: f"{x['audio']['p99_ms']:.1f} "
             f"({x['audio']['p99_ms_solo']:.1f})"),
            ("audio p50 ms, scheduler (solo)", lambda x: f"{x['audio']['p50_ms']:.1f} "
             f"({x['audio']['p50_ms_solo']:.1f})"),
            ("audio p99 ms, program (solo)", lambda x: f"{x['audio']['program_p99_ms']:.1f} "
             f"({x['audio']['program_p99_ms_solo']:.1f})"),
            ("audio deadline misses", lambda x: f"{x['audio']['deadline_miss_ratio']:.1%}"),
            ("bulk writer beside it, MB/s (IOPS)", lambda x: f"{x['audio']['bulk_write_mbps']:.1f}"
             f" ({x['audio']['bulk_iops']:.0f})"),
            ("reservation achieved / reserved", lambda x: f"{x['reservation']['achieved_iops']:.0f}"
             f"/{x['reservation']['reserved_iops']} = {x['reservation']['achieved_ratio']:.3f}"),
            ("weights 1:3 ratio", lambda x: f"{x['weights']['ratio']:.3f}"),
            ("limit worst 1 s window / limit", lambda x: f"{x['limit']['max_window_ratio']:.3f}"
             f" (limit {x['limit']['limit_iops']})")]
    w = 34
    lines = [f"profile {pname} ({r['settings']['profile']}), capacity "
             f"{r[scheds[0]]['capacity_iops']:,.0f} IOPS",
             f"| {'figure':{w}} | " + " | ".join(f"{s:>22}" for s in scheds) + " |",
             f"|{'-' * (w + 2)}|" + "|".join("-" * 24 for _ in scheds) + "|"]
    for label, fn in rows:
        lines.append(f"| {label:{w}} | " + " | ".join(f"{fn(r[s]):>22}" for s in scheds) + " |")
    if "fifo" in r and "mclock" in r:
        ratio = r["fifo"]["audio"]["p99_ms"] / max(1e-9, r["mclock"]["audio"]["p99_ms"])
        lines.append(f"audio p99 fifo/mclock (scheduler's figures): {ratio:.1f}x")
        for goal, ok in verdicts(r).items():
            lines.append(f"  {goal:34} goal {GOALS[goal]:>8}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    # (matplotlib alone: `pip install -e REPO[bench]` re-pointed a venv shared by
    # several clones at the clone running the benchmark; probe 19, F10)
    log("matplotlib (of the `bench` extra) is missing: installing it into this "
        f"environment with `{sys.executable} -m pip install 'matplotlib>=3.8'`")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        log(f"could not install matplotlib ({r.stderr.strip()[-300:]}): no plot drawn")
        return False
    return True


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    if not ensure_matplotlib():
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 4 * len(results)), squeeze=False)
    for ax, (pname, r) in zip(axes[:, 0], results.items()):
        a0 = r.get("mclock", r.get("fifo"))["audio"]
        t = [x[0] for x in a0["samples_solo"]]
        ax.plot(t, [x[1] * 1e3 for x in a0["samples_solo"]], ".", ms=3, color="grey",
                label="solo (mclock)")
        for sched, color in (("fifo", "tab:red"), ("mclock", "tab:blue")):
            if sched not in r:
                continue
            a = r[sched]["audio"]
            ax.plot([x[0] for x in a["samples"]], [x[1] * 1e3 for x in a["samples"]], ".",
                    ms=3, color=color, label=f"{sched}, beside the bulk writer")
            ax.axhline(a["p99_ms"], color=color, ls="--", lw=1,
                       label=f"{sched} p99 (scheduler) {a['p99_ms']:.1f} ms")
        ax.axhline(a0["deadline_ms"], color="black", ls=":", lw=1,
                   label=f"deadline {a0['deadline_ms']:.0f} ms")
        ax.set_yscale("log")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("read latency, ms (program)")
        ax.set_title(f"{pname} ({r['settings']['profile']}): a {a0['rate_per_s']:.0f}/s "
                     f"4 KiB reader reserved {a0['reserve']}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def summary_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def strip(r: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for sched in ("fifo", "mclock"):
            if sched in r:
                x = json.loads(json.dumps(r[sched]))
                x["audio"].pop("samples", None)
                x["audio"].pop("samples_solo", None)
                out[sched] = x
        out["settings"] = r["settings"]
        if "fifo" in r and "mclock" in r:
            out["goals_met"] = verdicts(r)
        return out
    by = {p: strip(r) for p, r in results.items()}
    first = next(iter(by))
    return {"profile": first, **{k: v for k, v in by[first].items()}, "by_profile": by}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        return load_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"every case briefly, on the custom profile {CUSTOM[0]} only")
    ap.add_argument("--profile", action="append", choices=[*PROFILES, *EXTRA_PROFILES],
                    help="profiles to run (default: all; --quick: the custom one)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--plot", type=Path, help="latency-over-time PNG (default: next to "
                    "--json, else qos_latency.png in the current directory; with --quick "
                    "only when given)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the volumes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_qos: run as root (it mounts volumes with allow_other)")
    profiles = args.profile or ([CUSTOM[0]] if args.quick else list(PROFILES))
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="sluice-qos-"))
    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    try:
        for pname in profiles:
            spec = PROFILES.get(pname) or EXTRA_PROFILES[pname]
            results[pname] = run_profile(work, pname, spec, ["fifo", "mclock"],
                                         args.quick)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for pname, r in results.items():
        print(table(pname, r))
        print()
    print(f"({time.monotonic() - t0:.0f} s; machine load {os.getloadavg()[0]:.2f})")
    if args.quick:
        print("(--quick: short phases on one profile, a check that every case runs; the "
              "goals are judged on a full run: docs/BENCHMARKS.md)")
    if args.json:
        args.json.write_text(json.dumps(summary_json(results), indent=1))
    if not args.no_plot and (args.plot or not args.quick):  # (--quick: only if asked)
        path = args.plot or (args.json.with_suffix(".png") if args.json
                             else Path("qos_latency.png"))
        if plot(results, path):
            print(f"latency over time: {path}")
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
