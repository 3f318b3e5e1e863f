"""Cases found by the POSIX model test (tests/test_posix_model.py), shrunk to minimal
sequences and kept as plain tests. Each runs the same steps on a sluice mount and on a
plain directory of the host filesystem (ext4) and compares; a case that is a sluice bug
not yet fixed is marked xfail(strict=True) with the reason, so fixing it turns the test
into a failure until the mark is removed (and the model stops steering around it: see
KNOWN_BUGS there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.mounted


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    """A plain directory on the host filesystem, the reference."""
    d = tmp_path / "ref"
    d.mkdir()
    return d


def both(mnt: Path, ref: Path, fn: Callable[[Path], object]) -> object:
    """Run `fn` on the reference and on the mount; both results must agree."""
    want, got = fn(ref), fn(mnt)
    assert got == want, f"sluice gave {got!r}, the host fs gave {want!r}"
    return got


def test_rdonly_trunc_truncates_like_linux(mnt: Path, ref: Path) -> None:
    def scenario(d: Path) -> tuple[int, int]:
        (d / "f").write_bytes(b"x" * 4095)
        fd = os.open(d / "f", os.O_RDONLY | os.O_TRUNC)
        try:
            return os.fstat(fd).st_size, os.stat(d / "f").st_size
        finally:
            os.close(fd)
    assert both(mnt, ref, scenario) == (0, 0)
