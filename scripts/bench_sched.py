"""The I/O scheduler's own cost, and the precision of the modeled device time.

Part 1 — cost per request: the same workload through `slot()` of each scheduler in
one run, in real time, on the trio loop alone (no device, no backing I/O): P
principals (weights 100..400, one with a reservation, one with a limit far above what
it gets, so every tag is computed), T tasks each, a queue depth of 4 so that requests
really queue and every dispatch is a choice. Each request enters its slot, checkpoints
once (so the others run) and leaves. A `none` row runs the same loop with a bare
trio.Semaphore of the same depth and no accounting: the harness itself. The scheduler's
cost is its row minus nothing (reported raw, in us per request) and its ratio to FIFO's.
Goal (issue 9): mClock under 20 us per request, at most 5x FIFO.

Part 2 — timeline precision: a real device with the `nvme` and `ssd` profiles (and
`hdd`), closed-loop readers keeping the queue full for a few seconds of real time, FIFO.
The modeled busy time (the device's timeline) against the wall time it took: the
device sleeps only when its timeline runs more than the slack (1 ms) ahead of the
clock, so on fast profiles a request costs no sleep of its own. Also reported: the
same with `timeline_slack=0` (every request sleeps to its modeled completion, as a
naive model would), to show what the timeline saves.

    .venv/bin/python scripts/bench_sched.py [--requests 40000] [--seconds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockdev import (BankNode, BlockDevice, FifoScheduler, MClockScheduler,  # noqa: E402
                      PrincipalId, parse_profile)
from blockdev.types import ROOT_PRINCIPAL  # noqa: E402

BS = 4096


def banks(n: int) -> dict:
    out = {ROOT_PRINCIPAL: BankNode(ROOT_PRINCIPAL, None, "root")}
    for i in range(1, n + 1):
        out[PrincipalId(i)] = BankNode(
            PrincipalId(i), ROOT_PRINCIPAL, f"p{i}", io_weight=100 * i,
            io_reserve_iops=1000.0 if i == 1 else None,
            io_limit_iops=1e9 if i == 2 else None)
    return out


async def drive(slot_of, principals: int, tasks: int, per_task: int) -> float:
    async def worker(p: PrincipalId) -> None:
        for _ in range(per_task):
            async with slot_of(p):
                await trio.lowlevel.checkpoint()

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(1, principals + 1):
            for _ in range(tasks):
                n.start_soon(worker, PrincipalId(i))
    return time.perf_counter() - t0


def cost_table(requests: int, principals: int = 4, tasks: int = 4, depth: int = 4,
               rounds: int = 3) -> dict[str, float]:
    prof = parse_profile(f"lat=100,qd={depth}")
    per_task = max(1, requests // (principals * tasks))
    n = per_task * principals * tasks
    best: dict[str, float] = {}
    for _ in range(rounds):
        sem = trio.Semaphore  # a bare semaphore: the harness

        async def bare() -> float:
            s = sem(depth)
            return await drive(lambda p: s, principals, tasks, per_task)

        fifo = FifoScheduler(prof)
        fifo.configure_banks(banks(principals))
        mclock = MClockScheduler(prof)
        mclock.configure_banks(banks(principals))

        def rec(sched):
            class Slot:
                def __init__(self, p):
                    self.p = p
                    self.cm = sched.slot(p, BS)

                async def __aenter__(self):
                    self.t = trio.current_time()
                    await self.cm.__aenter__()

                async def __aexit__(self, *exc):
                    await self.cm.__aexit__(*exc)
                    sched.record(self.p, BS, latency_s=trio.current_time() - self.t)
            return Slot

        runs = {"none": bare,
                "fifo": lambda: drive(rec(fifo), principals, tasks, per_task),
                "mclock": lambda: drive(rec(mclock), principals, tasks, per_task)}
        for name, fn in runs.items():
            t = trio.run(fn)
            best[name] = min(best.get(name, float("inf")), t / n * 1e6)
        st = {s.principal: s.ops for s in mclock.statistics()}
        assert sum(st.values()) == n, st
    return best


async def precision_run(directory: Path, profile: str, seconds: float, slack: float,
                        readers: int) -> dict[str, float]:
    dev = BlockDevice.open(directory, profile=profile, scheduler="fifo",
                           timeline_slack=slack)
    try:
        prof = dev.profile
        count = 0
        modeled = 0.0
        t_end = trio.current_time() + seconds

        async def reader(i: int) -> None:
            nonlocal count
            b = (i * 97) % (dev.nblocks - 1)
            while trio.current_time() < t_end:
                await dev.read(b, 1, principal=PrincipalId(1))
                count += 1
                b = (b * 31 + 7) % (dev.nblocks - 1)

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for i in range(readers):
                n.start_soon(reader, i)
        wall = trio.current_time() - t0
        # What the model says `count` such reads take with the queue full: its cost each.
        modeled = count * prof.cost(BS)
        (st,) = dev.statistics().per_principal
        return {"requests": count, "wall_s": wall, "modeled_s": modeled,
                "error": wall / modeled - 1.0, "p50_us": st.p50_s * 1e6,
                "model_us": prof.service_time(BS, write=False) * 1e6,
                "ahead_max_ms": dev.timeline_ahead_max * 1e3}
    finally:
        dev.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    out: dict = {}
    cost = cost_table(args.requests)
    out["cost_us"] = cost
    print(f"Scheduler cost per request ({args.requests} requests, 4 principals x 4 tasks, "
          "queue depth 4; best of 3)")
    print(f"{'scheduler':10} {'us/request':>11} {'x fifo':>7}")
    for name in ("none", "fifo", "mclock"):
        print(f"{name:10} {cost[name]:>11.2f} {cost[name] / cost['fifo']:>7.2f}")
    print(f"mclock - fifo: {cost['mclock'] - cost['fifo']:.2f} us per request; "
          f"ratio {cost['mclock'] / cost['fifo']:.2f} (goal: mclock < 20 us, <= 5x fifo)")

    print()
    print(f"Timeline precision (closed-loop 4 KiB random reads, queue kept full, "
          f"{args.seconds:g} s each; error = wall / modeled - 1)")
    print(f"{'profile':8} {'slack':>6} {'readers':>7} {'requests':>9} {'wall s':>7} "
          f"{'model s':>8} {'error':>7} {'p50 us':>8} {'model us':>8}")
    out["precision"] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        BlockDevice.format(d, size=64 << 20, profile="none")
        for profile, readers in (("nvme", 64), ("ssd", 64), ("hdd", 4)):
            for slack in (1e-3, 0.0):
                r = trio.run(precision_run, d, profile, args.seconds, slack, readers)
                r.update(profile=profile, slack_ms=slack * 1e3, readers=readers)
                out["precision"].append(r)
                print(f"{profile:8} {slack * 1e3:>4.0f}ms {readers:>7} {r['requests']:>9} "
                      f"{r['wall_s']:>7.3f} {r['modeled_s']:>8.3f} {r['error']:>+7.1%} "
                      f"{r['p50_us']:>8.0f} {r['model_us']:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
