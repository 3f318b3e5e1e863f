#!/usr/bin/env python3
"""Another tenant's requests while one tenant reads cold data from a slow host (stop 28).

A sluice volume's store lies on a slow host filesystem: another sluice mount whose
timing profile makes each of its reads take LAT ms (a stand-in for a busy disk, a
network filesystem). One tenant reads 4 KiB blocks of a file at random, none of them
in sluice's cache or the host's; another calls getxattr (a FUSE request each) one at
a time. Both configurations in one run, the volume remounted and the host's cache
dropped before each:

  on the loop     every read that misses the host's page cache waits for the host on
                  the event loop (SLUICE_MISS_ON_LOOP_S=inf: sluice before stop 28)
  default         such reads go to a worker thread while the host is slow
                  (blockdev/backing.py, MISS_ON_LOOP_SECONDS)

Printed: the other tenant's getxattr p50/p99/max, the reader's reads a second and
p50, and the ratio of the two configurations.

    .venv/bin/python scripts/bench_slowhost.py [--lat-ms 20] [--calls 300]

Must run as root (it mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, SLUICE, is_mounted, log, main_quietly, run

BS = 4096


def pattern(i: int) -> bytes:
    return (b"%08d" % i) * (BS // 8)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(mnt: Path, nblocks: int, calls: int) -> dict[str, float]:
    f, other = mnt / "f", mnt / "other"
    stop = threading.Event()
    lat_r: list[float] = []
    bad: list[str] = []

    def reader() -> None:
        rnd = random.Random(11)
        fd = os.open(f, os.O_RDONLY)
        try:
            while not stop.is_set():
                i = rnd.randrange(nblocks)
                t0 = time.monotonic()
                if os.pread(fd, BS, i * BS) != pattern(i):
                    bad.append(str(i))
                lat_r.append(time.monotonic() - t0)
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    lat: list[float] = []
    t.start()
    t_start = time.monotonic()
    try:
        time.sleep(0.3)
        for _ in range(calls):
            t0 = time.monotonic()
            os.getxattr(other, "user.k")
            lat.append(time.monotonic() - t0)
            time.sleep(0.003)
    finally:
        stop.set()
        t.join()
    secs = time.monotonic() - t_start
    if bad:
        raise SystemExit(f"the reader got wrong data in blocks {bad[:5]}")
    return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat),
            "reads_s": len(lat_r) / secs, "read_p50": pct(lat_r, 0.5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lat-ms", type=float, default=20.0, help="the host's read latency")
    ap.add_argument("--calls", type=int, default=300, help="getxattr calls per configuration")
    ap.add_argument("--mib", type=int, default=16, help="the file's size")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_slowhost: must run as root (it mounts)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="sluice-slowhost-"))
    hvol, hmnt, mnt = base / "host-vol", base / "host", base / "mnt"
    hmnt.mkdir()
    mnt.mkdir()
    vol = hmnt / "vol"
    prof = f"lat={int(args.lat_ms * 1000)},bw=100,seek=0,qd=4"
    nblocks = args.mib * 256
    results: dict[str, dict[str, float]] = {}
    try:
        run([*SLUICE, "mkfs", str(hvol), "--size", "2G", "--profile", prof, "-q"], cwd=REPO)
        run([*SLUICE, "mount", str(hvol), str(hmnt)], cwd=REPO)
        run([*SLUICE, "mkfs", str(vol), "--size", "512M", "-q"], cwd=REPO)
        run([*SLUICE, "mount", str(vol), str(mnt)], cwd=REPO)
        (mnt / "f").write_bytes(b"".join(pattern(i) for i in range(nblocks)))
        (mnt / "other").write_bytes(b"x")
        os.setxattr(mnt / "other", "user.k", b"v")
        for name, env in (("on the loop (before)", {"SLUICE_MISS_ON_LOOP_S": "inf"}),
                          ("default", {})):
            run([*SLUICE, "umount", str(mnt)], cwd=REPO)
            run([*SLUICE, "umount", str(hmnt)], cwd=REPO)  # (the host's cache goes)
            run([*SLUICE, "mount", str(hvol), str(hmnt)], cwd=REPO)
            run([*SLUICE, "mount", str(vol), str(mnt)], cwd=REPO,
                env={**os.environ, **env})
            log(f"{name}: {args.calls} getxattr calls beside a reader of cold blocks")
            results[name] = measure(mnt, nblocks, args.calls)
    finally:
        for m in (mnt, hmnt):
            if is_mounted(m):
                with contextlib.suppress(RuntimeError):
                    run([*SLUICE, "umount", str(m)], cwd=REPO)
        shutil.rmtree(base, ignore_errors=True)
    print(f"host read latency {args.lat_ms:g} ms; the other tenant's getxattr (ms) and the "
          "reader's reads")
    print(f"{'':24}{'p50':>8}{'p99':>8}{'max':>8}{'reads/s':>9}{'read p50':>10}")
    for name, r in results.items():
        print(f"{name:24}{r['p50'] * 1e3:8.2f}{r['p99'] * 1e3:8.2f}{r['max'] * 1e3:8.2f}"
              f"{r['reads_s']:9.1f}{r['read_p50'] * 1e3:10.2f}")
    a, b = results["on the loop (before)"], results["default"]
    print(f"{'ratio before/default':24}{a['p50'] / b['p50']:8.1f}{a['p99'] / b['p99']:8.1f}"
          f"{a['max'] / b['max']:8.1f}{a['reads_s'] / b['reads_s']:9.2f}"
          f"{a['read_p50'] / b['read_p50']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main_quietly(main) or 0)
