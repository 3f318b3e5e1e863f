"""scripts/bench_randread.py on this checkout with a small file, run for real (a mount,
random 4 KiB reads, the daemon's CPU and system calls per read): the shape of its
--json, not its values (the machine is shared). And the loop statistics it led to:
FairTurns times one run-loop batch in BATCH_SAMPLE (docs/BENCHMARKS.md, "bench_fs
regression check: bisection")."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import REPO

from kernelshim.connection import BATCH_SAMPLE, FairTurns


@pytest.mark.mounted
def test_bench_randread_small(tmp_path: Path) -> None:
    out = tmp_path / "randread.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_randread.py"),
                        "--repo", str(REPO), "--size-mb", "16", "--duration", "0.3",
                        "--only", "d1,b4", "--plain", "--workdir", str(tmp_path),
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ms CPU/1000" in r.stdout and "Traceback" not in r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(x["fs"], x["config"]) for x in rows} == {
        ("plain", "d1"), ("plain", "b4"), ("sluice", "d1"), ("sluice", "b4")}
    for x in rows:
        assert x["iops"] > 0
        if x["fs"] == "sluice":
            assert x["reads"] >= 64 and x["cpu_s"] > 0 and x["cs_per_read"] > 0
            # each read is at least one request read from /dev/fuse and one reply
            sc = x["syscalls_per_read"]
            assert math.isnan(sc) or sc >= 2
    assert not list(tmp_path.glob("sluice-randread-*")), "the work directory is removed"


async def test_loop_batches_are_sampled() -> None:
    """Of the run loop's batches, one in BATCH_SAMPLE is timed; the turns still count
    every batch."""
    turns = FairTurns(lambda conn: None)
    trio.lowlevel.add_instrument(turns)
    try:
        first = turns._batch
        for _ in range(BATCH_SAMPLE * 20):
            await trio.lowlevel.checkpoint()
        batches = turns._batch - first
    finally:
        trio.lowlevel.remove_instrument(turns)
    assert batches >= BATCH_SAMPLE * 20
    assert abs(turns.batches.n - batches / BATCH_SAMPLE) <= 2
    assert turns.batches_cpu.n == turns.batches.n
    assert 0 < turns.batch_cpu <= turns.batch_wall * 1.05 + 1e-3
