"""The power-loss recorder (blockdev/recording.py): every write and barrier of a device's
data and checksum store in one log, and the materialiser that produces the states a
power loss could leave — all writes before the last barrier kept, each later one kept
or dropped block by block. Round trips with all, none and some post-barrier writes,
seeds, crash points, flushes racing with writes (on MockClock), a torn log tail, and a
recording made by a mounted daemon."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import trio

from blockdev import (BlockDevice, ChecksumError, DeviceError, FaultPlan, FaultyBacking,
                      FileBacking, FormatError, PrincipalId, Recording, RecordLog)
from blockdev.checksums import PAGE
from blockdev.device import BACKING, CHECKSUMS, HEADER
from blockdev.recording import Unit
from conftest import make_volume, sluice

BS = 4096
P0 = PrincipalId(0)


def pattern(count: int, seed: int) -> bytes:
    return b"".join(bytes([(seed + i) % 251 + 1]) * BS for i in range(count))


def snapshot(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in (BACKING, CHECKSUMS)}


def open_state(tmp_path: Path, src: Path, paths: dict[str, Path], name: str) -> BlockDevice:
    """A device directory made of `src`'s header and a materialised state."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src / HEADER, d / HEADER)
    for n, p in paths.items():
        shutil.copy(p, d / n)
    return BlockDevice.open(d)


@pytest.fixture
def recorded(tmp_path: Path):
    """A device recorded while it: writes blocks 1-2 and 40, flushes (the barrier),
    overwrites block 1, writes block 3, discards block 40. Yields (recording, device
    directory, files at the barrier, files at the end)."""
    async def run() -> tuple[dict[str, bytes], dict[str, bytes]]:
        d = tmp_path / "dev"
        d.mkdir()
        BlockDevice.format(d, size=64 * BS, block_size=BS)
        dev = BlockDevice.open(d, recorder=RecordLog.create(tmp_path / "rec"))
        try:
            await dev.write(1, pattern(2, 1), principal=P0)
            await dev.write(40, pattern(1, 9), principal=P0)
            await dev.flush()
            at_barrier = snapshot(d)
            await dev.write(1, pattern(1, 5), principal=P0)
            await dev.write(3, pattern(1, 7), principal=P0)
            await dev.discard(40, 1, principal=P0)
            return at_barrier, snapshot(d)
        finally:
            dev.close()
    at_barrier, at_end = trio.run(run)
    return Recording.load(tmp_path / "rec"), tmp_path / "dev", at_barrier, at_end


def test_log_holds_data_and_checksum_writes_and_barriers_in_order(recorded) -> None:
    rec, _d, _b, _e = recorded
    assert [b.name for b in rec.backings] == [BACKING, CHECKSUMS]
    assert rec.backings[0].unit == BS and rec.backings[1].unit == PAGE
    kinds = [(r.kind, rec.backings[r.backing].name) for r in rec.records[2:]]
    W, D, B = 2, 3, 4
    assert kinds == [(W, BACKING), (W, CHECKSUMS),        # write 1-2: data, then its sums
                     (W, BACKING), (W, CHECKSUMS),        # write 40
                     (B, BACKING), (B, CHECKSUMS),        # flush: data first, then sums
                     (W, BACKING), (W, CHECKSUMS),        # overwrite 1
                     (W, BACKING), (W, CHECKSUMS),        # write 3
                     (D, BACKING), (W, CHECKSUMS)]        # discard 40
    assert rec.barriers == 2
    # the post-barrier pieces a power loss may keep or drop, one per block / page
    assert rec.choices() == [Unit(8, BACKING, 1), Unit(9, CHECKSUMS, 0),
                             Unit(10, BACKING, 3), Unit(11, CHECKSUMS, 0),
                             Unit(12, BACKING, 40), Unit(13, CHECKSUMS, 0)]


def test_materialise_all_is_the_final_state(recorded, tmp_path: Path) -> None:
    rec, _d, _b, at_end = recorded
    paths = rec.materialise(tmp_path / "all", keep=set(rec.choices()))
    assert {n: p.read_bytes() for n, p in paths.items()} == at_end


def test_materialise_none_is_the_state_at_the_barrier(recorded, tmp_path: Path) -> None:
    rec, d, at_barrier, _e = recorded
    paths = rec.materialise(tmp_path / "none", keep=set())
    assert {n: p.read_bytes() for n, p in paths.items()} == at_barrier

    async def check() -> None:
        dev = open_state(tmp_path, d, paths, "none-dev")
        try:
            assert await dev.read(1, 3, principal=P0) == pattern(2, 1) + bytes(BS)
            assert await dev.read(40, 1, principal=P0) == pattern(1, 9)  # discard undone
        finally:
            dev.close()
    trio.run(check)


def test_materialise_some_keeps_exactly_the_chosen_blocks(recorded, tmp_path: Path) -> None:
    rec, d, _b, _e = recorded
    # Keep the overwrite of block 1 with its checksum page, the data of block 3 without
    # its checksum page, and the discard of 40 without its checksum page.
    keep = {Unit(8, BACKING, 1), Unit(9, CHECKSUMS, 0), Unit(10, BACKING, 3),
            Unit(12, BACKING, 40)}
    paths = rec.materialise(tmp_path / "some", keep=keep)
    img = paths[BACKING].read_bytes()
    assert img[BS:2 * BS] == pattern(1, 5)            # kept
    assert img[2 * BS:3 * BS] == pattern(2, 1)[BS:]   # never touched after the barrier
    assert img[3 * BS:4 * BS] == pattern(1, 7)        # kept
    assert img[40 * BS:41 * BS] == bytes(BS)          # the discard kept
    sums = np.load(paths[CHECKSUMS])
    # page 0 as written by record 9 (after the overwrite of 1, before the write of 3)
    assert sums[3] == 0 and sums[1] != 0 and sums[40] != 0

    async def check() -> None:
        dev = open_state(tmp_path, d, paths, "some-dev")
        try:
            assert await dev.read(1, 2, principal=P0) == pattern(1, 5) + pattern(2, 1)[BS:]
            # data without its checksum: a power-loss state the layers above must cope
            # with (issue 6, item 8); the device reports it, never returns it as data
            with pytest.raises(ChecksumError):
                await dev.read(3, 1, principal=P0)
            with pytest.raises(ChecksumError):
                await dev.read(40, 1, principal=P0)
        finally:
            dev.close()
    trio.run(check)


def test_seeded_states_are_repeatable_and_vary(recorded, tmp_path: Path) -> None:
    rec, _d, _b, _e = recorded
    states = []
    for i, seed in enumerate([1, 1, 2, 3, 4, 5, 6]):
        paths = rec.materialise(tmp_path / f"s{i}", seed=seed)
        states.append(tuple(p.read_bytes() for p in paths.values()))
    assert states[0] == states[1]
    assert len(set(states)) > 2


def test_crash_before_the_barrier_makes_earlier_writes_choosable(recorded,
                                                                 tmp_path: Path) -> None:
    rec, _d, _b, _e = recorded
    # after record 5 (the data barrier): the data writes are durable, the checksum
    # writes are not yet (their barrier is record 7)
    assert rec.choices(crash_at=7) == [Unit(3, CHECKSUMS, 0), Unit(5, CHECKSUMS, 0)]
    assert rec.choices(crash_at=4) == [Unit(2, BACKING, 1), Unit(2, BACKING, 2),
                                       Unit(3, CHECKSUMS, 0)]
    paths = rec.materialise(tmp_path / "early", keep=set(), crash_at=7)
    assert paths[BACKING].read_bytes()[BS:3 * BS] == pattern(2, 1)
    assert not np.load(paths[CHECKSUMS]).any()
    assert rec.choices(crash_at=0) == []
    with pytest.raises(ValueError, match="outside"):
        rec.materialise(tmp_path / "x", keep=set(), crash_at=len(rec.records) + 1)


def test_torn_log_tail_is_ignored(recorded, tmp_path: Path) -> None:
    rec, _d, _b, _e = recorded
    log = rec.directory / "log"
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - 3)
    short = Recording.load(rec.directory)
    assert len(short.records) == len(rec.records) - 1
    assert short.choices() == rec.choices()[:-1]


async def test_barrier_covers_only_writes_logged_before_the_flush(tmp_path: Path,
                                                                 autojump_clock) -> None:
    """A write that lands while a flush is in progress is not covered by it: the flush
    of a slow disk (1 s, on the trio clock) starts at 0, a write comes at 0.5."""
    d = tmp_path / "raw"
    inner = FileBacking(d, create_size=16 * BS)
    slow = FaultyBacking(inner, FaultPlan(latency_rate=1.0, latency_s=1.0), block_size=BS)
    log = RecordLog.create(tmp_path / "rec")
    b = log.attach("raw", slow, unit=BS)

    async def late_write() -> None:
        await trio.sleep(0.5)
        await b.write(2 * BS, memoryview(pattern(1, 3)))

    await b.write(0, memoryview(pattern(1, 1)))  # 0 -> 1.0
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.flush)
        nursery.start_soon(late_write)
    assert trio.current_time() - t0 == 1.5  # the late write ends last (0.5 + 1 s)
    b.close()
    rec = Recording.load(tmp_path / "rec")
    kinds = [r.kind for r in rec.records]
    assert kinds == [1, 2, 2, 4]  # attach, write, the late write, then the barrier
    assert rec.choices() == [Unit(2, "raw", 2)]


def test_recording_needs_a_new_directory(tmp_path: Path) -> None:
    (tmp_path / "rec").mkdir()
    with pytest.raises(DeviceError, match="must be a new directory"):
        RecordLog.create(tmp_path / "rec")
    log = RecordLog.create(tmp_path / "rec2")
    b = FileBacking(tmp_path / "f", create_size=BS)
    r = log.attach("f", b, unit=BS)
    with pytest.raises(ValueError, match="cannot record"):
        log.attach("f", b, unit=BS)
    r.close()


@pytest.mark.mounted
def test_mounted_daemon_records_and_the_full_state_fscks_clean(mount_factory, tmp_path: Path,
                                                               monkeypatch) -> None:
    """SLUICE_RECORD_DIR makes the daemon record its device: after an unmount, the state
    with every write kept is the volume's own files, and a copy of the volume made of it
    is clean and reads back what was written."""
    volume = make_volume(tmp_path / "vol", "64M")
    monkeypatch.setenv("SLUICE_RECORD_DIR", str(tmp_path / "rec"))
    m = mount_factory(volume)
    data = os.urandom(40 * BS + 123)
    with open(m.path / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    (m.path / "g").write_bytes(b"later\n")
    (m.path / "f").unlink()  # a discard after the commit
    (m.path / "h").write_bytes(data[:5 * BS])
    m.stop()
    monkeypatch.delenv("SLUICE_RECORD_DIR")
    rec = Recording.load(tmp_path / "rec")
    assert rec.barriers >= 2 and len(rec.records) > 10
    assert any(r.kind == 3 for r in rec.records)  # the discard of f's blocks
    paths = rec.materialise(tmp_path / "state", keep=set(rec.choices()))
    for name, p in paths.items():
        assert filecmp.cmp(p, volume / name, shallow=False), name
    # a volume made of the materialised state is the same volume
    copy = tmp_path / "copy"
    shutil.copytree(volume, copy, ignore=shutil.ignore_patterns(
        "lock", "mount.json", "sluice.log", BACKING, CHECKSUMS))  # (no 8 GiB of zeros)
    for name, p in paths.items():
        shutil.copy(p, copy / name)
    r = sluice("fsck", str(copy), "--verify-data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m2 = mount_factory(copy, name="copy-mnt")
    assert (m2.path / "h").read_bytes() == data[:5 * BS]
    assert (m2.path / "g").read_bytes() == b"later\n"
    assert json.loads((rec.directory / "log").read_bytes()[24:24 + rec.records[0].b])[
        "name"] == BACKING


def test_failed_open_closes_the_recording(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=32 * BS, block_size=BS)
    (d / CHECKSUMS).write_bytes(b"not a checksum file")
    log = RecordLog.create(tmp_path / "rec")
    with pytest.raises(FormatError, match="not readable"):
        BlockDevice.open(d, recorder=log)
    assert log._fd == -1  # nothing leaks from a failed open
