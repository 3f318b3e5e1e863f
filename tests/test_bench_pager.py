"""scripts/bench_pager.py --quick, run for real: the JSON it writes has the promised
shape, and the pager's goals hold on the small traces (checked here from the JSON, not
taken from the script's own verdict). The quick run also records the tiny version of
the `recorded` mix — sqlite3, cp, tar, grep and sha256sum run as three principals on
a real mount under `sluice trace record` — and replays it through every policy (no
goal is set for it: only its shape and that every principal's reads were traced)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MIXES = {"loop-scan", "zipf", "db", "scratch", "recorded"}


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
    m = re.search(r"== recorded: (\d+) records .*footprint (\d+) blocks; cache (\d+) frames "
                  r"= 10% of the footprint", text)
    assert m, text
    assert int(m.group(1)) > 0 and int(m.group(3)) == max(16, int(int(m.group(2)) * 0.10))
    # every program's principal shows in the recorded trace's table (reads or write-back)
    names = dict((n, i) for i, n in re.findall(r"p(\d+) = (\w+)",
                                                re.search(r"principals: (.*)", text).group(1)))
    assert {"db", "archiver", "scanner"} <= set(names), names
    section = text[text.index("== recorded:"):]
    header = next(ln for ln in section.splitlines() if ln.lstrip().startswith("policy"))
    for who in ("db", "archiver", "scanner"):
        assert f"p{names[who]} hits" in header, (who, header)
    res = json.loads(out.read_text())
    assert set(res) == MIXES, set(res)
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
