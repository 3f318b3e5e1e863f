#!/usr/bin/env python3
"""The daemon loop's batches while the victim ran under attack (a measurement aid).

    .venv/bin/python scripts/looptrace/batches.py TRACE.PID [...]

From `bench_hostile.py --loop-trace` logs: batches a second, the CPU per batch of
steps other than the victim's (root's: what a victim request waits behind in the batch
in progress and in the one that picks it up) p50/p90/p99, steps per batch, steps over
0.08 ms per batch, and the attackers' connections' share of the wall time (how hard
they pressed: it varies with the machine's load, so compare runs at similar shares).
The window: the victim's attacked phase (root's steps after the longest pause).
"""

from __future__ import annotations

import collections
import statistics
import sys


def one(fn: str) -> str:
    rows = [line.rstrip("\n").split("\t") for line in open(fn)]
    steps = [(int(r[0]), float(r[4]), float(r[3]), r[2]) for r in rows
             if r[1] not in ("IO", "OP", "SEND", "GC") and len(r) > 5 and r[0] != "0"]
    roots = sorted(s[1] for s in steps if s[3] == "root")
    gap = max(range(1, len(roots)), key=lambda i: roots[i] - roots[i - 1])
    lo, hi = roots[gap], roots[-1]
    win = [s for s in steps if lo <= s[1] <= hi]
    cpu: dict[int, float] = collections.defaultdict(float)
    n: collections.Counter[int] = collections.Counter()
    big: collections.Counter[int] = collections.Counter()
    for b, _t, c, who in win:
        if who == "root":
            continue
        cpu[b] += c
        n[b] += 1
        big[b] += c > 0.08e-3
    bs = sorted(cpu.values())
    att = sum(c for _b, _t, c, who in win if who.startswith("uid-")) / (hi - lo)
    q = lambda x: bs[min(len(bs) - 1, int(len(bs) * x))] * 1e3  # noqa: E731
    return (f"{fn}: {len(bs) / (hi - lo):.0f} batches/s; others' CPU per batch p50 {q(.5):.3f} "
            f"p90 {q(.9):.3f} p99 {q(.99):.3f} ms; {statistics.mean(n.values()):.2f} steps/batch, "
            f"{statistics.mean(big[b] for b in cpu):.2f} over 0.08 ms; attackers' share {att:.2f}")


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(one(f))
