#!/usr/bin/env python3
"""Another tenant's write + fdatasync while one tenant storms metadata fsyncs (stop 29).

A victim (root) writes 4 KiB at a time and fdatasyncs, one after the other; an
attacker tenant (uid ATTACKER_UID, its default principal; `--uid`, by default a uid no
account of the host has) runs NPROC processes that each
change the mode of one of their files and fsync it, without pause. The victim runs
alone for SECONDS, then under the storm for SECONDS, in the same mount; optionally the
attacker's principal gets an I/O limit first (`--limit 1iops`, `--limit 1MB/s`).

Printed: the victim's fdatasync p50/p99 and rate alone and under the storm and their
ratio, the attacker's fsyncs a second, and the daemon's durable commits and fsyncs
served by another's commit (group commit) over the storm.

    .venv/bin/python scripts/bench_fsync_storm.py [--nproc 8] [--seconds 4]
                                                  [--limit RATE] [--profile none]

Must run as root (it mounts, and runs the attacker as another uid with setpriv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (REPO, SLUICE, SluiceMount, log, main_quietly, parse_uids, run,
                      signals_held, stop_processes, unused_uids)

#: the attacker's uid (its processes run as it, by setpriv; `--uid`)
ATTACKER_UID = 61000

#: an attacker process: chmod + fsync of its files without end, counting fsyncs
_ATTACKER = r'''
import os, sys, time
d, out, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(d, exist_ok=True)
fds = [os.open(os.path.join(d, "f%d" % i), os.O_CREAT | os.O_RDWR, 0o644) for i in range(4)]
n = 0
mode = 0o644
while time.time() < until:
    for fd in fds:
        mode ^= 0o001
        os.fchmod(fd, mode)
        os.fsync(fd)
        n += 1
open(out, "w").write(str(n))
'''


def victim(fd: int, seconds: float) -> tuple[float, float, float]:
    """p50 and p99 (ms) of 4 KiB pwrite + fdatasync, and how many a second."""
    buf = os.urandom(4096)
    lat = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        a = time.perf_counter()
        os.pwrite(fd, buf, (i % 256) * 4096)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - a)
        i += 1
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3, len(lat) / seconds


def fs_stats(mnt: Path) -> dict:
    r = subprocess.run([*SLUICE, "stats", str(mnt), "--json"], cwd=REPO,
                       capture_output=True, text=True, check=True)
    st = json.loads(r.stdout)
    return st.get("fs", st)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--limit", help="the attacker's --io-limit (e.g. 1iops, 1MB/s)")
    ap.add_argument("--profile", default="none")
    ap.add_argument("--uid", default=None,
                    help="the attacker's uid (default: the first from 61000 that no account "
                         "has and no process runs as)")
    args = ap.parse_args()
    global ATTACKER_UID
    try:
        ATTACKER_UID = parse_uids(args.uid, 1)[0] if args.uid else unused_uids(1)[0]
    except ValueError as exc:
        ap.error(f"--uid: {exc}")
    with tempfile.TemporaryDirectory(prefix="sluice-storm-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        (base / "mnt").mkdir()
        sm = SluiceMount(base / "vol", base / "mnt", size="2G")
        mnt = sm.mountpoint
        #: the attacker processes started: each is killed and reaped on every way out
        procs: list[subprocess.Popen] = []
        try:
            run([*SLUICE, "mkfs", str(sm.volume), "--size", "2G", "--profile", args.profile,
                 "-q"], cwd=REPO)
            # (a stop during the mount comes once it is done and recorded: the
            # `finally` below then unmounts it)
            with signals_held() as unblock:
                run([*SLUICE, "mount", str(sm.volume), str(sm.mountpoint), "--profile",
                     args.profile], cwd=REPO, preexec_fn=unblock)
                sm.pid = int(json.loads((sm.volume / "mount.json").read_text())["pid"])
            os.chmod(mnt, 0o777)
            if args.limit:
                d = mnt / "limit-probe"
                subprocess.run(["setpriv", f"--reuid={ATTACKER_UID}",
                                f"--regid={ATTACKER_UID}", "--clear-groups", "mkdir",
                                str(d)], check=True)  # (makes uid-N exist)
                run([*SLUICE, "principal", "set", str(mnt), f"uid-{ATTACKER_UID}",
                     "--io-limit", args.limit], cwd=REPO)
            fd = os.open(mnt / "victim", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                victim(fd, 1.0)  # warm
                alone = victim(fd, args.seconds)
                before = fs_stats(mnt)
                until = time.time() + args.seconds + 1.5
                outs = [mnt / f"att{k}.n" for k in range(args.nproc)]
                for k in range(args.nproc):
                    # (started and recorded in `procs`, or not started: a stop between
                    # the two left the process running to its end)
                    with signals_held() as unblock:
                        procs.append(subprocess.Popen(
                            ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}",
                             "--clear-groups", "/usr/bin/python3", "-c", _ATTACKER,
                             str(mnt / f"att{k}"), str(outs[k]), str(until)],
                            preexec_fn=unblock))
                log(f"attackers: pids {' '.join(str(p.pid) for p in procs)}")
                time.sleep(1.0)
                storm = victim(fd, args.seconds)
                for p in procs:
                    p.wait(timeout=120)
                after = fs_stats(mnt)
            finally:
                os.close(fd)
            fsyncs = sum(int(o.read_text()) for o in outs if o.exists())
            span = args.seconds + 2.5
            limit = f", attacker's limit {args.limit}" if args.limit else ", no limit"
            print(f"victim: 4 KiB write + fdatasync; attacker: {args.nproc} processes of "
                  f"chmod + fsync (uid {ATTACKER_UID}{limit}); profile {args.profile}")
            print(f"{'':28}{'p50 ms':>9}{'p99 ms':>9}{'per s':>9}")
            print(f"{'victim alone':28}{alone[0]:9.2f}{alone[1]:9.2f}{alone[2]:9.0f}")
            print(f"{'victim under the storm':28}{storm[0]:9.2f}{storm[1]:9.2f}{storm[2]:9.0f}")
            print(f"{'ratio storm / alone':28}{storm[0] / alone[0]:9.2f}"
                  f"{storm[1] / alone[1]:9.2f}{storm[2] / alone[2]:9.2f}")
            print(f"attacker: {fsyncs / span:.0f} fsyncs a second; daemon over the storm: "
                  f"{after.get('durable_commits', 0) - before.get('durable_commits', 0)} "
                  f"durable commits, "
                  f"{after.get('grouped_fsyncs', 0) - before.get('grouped_fsyncs', 0)} "
                  "fsyncs served by another's commit")
        finally:
            with signals_held():  # (a second stop waits until it is all undone)
                stop_processes(procs)
                sm.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main_quietly(main) or 0)
