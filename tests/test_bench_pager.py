"""scripts/bench_pager.py --quick, run for real: the JSON it writes has the promised
shape, and the pager's goals hold on the small traces (checked here from the JSON, not
taken from the script's own verdict)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MIXES = {"loop-scan", "zipf", "db", "scratch"}


@pytest.mark.slow
def test_bench_pager_quick(tmp_path: Path) -> None:
    out = tmp_path / "pager.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pager.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=900,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    # the fixed parameters are printed
    assert re.search(r"cache 128 frames of 4096 bytes; trace length about 30000 block "
                     r"accesses per mix; Zipf exponent 0\.9", text)
    assert re.search(r"== zipf: \d+ block accesses, footprint \d+ blocks \(cache = [\d.]+% "
                     r"of it\)", text)
    res = json.loads(out.read_text())
    assert set(res) == MIXES
    no_hint = set()
    for mix, pols in res.items():
        assert {"hinted", "principal", "global-lru", "belady"} <= set(pols), mix
        for name, v in pols.items():
            assert set(v) == {"hit_ratio", "writeback_bytes"}, (mix, name)
            assert isinstance(v["hit_ratio"], float) and 0.0 <= v["hit_ratio"] <= 1.0
            if name in ("hinted", "principal", "global-lru"):
                assert isinstance(v["writeback_bytes"], int) and v["writeback_bytes"] >= 0
            else:
                assert v["writeback_bytes"] is None  # no dirty-page model
            if name not in ("hinted", "belady"):
                no_hint.add(name)
    if "libcachesim is not installed" not in text:
        assert {"lib:LRU", "lib:ARC", "lib:LIRS", "lib:S3FIFO", "lib:Sieve"} <= no_hint

    def hr(mix: str, pol: str) -> float:
        return res[mix][pol]["hit_ratio"]

    for mix in ("loop-scan", "db", "scratch"):
        assert hr(mix, "hinted") >= 0.9 * hr(mix, "belady"), mix
        assert all(hr(mix, "hinted") >= hr(mix, p) for p in no_hint), mix
    assert hr("zipf", "hinted") >= max(hr("zipf", p) for p in no_hint) - 0.02
    for mix in ("loop-scan", "db"):  # a scan is present
        assert hr(mix, "hinted") - hr(mix, "global-lru") >= 0.20, mix
    wb = res["scratch"]
    assert wb["hinted"]["writeback_bytes"] * 2 <= wb["principal"]["writeback_bytes"]
    # the cost of a hit, measured in the same run against a miss on profile `none`
    m = re.search(r"a hit costs ([\d.]+) of a miss", text)
    assert m and float(m.group(1)) <= 0.5
    assert "NOT MET" not in text
