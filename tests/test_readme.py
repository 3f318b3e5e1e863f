"""The README's client-library example runs as written against a real mount."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

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
