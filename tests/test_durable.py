"""blockdev.write_durably: the volume's small files are replaced so that a crash leaves
the old or the new contents, whole, with mode 0600 (defect 9 of issue 6).

The fsyncs are observed for real with strace (the order of the system calls is the
whole point: file fsync'd before the rename, directory fsync'd after it), and a write
that fails for real (RLIMIT_FSIZE) must leave the old file untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blockdev import write_durably
from conftest import REPO


def test_replaces_whole_with_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old\n")
    os.chmod(target, 0o644)
    old_umask = os.umask(0)
    try:
        write_durably(target, b"new contents\n")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new contents\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_creates_a_missing_file(tmp_path: Path) -> None:
    write_durably(tmp_path / "fresh", b"x" * 100_000)
    assert (tmp_path / "fresh").read_bytes() == b"x" * 100_000
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o600


def _traced(tmp_path: Path, argv: list[str]) -> list[tuple[str, str]]:
    """Run `argv` under strace; its fsyncs (with the path of the descriptor) and renames,
    in order."""
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                    "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
                    *argv], check=True, cwd=REPO, capture_output=True)
    fd_path: dict[tuple[str, str], str] = {}
    events: list[tuple[str, str]] = []
    for line in trace.read_text().splitlines():
        pid, _, line = line.partition(" ")
        line = line.strip()
        m = re.match(r'openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)', line)
        if m:
            fd_path[pid, m.group(2)] = m.group(1)
            continue
        m = re.match(r"f(?:data)?sync\((\d+)\)\s+= 0", line)
        if m:
            events.append(("fsync", fd_path.get((pid, m.group(1)), "?")))
            continue
        m = re.match(r'rename(?:at2?)?\(.*"([^"]+)",.*"([^"]+)"', line)
        if m:
            events.append(("rename", m.group(1) + " -> " + m.group(2)))
    return events


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_fsyncs_file_before_rename_and_directory_after(tmp_path: Path) -> None:
    target = tmp_path / "principals.json"
    target.write_text("old\n")
    prog = ("import sys; from blockdev import write_durably; "
            "write_durably(sys.argv[1], b'durable\\n')")
    events = _traced(tmp_path, [sys.executable, "-c", prog, str(target)])
    assert target.read_bytes() == b"durable\n"
    relevant = [e for e in events if str(tmp_path) in e[1]]
    kinds = [k for k, _ in relevant]
    assert kinds == ["fsync", "rename", "fsync"], relevant
    tmp_name = relevant[1][1].split(" -> ")[0]
    assert relevant[0][1] == tmp_name and tmp_name.endswith(".tmp"), relevant
    assert relevant[1][1].endswith(" -> " + str(target)), relevant
    assert relevant[2][1] == str(tmp_path), relevant  # the directory


def test_failing_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    """A write that really fails (the file size limit: EFBIG) keeps the old contents and
    leaves no temporary file behind."""
    target = tmp_path / "volume.json"
    target.write_bytes(b"the old, whole contents\n")
    prog = (
        "import errno, resource, signal, sys\n"
        "from blockdev import write_durably\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    write_durably(sys.argv[1], b'n' * 100000)\n"
        "except OSError as exc:\n"
        "    sys.exit(10 if exc.errno == errno.EFBIG else 11)\n"
        "sys.exit(0)\n")
    r = subprocess.run([sys.executable, "-c", prog, str(target)], cwd=REPO)
    assert r.returncode == 10
    assert target.read_bytes() == b"the old, whole contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.json"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_mkfs_makes_the_device_durable_before_the_header(tmp_path: Path) -> None:
    """device.json, the checksums and meta.db are fsync'd, and so is the directory, before
    volume.json (which declares the volume) is durably put in place."""
    vol = tmp_path / "vol"
    events = _traced(tmp_path, [sys.executable, "-m", "fs.cli", "mkfs", str(vol),
                                "--size", "64M", "-q"])
    synced = [p for k, p in events if k == "fsync"]
    renames = [p for k, p in events if k == "rename"]
    header = next(i for i, e in enumerate(events)
                  if e[0] == "rename" and e[1].endswith(" -> " + str(vol / "volume.json")))
    before = [p for k, p in events[:header] if k == "fsync"]
    for name in ("device.json", "checksums", "meta.db"):
        assert str(vol / name) in before, (name, events)
    assert str(vol) in before, events  # the directory, with device.json's rename in it
    assert events[header - 1][0] == "fsync" and events[header - 1][1].endswith(".tmp")
    assert events[header + 1] == ("fsync", str(vol)), events
    assert renames and synced
