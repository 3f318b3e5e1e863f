"""The README's examples run as written against a real mount: the client library, the
cache hit-ratio one-liner."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, sluice

pytestmark = pytest.mark.mounted


def test_readme_client_example_runs(mnt: Path) -> None:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "Client.connect" in b)
    code = example.replace('"/mnt/vol1"', repr(str(mnt)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "revoked, as it should be" in r.stdout
    assert (mnt / "blob.bin").read_bytes() == b"x" * (8 << 20)


def test_readme_hit_ratio_one_liner_on_a_principal_without_reads(mnt: Path) -> None:
    """The cache statistics one-liner, as written: it divided by zero for a principal
    that had read nothing yet (W-2 of the new user's report)."""
    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.startswith("sluice stats /mnt/vol1 --json | python3 -c")
                and '["cache"]["alice"]' in x)
    sluice("principal", "add", str(mnt), "alice")
    sl = " ".join(SLUICE)
    r = subprocess.run(line.replace("sluice ", f"{sl} ", 1).replace("/mnt/vol1", str(mnt)),
                       shell=True, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "no reads yet", (r.stdout, r.stderr)
    sluice("run", str(mnt), "--principal", "alice", "--", "sh", "-c",
           f"head -c 64K /dev/zero > {mnt}/a && cat {mnt}/a {mnt}/a > /dev/null")
    r = subprocess.run(line.replace("sluice ", f"{sl} ", 1).replace("/mnt/vol1", str(mnt)),
                       shell=True, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and 0 <= float(r.stdout) <= 1, (r.stdout, r.stderr)

