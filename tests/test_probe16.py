"""Hostile probe 16 (stop 25): what one tenant's requests make the daemon hold, and who
pays for it. Each test fails on the code before its fix (docs/RELIABILITY.md, "stop 25")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import sluice
from shim_util import USER_PY, pubmnt, user_popen, user_run  # noqa: F401 (fixture)
from kernelshim import connection as conn_mod
from kernelshim.client import Client
from test_hostile import _reap, served, setup_pub, usage

# -- F3: tenants within their own banks filling the global caps ----------------------------

_HOLD_CONNECTIONS = """
import sys
from kernelshim.client import Client
held = []
while True:
    try:
        held.append(Client.connect(sys.argv[1], shm_size=0))
    except Exception as exc:
        print("held", len(held), type(exc).__name__, flush=True)
        break
sys.stdin.readline()
"""

_HOLD_SHM = """
import sys
from kernelshim.client import Client
held = []
while True:
    try:
        held.append(Client.connect(sys.argv[1], shm_size=64 << 20))
    except Exception as exc:
        print("held", len(held), type(exc).__name__, exc, flush=True)
        break
sys.stdin.readline()
"""

_SECOND_SESSION = """
import sys
from kernelshim.client import Client
with Client.connect(sys.argv[1]) as a:
    try:
        Client.connect(sys.argv[1])
    except Exception as exc:
        print("second", type(exc).__name__, exc, flush=True)
    else:
        print("second ok")
"""


def _hold(mnt: Path, code: str, uid: int) -> tuple:
    p = user_popen(code.replace("sys.argv[1]", repr(str(mnt))), uid)
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("held "), (line, p.stderr.read() if p.poll() is not None else "")
    return p, line.split()


@pytest.mark.mounted
def test_a_tenant_filling_the_connection_cap_leaves_others_their_first_connections(
        pubmnt: Path) -> None:
    """Probe 16, F3: eight tenants holding their default 64 connections each (or one
    whose bank root raised) filled the 480 connections the daemon serves for tenants,
    and every other tenant's `sluice stats`, `run` and direct client were refused:
    "the rest are kept for root". Each tenant's first TENANT_CONNECTIONS connections
    are now its own whatever the cap (its bank still decides); beyond them the cap
    holds, and root's reserve is still root's."""
    mnt = pubmnt
    setup_pub(mnt)
    sluice("principal", "add", str(mnt), "uid-1000", "--owner", "1000", check=False)
    sluice("principal", "set", str(mnt), "uid-1000", "--connections", "1000")
    p, words = _hold(mnt, _HOLD_CONNECTIONS, 1000)
    try:
        held = int(words[1])
        # its four of the floor, and the cap's 480 for tenants
        assert held == conn_mod.MAX_CONNECTIONS - conn_mod.ROOT_CONNECTIONS + \
            conn_mod.TENANT_CONNECTIONS, words
        assert words[2] == "TooManyObjects"
        assert usage(mnt)["uid-1000"]["connections"] == held
        served(mnt, 1002)  # stats, principal ls, sluice run, a direct client
        served(mnt)
        # the victim's floor is four connections at once: a fifth is refused
        code = f"""
from kernelshim.client import Client
cs = []
try:
    for _ in range(8):
        cs.append(Client.connect({str(mnt)!r}, shm_size=0))
except Exception as exc:
    print(len(cs), type(exc).__name__, exc)
"""
        r = user_run([USER_PY, "-c", code], 1002)
        n, err, *msg = r.stdout.split(maxsplit=2)
        assert (int(n), err) == (conn_mod.TENANT_CONNECTIONS, "TooManyObjects"), r.stdout
        assert "kept for root" in msg[0], msg
    finally:
        _reap(p)
    deadline = time.monotonic() + 10
    while usage(mnt)["uid-1000"]["connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.mounted
def test_a_tenant_filling_the_shared_memory_budget_leaves_others_their_first_buffer(
        pubmnt: Path) -> None:
    """Probe 16, F3: four tenants attaching their default 256 MiB of buffers each used
    up the 896 MiB the daemon attaches for tenants, and every other tenant's direct
    client failed at connect ("shared memory budget exhausted"). Each tenant's first
    TENANT_SHM bytes (a default client's buffer) are now its own whatever the budget;
    beyond them the budget holds."""
    mnt = pubmnt
    setup_pub(mnt)
    sluice("principal", "add", str(mnt), "uid-1000", "--owner", "1000", check=False)
    sluice("principal", "set", str(mnt), "uid-1000", "--shm", "4G")
    p, words = _hold(mnt, _HOLD_SHM, 1000)
    try:
        assert words[2] == "TooManyObjects" and "budget exhausted" in " ".join(words), words
        pooled = conn_mod.MAX_SHM_TOTAL - conn_mod.ROOT_SHM
        assert usage(mnt)["uid-1000"]["shm"] == int(words[1]) * (64 << 20) >= pooled
        served(mnt, 1002)  # its direct client: an 8 MiB buffer
        # a second buffer at once is beyond its floor, and the budget is full
        r = user_run([USER_PY, "-c", _SECOND_SESSION, str(mnt)], 1002)
        assert r.stdout.startswith("second TooManyObjects"), (r.stdout, r.stderr)
        assert "budget exhausted" in r.stdout
        served(mnt)  # root's reserve
    finally:
        _reap(p)
    deadline = time.monotonic() + 10
    while usage(mnt)["uid-1000"]["shm"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
