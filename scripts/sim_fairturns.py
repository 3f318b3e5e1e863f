#!/usr/bin/env python3
"""FairTurns alone, without sockets: what a victim waits behind, and the floods' rate.

    .venv/bin/python scripts/sim_fairturns.py victim [--seed N]
    .venv/bin/python scripts/sim_fairturns.py throughput

Imports `kernelshim.connection` from PYTHONPATH (give a tree to compare: PYTHONPATH=TREE).

`victim` (trio's MockClock, so the machine's load does not matter): two flooding
tenants with two connections each, always backlogged, whose steps cost their quantum
plus a request that overran it (0.13 ms +-20%); a churn of 240 connections a second
(0.12 ms to admit each); and a victim that sends a request 0.075-0.225 ms after its last
reply, picked up at the loop's next poll (its task is woken in `after_io_wait` once the
request is due), served in 0.05 ms. Printed: the victim's wait plus service per request
and per pair (two requests), p50 and p99, and each tenant's steps (fairness). A model of
bench_hostile's loop: the structure of the batches, not the costs of a real daemon.

`throughput` (the real clock): the two floods alone for 2 s, each request 20 us of
CPU, served in quanta of TURN_SECONDS: requests per CPU second of the loop thread (the
cost of the turns, parking and polls per request), batches and parked steps.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import trio
import trio.testing

from kernelshim.connection import TURN_SECONDS, FairTurns

STEP = TURN_SECONDS + 0.03e-3
ADMIT_STEP = 0.12e-3
ADMIT_EVERY = 1 / 240
VICTIM_OP = 0.05e-3
CLIENT = 0.15e-3


async def victim_model(seed: int, n: int) -> dict[str, Any]:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    rnd = random.Random(seed)
    turns = FairTurns(lambda conn: None)
    due: list[Any] = [None, None]  # when the victim's request is due, its task
    lat: list[float] = []
    steps = {"uid-a": 0, "uid-b": 0, "admission": 0}
    done = False

    class Poll(trio.abc.Instrument):
        def after_io_wait(self, timeout: float) -> None:
            if due[1] is not None and trio.current_time() >= due[0]:
                task, due[1] = due[1], None
                trio.lowlevel.reschedule(task)

    poll = Poll()
    trio.lowlevel.add_instrument(turns)
    trio.lowlevel.add_instrument(poll)

    async def flood(name: str, principal: int) -> None:
        sh = turns.share(principal)
        while not done:
            await turns.take(sh)
            steps[name] += 1
            clock.jump(STEP * rnd.uniform(0.8, 1.2))
            turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def admission() -> None:
        nxt = trio.current_time()
        while not done:
            if trio.current_time() < nxt:
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            nxt += ADMIT_EVERY
            if hasattr(turns, "admit"):  # older trees have no admission turn
                await turns.admit()
            steps["admission"] += 1
            clock.jump(ADMIT_STEP)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def victim() -> None:
        nonlocal done
        sh = turns.share(99)
        for _ in range(n):
            due[:] = [trio.current_time() + CLIENT * rnd.uniform(0.5, 1.5),
                      trio.lowlevel.current_task()]
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            await turns.take(sh)
            clock.jump(VICTIM_OP)
            lat.append(trio.current_time() - due[0])
            await trio.lowlevel.cancel_shielded_checkpoint()
        done = True

    try:
        async with trio.open_nursery() as nursery:
            for name, p in (("uid-a", 1), ("uid-a", 1), ("uid-b", 2), ("uid-b", 2)):
                nursery.start_soon(flood, name, p)
            nursery.start_soon(admission)
            nursery.start_soon(victim)
    finally:
        trio.lowlevel.remove_instrument(poll)
        trio.lowlevel.remove_instrument(turns)
    one = sorted(lat)
    pair = sorted(lat[i] + lat[i + 1] for i in range(0, len(lat) - 1, 2))
    q = lambda v, x: v[min(len(v) - 1, int(len(v) * x))] * 1e3  # noqa: E731
    return {"request_p50_ms": q(one, .5), "request_p99_ms": q(one, .99),
            "pair_p50_ms": q(pair, .5), "pair_p99_ms": q(pair, .99), "steps": steps}


async def throughput_model(seconds: float = 2.0, req: float = 20e-6) -> dict[str, Any]:
    turns = FairTurns(lambda conn: None)
    trio.lowlevel.add_instrument(turns)
    served = {1: 0, 2: 0}
    done = False

    async def flood(p: int) -> None:
        sh = turns.share(p)
        while not done:
            await turns.take(sh)
            t0 = trio.current_time()
            while True:
                end = time.perf_counter() + req
                while time.perf_counter() < end:
                    pass
                served[p] += 1
                if trio.current_time() - t0 >= TURN_SECONDS:
                    break
                await turns.take(sh)
            turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()

    c0 = time.thread_time()
    try:
        async with trio.open_nursery() as nursery:
            for p in (1, 1, 2, 2):
                nursery.start_soon(flood, p)
            await trio.sleep(seconds)
            done = True
    finally:
        trio.lowlevel.remove_instrument(turns)
    cpu = time.thread_time() - c0
    return {"requests": served, "per_cpu_second": sum(served.values()) / cpu,
            "batches": turns._batch, "parked": turns.parked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("victim", "throughput"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    if args.mode == "victim":
        r = trio.run(victim_model, args.seed, args.requests, clock=trio.testing.MockClock())
    else:
        r = trio.run(throughput_model)
    print(r)


if __name__ == "__main__":
    from benchlib import main_quietly
    main_quietly(main)
