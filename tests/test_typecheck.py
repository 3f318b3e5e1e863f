"""The packages type-check clean under mypy (the house style asks for it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "blockdev", "pager", "kernelshim", "fs"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout
