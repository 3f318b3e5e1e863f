"""A benchmark stopped with SIGTERM (`timeout`, a CI's cancel) or Ctrl-C unmounts what it
mounted and says so in one line (scripts/benchlib.py `main_quietly`). Probe 27: SIGTERM
left bench_fs.py's volume mounted under /var/tmp (Python's default for SIGTERM is to
die at once, with no `finally`), and Ctrl-C printed a KeyboardInterrupt traceback. And
its hostile tenants run as uids no account has, not as 1000 and 1002 (two real accounts
on the probe's host)."""

from __future__ import annotations

import contextlib
import os
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


def _attackers_of(pid: int) -> dict[int, str]:
    """bench_fsync_storm.py's attacker processes: the children of process `pid` (that
    run) running `python3 -c` (setpriv execs it), each with its start time (field 22 of
    /proc/PID/stat), so that a later process given the same pid is not taken for it."""
    found = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
            cmd = (st.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == pid and (cmd[0] == b"setpriv"
                                      or cmd[:2] == [b"/usr/bin/python3", b"-c"]):
            found[int(st.parent.name)] = fields[19]
    return found


def _runs(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


@pytest.mark.mounted
def test_a_benchmark_stopped_while_starting_its_attackers_kills_them_all() -> None:
    """A SIGTERM while bench_fsync_storm.py started its attacker processes: they ran on
    to their own end (the list of them was not made yet), on a volume the benchmark
    then could only unmount lazily. Every one it started is killed and reaped before it
    unmounts, and none outlives it; its volume is mounted inside the `try` that
    unmounts it."""
    before = storm_mounts()
    # (many attackers: the signal comes as the first one appears, while more start)
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "bench_fsync_storm.py"),
                          "--seconds", "30", "--nproc", "48"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    outlived: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not seen:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            seen.update(_attackers_of(p.pid))
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        while p.poll() is None:
            assert time.monotonic() < deadline + 120, "the benchmark did not stop"
            seen.update(_attackers_of(p.pid))
            if not storm_mounts() - before:  # unmounted: no attacker may run now
                outlived |= {a for a, start in seen.items() if _runs(a, start)}
            time.sleep(0.02)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    running = {a for a, start in seen.items() if _runs(a, start)}
    for a in running:  # (the test's own cleanup; the assertion below says it failed)
        with contextlib.suppress(ProcessLookupError):
            os.kill(a, signal.SIGKILL)
    assert p.returncode == 143, (out, err)
    assert not outlived, f"attackers {sorted(outlived)} ran on after the unmount:\n{err}"
    assert not running, f"attackers {sorted(running)} outlived the benchmark:\n{err}"
    assert storm_mounts() <= before


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
