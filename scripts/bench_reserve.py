"""Micro-benchmark of the host-space reservation every allocation makes (`Kernel.reserve`,
`BlockDevice.reserve`) in the common case: the blocks lie inside a 16 MiB chunk
already reserved (second review of probe 5, R6). Prints the CPU time per call of
`Kernel.reserve([(block, 1)])` over a loop of calls (one-block allocations across the
chunk, as appends allocate), and of the filesystem's path (`Kernel.host_reserved`
first, where it exists), the median of several rounds, as JSON.

    .venv/bin/python scripts/bench_reserve.py [--calls 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import trio

from blockdev import BlockDevice
from kernelshim import Kernel


async def _run(calls: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "vol"
        d.mkdir()
        BlockDevice.format(d, size=64 << 20, block_size=4096)
        kernel = Kernel.open(d, cache_bytes=1 << 20)
        try:
            cb = kernel.device._chunk_blocks
            await kernel.reserve([(0, 1)])  # the chunk, reserved once
            per = []
            for _ in range(rounds):
                t0 = time.thread_time()
                for i in range(calls):
                    await kernel.reserve([(i % cb, 1)])
                per.append((time.thread_time() - t0) / calls)
            # what the filesystem does (fs/space.py `_reserve_host_space`): the
            # pure-Python check first, `reserve` only when it says no (where there is
            # no such check, the code before R6's fix: `reserve` alone)
            check = getattr(kernel, "host_reserved", None)
            fs_per = []
            for _ in range(rounds):
                t0 = time.thread_time()
                for i in range(calls):
                    runs = [(i % cb, 1)]
                    if check is None or not check(runs):
                        await kernel.reserve(runs)
                fs_per.append((time.thread_time() - t0) / calls)
        finally:
            kernel.close()
    return {"calls": calls, "rounds": rounds,
            "reserve_us_per_call": round(statistics.median(per) * 1e6, 3),
            "fs_path_us_per_call": round(statistics.median(fs_per) * 1e6, 3),
            "reserve_rounds": [round(x * 1e6, 3) for x in per],
            "fs_path_rounds": [round(x * 1e6, 3) for x in fs_per]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(trio.run(_run, args.calls, args.rounds)))


if __name__ == "__main__":
    main()
