"""Banks pushed down: the pager and the device's scheduler are told every principal's
memory and I/O bank at mount and after every change while mounted (issue 7)."""

from __future__ import annotations

import json

import pytest

from conftest import sluice

from blockdev import BankNode, ROOT_PRINCIPAL
from kernelshim.principals import Banks, PrincipalTable, Rate


def test_bank_tree_snapshot_follows_every_change() -> None:
    t = PrincipalTable(None)
    seen: list[dict] = []
    t.watch(lambda tree: seen.append(dict(tree)))
    assert list(seen[-1]) == [ROOT_PRINCIPAL]
    a = t.add("a", owner_uid=1000, caller_uid=0,
              banks=Banks(cache_min=1 << 20, cache_max=4 << 20,
                          io_limit=Rate.parse("500iops"), io_weight=300))
    node = seen[-1][a.id]
    assert node == BankNode(a.id, ROOT_PRINCIPAL, "a", cache_min=1 << 20, cache_max=4 << 20,
                            io_weight=300, io_limit_iops=500.0)
    b = t.add("b", parent="a", owner_uid=1000, caller_uid=0,
              banks=Banks(io_limit=Rate.parse("20MB/s")))
    assert seen[-1][b.id].parent == a.id
    assert seen[-1][b.id].io_limit_bps == 20e6 and seen[-1][b.id].io_limit_iops is None
    t.set("a", 0, cache_max=8 << 20)
    assert seen[-1][a.id].cache_max == 8 << 20
    t.remove("b", 0)
    assert b.id not in seen[-1]
    u = t.default_for_uid(4242)
    assert seen[-1][u.id].name == "uid-4242"
    # Snapshots are values: an old one did not change under its holder.
    assert seen[1][a.id].cache_max == 4 << 20


@pytest.mark.mounted
def test_bank_change_while_mounted_reaches_pager_and_scheduler(mnt) -> None:
    """`sluice principal set` on a live mount changes what the pager and the scheduler
    hold (read back through the daemon's stats, which report the banks they enforce)."""
    sluice("principal", "add", str(mnt), "tenant", "--cache-max", "8M", "--io-weight", "250",
           "--io-limit", "300iops")
    st = json.loads(sluice("stats", str(mnt), "--json").stdout)
    row = st["enforced_banks"]["tenant"]
    assert row["pager"]["cache_max"] == 8 << 20
    assert row["scheduler"]["io_weight"] == 250 and row["scheduler"]["io_limit_iops"] == 300
    sluice("principal", "set", str(mnt), "tenant", "--cache-max", "16M", "--io-weight", "50")
    st = json.loads(sluice("stats", str(mnt), "--json").stdout)
    row = st["enforced_banks"]["tenant"]
    assert row["pager"]["cache_max"] == 16 << 20
    assert row["scheduler"]["io_weight"] == 50
