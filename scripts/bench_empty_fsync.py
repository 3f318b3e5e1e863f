#!/usr/bin/env python3
"""Empty fsyncs (hostile-probe finding 14): a victim's 4 KiB write+fsync latency while
another uid loops fsync on its own unchanged file.

For each tree (--tree LABEL=DIR, repeatable; default: this checkout) a fresh volume is
made and mounted with that tree's code (PYTHONPATH=DIR, this checkout's venv and
binding), and two phases of --seconds each run: the victim alone (root: pwrite of
4 KiB at one of 16 offsets of its file, then fsync, in a loop), then the victim while
a hostile process (uid --uid, by default the first from 61000 that no account has and
no process runs as) calls fsync on its own file — written and
fsync'd once before — as fast as it can. Each tree is measured --rounds times,
alternating trees, so both see the same machine load. Prints the victim's p50/p99
(ms), its operations/s, and the hostile's fsyncs/s; --json writes all of it.

    nice -n 10 .venv/bin/python scripts/bench_empty_fsync.py \\
        --tree main=/tmp/sluice-main --tree fsync=. --seconds 10 --rounds 2

(make the main tree with `git archive main | tar -x -C /tmp/sluice-main` and link
.build into it for the checksum extension.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import parse_uids, signals_held, stop_processes, unused_uids

REPO = Path(__file__).resolve().parent.parent
BS = 4096

HOSTILE = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"h" * 4096, 0)
os.fsync(fd)
print("ready", flush=True)
sys.stdin.readline()
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    os.fsync(fd)
    n += 1
print(n, flush=True)
"""


def sluice(tree: Path, *args: str, **kw: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-m", "fs.cli", *args], cwd=tree, env=env, check=True,
                   capture_output=True, text=True, **kw)


def victim(path: Path, seconds: float) -> list[float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    out: list[float] = []
    data = os.urandom(BS)
    try:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            os.pwrite(fd, data, (i % 16) * BS)
            os.fsync(fd)
            out.append(time.perf_counter() - t0)
            i += 1
    finally:
        os.close(fd)
    return out


def summary(lat: list[float], seconds: float) -> dict[str, float]:
    s = sorted(lat)
    return {"p50_ms": round(statistics.median(s) * 1000, 2),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 2),
            "ops_per_s": round(len(s) / seconds, 1)}


def measure(label: str, tree: Path, args: argparse.Namespace) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="sluice-bench-fsync-", dir=args.workdir))
    os.chmod(base, 0o755)
    vol, mp = base / "vol", base / "mnt"
    mp.mkdir()
    procs: list[subprocess.Popen] = []  # (killed and reaped on every way out)
    mounted = False
    try:
        sluice(tree, "mkfs", str(vol), "--size", "2G", "-q")
        # (a stop during the mount comes once it is recorded: the `finally` unmounts)
        with signals_held() as unblock:
            sluice(tree, "mount", str(vol), str(mp), "--profile", args.profile,
                   *(["--writeback"] if args.writeback else ["--no-writeback"]),
                   preexec_fn=unblock)
            mounted = True
        hd = mp / "hostile"
        hd.mkdir()
        os.chown(hd, args.uid, args.uid)
        mine = mp / "victim.bin"
        victim(mine, 1.0)  # warm up
        alone = victim(mine, args.seconds)
        with signals_held() as unblock:
            h = subprocess.Popen(["setpriv", f"--reuid={args.uid}", f"--regid={args.uid}",
                                  "--clear-groups", "--", sys.executable, "-c", HOSTILE,
                                  str(hd / "own.bin"), str(args.seconds + 1.0)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=unblock)
            procs.append(h)
        assert h.stdout is not None and h.stdin is not None
        assert h.stdout.readline().strip() == "ready"
        h.stdin.write("go\n")
        h.stdin.flush()
        time.sleep(0.5)
        loaded = victim(mine, args.seconds)
        hostile_n = int(h.stdout.readline())
        h.wait(60)
    finally:
        with signals_held():  # (a second stop waits until it is all undone)
            stop_processes(procs)
            if mounted:
                sluice(tree, "umount", str(mp))
            shutil.rmtree(base, ignore_errors=True)
    return {"tree": label, "alone": summary(alone, args.seconds),
            "with_hostile": summary(loaded, args.seconds),
            "hostile_fsyncs_per_s": round(hostile_n / (args.seconds + 1.0), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                   help="a source tree to mount with (repeatable; default: this checkout)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--rounds", type=int, default=1, help="measurements per tree")
    p.add_argument("--uid", default=None,
                   help="the hostile process's uid (default: the first from 61000 that no "
                        "account has and no process runs as)")
    p.add_argument("--profile", default="none", help="the mount's device profile")
    p.add_argument("--writeback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workdir", default="/tmp", help="where volumes and mounts go")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_empty_fsync: must run as root (mounts, and a second uid)",
              file=sys.stderr)
        return 2
    try:
        args.uid = parse_uids(args.uid, 1)[0] if args.uid else unused_uids(1)[0]
    except ValueError as exc:
        p.error(f"--uid: {exc}")
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree] \
        or [("this", REPO)]
    results = []
    for r in range(args.rounds):
        for label, tree in trees:
            res = measure(label, tree, args)
            res["round"] = r
            results.append(res)
            a, w = res["alone"], res["with_hostile"]
            print(f"{label:>8} round {r}: alone p50 {a['p50_ms']} p99 {a['p99_ms']} ms "
                  f"({a['ops_per_s']}/s); with hostile p50 {w['p50_ms']} p99 {w['p99_ms']} "
                  f"ms ({w['ops_per_s']}/s); hostile {res['hostile_fsyncs_per_s']} "
                  f"fsyncs/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
