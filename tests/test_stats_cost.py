"""What a tenant's `stats` costs the daemon: its page's principals, not the volume's.

`stats` is served a part at a time (kernelshim/adminops.py), but a part is one step of
the event loop that no other tenant's request can cut. The device part took a snapshot
of every principal that ever did I/O (each its latency histogram's percentiles, tens
of µs) and the pager part a row of every principal, to show the few of the page: a
tenant's `stats` cost the loop in proportion to all principals of the volume, however
many others made (docs/BENCHMARKS.md, "Stop 30")."""

from __future__ import annotations

import os

import pytest

from blockdev import scheduler as scheduler_mod
from fs.filesystem import ROOT_INODE, FileSystem
from fs.inodes import Caller
from kernelshim.principals import Banks
from test_filesystem import CALLER, fs, vol  # noqa: F401 - the fixtures


async def test_a_tenants_stats_takes_snapshots_of_its_page_only(
        fs: FileSystem, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """60 principals each write a file (so each has I/O counters and a pager account);
    the `stats` parts for one of them (a tenant's page) take one I/O snapshot, its own,
    and list its rows only; for all (root's `sluice stats`) every one of them."""
    who = []
    for i in range(60):
        p = fs.principals.add(f"t{i}", owner_uid=1000 + i, banks=Banks(), caller_uid=0)
        who.append(p)
        caller = Caller(CALLER.uid, CALLER.gid, CALLER.pid, 0o022, p.id)
        h, _node = fs.create(ROOT_INODE, f"f{i}".encode(), 0o644, os.O_RDWR, caller)
        assert await fs.write(h.fh, 0, b"x" * 8192) == 8192
        await fs.fsync(h.fh, False)  # (to the device: the scheduler counts it)
        await fs.release(h.fh)
    snapshots = []
    snapshot = scheduler_mod._Counters.snapshot

    def counted(self: object, principal: int, now: object) -> object:
        snapshots.append(int(principal))
        return snapshot(self, principal, now)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler_mod._Counters, "snapshot", counted)
    me = who[7]
    parts = dict(fs.statistics_parts(names=[me.name]))
    assert snapshots == [me.id]
    assert list(parts["device"]["per_principal"]) == [me.name]
    assert parts["device"]["per_principal"][me.name]["bytes_written"] >= 8192
    assert list(parts["cache"]) == [me.name]
    assert set(parts["pager"]["resident"]) <= {me.name}
    snapshots.clear()
    everything = dict(fs.statistics_parts())
    assert {p.id for p in who} <= set(snapshots)
    assert {p.name for p in who} <= set(everything["device"]["per_principal"])
    assert {p.name for p in who} <= set(everything["cache"])
