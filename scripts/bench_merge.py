"""Micro-benchmark of a partial-block write's merge (`Kernel.write` -> `_fill_block`,
probe 6: W1, W2, P1): CPU time (`time.thread_time`) per 100-byte write at a random
offset of a random block, through one grant that never commits, into a 4,096-block
extent that is unwritten (the merge asks `Grant.wrote_in`; past PENDING_EXACT writes
the grant's noted ranges), and into one that is FRESH (the merge reads the block, or
merges in its resident frame). No device latency (profile none), write-back on.

    .venv/bin/python scripts/bench_merge.py [WRITES]      # default 20000

Compare trees with PYTHONPATH (the script imports the packages it finds there).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from blockdev import BlockDevice
from blockdev.types import ROOT_PRINCIPAL
from kernelshim import Kernel, Rights
from kernelshim.extents import FRESH, UNWRITTEN, ExtentMap

BS = 4096


async def _run(writes: int, vol: Path) -> dict[int, float]:
    k = Kernel.open(vol, cache_bytes=256 * BS, writeback=True)
    out: dict[int, float] = {}
    try:
        for state in (UNWRITTEN, FRESH):
            em = ExtentMap([(0, 0 if state == UNWRITTEN else 4096, 4096, state, 0)])
            g = k.grant(inode=7 + state, generation=1, extents=em, rights=Rights.RW,
                        principal=ROOT_PRINCIPAL, charge=False)
            rnd = random.Random(1)
            data = b"x" * 100
            t0 = time.thread_time()
            for _ in range(writes):
                await k.write(g, rnd.randrange(4096) * BS + rnd.randrange(BS - 100), data)
            out[state] = (time.thread_time() - t0) / writes * 1e6
            k.release(g)
    finally:
        k.close()
    return out


def main() -> None:
    writes = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        vol = tmp / "vol"
        vol.mkdir()
        BlockDevice.format(vol, size=8192 * BS, block_size=BS, profile="none")
        out = trio.run(_run, writes, vol)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"us/write unwritten {out[UNWRITTEN]:.2f} fresh {out[FRESH]:.2f}")


if __name__ == "__main__":
    main()
