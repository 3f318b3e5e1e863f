"""scripts/bench_holds.py runs, and what it measures holds: each request on a file of
many extents lets other tasks run between its parts, and its reference (parts so large
that each request is one step) does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fs.space import EXTENTS_PER_STEP

REPO = Path(__file__).resolve().parent.parent


def test_bench_holds_small(tmp_path: Path) -> None:
    n = 4 * EXTENTS_PER_STEP + 40
    out = tmp_path / "holds.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_holds.py"),
                        "--extents", str(n), "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parts: longest" in r.stdout and "ratio" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"truncate to one block", "unlink (last name)", "punch hole",
                         "zero range", "zero range, half holes", "fallocate, half holes",
                         "fallocate, free space in 1-block runs"}
    for name, row in rows.items():
        # the parts: another task ran between each (at least a part of
        # EXTENTS_PER_STEP extents each, fewer for the allocation's halves)
        assert row["parts"]["steps"] >= 3, (name, row)
        # the reference: one step for the work on the extents (a few others around
        # the request's own awaits: the write of a partial block, the commit)
        assert row["one_step"]["steps"] < row["parts"]["steps"], (name, row)
