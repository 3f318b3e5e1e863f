"""The daemon's stop signals (SIGTERM, SIGINT; SIGHUP reopens its log) reach it whatever
mask it inherited: a parent that blocks them across its fork passed the mask on through
`sluice mount` to the detached daemon (review of stop 32, F1)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import sluice


def blocked_signals(pid: int) -> int:
    """The mask of signals the process `pid` blocks (/proc/PID/status, SigBlk)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for pid {pid}")


@pytest.mark.mounted
def test_a_daemon_started_with_its_stop_signals_blocked_still_stops_on_sigterm(
        volume: Path, tmp_path: Path) -> None:
    """A parent that blocks SIGTERM and SIGINT across its fork (a benchmark recording
    what it starts: review of stop 32, F1) passed the mask on through `sluice mount` to
    the detached daemon, whose signal receiver then never got them: `kill PID` did
    nothing. The daemon unblocks its own stop signals."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        sluice("mount", str(volume), str(mp))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    pid = int(json.loads((volume / "mount.json").read_text())["pid"])
    try:
        stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)) | \
            (1 << (signal.SIGHUP - 1))
        assert blocked_signals(pid) & stops == 0, hex(blocked_signals(pid))
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the daemon ignored SIGTERM"
        assert not os.path.ismount(mp)
    finally:
        if os.path.ismount(mp):
            sluice("umount", str(mp), check=False)
