"""A benchmark stopped with SIGTERM (`timeout`, a CI's cancel) or Ctrl-C unmounts what it
mounted and says so in one line (scripts/benchlib.py `main_quietly`). Probe 27: SIGTERM
left bench_fs.py's volume mounted under /var/tmp (Python's default for SIGTERM is to
die at once, with no `finally`), and Ctrl-C printed a KeyboardInterrupt traceback. And
its hostile tenants run as uids no account has, not as 1000 and 1002 (two real accounts
on the probe's host)."""

from __future__ import annotations

import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def storm_mounts() -> set[str]:
    """The sluice mounts of bench_fsync_storm.py runs (under its sluice-storm- tempdir)."""
    with open("/proc/self/mounts") as f:
        return {ln.split()[1] for ln in f
                if ln.split()[2] == "fuse.sluice" and "/sluice-storm-" in ln.split()[1]}


@pytest.mark.mounted
@pytest.mark.parametrize(("sig", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                     (signal.SIGINT, 130, "interrupted")])
def test_a_stopped_benchmark_unmounts_and_says_so(sig: int, status: int, word: str) -> None:
    before = storm_mounts()
    # (with SIGINT as a terminal leaves it: a pytest-xdist worker ignores it, and an
    # ignored SIGINT is inherited, so Python would install no KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "bench_fsync_storm.py"),
                          "--seconds", "30"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not storm_mounts() - before:  # its volume is mounted
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        time.sleep(1.0)  # (into its measurement)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == status, (out, err)
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"bench_fsync_storm.py: {word}", err
    assert storm_mounts() <= before  # nothing of its own left mounted


def test_hostile_tenants_run_as_uids_no_account_has() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from benchlib import parse_uids, unused_uids
    finally:
        sys.path.remove(str(REPO / "scripts"))
    uids = unused_uids(2)
    assert len(set(uids)) == 2 and min(uids) >= 61000
    for u in uids:
        with pytest.raises(KeyError):
            pwd.getpwuid(u)
    assert parse_uids("5000,5001", 2) == (5000, 5001)
    for bad in ("5000", "5000,5000", "0,1", "a,b"):
        with pytest.raises(ValueError):
            parse_uids(bad, 2)


def test_a_trio_benchmark_stopped_by_sigterm_says_so_too() -> None:
    """Review of stop 31, 4: a benchmark that runs trio got the signal's exception in an
    exception group, which `main_quietly` let through: a traceback and status 1."""
    code = f"""
import os, signal, sys, trio
sys.path.insert(0, {str(REPO / "scripts")!r})
from benchlib import main_quietly
def main():
    async def run():
        async with trio.open_nursery() as n:
            n.start_soon(trio.sleep, 30)
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(30)
    trio.run(run)
sys.exit(main_quietly(main))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 143 and r.stderr.strip() == "-c: terminated", (r.returncode,
                                                                         r.stderr)
