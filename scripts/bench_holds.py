#!/usr/bin/env python3
"""How long one tenant's request on a file of many extents holds every other tenant's.

The daemon serves every tenant from one event loop: a request whose work grows with
something the tenant controls (a file's extents, its holes) and runs in one step of
the loop holds every other request that long. This benchmark builds a file of N
one-block extents that never merge (or N/2 extents and N/2 holes), runs one request on
it beside a task that times its own steps (what another tenant's request waits at
most), and prints the longest and the 99th percentile gap between those steps.

Each request runs twice in the same invocation, on fresh volumes: cut in parts of
`extents_per_step` extents (the daemon's setting, EXTENTS_PER_STEP) and with parts so
large that each is one step (the reference: the work of the request as one hold). The
ratio is the part's longest hold over the whole one.

    .venv/bin/python scripts/bench_holds.py [--extents N] [--json FILE]

In-process (the filesystem layer on a volume in a temporary directory, no FUSE): the
figure is the loop's step, which FUSE and the control socket share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fs import volume  # noqa: E402
from fs.filesystem import ROOT_INODE, FileSystem  # noqa: E402
from fs.inodes import Caller  # noqa: E402
from fs.metadata import Metadata  # noqa: E402
from fs.space import EXTENTS_PER_STEP  # noqa: E402
from kernelshim import Kernel  # noqa: E402

BS = 4096
ONE_STEP = 10**9  # parts this large: each request is one step (the reference)
CALLER = Caller(os.getuid(), os.getgid(), os.getpid())
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


async def _build(fs: FileSystem, n: int, sparse: bool | str) -> tuple[int, Any]:
    """A file of n blocks, each its own extent (written last block first, so that no
    two merge); with `sparse`, only the even blocks are written; with "fragmented",
    too, and the free space is one-block runs (another file's blocks, written between
    the file's, are freed)."""
    h, node = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CALLER)
    if sparse == "fragmented":
        g, _gnode = fs.create(ROOT_INODE, b"g", 0o644, os.O_RDWR, CALLER)
        for b in range(0, n, 2):
            await fs.write(h.fh, b * BS, bytes([b % 251 + 1]) * BS)
            await fs.write(g.fh, b * BS, b"g" * BS)
        await fs.release(g.fh)
        await fs.unlink(ROOT_INODE, b"g")
        await fs.sync()
        await fs.sync()  # (its blocks free once the commit that freed them is durable)
        return h.fh, node
    for b in reversed(range(n)):
        if sparse and b % 2:
            continue
        await fs.write(h.fh, b * BS, bytes([b % 251 + 1]) * BS)
    await fs.sync()
    return h.fh, node


def _requests(n: int) -> dict[str, tuple[bool | str,
                                          Callable[[FileSystem, int, Any], Awaitable[Any]]]]:
    lo, length = 10 * BS + 5, (n - 20) * BS
    return {
        "truncate to one block": (False, lambda fs, fh, node: fs.truncate(
            node, BS + 1, principal=CALLER.principal)),
        "unlink (last name)": (False, lambda fs, fh, node: _unlink(fs, fh)),
        "punch hole": (False, lambda fs, fh, node: fs.fallocate(
            fh, KEEP_SIZE | PUNCH_HOLE, lo, length)),
        "zero range": (False, lambda fs, fh, node: fs.fallocate(fh, ZERO_RANGE, lo, length)),
        "zero range, half holes": (True, lambda fs, fh, node: fs.fallocate(
            fh, ZERO_RANGE, lo, length)),
        "fallocate, half holes": (True, lambda fs, fh, node: fs.fallocate(fh, 0, 0, n * BS)),
        "fallocate, free space in 1-block runs": ("fragmented", lambda fs, fh, node:
                                                   fs.fallocate(fh, 0, 0, n * BS)),
    }


async def _unlink(fs: FileSystem, fh: int) -> None:
    await fs.release(fh)
    await fs.unlink(ROOT_INODE, b"f")


async def _held(fn: Callable[[], Awaitable[Any]]) -> tuple[float, list[float]]:
    """Run fn() beside a task that times its own steps: (fn's wall time, the gaps)."""
    gaps: list[float] = []
    done = False

    async def other() -> None:
        last = time.perf_counter()
        while not done:
            await trio.lowlevel.checkpoint()
            t = time.perf_counter()
            gaps.append(t - last)
            last = t

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        t0 = time.perf_counter()
        await fn()
        wall = time.perf_counter() - t0
        done = True
    return wall, gaps


async def _one(n: int, name: str, sparse: bool, req, per_step: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sluice-holds-") as tmp:
        path = Path(tmp) / "vol"
        volume.mkfs(path, size=(2 * n + 4096) * BS)
        kernel = Kernel.open(path, cache_bytes=64 * BS)
        md = Metadata(path / volume.DB)
        try:
            fs = await FileSystem.load(md, kernel)
            fs.extents_per_step = per_step
            fh, node = await _build(fs, n, sparse)
            wall, gaps = await _held(lambda: req(fs, fh, node))
            await fs.sync()
        finally:
            md.close()
            kernel.close()
    gaps.sort()
    return {"wall_ms": wall * 1e3, "steps": len(gaps), "longest_ms": gaps[-1] * 1e3,
            "p99_ms": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3}


async def main_async(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"extents": n, "extents_per_step": EXTENTS_PER_STEP, "rows": {}}
    for name, (sparse, req) in _requests(n).items():
        parts = await _one(n, name, sparse, req, EXTENTS_PER_STEP)
        whole = await _one(n, name, sparse, req, ONE_STEP)
        out["rows"][name] = {"parts": parts, "one_step": whole}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extents", type=int, default=20000,
                    help="blocks of the file, each its own extent (default 20000)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.extents < 100:
        ap.error("--extents must be at least 100")
    r = trio.run(main_async, a.extents)
    print(f"a file of {a.extents} one-block extents; parts of {EXTENTS_PER_STEP} extents "
          f"against one step; another task's longest wait (ms)")
    print(f"{'request':38s} {'parts: longest':>15s} {'p99':>7s} {'wall':>8s}   "
          f"{'one step: longest':>18s} {'wall':>8s}   {'ratio':>6s}")
    for name, row in r["rows"].items():
        p, w = row["parts"], row["one_step"]
        print(f"{name:38s} {p['longest_ms']:15.2f} {p['p99_ms']:7.2f} {p['wall_ms']:8.1f}   "
              f"{w['longest_ms']:18.2f} {w['wall_ms']:8.1f}   "
              f"{p['longest_ms'] / w['longest_ms']:6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
