"""The smallest end-to-end check: mount, write, read back, unmount, fsck."""

from __future__ import annotations

from pathlib import Path

from conftest import sluice


def test_write_read_back_and_fsck(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    (m.path / "hello.txt").write_bytes(b"hello sluice\n")
    assert (m.path / "hello.txt").read_bytes() == b"hello sluice\n"
    m.stop()
    r = sluice("fsck", str(volume))
    assert "clean" in r.stdout
