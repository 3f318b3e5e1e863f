#!/usr/bin/env python3
"""The victim's request pairs split end to end, by band of latency (a measurement aid).

    .venv/bin/python scripts/looptrace/bands.py TRACE.PID RESULT.json

TRACE.PID is a log of `bench_hostile.py --loop-trace TRACE` and RESULT.json that run's
`--json`. `bench_hostile.py` prints the mean of each part of a pair over all pairs and
over the slowest 1%, where one pair of 30 ms (a collection, a stall of the machine) can
make the whole tail's mean; this prints, per phase, the median of each part in the bands
of pairs fastest half, p50-p90, p90-p98 and p98-p100 (bench_hostile's `PARTS`, in ms;
`steps`: other tasks' steps of the pick-up batch run first, `batches`: batches ended
between the call and the pick-up, counts), so that what the p99 is made of can be read.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_hostile import decompose  # noqa: E402

KEYS = (("total", "pair"), ("in_progress", "in progress"), ("more_batches", "more batches"),
        ("poll", "poll"), ("before_step", "steps first"), ("caught", "caught"),
        ("serve", "own step"), ("to_client", "to client"),
        ("victim_cpu_wait", "victim CPU wait"), ("daemon_cpu", "daemon CPU behind"),
        ("steps_before", "steps"), ("batches", "batches"))
BANDS = ((0.0, 0.5, "fastest half"), (0.5, 0.9, "p50-p90"), (0.9, 0.98, "p90-p98"),
         (0.98, 1.0, "p98-p100"))


def main(trace: str, result: str) -> None:
    stamps = {k: [tuple(x) for x in v] for k, v in json.load(open(result))["stamps"].items()}
    pairs: dict[str, list[dict[str, float]]] = {}
    decompose(trace, stamps, pairs)
    for phase, ps in pairs.items():
        n = len(ps)
        print(f"{phase}: {n} pairs, p50 {ps[n // 2]['total'] * 1e3:.3f} "
              f"p99 {ps[min(n - 1, int(n * 0.99))]['total'] * 1e3:.3f} ms; "
              "median of each part per band (ms; steps, batches: counts)")
        print(f"  {'band':12}" + "".join(f" {label:>10}" for _, label in KEYS))
        for lo, hi, name in BANDS:
            sub = ps[int(n * lo):int(n * hi)] or ps[-1:]
            cells = []
            for key, _ in KEYS:
                v = statistics.median(q[key] for q in sub)
                cells.append(f"{v:10.2f}" if key in ("steps_before", "batches")
                             else f"{v * 1e3:10.3f}")
            print(f"  {name:12}" + "".join(f" {c}" for c in cells))


if __name__ == "__main__":
    main(*sys.argv[1:3])
