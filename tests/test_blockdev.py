"""The simulated block device: format/open, the data path, checksums, discard, flush,
the timing model (on trio's MockClock) and per-principal accounting."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from blockdev import (PROFILES, BlockDevice, ChecksumError, ChecksumStore, DeviceError,
                      DeviceFull, FileBacking, FifoScheduler, FormatError, OutOfRange,
                      PrincipalId, parse_profile)
from blockdev.device import BACKING, CHECKSUMS, HEADER

BS = 4096
P0 = PrincipalId(0)
P1 = PrincipalId(1)
P2 = PrincipalId(2)


def make(tmp_path: Path, *, nblocks: int = 64, profile: str = "none",
         block_size: int = BS) -> BlockDevice:
    d = tmp_path / "dev"
    d.mkdir(exist_ok=True)
    BlockDevice.format(d, size=nblocks * block_size, block_size=block_size, profile=profile)
    return BlockDevice.open(d, timeline_slack=0.0)


def pattern(count: int, seed: int, bs: int = BS) -> bytes:
    return b"".join(bytes([(seed + i) % 251 + 1]) * bs for i in range(count))


@pytest.fixture
def dev(tmp_path: Path):
    d = make(tmp_path)
    yield d
    d.close()


# -- format and open ------------------------------------------------------------------


def test_format_open_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    d.mkdir()
    geo = BlockDevice.format(d, size=100 * BS + 123, block_size=BS, profile="ssd")
    assert geo.nblocks == 100 and geo.block_size == BS and geo.size == 100 * BS
    assert (d / BACKING).stat().st_size == 100 * BS
    assert BlockDevice.read_geometry(d) == geo
    dev = BlockDevice.open(d)
    try:
        assert dev.geometry == geo
        assert dev.nblocks == 100 and dev.block_size == BS
        assert dev.profile is PROFILES["ssd"]
    finally:
        dev.close()
    dev = BlockDevice.open(d, profile="hdd")  # override the formatted profile
    try:
        assert dev.profile is PROFILES["hdd"]
    finally:
        dev.close()


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    dev = make(tmp_path)
    await dev.write(5, pattern(3, 7), principal=P0)
    csum = dev.stored_checksum(6)
    await dev.flush()
    dev.close()
    dev.close()  # idempotent
    dev = BlockDevice.open(tmp_path / "dev")
    try:
        assert await dev.read(5, 3, principal=P0) == pattern(3, 7)
        assert dev.stored_checksum(6) == csum != 0
        assert dev.written_blocks().tolist() == [5, 6, 7]
    finally:
        dev.close()


def test_format_rejects_bad_geometry(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="power of two"):
        BlockDevice.format(tmp_path, size=1 << 20, block_size=3000)
    with pytest.raises(FormatError, match="power of two"):
        BlockDevice.format(tmp_path, size=1 << 20, block_size=256)
    with pytest.raises(FormatError, match="too small"):
        BlockDevice.format(tmp_path, size=15 * BS, block_size=BS)
    with pytest.raises(ValueError, match="unknown timing profile"):
        BlockDevice.format(tmp_path, size=1 << 20, block_size=BS, profile="floppy")


def test_open_rejects_missing_or_foreign_header(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="missing"):
        BlockDevice.open(tmp_path)
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=16 * BS)
    h = json.loads((d / HEADER).read_text())
    h["format"] = 99
    (d / HEADER).write_text(json.dumps(h))
    with pytest.raises(FormatError, match="unsupported"):
        BlockDevice.open(d)
    (d / HEADER).write_text("{not json")
    with pytest.raises(FormatError, match="cannot read"):
        BlockDevice.open(d)


# -- data path ----------------------------------------------------------------------------


async def test_read_write_block_ranges(dev: BlockDevice) -> None:
    await dev.write(0, pattern(1, 1), principal=P0)
    await dev.write(10, pattern(4, 2), principal=P0)
    await dev.write(63, pattern(1, 3), principal=P0)  # the last block
    assert await dev.read(0, 1, principal=P0) == pattern(1, 1)
    assert await dev.read(10, 4, principal=P0) == pattern(4, 2)
    assert await dev.read(12, 1, principal=P0) == pattern(4, 2)[2 * BS:3 * BS]
    assert await dev.read(63, 1, principal=P0) == pattern(1, 3)
    # a range spanning written and never-written blocks
    got = await dev.read(8, 8, principal=P0)
    assert got == bytes(2 * BS) + pattern(4, 2) + bytes(2 * BS)
    # overwrite in the middle of a written range
    await dev.write(11, pattern(2, 9), principal=P0)
    assert await dev.read(10, 4, principal=P0) == (pattern(4, 2)[:BS] + pattern(2, 9)
                                                    + pattern(4, 2)[3 * BS:])
    # memoryview and bytearray inputs are accepted
    await dev.write(20, memoryview(bytearray(pattern(2, 4))), principal=P0)
    assert await dev.read(20, 2, principal=P0) == pattern(2, 4)
    assert await dev.read(20, 0, principal=P0) == b""


async def test_never_written_blocks_read_as_zeros(dev: BlockDevice) -> None:
    assert await dev.read(0, 64, principal=P0) == bytes(64 * BS)
    assert dev.written_blocks().tolist() == []
    assert dev.stored_checksum(0) == 0


async def test_zero_filled_write_is_checksummed(dev: BlockDevice) -> None:
    await dev.write(3, bytes(BS), principal=P0)
    assert dev.stored_checksum(3) != 0
    assert dev.written_blocks().tolist() == [3]
    assert await dev.read(3, 1, principal=P0) == bytes(BS)


@pytest.mark.parametrize("block,count", [(64, 1), (63, 2), (-1, 1), (0, 65), (0, -1)])
async def test_out_of_range_read(dev: BlockDevice, block: int, count: int) -> None:
    with pytest.raises(OutOfRange):
        await dev.read(block, count, principal=P0)


@pytest.mark.parametrize("block,count", [(64, 1), (62, 3), (-1, 1)])
async def test_out_of_range_write_and_discard(dev: BlockDevice, block: int, count: int) -> None:
    with pytest.raises(OutOfRange):
        await dev.write(block, pattern(count, 1), principal=P0)
    with pytest.raises(OutOfRange):
        await dev.discard(block, count, principal=P0)
    assert dev.written_blocks().tolist() == []


@pytest.mark.parametrize("nbytes", [1, BS - 1, BS + 1, 3 * BS - 512])
async def test_partial_block_write_is_rejected(dev: BlockDevice, nbytes: int) -> None:
    with pytest.raises(ValueError, match="whole number of blocks"):
        await dev.write(0, b"x" * nbytes, principal=P0)
    assert dev.written_blocks().tolist() == []
    assert await dev.read(0, 4, principal=P0) == bytes(4 * BS)


def _flip(dev: BlockDevice, offset: int) -> None:
    path = dev.directory / BACKING
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


async def test_flipped_byte_raises_checksum_error_naming_the_block(dev: BlockDevice) -> None:
    await dev.write(10, pattern(4, 5), principal=P0)
    _flip(dev, 12 * BS + 100)
    with pytest.raises(ChecksumError, match=r"block 12\b") as ei:
        await dev.read(10, 4, principal=P0)
    assert ei.value.block == 12
    assert "of 4 read" in str(ei.value)
    with pytest.raises(ChecksumError, match=r"block 12\b") as ei:
        await dev.read(12, 1, principal=P0)
    assert ei.value.block == 12
    assert dev.checksum_errors == 2
    assert dev.statistics().checksum_errors == 2
    # the neighbours are still fine
    assert await dev.read(10, 2, principal=P0) == pattern(4, 5)[:2 * BS]
    assert await dev.read(13, 1, principal=P0) == pattern(4, 5)[3 * BS:]
    # rewriting the block heals it
    await dev.write(12, pattern(1, 77), principal=P0)
    assert await dev.read(12, 1, principal=P0) == pattern(1, 77)


async def test_garbage_in_never_written_block_is_detected(dev: BlockDevice) -> None:
    _flip(dev, 7 * BS)
    with pytest.raises(ChecksumError) as ei:
        await dev.read(5, 4, principal=P0)
    assert ei.value.block == 7
    assert "block 7" in str(ei.value)


async def test_discard_reads_zeros_and_resets_checksum(dev: BlockDevice) -> None:
    await dev.write(4, pattern(6, 3), principal=P0)
    await dev.discard(5, 3, principal=P0)
    assert [dev.stored_checksum(b) for b in range(5, 8)] == [0, 0, 0]
    assert dev.stored_checksum(4) != 0 and dev.stored_checksum(8) != 0
    assert dev.written_blocks().tolist() == [4, 8, 9]
    got = await dev.read(4, 6, principal=P0)
    assert got == pattern(6, 3)[:BS] + bytes(3 * BS) + pattern(6, 3)[4 * BS:]
    await dev.discard(0, 0, principal=P0)  # nothing
    # a discarded block can be written again
    await dev.write(6, pattern(1, 11), principal=P0)
    assert await dev.read(6, 1, principal=P0) == pattern(1, 11)


async def test_discard_runs_is_one_request_writing_each_checksum_page_once(
        tmp_path: Path) -> None:
    """A commit's freed blocks go down as one discard: one scheduler request, a hole per
    run, and the checksum pages they touch written once each (runs on touching pages in
    one write); the result is the same as one discard per run, also after a reopen."""
    dev = make(tmp_path, nblocks=4096)
    runs = [(3, 1), (10, 1), (600, 2), (1500, 1), (3800, 1)]
    try:
        for b, c in runs:
            await dev.write(b - 1, pattern(c + 2, b), principal=P1)
        pages: list[tuple[int, int]] = []
        inner = dev.checksums.backing.write

        async def write(offset: int, data: memoryview) -> None:
            pages.append((offset, len(data)))
            await inner(offset, data)

        dev.checksums.backing.write = write  # type: ignore[method-assign]
        await dev.discard_runs(runs, principal=P2)
        # entries 3..1500 lie on the first three 4 KiB pages (touching: one write),
        # entry 3800 on the eighth
        assert pages == [(0, 3 * 4096), (7 * 4096, 4096)]
        by = {s.principal: s for s in dev.statistics().per_principal}
        assert by[P2].discards == 1
        await dev.flush()
    finally:
        dev.close()
    dev = BlockDevice.open(tmp_path / "dev")
    try:
        for b, c in runs:
            assert [dev.stored_checksum(x) for x in range(b, b + c)] == [0] * c
            assert dev.stored_checksum(b - 1) != 0 and dev.stored_checksum(b + c) != 0
            got = await dev.read(b - 1, c + 2, principal=P0)
            want = pattern(c + 2, b)
            assert got == want[:BS] + bytes(c * BS) + want[(c + 1) * BS:]
    finally:
        dev.close()


class _SlowWrapper:
    """A backing wrapper (not a FileBacking: the device punches run by run through its
    `discard`) whose discard holds the loop a quarter of DISCARD_STEP_SECONDS."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.can_discard = inner.can_discard
        self.punched: list[int] = []
        self.ticks = 0
        self.during = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def discard(self, offset: int, length: int) -> None:
        import time

        from blockdev.device import DISCARD_STEP_SECONDS
        time.sleep(DISCARD_STEP_SECONDS / 4)
        self.punched.append(self.ticks)
        await self.inner.discard(offset, length)


@pytest.mark.parametrize("backing", ["wrapper", "file"])
async def test_discard_runs_gives_the_loop_back_between_punches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backing: str) -> None:
    """A discard of many runs is one request, but the event loop keeps running: through
    a wrapper the device gives it back every DISCARD_STEP_SECONDS between two punches
    (as the request per run did); on a FileBacking the punches run in a worker thread
    (each may wait for the host's journal). Every run is discarded either way."""
    import time

    import blockdev.backing as backing_mod
    from blockdev.device import DISCARD_STEP_SECONDS
    dev = make(tmp_path, nblocks=256)
    runs = [(b, 1) for b in range(0, 200, 10)]
    try:
        for b, _c in runs:
            await dev.write(b, pattern(1, b), principal=P0)
        w = _SlowWrapper(dev.data)
        if backing == "wrapper":
            dev.data = w  # type: ignore[assignment]
        else:
            punch = backing_mod.punch_hole

            def slow_punch(fd: int, offset: int, length: int) -> None:
                t0 = w.ticks
                time.sleep(DISCARD_STEP_SECONDS / 4)
                w.during += w.ticks - t0  # the loop ran while this punch waited
                w.punched.append(w.ticks)
                punch(fd, offset, length)

            monkeypatch.setattr(backing_mod, "punch_hole", slow_punch)

        async def ticker() -> None:
            while True:
                w.ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            await dev.discard_runs(runs, principal=P0)
            nursery.cancel_scope.cancel()
        assert len(w.punched) == len(runs)
        # 20 punches of a quarter step each: the ticker ran between them several times
        assert w.punched[-1] - w.punched[0] >= 3, w.punched
        if backing == "file":  # in a thread: the loop runs during the punches too
            assert w.during > 0
        assert all(dev.stored_checksum(b) == 0 for b, _c in runs)
        for b, _c in runs:
            assert await dev.read(b, 1, principal=P0) == bytes(BS)
    finally:
        dev.data = w.inner
        dev.close()


async def test_flush(dev: BlockDevice) -> None:
    await dev.write(1, pattern(2, 1), principal=P0)
    await dev.flush()
    # after a flush the checksum file on disk holds the new checksums
    import numpy as np
    on_disk = np.load(dev.directory / CHECKSUMS)
    assert int(on_disk[1]) == dev.stored_checksum(1) != 0
    assert int(on_disk[2]) == dev.stored_checksum(2) != 0
    with open(dev.directory / BACKING, "rb") as f:
        f.seek(BS)
        assert f.read(2 * BS) == pattern(2, 1)


# -- timing model -------------------------------------------------------------------------


def ssd_read(n: int) -> float:
    return 150e-6 + n / 500e6


async def test_instant_profile_takes_no_virtual_time(dev: BlockDevice, autojump_clock) -> None:
    t0 = trio.current_time()
    await dev.write(0, pattern(8, 1), principal=P0)
    await dev.read(0, 8, principal=P0)
    assert trio.current_time() == t0


async def test_ssd_service_times(tmp_path: Path, autojump_clock) -> None:
    dev = make(tmp_path, profile="ssd")
    try:
        t0 = trio.current_time()
        await dev.read(3, 1, principal=P0)
        t1 = trio.current_time()
        assert t1 - t0 == pytest.approx(150e-6 + BS / 500e6, rel=1e-9)
        await dev.write(3, pattern(4, 1), principal=P0)
        t2 = trio.current_time()
        assert t2 - t1 == pytest.approx(150e-6 + 50e-6 + 4 * BS / 500e6, rel=1e-9)
        await dev.read(40, 16, principal=P0)  # no seek cost on flash
        assert trio.current_time() - t2 == pytest.approx(ssd_read(16 * BS), rel=1e-9)
    finally:
        dev.close()


async def test_hdd_service_times_include_seek(tmp_path: Path, autojump_clock) -> None:
    n = 64
    dev = make(tmp_path, nblocks=n, profile="hdd")
    base = 4.2e-3 + BS / 180e6
    try:
        t0 = trio.current_time()
        await dev.read(0, 1, principal=P0)  # head at 0: no seek
        t1 = trio.current_time()
        assert t1 - t0 == pytest.approx(base, rel=1e-9)
        await dev.read(1, 1, principal=P0)  # sequential: the head is already there
        t2 = trio.current_time()
        assert t2 - t1 == pytest.approx(base, rel=1e-9)
        await dev.read(n - 1, 1, principal=P0)  # long seek from 2 to n-1
        t3 = trio.current_time()
        assert t3 - t2 == pytest.approx(base + 15e-3 * ((n - 3) / n) ** 0.5, rel=1e-9)
        await dev.write(0, pattern(1, 1), principal=P0)  # hdd writes cost the same as reads
        t4 = trio.current_time()
        assert t4 - t3 == pytest.approx(base + 15e-3 * 1.0, rel=1e-9)
    finally:
        dev.close()


async def _concurrently(dev: BlockDevice, jobs: list[tuple[int, int, PrincipalId]]) -> float:
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for block, count, p in jobs:
            nursery.start_soon(lambda b=block, c=count, p=p: dev.read(b, c, principal=p))
    return trio.current_time() - t0


async def test_hdd_queue_depth_one_serialises(tmp_path: Path, autojump_clock) -> None:
    n = 64
    dev = make(tmp_path, nblocks=n, profile="hdd")
    try:
        # Four reads of block 0: the first finds the head at 0, each later one seeks back
        # one block (the head rests after the block it read), whatever the order.
        elapsed = await _concurrently(dev, [(0, 1, P0)] * 4)
        base = 4.2e-3 + BS / 180e6
        assert elapsed == pytest.approx(4 * base + 3 * 15e-3 * (1 / n) ** 0.5, rel=1e-9)
    finally:
        dev.close()


async def test_ssd_deep_queue_overlaps(tmp_path: Path, autojump_clock) -> None:
    """Channels overlap their access times; transfers share the one bus."""
    dev = make(tmp_path, profile="ssd")
    xfer = BS / 500e6
    try:
        elapsed = await _concurrently(dev, [(i, 1, P0) for i in range(4)])
        assert elapsed == pytest.approx(150e-6 + 4 * xfer, rel=1e-9)
        elapsed = await _concurrently(dev, [(i, 1, P0) for i in range(32)])
        assert elapsed == pytest.approx(150e-6 + 32 * xfer, rel=1e-9)
        # one more than the queue depth waits for a channel (free after 158 us), and
        # its transfer then waits for the bus
        elapsed = await _concurrently(dev, [(i, 1, P0) for i in range(33)])
        assert elapsed == pytest.approx(150e-6 + 33 * xfer, rel=1e-9)
        # large requests are bandwidth-bound whatever the depth: 8 x 1 MiB at 500 MB/s
        elapsed = await _concurrently(dev, [(0, 16, P0) for i in range(8)])
        assert elapsed == pytest.approx(150e-6 + 8 * 16 * xfer, rel=1e-9)
    finally:
        dev.close()


@pytest.mark.parametrize("depth,rounds", [(1, 4), (2, 2), (3, 2), (4, 1), (8, 1)])
async def test_queue_depth_limits_concurrency(tmp_path: Path, autojump_clock, depth: int,
                                              rounds: int) -> None:
    # custom: 100 us per request, unlimited bandwidth, no seek
    dev = make(tmp_path, profile=f"100,0,0,{depth}")
    try:
        elapsed = await _concurrently(dev, [(i * 3, 2, P0) for i in range(4)])
        assert elapsed == pytest.approx(rounds * 100e-6, rel=1e-9)
    finally:
        dev.close()


async def test_queue_depth_is_never_exceeded(tmp_path: Path, autojump_clock) -> None:
    dev = make(tmp_path, profile="100,0,0,3")
    active = peak = 0
    sched = dev.scheduler
    orig = sched.slot

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def counting_slot(*a, **kw):
        nonlocal active, peak
        async with orig(*a, **kw) as chosen:
            active += 1
            peak = max(peak, active)
            try:
                yield chosen  # the modeled time the scheduler chose the request
            finally:
                active -= 1

    sched.slot = counting_slot  # type: ignore[method-assign]
    try:
        await _concurrently(dev, [(i, 1, P0) for i in range(10)])
        assert peak == 3
    finally:
        dev.close()


async def test_per_principal_statistics(tmp_path: Path, autojump_clock) -> None:
    dev = make(tmp_path, profile="ssd")
    try:
        await dev.write(0, pattern(2, 1), principal=P1)
        await dev.write(8, pattern(1, 1), principal=P1)
        await dev.read(0, 2, principal=P1)
        await dev.read(0, 1, principal=P2)
        await dev.read(0, 3, principal=P2)
        await dev.read(4, 1, principal=P2)
        await dev.discard(0, 2, principal=P2)  # a discard is a request of its own kind
        st = dev.statistics()
        assert st.profile == "ssd" and st.scheduler == "mclock"
        assert st.block_size == BS and st.nblocks == 64
        by = {s.principal: s for s in st.per_principal}
        assert set(by) == {P1, P2}
        assert (by[P1].reads, by[P1].writes) == (1, 2)
        assert (by[P1].bytes_read, by[P1].bytes_written) == (2 * BS, 3 * BS)
        assert (by[P2].reads, by[P2].writes, by[P2].discards) == (3, 0, 1)
        assert (by[P1].ops, by[P2].ops) == (3, 4)
        assert (by[P2].bytes_read, by[P2].bytes_written) == (5 * BS, 0)
        # latencies: every P2 read took at least one ssd service time
        assert by[P2].max_s == pytest.approx(ssd_read(3 * BS), rel=1e-9)
        assert ssd_read(BS) <= by[P2].p50_s <= 2 * ssd_read(3 * BS)
        assert by[P2].p50_s <= by[P2].p99_s
    finally:
        dev.close()


async def test_queueing_counts_in_latency(tmp_path: Path, autojump_clock) -> None:
    dev = make(tmp_path, profile="1000,0,0,1")
    try:
        await _concurrently(dev, [(0, 1, P1), (1, 1, P1), (2, 1, P1)])
        (st,) = dev.statistics().per_principal
        assert st.reads == 3
        # the last request waited for two others: 3 ms from arrival to completion
        assert st.max_s == pytest.approx(3e-3, rel=1e-9)
    finally:
        dev.close()


# -- profiles ------------------------------------------------------------------------------


def test_parse_profile_named_and_custom() -> None:
    for name, prof in PROFILES.items():
        assert parse_profile(name) is prof
    p = parse_profile("250,400,12,8")
    assert p.latency_s == pytest.approx(250e-6)
    assert p.bandwidth_bps == pytest.approx(400e6)
    assert p.full_seek_s == pytest.approx(12e-3)
    assert p.queue_depth == 8
    assert p.write_latency_s == 0.0
    assert p.name == "custom:250,400,12,8"
    assert not p.is_instant
    assert p.service_time(4_000_000, write=False) == pytest.approx(250e-6 + 0.01)
    assert p.service_time(0, write=True, seek_fraction=0.25) == pytest.approx(250e-6 + 6e-3)
    assert p.service_time(0, write=True, seek_fraction=4.0) == pytest.approx(250e-6 + 12e-3)
    assert parse_profile("0,0,0,4").is_instant
    assert PROFILES["none"].is_instant


@pytest.mark.parametrize("spec", ["", "fast", "1,2,3", "1,2,3,4,5,6,7", "a,b,c,d", "1,2,3,4.5",
                                  "SSD"])
def test_parse_profile_rejects_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown timing profile"):
        parse_profile(spec)


def test_block_size_512(tmp_path: Path) -> None:
    dev = make(tmp_path, nblocks=32, block_size=512)

    async def main() -> None:
        await dev.write(31, b"z" * 512, principal=P0)
        assert await dev.read(31, 1, principal=P0) == b"z" * 512
        with pytest.raises(ValueError):
            await dev.write(0, b"z" * 4096 + b"1", principal=P0)
    try:
        trio.run(main)
    finally:
        dev.close()
    assert os.path.getsize(tmp_path / "dev" / BACKING) == 32 * 512


# -- the backing-store seam ------------------------------------------------------------------


def _device_on(tmp_path: Path, image: Path, nblocks: int) -> BlockDevice:
    """A device in tmp_path/dev whose data lives in `image` (a `--device` style path)."""
    with open(image, "wb") as f:
        f.truncate(nblocks * BS)
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=nblocks * BS, block_size=BS, backing=str(image))
    return BlockDevice.open(d, timeline_slack=0.0)


async def test_device_is_built_from_injected_parts(tmp_path: Path, autojump_clock) -> None:
    d = tmp_path / "dev"
    d.mkdir()
    geo = BlockDevice.format(d, size=32 * BS, block_size=BS)
    data = FileBacking(d / BACKING)
    store = ChecksumStore.load(FileBacking(d / CHECKSUMS), geo.nblocks)
    sched = FifoScheduler(1)
    dev = BlockDevice(geo, parse_profile("1000,0,0,1"), data=data, checksums=store,
                      scheduler=sched, timeline_slack=0.0)
    try:
        assert dev.scheduler is sched and dev.data is data and dev.checksums is store
        t0 = trio.current_time()
        await dev.write(3, pattern(2, 5), principal=P1)
        assert trio.current_time() - t0 == pytest.approx(1e-3)
        assert await dev.read(3, 2, principal=P1) == pattern(2, 5)
        assert sched.statistics()[0].writes == 1
    finally:
        dev.close()
    with pytest.raises(FormatError, match="16 entries, device has 32 blocks"):
        other = tmp_path / "other"
        other.mkdir()
        BlockDevice.format(other, size=16 * BS, block_size=BS)
        BlockDevice(geo, PROFILES["none"], data=FileBacking(d / BACKING),
                    checksums=ChecksumStore.load(FileBacking(other / CHECKSUMS), 16))


def test_checksum_file_format_is_checked(tmp_path: Path) -> None:
    import numpy as np

    def save(arr: np.ndarray) -> None:
        with open(d / CHECKSUMS, "wb") as f:  # (np.save to a path would add ".npy")
            np.save(f, arr)
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=32 * BS, block_size=BS)
    # a file written by plain numpy (as format 1 always was) opens
    save(np.arange(32, dtype="<u8") * 0)
    BlockDevice.open(d).close()
    save(np.zeros(32, dtype="<u4"))
    with pytest.raises(FormatError, match="not one little-endian uint64"):
        BlockDevice.open(d)
    save(np.zeros(31, dtype="<u8"))
    with pytest.raises(FormatError, match="31 entries, device has 32"):
        BlockDevice.open(d)
    save(np.zeros(32, dtype="<u8"))
    with open(d / CHECKSUMS, "r+b") as f:
        f.truncate(os.path.getsize(d / CHECKSUMS) - 8)
    with pytest.raises(FormatError, match="truncated"):
        BlockDevice.open(d)
    (d / CHECKSUMS).write_bytes(b"garbage" * 10)
    with pytest.raises(FormatError, match="not readable"):
        BlockDevice.open(d)


async def test_host_filesystem_full_is_enospc(tmp_path: Path, small_tmpfs) -> None:
    """A sparse backing file on a full filesystem: the write fails with DeviceFull
    (ENOSPC) naming its first block — including a write the host cut short — and what
    landed of it never reads back as data."""
    dev = _device_on(tmp_path, small_tmpfs("256k") / "img", nblocks=256)  # 1 MiB on 256 KiB
    try:
        with pytest.raises(DeviceFull) as ei:
            await dev.write(0, pattern(128, 1), principal=P0)  # 512 KiB: cut short
        assert ei.value.errno == errno.ENOSPC and ei.value.block == 0
        assert "full" in str(ei.value) and "block 0+128" in str(ei.value)
        # the blocks that did land are not data: no checksum was ever set for them
        assert dev.written_blocks().tolist() == []
        with pytest.raises(ChecksumError):
            await dev.read(0, 1, principal=P0)
        with pytest.raises(DeviceFull):
            await dev.write(200, pattern(1, 2), principal=P0)  # a block of its own
        assert dev.statistics().io_errors == 2
        # space comes back when blocks are discarded, and the device works again
        await dev.discard(0, 128, principal=P0)
        await dev.write(200, pattern(1, 2), principal=P0)
        assert await dev.read(200, 1, principal=P0) == pattern(1, 2)
        assert await dev.read(0, 4, principal=P0) == bytes(4 * BS)
    finally:
        dev.close()


async def test_failed_hole_punch_is_an_error(tmp_path: Path) -> None:
    """The host refusing to punch a hole (here: an immutable backing file, EPERM) is a
    DeviceError; the blocks keep their data and checksums, nothing is ignored."""
    dev = make(tmp_path)
    img = tmp_path / "dev" / BACKING
    try:
        await dev.write(4, pattern(2, 6), principal=P0)
        if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        try:
            with pytest.raises(DeviceError) as ei:
                await dev.discard(4, 2, principal=P0)
        finally:
            subprocess.run(["chattr", "-i", str(img)], check=True)
        assert ei.value.errno == errno.EPERM and ei.value.block == 4
        assert "discard at device block 4+2" in str(ei.value)
        assert dev.stored_checksum(4) != 0
        assert await dev.read(4, 2, principal=P0) == pattern(2, 6)
    finally:
        dev.close()


def test_backing_file_shorter_than_the_device_is_refused(tmp_path: Path) -> None:
    """A truncated device.img would read its lost blocks as zeros that fail their
    checksums one by one; refuse it at open with one line instead."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=32 * BS, block_size=BS)
    os.truncate(d / BACKING, 20 * BS)
    with pytest.raises(FormatError, match=f"holds {20 * BS} bytes, the device needs {32 * BS}"):
        BlockDevice.open(d)


async def test_write_cache_defers_program_time_to_the_flush(tmp_path: Path,
                                                            autojump_clock) -> None:
    """With a write cache (timing only) a write costs its command latency; the program
    time it skipped is paid by the next flush, or by the write that finds it full."""
    dev = make(tmp_path, profile="lat=100,qd=1,wlat=400,wcache=0.0078125")  # 8 KiB cache
    try:
        t0 = trio.current_time()
        await dev.write(0, pattern(1, 1), principal=P1)
        await dev.write(1, pattern(1, 2), principal=P1)
        t1 = trio.current_time()
        assert t1 - t0 == pytest.approx(2 * 100e-6, rel=1e-9)
        await dev.flush(principal=P2)
        t2 = trio.current_time()
        assert t2 - t1 == pytest.approx(100e-6 + 2 * 400e-6, rel=1e-9)
        await dev.write(2, pattern(2, 3), principal=P1)  # fills the cache
        await dev.write(4, pattern(1, 3), principal=P1)  # full: pays its own and what is owed
        t3 = trio.current_time()
        assert t3 - t2 == pytest.approx(100e-6 + (500e-6 + 400e-6), rel=1e-9)
        assert await dev.read(0, 2, principal=P1) == pattern(1, 1) + pattern(1, 2)
        st = {s.principal: s for s in dev.statistics().per_principal}
        assert st[P2].flushes == 1 and st[P1].writes == 4
    finally:
        dev.close()


def test_parse_custom_profiles() -> None:
    p = parse_profile("lat=2000,bw=50,seek=4,qd=2,wlat=500,wcache=16")
    assert (p.latency_s, p.bandwidth_bps, p.full_seek_s, p.queue_depth) == (2e-3, 50e6, 4e-3, 2)
    assert p.write_latency_s == 500e-6 and p.write_cache_bytes == 16 << 20
    assert parse_profile("250,400,12,8,30").write_latency_s == pytest.approx(30e-6)
    for bad in ("lat=1", "qd=2,lat=1,lat=2", "lat=-1,qd=1", "lat=1,qd=0", "x=1,lat=1,qd=1",
                "lat=nan,qd=1"):
        with pytest.raises(ValueError, match="timing profile"):
            parse_profile(bad)


async def test_timeline_slack_keeps_sequential_requests_in_sequence(tmp_path: Path,
                                                                    autojump_clock) -> None:
    """With the default slack, short requests return before their modeled completion
    without sleeping; a sequential stream — even one whose every request comes from a
    new task, as through FUSE — still takes its service times one after the other on
    the model, and each records its modeled latency; parallel requests overlap."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=64 * BS, block_size=BS, profile="ssd")
    dev = BlockDevice.open(d)  # timeline_slack 1 ms
    try:
        t0 = trio.current_time()
        for i in range(5):  # 5 x 158 us: under the slack, no sleep
            async with trio.open_nursery() as n:
                n.start_soon(lambda i=i: dev.read(i, 1, principal=P1))
        assert trio.current_time() == t0
        for i in range(5, 10):  # the timeline passes the slack: sleeps begin
            async with trio.open_nursery() as n:
                n.start_soon(lambda i=i: dev.read(i, 1, principal=P1))
        assert max(dev._chan_end) - t0 == pytest.approx(10 * ssd_read(BS), rel=1e-9)
        assert dev.timeline_sleeps >= 1
        (st,) = dev.statistics().per_principal
        assert st.max_s == pytest.approx(ssd_read(BS), rel=1e-6)
        # eight in parallel from another principal overlap their access times
        await trio.sleep(0.01)
        t1 = trio.current_time()
        await _concurrently(dev, [(i, 1, P2) for i in range(8)])
        assert max(dev._chan_end) - t1 == pytest.approx(150e-6 + 8 * BS / 500e6, rel=1e-9)
    finally:
        dev.close()


# -- ordering of claimed writes, direct writes -----------------------------------------

async def test_read_of_claimed_blocks_waits_for_the_claimed_write(dev: BlockDevice) -> None:
    """A write acknowledged before it lands (the pager's write-behind) claims its
    blocks: a read of them waits for it and sees the new data, and a write that comes
    after the claim lands after it."""
    import functools
    from trio.testing import wait_all_tasks_blocked
    await dev.write(0, pattern(4, 1), principal=P0)
    claim = dev.claim(0, 4)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await dev.read(2, 1, principal=P1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(functools.partial(dev.write, 1, pattern(1, 5), principal=P2))
        await wait_all_tasks_blocked()
        assert got == [] and dev.data.pread(BS, BS) == pattern(4, 1)[BS:2 * BS]  # both wait
        await dev.write(0, pattern(4, 9), principal=P0, claim=claim)
    assert got == [pattern(4, 9)[2 * BS:3 * BS]]
    assert await dev.read(0, 4, principal=P0) == (pattern(4, 9)[:BS] + pattern(1, 5)
                                                  + pattern(4, 9)[2 * BS:])



# -- host space and large writes ---------------------------------------------------------

def _host_bytes(path: Path) -> int:
    """Bytes the host filesystem has allocated under a (sparse) file."""
    return os.stat(path).st_blocks * 512


async def test_host_space_is_reserved_in_whole_chunks_until_a_discard(tmp_path: Path) -> None:
    """`reserve` makes the host allocate the whole aligned chunks
    (RESERVE_CHUNK_BYTES) under the blocks asked for, so a stream of allocations costs
    one fallocate per chunk; a discard in a chunk punches its hole, and from then on a
    reservation in that chunk takes its range and a window ahead of it: reserving the
    chunk whole again refilled on the host the holes punched for freed blocks (probe 15,
    F1: an empty volume kept 54 MiB to 1.3 GiB of the host after churn). Contents never
    change."""
    from blockdev.device import RESERVE_CHUNK_BYTES, RESERVE_WINDOW_BYTES
    chunk = RESERVE_CHUNK_BYTES // BS
    dev = make(tmp_path, nblocks=3 * chunk + 5)  # three chunks and a short last one
    img = tmp_path / "dev" / BACKING

    def host(want: int) -> bool:  # (st_blocks also counts the host's extent tree)
        return want <= _host_bytes(img) < want + 64 * 1024

    try:
        await dev.write(3, pattern(1, 7), principal=P0)
        assert host(BS)
        dev.reserve(5, 2)
        assert host(RESERVE_CHUNK_BYTES)  # the whole first chunk
        dev.reserve(chunk - 1, 2)  # straddles into the second chunk: both
        assert host(2 * RESERVE_CHUNK_BYTES)
        dev.reserve(3 * chunk + 1, 1)  # the last chunk is clipped to the device
        assert host(2 * RESERVE_CHUNK_BYTES + 5 * BS)
        assert await dev.read(3, 1, principal=P0) == pattern(1, 7)  # kept
        assert await dev.read(5, 2, principal=P0) == bytes(2 * BS)
        # a discard gives back what it covers; a reserve in that chunk then takes its
        # range and a window ahead of it (RESERVE_WINDOW_BYTES: the allocator's next
        # blocks, reserved without a system call each), never the holes behind it
        await dev.discard(8, 4, principal=P0)
        assert host(2 * RESERVE_CHUNK_BYTES + BS)
        assert not dev.host_reserved(9, 1)
        dev.reserve(9, 1)
        assert host(2 * RESERVE_CHUNK_BYTES + 4 * BS)  # 9, 10, 11; block 8 stays a hole
        window = RESERVE_WINDOW_BYTES // BS
        assert dev.host_reserved(9, window) and not dev.host_reserved(9, window + 1)
        assert not dev.host_reserved(8, 1)
        dev.reserve(8, 2)
        assert host(2 * RESERVE_CHUNK_BYTES + 5 * BS)
        await dev.discard(100, 1, principal=P0)  # a punch closes the window
        assert not dev.host_reserved(9, 1)
        assert await dev.read(3, 1, principal=P0) == pattern(1, 7)
        assert await dev.read(8, 4, principal=P0) == bytes(4 * BS)
        with pytest.raises(OutOfRange):
            dev.reserve(3 * chunk + 4, 2)
    finally:
        dev.close()


async def test_reserve_falls_back_to_the_range_when_the_host_lacks_a_chunk(
        tmp_path: Path, small_tmpfs) -> None:
    """On a host with less room than a chunk, `reserve` still reserves exactly what
    is asked for while it fits, and raises ENOSPC (nothing acknowledged yet: the
    caller is allocating) when it does not; writes into what was reserved succeed."""
    dev = _device_on(tmp_path, small_tmpfs("1m") / "img", nblocks=8192)  # 32 MiB on 1 MiB
    try:
        dev.reserve(16, 32)  # 128 KiB: no room for 16 MiB, room for this
        assert 32 * BS <= _host_bytes(Path(dev.data.name)) < 64 * BS
        with pytest.raises(OSError) as ei:
            dev.reserve(1000, 1024)  # 4 MiB
        assert ei.value.errno == errno.ENOSPC
        await dev.write(16, pattern(32, 3), principal=P0)
        assert await dev.read(16, 32, principal=P0) == pattern(32, 3)
    finally:
        dev.close()
