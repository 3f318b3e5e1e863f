#!/usr/bin/env python3
"""How a direct 4 KiB read waits for its reply: FUSE against the direct path with the
client's hybrid polling off (`spin=0`) and on (kernelshim/hybridwait.py), alternated
in short rounds on one mount so that the three share the machine's load.

With `--pin`, the daemon is pinned to CPU 0 and this process to CPU 1 for the run: that
is where an idle two-CPU machine puts them anyway (each wakes on its own idle CPU), so
every wake-up crosses CPUs as on a quiet machine, even while other work runs. Without
it, the kernel places them as the load makes it (on a loaded machine often on one CPU,
where a wake-up is cheap and polling cannot pay: the policy then switches it off).

Per round and system: reads per second, and CPU per read of the daemon and of this
process (schedstat run time, ns precision); for the direct rounds the polls made and
how many caught their reply. The last lines: per round, polling/no polling and each
direct variant / FUSE, and their geometric means. Not the figure of record (that is
`bench_direct.py`'s same-run ratio); this separates the waiting from the rest.

Run as root:  .venv/bin/python scripts/bench_direct_wait.py [--pin] [--rounds 6]
              [--seconds 1.5] [--size-mb 1024] [--spin-us 250]
About 1.5 minutes with the defaults (most of it writing the file). The mount is made
under a temporary directory and removed at the end.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BS, REPO, MiB, SluiceMount, io_until, loadavg, log, random_offsets

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_seconds(pid: int) -> float:
    """CPU seconds `pid` has run, all its threads (schedstat: ns, not clock ticks)."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except OSError:
            pass
    return total


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pin", action="store_true",
                   help="pin the daemon to CPU 0 and this process to CPU 1")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per system per round")
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--spin-us", type=float, default=250.0,
                   help="the polling budget of the 'on' variant (µs)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root (it mounts a volume)")
    if a.pin and os.cpu_count() is not None and os.cpu_count() < 2:  # type: ignore[operator]
        p.error("--pin needs two CPUs")
    from kernelshim.client import Client
    from kernelshim.hybridwait import HybridWait

    size = a.size_mb * MiB
    tmp = Path(tempfile.mkdtemp(prefix="sluice-wait-"))
    (tmp / "mnt").mkdir()
    m = SluiceMount(tmp / "vol", tmp / "mnt", max(8 << 30, 3 * size))
    results: dict[str, list[float]] = {"fuse": [], "off": [], "on": []}
    try:
        m.mkfs()
        m.mount()
        assert m.pid is not None
        f = tmp / "mnt" / "data.bin"
        log(f"writing a {a.size_mb} MiB file")
        chunk = os.urandom(4 * MiB)
        with open(f, "wb") as fh:
            for _ in range(size // (4 * MiB)):
                fh.write(chunk)
            os.fsync(fh.fileno())
        with open(f, "rb") as fh:  # into the host's page cache
            while fh.read(4 * MiB):
                pass
        if a.pin:
            for tid in os.listdir(f"/proc/{m.pid}/task"):
                os.sched_setaffinity(int(tid), {0})
            os.sched_setaffinity(0, {1})
        c = Client.connect(tmp / "mnt")
        offs = random_offsets(size, 555)
        print(f"load {loadavg()}; pinned: {a.pin}")
        print("| round | system | reads/s | daemon CPU µs/read | client CPU µs/read | polls | caught |")
        print("|---|---|---|---|---|---|---|")
        for r in range(a.rounds):
            for system in ("fuse", "off", "on"):
                d0 = run_seconds(m.pid)
                c0 = time.thread_time()
                t0 = time.perf_counter()
                if system == "fuse":
                    fd = os.open(f, os.O_RDONLY)
                    buf = mmap.mmap(-1, BS)
                    try:
                        n = io_until(os.preadv, fd, [buf], offs, a.seconds, batch=32,
                                     error="short read")
                    finally:
                        os.close(fd)
                else:
                    c.hybrid = HybridWait(a.spin_us / 1e6 if system == "on" else 0.0)
                    bb = bytearray(BS)
                    n = 0
                    with c.open("data.bin", "r") as fl:
                        t_end = t0 + a.seconds
                        while True:
                            for k in range(32):
                                if fl.readinto(bb, offs[(n + k) & 0xFFFF]) != BS:
                                    raise RuntimeError("short read")
                            n += 32
                            if time.perf_counter() >= t_end:
                                break
                dt = time.perf_counter() - t0
                dc = run_seconds(m.pid) - d0
                cc = time.thread_time() - c0
                results[system].append(n / dt)
                polls = f"{c.hybrid.polls} | {c.hybrid.hits}" if system != "fuse" else "- | -"
                print(f"| {r + 1} | {system} | {n / dt:.0f} | {dc / n * 1e6:.1f} | "
                      f"{cc / n * 1e6:.1f} | {polls} |", flush=True)
        c.close()
        on_off = [x / y for x, y in zip(results["on"], results["off"])]
        on_f = [x / y for x, y in zip(results["on"], results["fuse"])]
        off_f = [x / y for x, y in zip(results["off"], results["fuse"])]
        print(f"\npolling on / off, per round: {' '.join(f'{x:.2f}' for x in on_off)}; "
              f"geometric mean {geomean(on_off):.2f}")
        print(f"direct (polling on) / FUSE: {' '.join(f'{x:.2f}' for x in on_f)}; "
              f"geometric mean {geomean(on_f):.2f}")
        print(f"direct (polling off) / FUSE: {' '.join(f'{x:.2f}' for x in off_f)}; "
              f"geometric mean {geomean(off_f):.2f}")
        print(f"load at the end {loadavg()}")
    finally:
        m.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
