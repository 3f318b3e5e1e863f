"""The I/O schedulers (blockdev/scheduler.py) on trio's MockClock, through a real device.

The device is a custom profile of 125 us per request, unlimited bandwidth and queue
depth 1: exactly 8,000 requests per second, whatever their size. Principals are
"flooders" (several tasks each reading in a loop, so their queue never empties) or
paced (one request every 1/rate seconds). Counts are taken over a window after a
warm-up, from the completion times; every expectation is exact up to the rounding
of a count (1%).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import pytest
import trio

from blockdev import (BankNode, BlockDevice, MClockScheduler, OverReserved, PrincipalId,
                      check_reservations, parse_profile)
from blockdev.histogram import LatencyHistogram
from blockdev.types import ROOT_PRINCIPAL

BS = 4096
PROFILE = "lat=125,qd=1"  # 8,000 IOPS


def P(i: int) -> PrincipalId:
    return PrincipalId(i)


def node(i: int, parent: int | None = 0, *, name: str | None = None, **kw) -> BankNode:
    return BankNode(P(i), None if parent is None else P(parent), name or f"p{i}", **kw)


def tree(*nodes: BankNode) -> dict[PrincipalId, BankNode]:
    out = {ROOT_PRINCIPAL: node(0, None)}
    out.update({n.id: n for n in nodes})
    return out


@pytest.fixture(params=[PROFILE, PROFILE + ",antic=1"], ids=["", "antic"])
def dev(tmp_path: Path, request: pytest.FixtureRequest):
    """The device; every test of it runs again with anticipation on (up to 1 ms, eight
    requests' time): the oracles must hold whatever it does."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile=request.param)
    device = BlockDevice.open(d, scheduler="mclock", timeline_slack=0.0)
    yield device
    device.close()


def _kernel(tmp_path: Path, profile: str = PROFILE,  # type: ignore[no-untyped-def]
            blocks: int = 256):
    """The shim kernel over a fresh device of `blocks` blocks and `profile` (by default
    this file's; the caller closes it)."""
    from kernelshim import Kernel
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=blocks * BS, block_size=BS, profile=profile)
    return Kernel.open(d, cache_bytes=64 * BS)


class Load:
    """Drives principals against a device and records each completion time."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.done: dict[PrincipalId, list[float]] = defaultdict(list)

    async def flood(self, p: PrincipalId, *, until: float, workers: int = 4,
                    start: float = 0.0, blocks: int = 1) -> None:
        async def worker(i: int) -> None:
            await trio.sleep_until(start)
            while trio.current_time() < until:
                await self.dev.read((i * 7) % 200, blocks, principal=p)
                self.done[p].append(trio.current_time())
        async with trio.open_nursery() as n:
            for i in range(workers):
                n.start_soon(worker, i)

    async def paced(self, p: PrincipalId, rate: float, *, until: float) -> None:
        t = trio.current_time()
        async with trio.open_nursery() as n:
            while t < until:
                n.start_soon(self._one, p)
                t += 1.0 / rate
                await trio.sleep_until(t)

    async def _one(self, p: PrincipalId) -> None:
        await self.dev.read(3, 1, principal=p)
        self.done[p].append(trio.current_time())

    def rate(self, p: PrincipalId, t0: float, t1: float) -> float:
        return sum(1 for t in self.done[p] if t0 <= t < t1) / (t1 - t0)

    def max_in_window(self, p: PrincipalId, width: float = 1.0) -> int:
        ts = sorted(self.done[p])
        best = j = 0
        for i, t in enumerate(ts):
            while ts[j] <= t - width:
                j += 1
            best = max(best, i - j + 1)
        return best


async def test_vmware_entitlement_oracle(dev: BlockDevice, autojump_clock) -> None:
    """The published example: hosts share by weight, a host's unused share stays with
    its other VM first, and what neither VM of host2 can use goes to host1."""
    dev.configure_banks(tree(
        node(1, 0, name="host1", io_weight=3500), node(2, 0, name="host2", io_weight=1500),
        node(3, 1, name="vm1", io_weight=1000), node(4, 1, name="vm2", io_weight=2500),
        node(5, 2, name="vm3", io_weight=500),
        node(6, 2, name="vm4", io_weight=1000, io_limit_iops=2000)))
    load = Load(dev)
    end = 3.0
    async with trio.open_nursery() as n:
        for p in (3, 4, 6):
            n.start_soon(lambda p=p: load.flood(P(p), until=end))
        n.start_soon(lambda: load.paced(P(5), 10, until=end))
    got = {p: load.rate(P(p), 1.0, end - 0.1) for p in (3, 4, 5, 6)}
    assert got[3] == pytest.approx(1711, rel=0.01)
    assert got[4] == pytest.approx(4279, rel=0.01)
    assert got[5] == pytest.approx(10, rel=0.01 if got[5] else 0)
    assert got[6] == pytest.approx(2000, rel=0.01)
    # flattened weights would give 1,776 / 4,439 / 10 / 1,776
    assert abs(got[3] - 1776) > 40 and abs(got[6] - 1776) > 150


async def test_a_reservation_holds_after_the_principal_had_the_device_alone(
        dev: BlockDevice, autojump_clock) -> None:
    """A principal reserved 3,000 IOPS that had the idle device to itself (8,000 IOPS
    for 2 s) gets its reservation at once when a weight-1000 flooder comes. Its R tag
    counted all its service, weight-phase included, and ran seconds ahead: it got its
    weight share, 8 IOPS, for the next 3 s (found beside probe 20, F2)."""
    dev.configure_banks(tree(node(1, io_weight=1, io_reserve_iops=3000),
                             node(2, io_weight=1000)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=4.0))
        n.start_soon(lambda: load.flood(P(2), start=2.0, until=4.0))
    assert load.rate(P(1), 0.5, 1.9) > 7000  # (alone: the whole device)
    assert load.rate(P(1), 2.05, 2.5) == pytest.approx(3000 + 5000 / 1001, rel=0.02)
    assert load.rate(P(1), 2.5, 3.9) == pytest.approx(3000 + 5000 / 1001, rel=0.01)
    st = {s.principal: s for s in dev.statistics().per_principal}
    assert st[P(1)].reservation_missed == 0


async def test_reservation_met_beside_heavy_weights(dev: BlockDevice, autojump_clock) -> None:
    """A weight-1 principal reserved 3,000 IOPS gets its reservation (plus its tiny
    share of the rest) beside a weight-1000 flooder; without it, about 8."""
    dev.configure_banks(tree(node(1, io_weight=1, io_reserve_iops=3000),
                             node(2, io_weight=1000)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=2.0))
        n.start_soon(lambda: load.flood(P(2), until=2.0))
    r1, r2 = load.rate(P(1), 0.5, 1.9), load.rate(P(2), 0.5, 1.9)
    assert r1 == pytest.approx(3000 + 5000 / 1001, rel=0.01)
    assert r2 == pytest.approx(5000 * 1000 / 1001, rel=0.01)
    st = {s.principal: s for s in dev.statistics().per_principal}
    assert st[P(1)].reservation_missed == 0
    assert st[P(1)].reservation_met == st[P(1)].ops
    assert st[P(1)].reserved_ops >= 0.99 * 3000 * 1.9
    assert st[P(2)].reservation_met == st[P(2)].reservation_missed == 0  # has none

    # the same without the reservation: weights alone
    dev.configure_banks(tree(node(1, io_weight=1), node(2, io_weight=1000)))
    load = Load(dev)
    t = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=t + 1.5))
        n.start_soon(lambda: load.flood(P(2), until=t + 1.5))
    assert load.rate(P(1), t + 0.4, t + 1.4) == pytest.approx(8000 / 1001, rel=0.15)


async def test_reservations_hold_in_a_tree(dev: BlockDevice, autojump_clock) -> None:
    """A parent's reservation is shared by weight among its children; a child's own
    reservation carved from it holds inside."""
    dev.configure_banks(tree(
        node(1, io_weight=1, io_reserve_iops=4000),
        node(2, 1, io_weight=100, io_reserve_iops=1000), node(3, 1, io_weight=300),
        node(4, io_weight=10000)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        for p in (2, 3, 4):
            n.start_soon(lambda p=p: load.flood(P(p), until=2.0))
    r = {p: load.rate(P(p), 0.5, 1.9) for p in (2, 3, 4)}
    assert r[2] + r[3] >= 0.99 * 4000
    assert r[2] >= 0.99 * 1000
    assert r[2] + r[3] + r[4] == pytest.approx(8000, rel=0.01)


async def test_limits_are_never_exceeded(dev: BlockDevice, autojump_clock) -> None:
    """A flooder alone on the device gets its limit, never more in any one-second
    window: in IOPS, in bytes/s, and with both the tighter one."""
    cases = [
        (dict(io_limit_iops=1000), 1, 1000),
        (dict(io_limit_bps=4 << 20), 16, (4 << 20) / (16 * BS)),  # 64 KiB requests
        (dict(io_limit_iops=1000, io_limit_bps=2 << 20), 1, (2 << 20) / BS),  # bytes/s tighter
        (dict(io_limit_iops=300, io_limit_bps=2 << 20), 1, 300),  # IOPS tighter
    ]
    for i, (limit, blocks, want) in enumerate(cases):
        p = P(10 + i)
        dev.configure_banks(tree(node(10 + i, **limit)))
        load = Load(dev)
        t = trio.current_time()
        await load.flood(p, until=t + 2.0, workers=8, blocks=blocks)
        assert load.rate(p, t + 0.5, t + 1.9) == pytest.approx(want, rel=0.01)
        assert load.max_in_window(p) <= want + 1
        assert dev.statistics().per_principal[-1].throttled > 0


async def test_limit_of_a_parent_holds_its_children(dev: BlockDevice, autojump_clock) -> None:
    dev.configure_banks(tree(node(1, io_limit_iops=2000), node(2, 1), node(3, 1, io_weight=300),
                             node(4)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        for p in (2, 3, 4):
            n.start_soon(lambda p=p: load.flood(P(p), until=2.0))
    r = {p: load.rate(P(p), 0.5, 1.9) for p in (2, 3, 4)}
    assert r[2] + r[3] == pytest.approx(2000, rel=0.01)
    assert r[3] == pytest.approx(3 * r[2], rel=0.02)
    assert r[4] == pytest.approx(6000, rel=0.01)  # the rest: work-conserving


async def test_work_conserving_and_weights(dev: BlockDevice, autojump_clock) -> None:
    """Alone, a principal gets the whole device whatever its weight; together, the
    device is shared 1:3."""
    dev.configure_banks(tree(node(1, io_weight=100), node(2, io_weight=300)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=2.5))
        n.start_soon(lambda: load.flood(P(2), start=1.2, until=2.5))
    assert load.rate(P(1), 0.3, 1.1) == pytest.approx(8000, rel=0.01)
    assert load.rate(P(1), 1.5, 2.4) == pytest.approx(2000, rel=0.01)
    assert load.rate(P(2), 1.5, 2.4) == pytest.approx(6000, rel=0.01)


async def test_idle_principal_banks_no_credit(dev: BlockDevice, autojump_clock) -> None:
    """A principal idle for 3 s gets its share from the moment it comes back, not a
    burst making up for the idle time; a limited one, no more than its limit."""
    dev.configure_banks(tree(node(1), node(2), node(3, io_limit_iops=1000)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=2.0))
        n.start_soon(lambda: load.flood(P(2), until=0.3))  # busy, then idle for 1.2 s
        n.start_soon(lambda: load.flood(P(2), start=1.5, until=2.0))
        n.start_soon(lambda: load.flood(P(3), until=0.2))  # limited, then idle
        n.start_soon(lambda: load.flood(P(3), start=1.5, until=2.0))
    # the first 50 ms after coming back: shares as if never away
    for a, b in ((1.5, 1.55), (1.55, 2.0)):
        r3 = load.rate(P(3), a, b)
        assert r3 <= 1000 * 1.01 + 1 / (b - a)
        assert load.rate(P(2), a, b) == pytest.approx(load.rate(P(1), a, b), rel=0.05)
    assert load.rate(P(1), 0.5, 1.4) == pytest.approx(8000, rel=0.01)  # alone meanwhile
    assert load.max_in_window(P(3)) <= 1001


async def test_cost_per_byte_shares_device_time(tmp_path: Path, autojump_clock) -> None:
    """On a bandwidth-bound profile, equal weights share device time: 64 KiB requests
    get a sixteenth of the requests of 4 KiB ones, the same bytes."""
    d = tmp_path / "bw"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile="lat=0,bw=100,qd=4")
    dev = BlockDevice.open(d, timeline_slack=0.0)
    try:
        dev.configure_banks(tree(node(1), node(2)))
        load = Load(dev)
        async with trio.open_nursery() as n:
            n.start_soon(lambda: load.flood(P(1), until=1.2, blocks=1, workers=8))
            n.start_soon(lambda: load.flood(P(2), until=1.2, blocks=16, workers=8))
        b1 = load.rate(P(1), 0.3, 1.1) * BS
        b2 = load.rate(P(2), 0.3, 1.1) * 16 * BS
        assert b1 == pytest.approx(50e6, rel=0.02)
        assert b2 == pytest.approx(50e6, rel=0.02)
    finally:
        dev.close()


async def test_fifo_ignores_weights(tmp_path: Path, autojump_clock) -> None:
    d = tmp_path / "fifo"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile=PROFILE)
    dev = BlockDevice.open(d, scheduler="fifo", timeline_slack=0.0)
    try:
        dev.configure_banks(tree(node(1, io_weight=100), node(2, io_weight=300, io_limit_iops=10)))
        load = Load(dev)
        async with trio.open_nursery() as n:
            n.start_soon(lambda: load.flood(P(1), until=2.0))
            n.start_soon(lambda: load.flood(P(2), until=2.0))
        assert load.rate(P(1), 0.5, 1.9) == pytest.approx(4000, rel=0.01)
        assert load.rate(P(2), 0.5, 1.9) == pytest.approx(4000, rel=0.01)
        assert dev.statistics().scheduler == "fifo"
    finally:
        dev.close()


async def test_raising_a_limit_releases_waiting_requests(dev: BlockDevice,
                                                         autojump_clock) -> None:
    dev.configure_banks(tree(node(1, io_limit_iops=1)))
    done: list[float] = []

    async def one() -> None:
        await dev.read(0, 1, principal=P(1))
        done.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
        await trio.sleep(2.5)
        assert len(done) == 3  # at 0, 1 and 2 s
        dev.configure_banks(tree(node(1)))  # no limit now: the rest go at once
    assert len(done) == 5
    assert done[-1] - t0 == pytest.approx(2.5 + 2 * 125e-6, rel=1e-6)


async def test_a_raised_limit_shortens_the_waits_it_held(tmp_path: Path,
                                                          autojump_clock) -> None:
    """Review of hostile probe 7's fixes, R3: raising a limit on a live mount left the
    requests it held waiting for tags and places counted at the old limit (10-30 s
    after a raise from 0.2 to 1,000 IOPS). The tags' future is counted again at the
    new limit, and a write-through write waiting for its place (`repay_limit`, before
    any lock) takes a new one."""
    kernel = _kernel(tmp_path)
    dev = kernel.device
    try:
        dev.timeline_slack = 0.0
        kernel.configure_banks(tree(node(1, io_limit_iops=0.2)))
        reads: list[float] = []
        places: list[float] = []

        async def read() -> None:
            await dev.read(0, 1, principal=P(1))
            reads.append(trio.current_time())

        async def place() -> None:
            await kernel.repay_limit(P(1), BS)
            places.append(trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(read)  # the first at once, then every 5 s
            await trio.sleep(1.0)
            for _ in range(4):
                n.start_soon(place)  # after the reads' tags: 15, 20, 25, 30 s
            await trio.sleep(1.0)
            assert len(reads) == 1 and not places
            kernel.configure_banks(tree(node(1, io_limit_iops=1000)))
        # before: the reads at 5 and 10 s, the places at 15-30 s
        assert reads[-1] - t0 < 2.1, reads
        assert places[-1] - t0 < 2.1, places
        # ... and a limit lowered holds the next ones the longer
        kernel.configure_banks(tree(node(1, io_limit_iops=1)))
        t1 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(place)
        assert trio.current_time() - t1 >= 1.9
    finally:
        kernel.close()


async def test_bank_changes_keep_the_places_and_their_order(tmp_path: Path,
                                                             autojump_clock) -> None:
    """Review of d4a70cd (R3's fix), 1 and 4. Any tenant may change the banks (its own
    children) 50 times a second: each change gave every write waiting for its place a
    new one, in whatever order trio woke them (one writer of twelve at 1 IOPS done at
    9 s for its 5 s place; closed-loop waits up to 32 s for 8 s). A change that leaves
    a path's limits alone leaves its places alone, and one that changes them re-counts
    the rest of each wait in place, keeping the order. A unit no longer limited holds
    nothing though the other still does."""
    kernel = _kernel(tmp_path)
    try:
        kernel.device.timeline_slack = 0.0
        banks = tree(node(1, io_limit_iops=1), node(2))
        kernel.configure_banks(banks)
        done: dict[int, float] = {}
        t0 = trio.current_time()

        async def place(k: int, nbytes: int = BS) -> None:
            await kernel.repay_limit(P(1), nbytes)
            done[k] = trio.current_time() - t0

        async def churn() -> None:  # another tenant's principal changes
            for i in range(60):
                await trio.sleep(0.05)
                kernel.configure_banks({**banks, P(3 + i % 2): node(3 + i % 2)})

        async with trio.open_nursery() as n:
            for k in range(8):
                n.start_soon(place, k)
                await trio.sleep(0)
            n.start_soon(churn)
            await trio.sleep(2.5)
            # raised to 2 IOPS: the rest of each wait halves, in order
            banks = tree(node(1, io_limit_iops=2), node(2))
            kernel.configure_banks(banks)
        assert [k for k in sorted(done, key=done.get)] == list(range(8)), done
        for k in range(3):
            assert done[k] == pytest.approx(k, abs=0.01), done
        for k in range(3, 8):
            assert done[k] == pytest.approx(2.5 + (k - 2.5) / 2, abs=0.01), done
        # a limit of bytes only now: the old IOPS tag holds nothing
        kernel.configure_banks(tree(node(1, io_limit_iops=0.2), node(2)))
        await place(10)
        await kernel.device.read(0, 1, principal=P(1))  # its tag: 5 s on
        kernel.configure_banks(tree(node(1, io_limit_bps=100e6), node(2)))
        t1 = trio.current_time()
        await kernel.device.read(0, 1, principal=P(1))
        await place(11)
        assert trio.current_time() - t1 < 0.01
    finally:
        kernel.close()


async def test_small_writes_take_places_of_whole_blocks(tmp_path: Path,
                                                        autojump_clock) -> None:
    """Review of d4a70cd, 2: a write's place was priced at its own bytes, so 32
    concurrent 16-byte writes (each a whole block on the device) took their places at
    once under an 8 KiB/s limit: 17x the limit in a burst. With its offset, a write is
    priced at the blocks it spans."""
    kernel = _kernel(tmp_path)
    try:
        kernel.configure_banks(tree(node(1, io_limit_bps=8192)))
        done: list[float] = []
        t0 = trio.current_time()

        async def place(k: int) -> None:
            await kernel.repay_limit(P(1), 16, k * BS + 100)
            done.append(trio.current_time() - t0)

        async with trio.open_nursery() as n:
            for k in range(32):
                n.start_soon(place, k)
        # 32 blocks at 2 a second: the last place 15.5 s on (before: all within 0.1 s)
        assert max(done) == pytest.approx(15.5, abs=0.05), sorted(done)
        # one write over two blocks is two blocks' worth
        t1 = trio.current_time()
        await kernel.repay_limit(P(1), 16, 2 * BS - 8)
        await kernel.repay_limit(P(1), 16, 0)
        assert trio.current_time() - t1 == pytest.approx(0.5 + 1.0, abs=0.05)
    finally:
        kernel.close()


async def test_a_place_grows_with_the_requests_its_write_makes(
        dev: BlockDevice, autojump_clock) -> None:
    """Hostile probe 8, F1: a large overwrite relocated into fresh blocks that do not
    continue each other goes down as one request per run, known only under the lock;
    its place was priced as one request. 16 concurrent 128 KiB overwrites at a 4 IOPS
    limit made 127 requests a second in the first seconds. Inside `place_scope()` a
    place grows by each request its write makes beyond its price, as it makes it, and
    the places still to start move later: fragmented writers go at the limit from the
    first wave; a write of one request each is priced at one."""
    sched = dev.scheduler
    dev.configure_banks(tree(node(1, io_limit_iops=4)))
    sent: list[float] = []

    async def write(requests: int) -> None:
        with sched.place_scope():
            place = sched.limit_slot(P(1), 32 * BS)
            assert place is not None
            await sched.wait_place(place)
            with sched.past_limits():  # (as under the inode lock)
                for k in range(requests):
                    await dev.write(k, bytes(BS), principal=P(1))
                    sent.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as n:  # the first wave: 8 writers at once
        for _ in range(8):
            n.start_soon(write, 32)  # one request a block
    # 256 requests at 4 a second: no second holds more than its 4 plus one write's 32
    # (before: all 256 within 1.8 s)
    for t in sent:
        assert sum(1 for u in sent if t <= u < t + 1.0) <= 4 + 32
    assert sent[-1] - t0 == pytest.approx(7 * 32 / 4, abs=0.1)
    await trio.sleep(60)
    sent.clear()
    t1 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(write, 1)
    assert len(sent) == 8
    assert sent[-1] - t1 == pytest.approx(7 / 4, abs=0.05), [u - t1 for u in sent]


async def test_concurrent_writers_are_not_held_to_one_at_a_time(
        tmp_path: Path, autojump_clock) -> None:
    """Review of F1's first fix, D: a place priced at its write's most (32 for 128 KiB)
    and re-priced when the write ended made each concurrent writer wait for the one
    before it to end: 16 writers of one request each at 1,000 IOPS on a 5 ms device
    went one per 5 ms (172 writes a second through a mount, 956 before). A place is
    priced at its least now, and grows only by what its write makes beyond it."""
    kernel = _kernel(tmp_path, "lat=5000,qd=32", 1024)
    try:
        kernel.device.timeline_slack = 0.0
        dev = kernel.device
        kernel.configure_banks(tree(node(1, io_limit_iops=1000)))
        done: list[float] = []

        async def write(k: int) -> None:
            with kernel.limit_scope(P(1)):
                await kernel.repay_limit(P(1), 32 * BS, k * 32 * BS)  # 128 KiB
                with kernel.past_limits():  # contiguous: one request
                    await dev.write(k * 32, bytes(32 * BS), principal=P(1))
            done.append(trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for k in range(16):
                n.start_soon(write, k)
        # 16 places 1 ms apart, each write 5 ms: 20 ms (before: 16 x 5 ms)
        assert max(done) - t0 < 0.025, sorted(u - t0 for u in done)
    finally:
        kernel.close()


async def test_a_merges_read_is_priced_too(tmp_path: Path, autojump_clock) -> None:
    """Review of F1's first fix, H: a one-block write's place was never opened to its
    requests, so the read a partial block's merge makes went unpriced (32 concurrent
    100-byte writes into committed blocks: 40 requests in the worst second at 20
    IOPS). Its place grows by the read like any request beyond its price."""
    kernel = _kernel(tmp_path)
    try:
        kernel.device.timeline_slack = 0.0
        dev = kernel.device
        kernel.configure_banks(tree(node(1, io_limit_iops=4)))
        starts: list[float] = []

        async def write(k: int) -> None:
            with kernel.limit_scope(P(1)):
                await kernel.repay_limit(P(1), 100, k * BS + 7)  # inside one block
                starts.append(trio.current_time())
                with kernel.past_limits():
                    await dev.read(k, 1, principal=P(1))   # the merge's read
                    await dev.write(k, bytes(BS), principal=P(1))

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for k in range(4):
                n.start_soon(write, k)
        # two requests each at 4 a second: 0, 0.5, 1.0, 1.5 s (before: 0.25 apart)
        assert [round(u - t0, 2) for u in starts] == [0.0, 0.5, 1.0, 1.5]
    finally:
        kernel.close()


async def test_writers_behind_a_held_lock_keep_to_the_limit(
        dev: BlockDevice, autojump_clock) -> None:
    """Second review of F1, A: writers whose places went while they waited for a lock
    another held (a long write, a layout's copy, a slow device) grew only once they
    held it, too late to move anyone: 16 writers of 16 requests each at 4 IOPS behind
    a lock held 2 s made 144 requests in the worst second, 20 allowed. While a writer
    waits for a held lock its place is priced at its most (`hold_place`, as
    `FileSystem._limited_lock` does), and back once it holds the lock."""
    sched = dev.scheduler
    dev.configure_banks(tree(node(1, io_limit_iops=4)))
    lock = trio.Lock()
    sent: list[float] = []

    async def write(k: int) -> None:
        with sched.place_scope():
            place = sched.limit_slot(P(1), 16 * BS)
            assert place is not None
            await sched.wait_place(place)
            if lock.locked():
                sched.hold_place(16)
            await lock.acquire()
            try:
                with sched.past_limits():
                    for b in range(16):  # fragmented: a request a block
                        await dev.write(2 * b, bytes(BS), principal=P(1))
                        sent.append(trio.current_time())
            finally:
                lock.release()

    async def holder(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        async with lock:
            task_status.started()
            await trio.sleep(2.0)

    async with trio.open_nursery() as n:
        await n.start(holder)
        for k in range(16):
            n.start_soon(write, k)
    assert len(sent) == 256
    worst = max(sum(1 for u in sent if t <= u < t + 1.0) for t in sent)
    assert worst <= 4 + 16 + 1, worst   # (before: 144)


async def test_a_bursts_writes_share_one_place(dev: BlockDevice, autojump_clock) -> None:
    """Review of F1's first fix, G: a direct client's burst of pipelined overwrites
    (`write_relocating_many`) took a place a write, then went down as one request: at
    100 IOPS a closed-loop client made 12 requests a second. The burst's later writes
    are priced at no request of their own (`ios` 0) and join the first's place, which
    grows by what the burst makes beyond one request."""
    sched = dev.scheduler
    dev.configure_banks(tree(node(1, io_limit_iops=100)))
    made: list[float] = []

    async def burst(requests: int) -> None:
        with sched.place_scope():
            for k in range(8):
                place = sched.limit_slot(P(1), 4 * BS, ios=0.0 if k else 1.0)
                assert place is not None
                await sched.wait_place(place)
            with sched.past_limits():
                for k in range(requests):
                    await dev.write(k * 4, bytes(4 * BS), principal=P(1))
                    made.append(trio.current_time())

    for requests in (1, 8):
        made.clear()
        t0 = trio.current_time()
        while trio.current_time() - t0 < 3.0:
            await burst(requests)
        rate = sum(1 for t in made if t0 + 1.0 <= t < t0 + 3.0) / 2.0
        assert 95 <= rate <= 104, (requests, rate)   # before: 12 and 54


async def test_a_limit_dropped_and_set_again_at_once_keeps_its_places(
        tmp_path: Path, autojump_clock) -> None:
    """Review of F1's first fix, C: a limit removed and set again with no checkpoint in
    between let every write waiting for its place through at once (its place had no
    line left, and only waiting places were given new ones). The waiters take new
    places, in the order they were taken."""
    kernel = _kernel(tmp_path)
    try:
        kernel.device.timeline_slack = 0.0
        kernel.configure_banks(tree(node(1, io_limit_iops=1)))
        done: list[float] = []

        async def place() -> None:
            await kernel.repay_limit(P(1), BS)
            done.append(trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(place)
                await trio.sleep(0)
            await trio.sleep(2.5)
            kernel.configure_banks(tree(node(1)))
            kernel.configure_banks(tree(node(1, io_limit_iops=1)))
        gaps = [round(u - t0, 2) for u in done]
        assert gaps[:3] == [0.0, 1.0, 2.0]
        # the other five take new places one a second from the change (the first at
        # once: its node's limit tags were counted again from the change)
        assert gaps[3:] == sorted(gaps[3:]) and gaps[-1] >= 2.5 + 3.9, gaps
    finally:
        kernel.close()


async def test_the_past_limits_flag_keeps_no_finished_task_alive(dev: BlockDevice) -> None:
    """Review of d4a70cd, 3: the flag held its task, and a task spawned inside copies
    the context, so a line of tasks each spawned by the last (pyfuse3's workers) kept
    every finished one alive (~750 B each)."""
    import gc
    import weakref
    refs: list[weakref.ref] = []
    alive: list[int] = []

    async def link(n: int, nursery: trio.Nursery) -> None:
        refs.append(weakref.ref(trio.lowlevel.current_task()))
        with dev.scheduler.past_limits():
            if n:
                nursery.start_soon(link, n - 1, nursery)
                return
        # the last of the line, still running: which of the finished ones live on?
        await trio.sleep(0.01)
        gc.collect()
        alive.append(sum(r() is not None for r in refs[:-1]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link, 200, nursery)
    assert alive == [0]  # before: 200


async def test_cancelled_waiters_leave_the_queue(dev: BlockDevice, autojump_clock) -> None:
    dev.configure_banks(tree(node(1, io_limit_iops=10), node(2)))
    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(lambda: dev.read(0, 1, principal=P(1)))
        await trio.sleep(0.35)
        n.cancel_scope.cancel()
    sched = dev.scheduler
    assert isinstance(sched, MClockScheduler)
    assert sched._queued == 0 and sched._busy == 0
    # the device still serves everyone
    await dev.read(0, 1, principal=P(2))
    with trio.fail_after(1):
        await dev.read(0, 1, principal=P(1))
    st = {s.principal: s for s in dev.statistics().per_principal}
    assert st[P(1)].waiting == 0 and st[P(1)].reads == 4 + 1


async def test_statistics_latency_and_throughput(dev: BlockDevice, autojump_clock) -> None:
    dev.configure_banks(tree(node(1), node(2)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.paced(P(1), 100, until=2.0))
        n.start_soon(lambda: load.flood(P(2), until=2.0, workers=4))
    st = {s.principal: s for s in dev.statistics().per_principal}
    # a paced reader beside a 4-deep flood waits for at most the request in service
    assert 125e-6 <= st[P(1)].p50_s <= st[P(1)].p99_s <= 2 * 125e-6 + 1e-9
    # the flooder's requests wait behind ~3 of its own and its share of the device
    assert st[P(2)].p50_s == pytest.approx(4 * 125e-6, rel=0.05)
    assert st[P(1)].ops == 200 and st[P(1)].bytes_read == 200 * BS
    # throughput of the last complete second of the trio clock ([1, 2))
    assert st[P(1)].iops == pytest.approx(100, abs=1)
    assert st[P(2)].iops + st[P(1)].iops == pytest.approx(8000, abs=2)


def test_histogram_percentiles_are_precise() -> None:
    h = LatencyHistogram()
    vals = [1.1e-3] * 990 + [0.5e-3] * 5 + [30e-3] * 5
    for v in vals:
        h.record(v)
    assert h.percentile(0.99) == pytest.approx(1.1e-3, rel=0.005)
    assert h.percentile(0.5) == pytest.approx(1.1e-3, rel=0.005)
    assert h.percentile(1.0) == pytest.approx(30e-3, rel=0.005)
    h2 = LatencyHistogram()
    for i in range(1, 100001):
        h2.record(i * 1e-6)  # 1 us .. 100 ms, uniform
    for q in (0.5, 0.95, 0.99):
        assert h2.percentile(q) == pytest.approx(q * 0.1, rel=0.005)
    assert h2.max_s == pytest.approx(0.1)


def test_capacity_and_over_reservation() -> None:
    ssd, hdd = parse_profile("ssd"), parse_profile("hdd")
    assert ssd.capacity().iops == pytest.approx(500e6 / BS)
    assert ssd.capacity().bps == pytest.approx(500e6)
    assert hdd.capacity().iops == pytest.approx(1 / (4.2e-3 + 8e-3 + BS / 180e6))
    assert parse_profile(PROFILE).capacity().iops == pytest.approx(8000)
    assert parse_profile("none").capacity().iops is None
    prof = parse_profile(PROFILE)
    check_reservations(tree(node(1, io_reserve_iops=5000), node(2, io_reserve_iops=3000)), prof)
    # children carve from their parent: counted once
    check_reservations(tree(node(1, io_reserve_iops=8000), node(2, 1, io_reserve_iops=8000)),
                       prof)
    with pytest.raises(OverReserved, match=r"add up to 101% .* p1 5000iops \(62%\)"):
        check_reservations(tree(node(1, io_reserve_iops=5000), node(2, io_reserve_iops=3080)),
                           prof)
    # bytes/s counted as sequential 1 MiB reads: 8000 x 4 KiB... unlimited bandwidth here
    check_reservations(tree(node(1, io_reserve_bps=1e12)), parse_profile("none"))
    with pytest.raises(OverReserved, match="MB/s"):
        check_reservations(tree(node(1, io_reserve_bps=400e6), node(2, io_reserve_iops=30000)),
                           ssd)


def test_banknode_is_a_value() -> None:
    n = node(1, io_weight=5)
    assert dataclasses.replace(n, io_weight=6).io_weight == 6


# -- mounted: the banks from `sluice principal`, enforced by the daemon's scheduler ------------


def _fails_one_line(*args: str) -> str:
    from conftest import sluice
    r = sluice(*args, check=False)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _io(mnt: Path) -> dict:
    import json

    from conftest import sluice
    return json.loads(sluice("stats", str(mnt), "--json").stdout)


@pytest.mark.mounted
def test_io_limit_set_while_mounted_is_enforced(mnt: Path) -> None:
    """`sluice principal set --io-limit` on a live mount holds the principal's writes
    to the limit: the run takes at least (requests - 1) / limit, whatever the machine,
    and the scheduler counts the requests it held back."""
    import subprocess
    import time

    from conftest import sluice
    m = str(mnt)
    sluice("principal", "add", m, "tenant")

    def dd(name: str) -> tuple[float, int, int]:
        before = _io(mnt)["io"].get("tenant", {"ops": 0, "throttled": 0})
        t0 = time.monotonic()
        sluice("run", m, "--principal", "tenant", "--", "dd", "if=/dev/zero",
               f"of={m}/{name}", "bs=4k", "count=40", "oflag=direct", "status=none")
        elapsed = time.monotonic() - t0
        after = _io(mnt)["io"]["tenant"]
        assert after["write_bytes"] >= 40 * BS
        return elapsed, after["ops"] - before["ops"], after["throttled"] - before["throttled"]

    _elapsed, ops, throttled = dd("before")
    assert ops >= 40 and throttled == 0
    sluice("principal", "set", m, "tenant", "--io-limit", "20iops", "--io-limit", "1MB/s")
    rows = {r["name"]: r for r in __import__("json").loads(
        sluice("principal", "ls", m, "--json").stdout)}
    assert rows["tenant"]["banks"]["io_limit"] == "20iops,1MB/s"
    elapsed, ops, throttled = dd("after")
    # most of dd's writes came before the limit allowed them (one that a loaded
    # machine delays past its turn is not throttled: 36 of 40 seen once); the
    # elapsed time is what shows the limit held
    assert ops >= 40 and throttled >= ops // 2
    assert elapsed >= (ops - 1) / 20
    st = _io(mnt)
    assert st["enforced_banks"]["tenant"]["scheduler"]["io_limit_iops"] == 20
    # the file is whole
    assert (mnt / "after").read_bytes() == bytes(40 * BS)
    # lifting the limit (`none`) lets it go at once again
    sluice("principal", "set", m, "tenant", "--io-limit", "none")
    _elapsed, ops, throttled = dd("lifted")
    assert throttled == 0
    assert subprocess.run(["cmp", f"{m}/before", f"{m}/lifted"]).returncode == 0


_PARTIAL_WRITES = r"""
import os, sys, threading
path = sys.argv[1]
def run(i):
    fd = os.open(path, os.O_WRONLY)
    try:
        for k in range(4):  # 100 bytes into a sealed block: merged, relocated
            os.pwrite(fd, b"w" * 100, ((i * 4 + k) * 4 + 1) * 4096 + 7)
    finally:
        os.close(fd)
ts = [threading.Thread(target=run, args=(i,)) for i in range(16)]
for t in ts: t.start()
for t in ts: t.join()
"""

_DIRECT_READS = r"""
import mmap, os, random, sys, threading, time
path, seconds = sys.argv[1], float(sys.argv[2])
blocks = os.path.getsize(path) // 4096
n = [0] * 8
def run(i):
    rnd = random.Random(i)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.preadv(fd, [buf], rnd.randrange(blocks) * 4096)
            n[i] += 1
    finally:
        os.close(fd)
t0 = time.monotonic()
ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print(sum(n), time.monotonic() - t0)
"""


@pytest.mark.mounted
@pytest.mark.exclusive
def test_a_limit_holds_reads_after_write_through_writes(volume: Path, mount_factory) -> None:
    """The past-limits flag of a write-through write (made under the inode lock: it
    goes past the writer's I/O limit, repaid before) was a context variable, which a
    task spawned inside inherits — and pyfuse3 starts a new worker from a handler that
    blocks. Workers started by a limited tenant's blocked writes then served every
    later request of the mount past the limits: the quick QoS benchmark's limited
    reader read at twice its limit. The flag is the task's own now."""
    import subprocess
    import sys
    import time

    from conftest import REPO, sluice
    m = mount_factory(volume, "--profile", "lat=2000,qd=4", "--cache-size", "4M").path
    data = m / "data"
    data.write_bytes(os.urandom(16 << 20))
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)  # sealed: a partial overwrite merges and relocates under the lock
    finally:
        os.close(fd)
    os.chmod(data, 0o666)
    sluice("principal", "add", str(m), "tenant", "--io-limit", "50iops")

    def as_tenant(script: str, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "fs.cli", "run", str(m), "--principal",
                            "tenant", "--", sys.executable, "-c", script, *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        return r.stdout

    as_tenant(_PARTIAL_WRITES, str(data))  # 64 writes at the limit: workers started
    with open(data, "rb") as f:
        f.seek(5 * BS + 7)
        assert f.read(100) == b"w" * 100
    before = _io(m)["io"]["tenant"]["ops"]
    t0 = time.monotonic()
    reads, _took = as_tenant(_DIRECT_READS, str(data), "3").split()
    elapsed = time.monotonic() - t0
    ops = _io(m)["io"]["tenant"]["ops"] - before
    assert int(reads) >= 20
    # at most the limit over the run (a loaded machine may only lower it); before:
    # 3-10x over it
    assert ops <= 50 * elapsed * 1.1 + 5, (ops, elapsed, reads)


_FRAGMENTED_OVERWRITES = r"""
import mmap, os, sys, threading, time
path = sys.argv[1]
def run(i):
    buf = mmap.mmap(-1, 8 * 4096)
    buf.write(bytes([65 + i]) * (8 * 4096))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], i * 8 * 4096)  # 8 committed blocks: relocated
    finally:
        os.close(fd)
t0 = time.monotonic()
ts = [threading.Thread(target=run, args=(i,)) for i in range(6)]
for t in ts: t.start()
for t in ts: t.join()
print(time.monotonic() - t0)
"""


@pytest.mark.mounted
@pytest.mark.exclusive
def test_a_limited_tenants_fragmented_overwrites_go_at_its_limit(tmp_path: Path,
                                                                  mount_factory) -> None:
    """Hostile probe 8, F1: an overwrite of committed blocks is relocated into fresh
    blocks, which on an aged volume do not continue each other — one device request a
    block — but its place at the writer's limit was priced as one request: the first
    wave of concurrent writers went down at once (127 requests a second at 4 IOPS).
    Priced at the most it can make and re-priced at what it made, the tenant's writes go
    at its limit from the first wave."""
    import ctypes
    import subprocess
    import sys
    import time

    from conftest import REPO, make_volume, sluice
    vol = make_volume(tmp_path / "small", "2M")  # 512 blocks
    m = mount_factory(vol, "--cache-size", "1M").path
    filler, target = m / "filler", m / "target"
    for f, blocks in ((filler, 360), (target, 48)):
        f.write_bytes(os.urandom(blocks * BS))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(filler, os.O_RDWR)
    try:  # the free space left in holes of one block
        for b in range(0, 360, 2):
            assert libc.fallocate(fd, 3, ctypes.c_long(b * BS), ctypes.c_long(BS)) == 0
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)  # committed (and the punches' commit made durable): relocated
    finally:
        os.close(fd)
    os.chmod(target, 0o666)
    sluice("principal", "add", str(m), "tenant", "--io-limit", "20iops")
    before = _io(m)["io"].get("tenant", {}).get("ops", 0)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fs.cli", "run", str(m), "--principal",
                        "tenant", "--", sys.executable, "-c", _FRAGMENTED_OVERWRITES,
                        str(target)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    elapsed = float(r.stdout)  # (the writes' own time: not the interpreter's start)
    assert elapsed <= time.monotonic() - t0
    ops = _io(m)["io"]["tenant"]["ops"] - before
    data = target.read_bytes()
    for i in range(6):
        assert data[i * 8 * BS:(i + 1) * 8 * BS] == bytes([65 + i]) * (8 * BS)
    # the writes went down as several requests each (fewer when a commit between them
    # gave the next the blocks the last one freed, which continue each other)
    assert ops >= 16, ops
    # at the limit, plus the one write that goes at once (before: 25-48 requests in
    # 0.4 s)
    assert ops <= 20 * elapsed + 8 + 4, (ops, elapsed)


@pytest.mark.mounted
def test_reservations_beyond_capacity_are_refused(volume: Path, mount_factory) -> None:
    """On `hdd` (82 IOPS of 4 KiB random reads) reservations adding up to more are
    refused with one line, at `principal add`/`set` and at mount under a slower profile."""
    from conftest import sluice
    mt = mount_factory(volume, "--profile", "hdd")
    m = str(mt.path)
    st = _io(mt.path)
    assert st["device"]["capacity"]["iops"] == pytest.approx(81.8, abs=0.1)
    assert "capacity: 82 IOPS (4 KiB random reads), 104.6 MB/s sequential" in \
        sluice("stats", m).stdout
    sluice("principal", "add", m, "a", "--io-reserve", "50iops")
    line = _fails_one_line("principal", "add", m, "b", "--io-reserve", "40iops")
    assert "add up to 110% of what the device can serve" in line
    assert "b 40iops (49%)" in line and "a 50iops (61%)" in line
    line = _fails_one_line("principal", "set", m, "a", "--io-reserve", "90iops")
    assert "add up to 110%" in line
    sluice("principal", "add", m, "b", "--io-reserve", "30iops,5MB/s")
    line = _fails_one_line("principal", "set", m, "b", "--io-reserve", "30iops,60MB/s")
    assert "MB/s" in line
    rows = {r["name"]: r for r in __import__("json").loads(
        sluice("principal", "ls", m, "--json").stdout)}
    assert rows["a"]["banks"]["io_reserve"] == "50iops"
    assert rows["b"]["banks"]["io_reserve"] == "30iops,5MB/s"
    mt.stop()
    # 50 IOPS of 20 ms each: 80 IOPS reserved do not fit; the mount says so and goes
    mp = volume.parent / "mnt2"
    mp.mkdir()
    r = sluice("mount", str(volume), str(mp), "--profile", "lat=20000,qd=1", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "add up to 160%" in r.stderr and "Traceback" not in r.stderr
    from conftest import is_mounted
    assert not is_mounted(mp)


@pytest.mark.mounted
def test_stats_json_reports_io_per_principal(mnt: Path) -> None:
    from conftest import sluice
    m = str(mnt)
    sluice("principal", "add", m, "reader", "--io-reserve", "100iops", "--io-weight", "300")
    (mnt / "f").write_bytes(b"x" * (256 << 10))
    sluice("run", m, "--principal", "reader", "--", "dd", f"if={m}/f", "of=/dev/null",
           "bs=256k", "iflag=direct", "status=none")
    st = _io(mnt)
    io = st["io"]["reader"]
    assert io["read_bytes"] >= 256 << 10 and io["ops"] >= 1
    assert 0 < io["latency_us"]["p50"] <= io["latency_us"]["p99"] <= io["latency_us"]["max"]
    assert set(io["latency_us"]) >= {"p50", "p95", "p99", "max"}
    assert io["reservation"]["met"] == io["ops"] and io["reservation"]["missed"] == 0
    assert st["device"]["scheduler"] == "mclock"
    assert st["device"]["capacity"] == {"iops": None, "bps": None}  # profile none


async def test_a_barrier_expedites_throttled_writes(dev: BlockDevice, autojump_clock) -> None:
    """A commit must not wait for a throttled principal's queue to drain at its limit:
    inside `expedite_writes` its waiting writes go at once; its tags still advance, so
    it repays them afterwards. Reads are not expedited."""
    dev.configure_banks(tree(node(1, io_limit_iops=1)))
    done: list[tuple[str, float]] = []

    async def write(i: int) -> None:
        await dev.write(i, bytes(BS), principal=P(1))
        done.append(("w", trio.current_time()))

    async def read() -> None:
        await dev.read(0, 1, principal=P(1))
        done.append(("r", trio.current_time()))

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(read)  # goes at once: the principal was idle
        await trio.sleep(0.01)
        for i in range(4):
            n.start_soon(write, i)
        n.start_soon(read)
        await trio.sleep(0.01)
        assert [k for k, _t in done] == ["r"]
        with dev.scheduler.expedite_writes():
            await trio.sleep(0.01)
            assert [k for k, _t in done] == ["r", "w", "w", "w", "w"]
    # the read waited behind the repaid tags: 1 + 4 requests at 1 per second
    assert done[-1][0] == "r" and done[-1][1] - t0 == pytest.approx(5.0, abs=0.01)
    st = {s.principal: s for s in dev.statistics().per_principal}
    assert st[P(1)].expedited == 4


async def test_commit_is_not_stalled_by_a_throttled_writer(tmp_path: Path,
                                                           autojump_clock) -> None:
    """Through the shim kernel: a principal limited to 1 IOPS with 8 writes under way
    does not hold a barrier (a commit) for 8 seconds. Write-through writes wait at the
    limit before they begin, as their callers do it (`repay_limit`: before any lock,
    and so outside the writes a barrier waits for; hostile probe 7, F1), and go past
    it once begun: the 8 still go at 1 IOPS."""
    from kernelshim import FRESH, ExtentMap, Rights
    kernel = _kernel(tmp_path)
    try:
        kernel.device.timeline_slack = 0.0
        kernel.configure_banks(tree(node(1, io_limit_iops=1), node(2)))
        emap = ExtentMap([(0, 10, 16, FRESH)])
        g = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.RW,
                         principal=P(1))
        g2 = kernel.grant(inode=8, generation=1, extents=ExtentMap([(0, 40, 4, FRESH)]),
                          rights=Rights.RW, principal=P(2))
        wrote: list[float] = []

        async def w(i: int) -> None:
            await kernel.repay_limit(P(1), BS)
            await kernel.write(g, i * BS, bytes([i + 1]) * BS)
            wrote.append(trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(w, i)
            await trio.sleep(0.01)
            assert len(wrote) == 1  # the limit holds them
            async with kernel.barrier():
                # (in order, not in the clock's time: while the flush's thread runs
                # the autojump clock moves on to the paced writers' next timer)
                committed_after = len(wrote)
            await kernel.write(g2, 0, b"z" * BS)  # another principal's write goes on
            other_after = len(wrote)
        assert committed_after == 1 and other_after == 1
        assert len(wrote) == 8
        assert bytes(await kernel.read(g, 0, 8 * BS)) == b"".join(
            bytes([i + 1]) * BS for i in range(8))
        # at the limit: one a second, each held back before it began
        assert wrote[-1] - t0 >= 7.0
        st = {s.principal: s for s in kernel.device.statistics().per_principal}
        assert st[P(1)].throttled == 7 and st[P(1)].writes == 8
    finally:
        kernel.close()


async def test_an_fsyncs_barrier_is_charged_to_the_asker_and_not_held_by_its_limit(
        tmp_path: Path, autojump_clock) -> None:
    """Hostile-probe finding 14: the flush of a barrier an fsync asks for is the
    asker's I/O (its bank, its statistics), not root's; but it runs while every writer
    waits, so the asker's I/O limit does not hold it (expedited, repaid afterwards)."""
    from kernelshim import FRESH, ExtentMap, Rights
    kernel = _kernel(tmp_path)
    try:
        kernel.device.timeline_slack = 0.0
        kernel.configure_banks(tree(node(1, io_limit_iops=1), node(2)))
        g = kernel.grant(inode=7, generation=1, extents=ExtentMap([(0, 10, 4, FRESH)]),
                         rights=Rights.RW, principal=P(1))
        await kernel.write(g, 0, b"a" * BS)  # spends the limit's token
        t0 = trio.current_time()
        async with kernel.barrier(principal=P(1), file=7, durable=True):
            t_commit = trio.current_time()
        assert t_commit - t0 < 0.02
        st = {s.principal: s for s in kernel.device.statistics().per_principal}
        assert st[P(1)].flushes == 1 and st[P(1)].expedited == 1
        assert P(0) not in st or st[P(0)].flushes == 0
        assert not kernel.may_be_unflushed(7)
        # repaid: the asker's next write waits for its limit (before it begins)
        await kernel.repay_limit(P(1), BS)
        await kernel.write(g, BS, b"b" * BS)
        assert trio.current_time() - t0 >= 1.0
    finally:
        kernel.close()


async def test_a_request_past_its_limits_is_not_held_while_others_keep_the_device_busy(
        dev: BlockDevice, autojump_clock) -> None:
    """Review of hostile probe 7's fixes, R4: a request made `past_limits()` (under a
    lock others wait for) was chosen only when no other request could go, so while
    another principal kept the device busy it waited for its limit tags — under the
    lock. It competes by weight now: served within a few requests' time, its tags
    advanced all the same (the principal's next plain request waits for them), and
    many of them take a weight share, not the device: a reservation is still met."""
    dev.configure_banks(tree(node(1, io_limit_iops=1), node(2),
                             node(3, io_reserve_iops=2000)))
    load = Load(dev)
    done: dict[str, float] = {}

    async def read(tag: str, *, past: bool) -> None:
        if past:
            with dev.scheduler.past_limits():
                await dev.read(5, 1, principal=P(1))
        else:
            await dev.read(5, 1, principal=P(1))
        done[tag] = trio.current_time()

    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(2), until=3.0))
        await trio.sleep(0.1)
        t0 = trio.current_time()
        await read("first", past=False)  # idle until now: goes at its turn, spends the token
        assert done["first"] - t0 < 0.01
        t1 = trio.current_time()
        await read("past", past=True)  # held by the limit until t0 + 1 s before
        assert done["past"] - t1 < 0.002, done["past"] - t1
        await read("plain", past=False)  # repays: after both tags, at 1 IOPS
        assert done["plain"] - t0 >= 1.9, done["plain"] - t0
        assert load.rate(P(2), t0, done["plain"]) > 7900  # the flooder kept the device busy
        # Many past-limits requests take a weight share beside the flooder, and the
        # reservation of a third principal is still met.
        t3 = trio.current_time()
        async with trio.open_nursery() as m:
            m.start_soon(lambda: load.paced(P(3), 2000, until=t3 + 0.5))

            async def past_worker(i: int) -> None:
                # (the flag is the task's own: each worker enters it)
                with dev.scheduler.past_limits():
                    while trio.current_time() < t3 + 0.5:
                        await dev.read((i * 7) % 200, 1, principal=P(1))
                        load.done[P(1)].append(trio.current_time())
            for i in range(4):
                m.start_soon(past_worker, i)
        r1 = load.rate(P(1), t3 + 0.1, t3 + 0.45)
        r2 = load.rate(P(2), t3 + 0.1, t3 + 0.45)
        r3 = load.rate(P(3), t3 + 0.1, t3 + 0.45)
        assert r3 == pytest.approx(2000, rel=0.02)
        # (an equal share of what the reservation leaves: 2,000-3,000 a second each,
        # less with anticipation, which may keep the device for the reserved reader)
        assert r1 == pytest.approx(r2, rel=0.05) and r1 > 1500


async def test_dual_reservation_the_tighter_holds(dev: BlockDevice, autojump_clock) -> None:
    """Reserved 3,000 IOPS and 4 MB/s with 4 KiB requests: 4 MB/s (977 requests/s) is
    reached first, so that is what is reserved."""
    dev.configure_banks(tree(node(1, io_weight=1, io_reserve_iops=3000, io_reserve_bps=4e6),
                             node(2, io_weight=1000)))
    load = Load(dev)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(1), until=2.0))
        n.start_soon(lambda: load.flood(P(2), until=2.0))
    want = 4e6 / BS
    assert load.rate(P(1), 0.5, 1.9) == pytest.approx(want + (8000 - want) / 1001, rel=0.01)


def test_principal_rates_and_the_capacity_hook() -> None:
    """Banks in IOPS and bytes/s: parsed and printed, carved per unit, handed down, and
    refused by the device's capacity check before anything is saved."""
    from kernelshim import UnitError
    from kernelshim.principals import Banks, PrincipalError, PrincipalTable, Rate
    r = Rate.parse("500iops,20MB/s")
    assert (r.iops, r.bps, str(r)) == (500.0, 20e6, "500iops,20MB/s")
    assert Rate.parse("1.5GiB/s").bps == 1.5 * (1 << 30)
    assert Rate.parse("none").empty
    for bad in ("1iops,2iops", "1MB/s,2MB/s", "1iops,2MB/s,3iops", "fast", "0iops"):
        with pytest.raises(UnitError):
            Rate.parse(bad)
    t = PrincipalTable(None)
    seen: list = []
    t.watch(lambda tree: seen.append(tree))

    def capacity(tree) -> None:  # what Kernel.check_banks does with the device's check
        try:
            check_reservations(tree, parse_profile(PROFILE))
        except OverReserved as exc:
            raise PrincipalError(str(exc)) from None
    t.add_bank_validator(capacity)
    a = t.add("a", owner_uid=1, caller_uid=0,
              banks=Banks(io_reserve=Rate.parse("4000iops,20MB/s"),
                          io_limit=Rate.parse("6000iops,50MB/s")))
    assert seen[-1][a.id].io_reserve_iops == 4000 and seen[-1][a.id].io_reserve_bps == 20e6
    assert seen[-1][a.id].io_limit_iops == 6000 and seen[-1][a.id].io_limit_bps == 50e6
    # carved per unit: IOPS from the IOPS reservation, bytes/s from the bytes/s one
    t.add("a1", parent="a", owner_uid=1, caller_uid=0,
          banks=Banks(io_reserve=Rate.parse("3000iops")))
    with pytest.raises(PrincipalError, match="left to reserve"):
        t.add("a2", parent="a", owner_uid=1, caller_uid=0,
              banks=Banks(io_reserve=Rate.parse("1001iops")))
    with pytest.raises(PrincipalError, match="exceeds parent's"):
        t.add("a2", parent="a", owner_uid=1, caller_uid=0,
              banks=Banks(io_limit=Rate.parse("60MB/s")))
    t.add("a2", parent="a", owner_uid=1, caller_uid=0,
          banks=Banks(io_reserve=Rate.parse("1000iops,20MB/s")))
    with pytest.raises(PrincipalError, match="children of 'a' reserve 4000iops"):
        t.set("a", 0, io_reserve=Rate.parse("3999iops,20MB/s"))
    # 4,000 of the device's 8,000 IOPS are taken: 4,001 more do not fit, and nothing
    # of the refused change is kept
    n = len(seen)
    with pytest.raises(PrincipalError, match="add up to 100%"):
        t.add("b", owner_uid=1, caller_uid=0, banks=Banks(io_reserve=Rate.parse("4001iops")))
    with pytest.raises(PrincipalError, match="add up to 1"):
        t.set("a", 0, io_reserve=Rate.parse("8001iops,20MB/s"))
    assert len(seen) == n and "b" not in {p.name for p in t.walk()}
    assert str(t.get("a").banks.io_reserve) == "4000iops,20MB/s"
    t.add("b", owner_uid=1, caller_uid=0, banks=Banks(io_reserve=Rate.parse("4000iops")))
    # `none` removes a rate
    t.set("a2", 0, io_reserve=Rate.parse("none"))
    assert t.get("a2").banks.io_reserve is None


@pytest.mark.mounted
def test_fuse_and_direct_requests_are_charged_to_their_principals(mnt: Path) -> None:
    """A program's FUSE writes and a direct client's writes and reads reach the
    scheduler charged to the principal each runs as, not to root (the daemon)."""
    import subprocess
    import sys

    from conftest import REPO, sluice
    m = str(mnt)
    for name in ("fuse-writer", "direct"):
        sluice("principal", "add", m, name)
    sluice("run", m, "--principal", "fuse-writer", "--", "dd", "if=/dev/zero",
           f"of={m}/viafuse", "bs=64k", "count=4", "oflag=direct", "status=none")
    code = ("from kernelshim.client import Client\n"
            f"with Client.connect({m!r}) as c:\n"
            "    with c.open('viadirect', 'w') as f:\n"
            "        f.write(b'd' * (256 << 10))\n"
            "    with c.open('viadirect') as f:\n"
            "        assert f.pread(256 << 10, 0) == b'd' * (256 << 10)\n")
    r = subprocess.run([sys.executable, "-m", "fs.cli", "run", m, "--principal", "direct",
                        "--", sys.executable, "-c", code],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    io = _io(mnt)["io"]
    assert io["fuse-writer"]["write_bytes"] >= 4 * (64 << 10)
    assert io["direct"]["write_bytes"] >= 256 << 10
    # a 64-block read is larger than what the pager caches: it reaches the device
    assert io["direct"]["read_bytes"] >= 256 << 10
    assert "root" not in io or io["root"]["write_bytes"] < 256 << 10
    assert (mnt / "viadirect").read_bytes() == b"d" * (256 << 10)


# -- choosing as of the modeled time a channel frees (the event loop may run late) ----------

SLOW = "lat=10000,qd=1"  # 10 ms a request, one at a time
MS = 1e-3


async def _hold(sched, p: int, *, arrival: float, free_at: float, until: float,
                chosen: dict[int, float], write: bool = False) -> None:
    """A request of principal `p` arriving at `arrival`: note when the scheduler chose
    it, hold its channel until `until` (the task, running late), and give it back as
    free in the model `free_at` seconds after the choice (its modeled service)."""
    slot = sched.slot(P(p), BS, write=write, arrival=arrival)
    async with slot as t:
        chosen[p] = t
        await trio.sleep_until(until)
        slot.free_at = t + free_at


async def test_late_release_does_not_let_a_later_arrival_jump(autojump_clock) -> None:
    """The task holding the one channel gives it back 4 ms after its modeled
    completion (10 ms): a reserved reader that arrived during those 4 ms is not chosen
    in the waiting write's place; the write starts at 10 ms, not 14, and the reader
    when the write is done, at 20 ms."""
    sched = MClockScheduler(parse_profile(SLOW))
    sched.configure_banks(tree(node(1), node(2, io_reserve_iops=50)))
    chosen: dict[int, float] = {}
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _hold(sched, 1, arrival=0.0, free_at=10 * MS, until=14 * MS,
                                   chosen=chosen, write=True))
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _hold(sched, 3, arrival=0.0, free_at=10 * MS, until=30 * MS,
                                   chosen=chosen, write=True))
        await trio.sleep_until(12 * MS)
        n.start_soon(lambda: _hold(sched, 2, arrival=12 * MS, free_at=10 * MS,
                                   until=40 * MS, chosen=chosen))
    assert chosen[1] == 0.0
    assert chosen[3] == pytest.approx(10 * MS, abs=1e-12)
    assert chosen[2] == pytest.approx(20 * MS, abs=1e-12)


async def test_late_release_serves_the_reservation_that_was_waiting(autojump_clock) -> None:
    """Same, but the reserved reader arrived (at 9 ms) before the modeled completion
    (10 ms): it is chosen ahead of the earlier write, as of 10 ms, though the channel
    came back at 14 ms; the write follows it at 20 ms."""
    sched = MClockScheduler(parse_profile(SLOW))
    sched.configure_banks(tree(node(1), node(2, io_reserve_iops=50)))
    chosen: dict[int, float] = {}
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _hold(sched, 1, arrival=0.0, free_at=10 * MS, until=14 * MS,
                                   chosen=chosen, write=True))
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _hold(sched, 3, arrival=0.0, free_at=10 * MS, until=40 * MS,
                                   chosen=chosen, write=True))
        await trio.sleep_until(9 * MS)
        n.start_soon(lambda: _hold(sched, 2, arrival=9 * MS, free_at=10 * MS,
                                   until=30 * MS, chosen=chosen))
    assert chosen[2] == pytest.approx(10 * MS, abs=1e-12)
    assert chosen[3] == pytest.approx(20 * MS, abs=1e-12)


@pytest.mark.parametrize("scheduler", ["mclock", "fifo"])
async def test_a_late_task_does_not_idle_the_modeled_device(tmp_path: Path, autojump_clock,
                                                             scheduler: str) -> None:
    """The event loop runs 6 ms late (the clock jumps while a write is in service): the
    next write still starts when the first completes in the model (10 ms) and
    completes at 20 ms; its latency is the model's. The late task itself records the
    real time it got back (16 ms)."""
    d = tmp_path / "late"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile=SLOW)
    dev = BlockDevice.open(d, scheduler=scheduler, timeline_slack=0.0)
    done: dict[int, float] = {}

    async def write(p: int) -> None:
        await dev.write(p, bytes(BS), principal=P(p))
        done[p] = trio.current_time()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(write, 1)
            await trio.sleep(0)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(write, 2)
            await trio.sleep_until(4 * MS)
            autojump_clock.jump(12 * MS)  # the loop was busy elsewhere: now 16 ms
        assert done[1] == pytest.approx(16 * MS, abs=1e-9)
        assert done[2] <= 20 * MS  # (woken early by the sleep's measured oversleep)
        st = {s.principal: s for s in dev.statistics().per_principal}
        assert st[P(1)].max_s == pytest.approx(16 * MS, rel=0.01)
        assert st[P(2)].max_s == pytest.approx(20 * MS, rel=0.01)
    finally:
        dev.close()


# -- anticipation (blockdev/anticipation.py) ----------------------------------------------------

#: 12 ms a request, one at a time, no seek; anticipation up to 20 ms (W), and the same
#: device without it. (12 ms: a reader every 100 ms does not fall on the flood's
#: request boundaries.)
ANTIC = "lat=12000,qd=1,antic=20"
NO_ANTIC = "lat=12000,qd=1"


def _antic_dev(tmp_path: Path, spec: str) -> BlockDevice:
    d = tmp_path / spec.replace(",", "_").replace("=", "")
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile=spec)
    return BlockDevice.open(d, scheduler="mclock", timeline_slack=0.0)


async def _periodic_reader(dev: BlockDevice, p: PrincipalId, arrivals: list[float],
                           lat: dict[float, float]) -> None:
    """One read of `p` at each of `arrivals` (each in its own task, as FUSE does);
    `lat[arrival]` is its latency."""
    async def one(t: float) -> None:
        await trio.sleep_until(t)
        await dev.read(3, 1, principal=p)
        lat[t] = trio.current_time() - t

    async with trio.open_nursery() as n:
        for t in arrivals:
            n.start_soon(one, t)


async def _reader_beside_flood(dev: BlockDevice, arrivals: list[float], until: float
                               ) -> tuple[Load, dict[float, float]]:
    """Principal 1 (reserved 15 IOPS) reads at `arrivals` while principal 2 floods with
    two workers until `until`; the flood's Load and the reads' latencies."""
    dev.configure_banks(tree(node(1, io_reserve_iops=15), node(2)))
    load = Load(dev)
    lat: dict[float, float] = {}
    async with trio.open_nursery() as n:
        n.start_soon(lambda: load.flood(P(2), until=until, workers=2))
        n.start_soon(_periodic_reader, dev, P(1), arrivals, lat)
    return load, lat


def _antic_stats(dev: BlockDevice, p: PrincipalId):
    return {s.principal: s for s in dev.statistics().per_principal}[p]


def _ms(lat: dict[float, float], arrivals: list[float]) -> list[float]:
    return [round(lat[t] / MS, 6) for t in arrivals]


@pytest.mark.parametrize("spec", [ANTIC, NO_ANTIC])
async def test_anticipation_serves_a_periodic_reader_at_once(tmp_path: Path, autojump_clock,
                                                             spec: str) -> None:
    """A reader reserved 15 IOPS reads every 100 ms (at 5 ms, 105 ms, ...) beside a
    flood of 12 ms requests. Without anticipation each read waits for the request in
    service: 19, 15 and 23 ms in turn. With it, from the third read on (two arrivals
    make the schedule; the grace is W/4 = 5 ms) the flood's request that would end
    after the read is due is not started, and the read finds the channel free: 12 ms,
    as alone. The idle is exact: 1 ms before the third read (the request from 192 ms
    ends at 204 ms, the next would end past 205), then 4 ms before each (the flood's
    requests end at 301, 401, ... ms), which the flood pays: 7 requests a period."""
    dev = _antic_dev(tmp_path, spec)
    try:
        arrivals = [0.005 + 0.1 * k for k in range(10)]
        load, lat = await _reader_beside_flood(dev, arrivals, until=0.95)
        st = _antic_stats(dev, P(1))
        if spec == NO_ANTIC:
            assert _ms(lat, arrivals) == [19.0, 15.0, 23.0] * 3 + [19.0]
            assert st.anticipated == st.anticipation_missed == 0
            return
        assert _ms(lat, arrivals) == [19.0, 15.0] + [12.0] * 8
        assert st.anticipated == 8 and st.anticipation_missed == 0
        assert st.anticipation_idle_s == pytest.approx((1 + 7 * 4) * MS, abs=1e-9)
        assert load.rate(P(2), 0.317, 0.917) == pytest.approx(70)
    finally:
        dev.close()


async def test_anticipation_is_bounded_and_stops_with_the_reader(tmp_path: Path,
                                                                 autojump_clock) -> None:
    """The reader of the test above reads four times and stops. Its next read was
    predicted at 405 ms: the channel idles from 401 ms (the flood's next request would
    end past it) to 410 ms, the end of the grace, and no longer: one miss of 9 ms (the
    bound W is 20 ms). From then on nothing is held: the flood's requests follow each
    other every 12 ms."""
    dev = _antic_dev(tmp_path, ANTIC)
    try:
        arrivals = [0.005 + 0.1 * k for k in range(4)]
        load, lat = await _reader_beside_flood(dev, arrivals, until=1.0)
        assert _ms(lat, arrivals) == [19.0, 15.0, 12.0, 12.0]
        st = _antic_stats(dev, P(1))
        assert st.anticipated == 2 and st.anticipation_missed == 1
        assert st.anticipation_idle_s == pytest.approx((1 + 4 + 9) * MS, abs=1e-9)
        after = [t for t in sorted(load.done[P(2)]) if t > 0.402]
        assert after[0] == pytest.approx(0.422, abs=1e-9)
        assert all(b - a == pytest.approx(12 * MS, abs=1e-9) for a, b in zip(after, after[1:]))
        assert after[-1] >= 0.99
    finally:
        dev.close()


async def test_a_late_read_costs_at_most_the_bound(tmp_path: Path, autojump_clock) -> None:
    """A read 25 ms late (430 ms instead of 405) finds the hold over (it ran from
    401 to 410 ms) and waits for the request in service, as without anticipation
    (to 434 ms: 16 ms). Then an extra read (537 ms) off the schedule; whatever the
    reader does, the device never idles longer than W (20 ms) while the flood waits,
    and the reads on schedule are served at once again."""
    dev = _antic_dev(tmp_path, ANTIC)
    try:
        arrivals = [0.005, 0.105, 0.205, 0.305, 0.430, 0.505, 0.537, 0.605, 0.705, 0.805,
                    0.905]
        load, lat = await _reader_beside_flood(dev, arrivals, until=0.95)
        got = dict(zip(arrivals, _ms(lat, arrivals)))
        assert got[0.430] == 16.0
        assert [got[t] for t in (0.705, 0.805, 0.905)] == [12.0] * 3
        st = _antic_stats(dev, P(1))
        assert st.anticipation_missed >= 1
        ends = sorted([*load.done[P(2)], *(t + lat[t] for t in arrivals)])
        idle = max(b - a - 12 * MS for a, b in zip(ends, ends[1:]) if b < 0.95)
        assert idle <= 20 * MS + 1e-9
    finally:
        dev.close()


@pytest.mark.parametrize("spec", [ANTIC, NO_ANTIC])
async def test_anticipation_serves_a_dependent_reader(tmp_path: Path, autojump_clock,
                                                      spec: str) -> None:
    """A reader that issues its next read 3 ms after the last returns (think time, as
    the anticipatory scheduler measured it), reserved 100 IOPS, beside a flood: without
    anticipation the flood's next request takes the channel in those 3 ms and every
    read waits 9 ms for it (21 ms); with it, from the third read, the channel waits
    the 3 ms for the read (12 ms, as alone)."""
    dev = _antic_dev(tmp_path, spec)
    try:
        dev.configure_banks(tree(node(1, io_reserve_iops=100), node(2)))
        load = Load(dev)
        lat: list[float] = []

        async def reader() -> None:
            await trio.sleep_until(0.001)
            while trio.current_time() < 0.5:
                t = trio.current_time()
                await dev.read(3, 1, principal=P(1))
                lat.append(round((trio.current_time() - t) / MS, 6))
                await trio.sleep(3 * MS)

        async with trio.open_nursery() as n:
            n.start_soon(lambda: load.flood(P(2), until=0.6, workers=2))
            n.start_soon(reader)
        # the first read waits 11 ms for the flood's first request (0-12 ms)
        if spec == NO_ANTIC:
            assert lat == [23.0] + [21.0] * 20
            return
        assert lat == [23.0, 21.0] + [12.0] * 30
        # 3 ms idle before each read; after the last, the hold runs to the end of the
        # grace (3 + 5 ms) and misses
        st = _antic_stats(dev, P(1))
        assert st.anticipated == 30 and st.anticipation_missed == 1
        assert st.anticipation_idle_s == pytest.approx((30 * 3 + 8) * MS, abs=1e-9)
    finally:
        dev.close()


def test_anticipation_is_a_profile_setting() -> None:
    """On for `hdd` (20 ms), off for the other built-in profiles and for custom specs
    unless `antic=MS` is given; a bad value is refused with the spec's one-line error."""
    assert parse_profile("hdd").anticipation_s == pytest.approx(20e-3)
    for name in ("none", "nvme", "ssd"):
        assert parse_profile(name).anticipation_s == 0
    assert parse_profile("10000,400,0,4").anticipation_s == 0
    assert parse_profile("lat=4200,bw=180,seek=15,qd=1,antic=12.5").anticipation_s \
        == pytest.approx(12.5e-3)
    assert MClockScheduler(parse_profile("lat=100,qd=1"))._antic is None
    for bad in ("lat=1,qd=1,antic=-1", "lat=1,qd=1,antic=nan", "lat=1,qd=1,antic=2000",
                "lat=1,qd=1,antic=x", "1,2,3,4,5,6,7"):
        with pytest.raises(ValueError, match="timing profile"):
            parse_profile(bad)


@pytest.mark.parametrize("ios", [1, 2])
async def test_a_serial_writer_gets_its_whole_limit(dev: BlockDevice, autojump_clock,
                                                    ios: int) -> None:
    """Probe 15, F4: a serial 4 KiB writer under an I/O limit got 40-73% of it. Its
    place at the limit paid for its write, and its device request, made a little after
    the place went (the write's locks, its allocation: 1.5 ms here), advanced the limit
    tags again from the moment it was made: each write's next place started that much
    later. A request its place paid for advances the tags from the place's start."""
    sched = dev.scheduler
    dev.configure_banks(tree(node(1, io_limit_iops=100)))
    done = 0

    async def write() -> None:
        nonlocal done
        with sched.place_scope():
            place = sched.limit_slot(P(1), ios * BS, ios=ios)
            assert place is not None
            await sched.wait_place(place)
            await trio.sleep(0.0015)  # (the locks, the allocation)
            with sched.past_limits():
                for k in range(ios):
                    await dev.write(k, bytes(BS), principal=P(1))
        done += ios

    t0 = trio.current_time()
    while trio.current_time() - t0 < 10.0:
        await write()
        await trio.sleep(0.0002)  # (the reply, the writer's next call)
    assert 980 <= done <= 1010 + ios, done


@pytest.mark.parametrize("profile,iops", [("nvme", 20000), ("ssd", 8000)])
async def test_a_high_reservation_served_alone_counts_as_met(
        tmp_path: Path, autojump_clock, profile: str, iops: int) -> None:
    """A reservation is a rate: a principal reserved 20,000 IOPS on `nvme` (a 50 µs
    interval) reading one block every 10 ms alone on the device completes each read
    in its own service time (~100 µs), and that is served in time. The deadline of a
    request judged at completion allows the time it takes alone on the device
    (review of stop 28, 1: every such read counted as missed)."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS, profile=profile)
    dev = BlockDevice.open(d, scheduler="mclock", timeline_slack=0.0)
    try:
        dev.configure_banks(tree(node(1, io_reserve_iops=iops)))
        for i in range(50):
            await dev.read(i, 1, principal=P(1))
            await trio.sleep(0.01)
        st = {s.principal: s for s in dev.statistics().per_principal}[P(1)]
        assert (st.reservation_met, st.reservation_missed) == (50, 0)
    finally:
        dev.close()
