#!/usr/bin/env python3
"""The daemon's CPU for bench_hostile's victim alone (a measurement aid).

    .venv/bin/python scripts/looptrace/victim_cpu.py [--seconds S] [--idle-poll USEC]

A volume mounted as bench_hostile mounts it, the daemon's loop thread pinned to CPU 0
and this process to CPU 1; a root direct client sends bench_hostile's victim pairs (a
stat, then a 4 KiB pread) one after the other for S seconds, and the loop thread's user
and system CPU time (/proc/PID/task/PID/stat) is divided by the pairs. With
`--idle-poll 0` (the default here) every request goes through the loop's epoll, as it
does under attack: what the victim alone asks of the loop, the figure to hold against
its fair share (docs/BENCHMARKS.md, "Stop 29")."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import REPO, SluiceMount  # noqa: E402

sys.path.insert(0, str(REPO))
from kernelshim.client import Client  # noqa: E402


def thread_cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of the thread `pid` (the daemon's loop thread)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--idle-poll", dest="idle_poll", default="0")
    ap.add_argument("--py-spy", dest="py_spy", metavar="FILE",
                    help="also sample the daemon with py-spy (collapsed stacks, "
                         "by thread) into FILE while the pairs run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="victim-cpu-") as tmp:
        base = Path(tmp)
        (base / "mnt").mkdir()
        sm = SluiceMount(base / "vol", base / "mnt", size="1G",
                         options=("--idle-poll", args.idle_poll))
        sm.mkfs()
        sm.mount()
        try:
            assert sm.pid is not None
            (base / "mnt/pub").mkdir()
            (base / "mnt/pub/shared").write_bytes(os.urandom(65536))
            os.sched_setaffinity(sm.pid, {0})
            os.sched_setaffinity(0, {1})
            with Client.connect(base / "mnt", shm_size=1 << 16) as c, \
                    c.open("pub/shared") as f:
                for _ in range(200):  # warm
                    f.stat()
                    f.pread(4096, 0)
                lat = []
                spy = None
                if args.py_spy:
                    spy = subprocess.Popen(
                        [str(REPO / ".venv/bin/py-spy"), "record", "--pid", str(sm.pid),
                         "--rate", "1000", "--format", "raw", "--nonblocking", "--threads",
                         "--duration", str(int(args.seconds)), "-o", args.py_spy],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.5)
                u0, s0 = thread_cpu(sm.pid)
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    a = time.perf_counter()
                    f.stat()
                    f.pread(4096, 0)
                    lat.append(time.perf_counter() - a)
                u1, s1 = thread_cpu(sm.pid)
                if spy is not None:
                    spy.wait()
            n = len(lat)
            lat.sort()
            print(f"{n} pairs, p50 {lat[n // 2] * 1e3:.3f} ms, p99 {lat[int(n * .99)] * 1e3:.3f} ms; "
                  f"the daemon's loop thread per pair: user {(u1 - u0) / n * 1e3:.3f} ms, "
                  f"system {(s1 - s0) / n * 1e3:.3f} ms ({(u1 - u0 + s1 - s0) / (lat and sum(lat) or 1):.0%} of the pairs' time)")
        finally:
            sm.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
