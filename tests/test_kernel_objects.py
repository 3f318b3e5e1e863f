"""Kernel objects are bounded per principal: a client that opens grants without end
gets EMFILE (TooManyObjects) while everyone else keeps working, and what it held is
given back when it closes or disconnects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, sluice

pytestmark = pytest.mark.mounted


def _usage(mnt: Path, name: str) -> dict:
    rows = json.loads(sluice("principal", "ls", str(mnt), "--json").stdout)
    return next(r["usage"] for r in rows if r["name"] == name)


def _run_as_principal(mnt: Path, principal: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fs.cli", "run", str(mnt), "--principal",
                           principal, "--", sys.executable, "-c", textwrap.dedent(code)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_fuse_opens_bounded_by_grant_bank(mnt: Path) -> None:
    sluice("principal", "add", str(mnt), "greedy", "--grants", "5")
    for i in range(8):
        (mnt / f"f{i}").write_bytes(b"data")
    r = _run_as_principal(mnt, "greedy", f"""
        import errno, os
        fds = []
        try:
            for i in range(8):
                fds.append(os.open("{mnt}/f%d" % i, os.O_RDONLY))
        except OSError as e:
            print("stopped at", len(fds), errno.errorcode[e.errno])
        for fd in fds:
            os.close(fd)
        # Closing gave the grants back: opening works again.
        fd = os.open("{mnt}/f0", os.O_RDONLY)
        print("reopened", os.read(fd, 4))
        os.close(fd)
    """)
    assert r.returncode == 0, r.stderr
    assert "stopped at 5 EMFILE" in r.stdout
    assert "reopened b'data'" in r.stdout
    # Other principals (root here) are not affected, and nothing is left charged.
    fds = [open(mnt / f"f{i}", "rb") for i in range(8)]
    for f in fds:
        f.close()
    assert _usage(mnt, "greedy")["grants"] == 0


def test_direct_client_bounded_by_grant_and_cap_banks(mnt: Path) -> None:
    sluice("principal", "add", str(mnt), "hoarder", "--grants", "4", "--caps", "6")
    (mnt / "x").write_bytes(b"x" * 100)
    r = _run_as_principal(mnt, "hoarder", f"""
        from kernelshim.client import Client
        from kernelshim.principals import TooManyObjects
        with Client.connect("{mnt}") as c:
            assert c.whoami()["principal"] == "hoarder"
            files = []
            try:
                for i in range(10):
                    files.append(c.open("x"))
            except TooManyObjects as e:
                print("grants stopped at", len(files), e.errno)
            mints = []
            try:
                for i in range(10):
                    mints.append(files[0].mint(1))
            except TooManyObjects as e:
                print("caps stopped at", len(files) + len(mints), e.errno)
            print("read", files[0].pread(3, 0))
            # Leave without closing anything: the disconnect must release it all.
    """)
    assert r.returncode == 0, r.stderr
    assert "grants stopped at 4 24" in r.stdout
    # 4 opened slots + minted slots up to the caps bank of 6 (a mint is a grant too,
    # and the grants bank of 4 is already full, so the first mint is refused).
    assert "caps stopped at 4 24" in r.stdout
    assert "read b'xxx'" in r.stdout
    u = _usage(mnt, "hoarder")
    assert u["grants"] == 0 and u["caps"] == 0
    st = json.loads(sluice("stats", str(mnt), "--json").stdout)
    assert st["fs"]["live_grants"] == 0


def test_shared_buffer_size_is_bounded(mnt: Path) -> None:
    from kernelshim.client import Client
    from kernelshim.protocol import ProtocolError
    with Client.connect(mnt, shm_size=0) as c:
        with pytest.raises(ProtocolError):
            c.call("attach", size=1 << 40)
        assert c.call("hello")["max_shm"] == 64 << 20


def test_principal_rm_moves_storage(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    mnt = m.path
    sluice("principal", "add", str(mnt), "temp", "--space", "64M")
    sluice("principal", "add", str(mnt), "keeper", "--space", "64M")
    r = _run_as_principal(mnt, "temp", f"""
        with open("{mnt}/t.bin", "wb") as f:
            f.write(b"t" * (1 << 20))
    """)
    assert r.returncode == 0, r.stderr
    owned = _usage(mnt, "temp")
    assert owned["space"] >= 1 << 20 and owned["inodes"] == 1
    # It owns storage: removing it needs to be told where the storage goes.
    r = subprocess.run([sys.executable, "-m", "fs.cli", "principal", "rm", str(mnt), "temp"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "--move-to" in r.stderr
    before_keeper = _usage(mnt, "keeper")
    sluice("principal", "rm", str(mnt), "temp", "--move-to", "keeper")
    after = _usage(mnt, "keeper")
    assert after["space"] == before_keeper["space"] + owned["space"]
    assert after["inodes"] == before_keeper["inodes"] + owned["inodes"]
    # The move is recorded in the volume: a remount recounts the same usage.
    m.stop()
    m.start()
    assert _usage(mnt, "keeper") == after
    names = [r["name"] for r in json.loads(sluice("principal", "ls", str(mnt), "--json").stdout)]
    assert "temp" not in names
    assert (mnt / "t.bin").read_bytes() == b"t" * (1 << 20)


def test_direct_files_do_not_pin_the_inode_cache(mnt: Path) -> None:
    """Files a direct client creates and closes are not kept in the daemon's inode
    cache (the kernel never looked them up, so no forget would ever drop them)."""
    from kernelshim.client import Client

    def cached() -> int:
        return json.loads(sluice("stats", str(mnt), "--json").stdout)["fs"]["cached_inodes"]

    before = cached()
    with Client.connect(mnt) as c:
        for i in range(50):
            with c.open(f"d{i}", "w") as f:
                f.write(b"z" * 5000)
    assert cached() <= before + 2
    assert (mnt / "d49").read_bytes() == b"z" * 5000


def test_principal_ids_are_never_reused(volume: Path, mount_factory) -> None:
    """Storage tagged with a removed principal's id (a crash between the re-tag and the
    table's save could leave some) must never be charged to whoever is added next: ids
    are not reused, also across a remount."""
    m = mount_factory(volume)
    mnt = m.path

    def ids() -> dict[str, int]:
        rows = json.loads(sluice("principal", "ls", str(mnt), "--json").stdout)
        return {r["name"]: r["id"] for r in rows}

    sluice("principal", "add", str(mnt), "first")
    sluice("principal", "add", str(mnt), "second")
    gone = ids()["second"]
    sluice("principal", "rm", str(mnt), "second")
    sluice("principal", "add", str(mnt), "third")
    assert ids()["third"] > gone
    third = ids()["third"]
    sluice("principal", "rm", str(mnt), "third")
    m.stop()
    m.start()
    sluice("principal", "add", str(mnt), "fourth")
    assert ids()["fourth"] > third
