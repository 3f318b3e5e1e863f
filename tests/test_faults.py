"""Fault injection below the block device (blockdev/faults.py): read and write errors,
torn block writes, failing flushes, latency spikes — each reported to the request that
met it and to nobody else, never turned into wrong data; and the host filesystem under
the backing file filling up. Unit tests on the device, then mounted tests with a plan
loaded from SLUICE_FAULT_PLAN and a real tmpfs that fills up."""

from __future__ import annotations

import errno
import functools
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from blockdev import (BlockDevice, ChecksumError, DeviceError, FaultPlan, FaultyBacking,
                      FormatError, PrincipalId)
from conftest import is_mounted, make_volume, sluice

BS = 4096
P0 = PrincipalId(0)


def pattern(count: int, seed: int) -> bytes:
    return b"".join(bytes([(seed + i) % 251 + 1]) * BS for i in range(count))


def make(tmp_path: Path, plan: FaultPlan, *, nblocks: int = 64, name: str = "dev") -> BlockDevice:
    d = tmp_path / name
    d.mkdir()
    BlockDevice.format(d, size=nblocks * BS, block_size=BS)
    return BlockDevice.open(d, fault_plan=plan)


def faults_of(dev: BlockDevice):
    b = dev.data if isinstance(dev.data, FaultyBacking) else dev.checksums.backing
    assert isinstance(b, FaultyBacking)
    return b.statistics()


# -- unit: the device over a FaultyBacking ------------------------------------------------


async def test_read_error_on_chosen_block_fails_that_request_only(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(read_error_blocks=frozenset({12})))
    try:
        await dev.write(10, pattern(4, 1), principal=P0)
        for block, count in ((12, 1), (10, 4), (11, 2)):
            with pytest.raises(DeviceError) as ei:
                await dev.read(block, count, principal=P0)
            assert ei.value.errno == errno.EIO and ei.value.block == block
            assert not isinstance(ei.value, ChecksumError)
            assert f"read at device block {block}" in str(ei.value)
        # the neighbours, before and after, read fine, as often as asked
        for _ in range(3):
            assert await dev.read(10, 2, principal=P0) == pattern(4, 1)[:2 * BS]
            assert await dev.read(13, 1, principal=P0) == pattern(4, 1)[3 * BS:]
        # writes to the block still work (only reads were planned to fail)
        await dev.write(12, pattern(1, 9), principal=P0)
        st = dev.statistics()
        assert st.io_errors == 3 and st.checksum_errors == 0
        assert faults_of(dev).read_errors == 3
    finally:
        dev.close()


async def test_write_error_is_reported_and_leaves_old_contents(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(write_error_blocks=frozenset({5})))
    try:
        await dev.write(4, pattern(1, 1), principal=P0)
        with pytest.raises(DeviceError) as ei:
            await dev.write(4, pattern(3, 7), principal=P0)
        assert ei.value.errno == errno.EIO and ei.value.block == 4
        assert "write at device block 4+3" in str(ei.value)
        # nothing of the failed request landed: old contents, old checksums
        assert await dev.read(4, 3, principal=P0) == pattern(1, 1) + bytes(2 * BS)
        assert dev.written_blocks().tolist() == [4]
    finally:
        dev.close()


async def test_seeded_error_rate_is_deterministic(tmp_path: Path) -> None:
    plan = FaultPlan(seed=42, read_error_rate=0.3)

    async def failures(name: str) -> list[int]:
        dev = make(tmp_path, plan, name=name)
        failed = []
        try:
            for i in range(200):
                try:
                    await dev.read(i % 64, 1, principal=P0)
                except DeviceError:
                    failed.append(i)
        finally:
            dev.close()
        return failed

    a = await failures("a")
    assert a == await failures("b")
    assert 30 < len(a) < 90  # about 30% of 200
    other = FaultPlan(seed=43, read_error_rate=0.3)
    dev = make(tmp_path, other, name="c")
    try:
        c = []
        for i in range(200):
            try:
                await dev.read(i % 64, 1, principal=P0)
            except DeviceError:
                c.append(i)
    finally:
        dev.close()
    assert c != a


@pytest.mark.parametrize("torn_bytes", [0, 512, BS - 1])
async def test_torn_write_is_detected_never_returned(tmp_path: Path, torn_bytes: int) -> None:
    """A torn write reports success (the device lost the tail silently); every read of
    the block then fails its checksum — the half-old, half-new block is never data."""
    dev = make(tmp_path, FaultPlan(torn_write_blocks=frozenset({21}), torn_bytes=torn_bytes))
    try:
        await dev.write(20, pattern(3, 1), principal=P0)  # first write of the blocks: torn
        with pytest.raises(ChecksumError) as ei:
            await dev.read(20, 3, principal=P0)
        assert ei.value.block == 21
        with pytest.raises(ChecksumError):
            await dev.read(21, 1, principal=P0)
        assert await dev.read(20, 1, principal=P0) == pattern(3, 1)[:BS]
        assert await dev.read(22, 1, principal=P0) == pattern(3, 1)[2 * BS:]
        # what landed really is torn: the first bytes new, the rest as before (zeros)
        with open(dev.directory / "device.img", "rb") as f:
            f.seek(21 * BS)
            raw = f.read(BS)
        keep = torn_bytes or BS // 2
        assert raw == pattern(3, 1)[BS:BS + keep] + bytes(BS - keep)
        assert faults_of(dev).torn_writes == 1
    finally:
        dev.close()


async def test_torn_write_rate_tears_somewhere_and_is_caught(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(seed=3, torn_write_rate=0.2))
    try:
        for i in range(16):
            await dev.write(i * 4, pattern(4, i), principal=P0)
        torn = faults_of(dev).torn_writes
        assert torn > 0
        bad = 0
        for b in range(64):
            try:
                assert await dev.read(b, 1, principal=P0) == \
                    pattern(4, b // 4)[(b % 4) * BS:(b % 4 + 1) * BS]
            except ChecksumError:
                bad += 1
        assert bad == torn  # every torn block caught, every other one intact
    finally:
        dev.close()


async def test_failing_flush_is_reported(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(flush_errors=frozenset({2})))
    try:
        await dev.write(1, pattern(1, 1), principal=P0)
        await dev.flush()
        await dev.write(2, pattern(1, 2), principal=P0)
        with pytest.raises(DeviceError) as ei:
            await dev.flush()
        assert ei.value.errno == errno.EIO and ei.value.block is None
        assert "flush of the data failed" in str(ei.value)
        await dev.flush()  # the third works again
        assert faults_of(dev).flush_errors == 1
    finally:
        dev.close()


async def test_failing_checksum_flush_is_reported(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(target="checksums", flush_errors=frozenset({1})))
    try:
        await dev.write(1, pattern(1, 1), principal=P0)
        with pytest.raises(DeviceError, match="flush of the checksums failed"):
            await dev.flush()
    finally:
        dev.close()


async def test_checksum_write_error_is_a_device_error(tmp_path: Path) -> None:
    dev = make(tmp_path, FaultPlan(target="checksums", write_error_rate=1.0))
    try:
        with pytest.raises(DeviceError) as ei:
            await dev.write(7, pattern(2, 1), principal=P0)
        assert "checksum write at device block 7+2" in str(ei.value)
        assert ei.value.errno == errno.EIO
    finally:
        dev.close()


async def test_latency_spikes_on_the_trio_clock(tmp_path: Path, autojump_clock) -> None:
    dev = make(tmp_path, FaultPlan(latency_rate=1.0, latency_s=0.25))
    try:
        t0 = trio.current_time()
        await dev.write(0, pattern(1, 1), principal=P0)
        assert trio.current_time() - t0 == 0.25
        await dev.read(0, 1, principal=P0)
        assert trio.current_time() - t0 == 0.5
        await dev.flush()  # flushes wait too
        assert trio.current_time() - t0 == 0.75
    finally:
        dev.close()


def test_seeded_latency_spikes_are_exact_and_repeatable(tmp_path: Path) -> None:
    plan = FaultPlan(seed=11, latency_rate=0.25, latency_s=0.5)

    def run(name: str) -> tuple[float, int]:
        async def main() -> tuple[float, int]:
            dev = make(tmp_path, plan, name=name)
            try:
                t0 = trio.current_time()
                for i in range(40):
                    await dev.read(i, 1, principal=P0)
                fs = faults_of(dev)
                return trio.current_time() - t0, fs.latency_spikes
            finally:
                dev.close()
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    elapsed, spikes = run("a")
    assert 0 < spikes < 40
    assert elapsed == spikes * 0.5  # exact: only spikes take virtual time
    assert run("b") == (elapsed, spikes)


def test_fault_plan_from_json(tmp_path: Path) -> None:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"seed": 5, "read_error_blocks": [3, 4], "flush_errors": [1],
                             "latency_rate": 0.5, "latency_s": 0.01, "target": "both"}))
    plan = FaultPlan.load(p)
    assert plan == FaultPlan(seed=5, read_error_blocks=frozenset({3, 4}),
                             flush_errors=frozenset({1}), latency_rate=0.5, latency_s=0.01,
                             target="both")
    assert "read_error_blocks=[3, 4]" in plan.describe()
    for bad, msg in [({"read_error_blocks": [-1]}, "non-negative"),
                     ({"read_eror_rate": 0.1}, "unknown keys read_eror_rate"),
                     ({"read_error_rate": 2}, "within 0..1"),
                     ({"seed": "x"}, "seed must be an integer"),
                     ({"target": "disk"}, "target must be one of"),
                     ([1, 2], "must be a JSON object")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(FormatError, match=msg) as ei:
            FaultPlan.load(p)
        assert str(ei.value).startswith(f"fault plan {p}: ")
    p.write_text("{nope")
    with pytest.raises(FormatError, match="fault plan"):
        FaultPlan.load(p)
    with pytest.raises(FormatError, match="No such file"):
        FaultPlan.load(tmp_path / "absent.json")


# -- mounted: a plan given to the daemon ------------------------------------------------------


def device_blocks(volume: Path, ino: int) -> list[int]:
    """Every device block of inode `ino`'s written extents, from the metadata."""
    con = sqlite3.connect(f"file:{volume / 'meta.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT dev_block, count FROM extents WHERE inode = ? AND state = 1",
                           (ino,)).fetchall()
    finally:
        con.close()
    return [d + i for d, c in rows for i in range(c)]


def write_plan(tmp_path: Path, **plan) -> Path:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    return p


@pytest.mark.mounted
def test_mounted_read_error_reaches_that_reader_only(volume: Path, mount_factory,
                                                     tmp_path: Path, monkeypatch) -> None:
    m = mount_factory(volume, name="first")
    bad, good = os.urandom(6 * BS), os.urandom(6 * BS)
    (m.path / "bad").write_bytes(bad)
    (m.path / "good").write_bytes(good)
    ino = os.stat(m.path / "bad").st_ino
    m.stop()
    blocks = device_blocks(volume, ino)
    assert len(blocks) == 6
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(write_plan(tmp_path, read_error_blocks=[blocks[3]])))
    m = mount_factory(volume, name="second")
    fd = os.open(m.path / "bad", os.O_RDONLY)
    try:
        for _ in range(2):  # every time, not once
            with pytest.raises(OSError) as ei:
                os.pread(fd, BS, 3 * BS)
            assert ei.value.errno == errno.EIO
        assert os.pread(fd, 3 * BS, 0) == bad[:3 * BS]
        assert os.pread(fd, 2 * BS, 4 * BS) == bad[4 * BS:]
    finally:
        os.close(fd)
    assert (m.path / "good").read_bytes() == good
    assert m.daemon_alive
    log = m.log.read_text()
    assert "fault injection active" in log and f"read_error_blocks=[{blocks[3]}]" in log
    assert f"read at device block {blocks[3]} failed: injected read error" in log


@pytest.mark.mounted
def test_mounted_torn_write_is_eio_after_remount_and_fsck_reports_it(
        volume: Path, mount_factory, tmp_path: Path, monkeypatch) -> None:
    """Every write of a fresh volume tears (rate 1): what the daemon wrote comes back as
    EIO after a remount (the cache no longer holds it), never as half-new data, and fsck
    --verify-data names the damage."""
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(write_plan(tmp_path, torn_write_rate=1.0)))
    m = mount_factory(volume, name="first")
    data = os.urandom(4 * BS)
    with open(m.path / "f", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    m.stop()
    monkeypatch.delenv("SLUICE_FAULT_PLAN")
    m = mount_factory(volume, name="second")
    with pytest.raises(OSError) as ei:
        (m.path / "f").read_bytes()
    assert ei.value.errno == errno.EIO
    assert m.daemon_alive
    m.stop()
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode != 0 and "checksum mismatch in device block" in r.stdout, r.stdout


@pytest.mark.mounted
def test_mounted_failing_fsync_is_reported(volume: Path, mount_factory, tmp_path: Path,
                                           monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(write_plan(tmp_path, flush_errors=[1])))
    m = mount_factory(volume)
    fd = os.open(m.path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 10000)
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EIO
        # Reported once per open file, as Linux does (errseq): the next fsync of the
        # same file returns 0, though the volume has failed and commits nothing more.
        os.fsync(fd)
        # The open file still reads what it wrote. (Not by path: the failed commit held
        # the file's creation, rolled back with it, so a lookup that misses the kernel's
        # dentry cache — a slow machine, the entry's timeout past — finds no "f".)
        assert os.pread(fd, 20000, 0) == b"x" * 10000
    finally:
        os.close(fd)
    # The volume failed and is read-only: a change gets EROFS, and nothing is lost
    # silently (the fsync above said so).
    with pytest.raises(OSError) as ei:
        (m.path / "g").write_bytes(b"y")
    assert ei.value.errno == errno.EROFS
    assert m.daemon_alive
    assert "flush of the data failed: injected flush error" in m.log.read_text()


@pytest.mark.mounted
def test_mounted_write_error_reaches_the_writer(volume: Path, mount_factory, tmp_path: Path,
                                                monkeypatch) -> None:
    """Every device write fails: the writer gets EIO, the file shows none of it (no
    size, no bytes), metadata operations and the daemon carry on."""
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(write_plan(tmp_path, write_error_rate=1.0)))
    # write-through: the error is the write's (with write-back it is the fsync's:
    # tests/test_writeback.py)
    m = mount_factory(volume, "--no-writeback")
    fd = os.open(m.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, b"z" * 3 * BS)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert (m.path / "f").stat().st_size == 0
    assert (m.path / "f").read_bytes() == b""
    (m.path / "d").mkdir()
    os.rename(m.path / "f", m.path / "d" / "g")
    assert m.daemon_alive
    assert "injected write error" in m.log.read_text()


@pytest.mark.mounted
def test_bad_fault_plan_fails_the_mount_with_one_line(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    plan = write_plan(tmp_path, read_error_rate=7)
    r = sluice("mount", str(volume), str(mp), check=False,
               env={**os.environ, "SLUICE_FAULT_PLAN": str(plan)})
    if is_mounted(mp):  # it must not mount; if it did, do not leave it behind
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    assert r.returncode != 0
    assert f"fault plan {plan}: read_error_rate must be within 0..1" in r.stderr
    assert "Traceback" not in r.stderr


# -- the host filesystem under the backing file fills up ---------------------------------------


@pytest.mark.mounted
def test_host_filesystem_full_gives_enospc_to_the_writer(tmp_path: Path, small_tmpfs,
                                                         mount_factory) -> None:
    """The volume's sparse backing file lives on a 2 MiB tmpfs but claims 64 MiB: a
    writer that fills the host filesystem gets ENOSPC (also for the write the host cut
    short), the daemon stays up, other files read fine, and space freed by unlink is
    usable again."""
    img = small_tmpfs("2m") / "device.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    volume = make_volume(tmp_path / "vol", "64M", "--device", str(img))
    m = mount_factory(volume)
    keep = os.urandom(3 * BS)  # three blocks first: the big writes then end mid-chunk
    (m.path / "keep").write_bytes(keep)
    fd = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        with pytest.raises(OSError) as ei:
            for _ in range(64):
                written += os.write(fd, os.urandom(256 << 10))
        assert ei.value.errno == errno.ENOSPC, ei.value
    finally:
        os.close(fd)
    assert 0 < written < 2 << 20
    assert m.daemon_alive
    assert (m.path / "keep").read_bytes() == keep
    log = m.log.read_text()
    assert "the host filesystem under the backing store is full" in log
    (m.path / "big").unlink()
    os.sync()
    # Freed blocks are discarded (hole punched) once their commit is through; then a new
    # file fits again.
    for _ in range(50):
        try:
            (m.path / "again").write_bytes(b"y" * (256 << 10))
            break
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            import time
            time.sleep(0.1)
    assert (m.path / "again").read_bytes() == b"y" * (256 << 10)
    assert m.daemon_alive


@pytest.mark.mounted
def test_umount_after_a_failed_commit_says_so_in_one_line(tmp_path: Path,
                                                           small_tmpfs) -> None:
    """The metadata database's host filesystem fills up from outside sluice: the next
    commit fails (SQLite rolls its transaction back itself) and the volume turns
    read-only. `sluice umount` then unmounts, says in one line that the volume failed
    and wants fsck, and exits 1; the daemon logs no traceback (before: "cannot commit
    - no transaction is active" from the close of the database, and "daemon failed")."""
    host = small_tmpfs("40m")
    volume = make_volume(host / "vol", "1G")
    mp = tmp_path / "mnt"
    mp.mkdir()
    sluice("mount", str(volume), str(mp), "--no-writeback")
    try:
        for i in range(20):
            (mp / f"f{i}").write_bytes(b"x" * 100)
        with open(host / "filler", "wb") as f:  # the host fills from outside
            try:
                while True:
                    f.write(bytes(1 << 20))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        failed = False
        for i in range(200):
            try:
                (mp / f"g{i}").write_bytes(b"y" * 100)
                fd = os.open(mp / f"g{i}", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.EROFS, errno.ENOSPC), exc
                failed = True
                break
        assert failed
    finally:
        r = sluice("umount", str(mp), check=False)
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    log = (volume / "sluice.log").read_text()
    assert "Traceback" not in log and "daemon failed" not in log, log[-3000:]
    assert "the volume is now read-only" in log
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"unmounted {mp}, but the volume failed while mounted" in lines[0], lines[0]
    assert "sluice fsck" in lines[0]



async def test_slow_checksum_writes_are_serialised_and_end_current(tmp_path: Path,
                                                                   autojump_clock) -> None:
    """Three writers of blocks whose checksums share one page, on a checksum store that
    takes 1 s per write: the page writes go one at a time (3 s, not 1 s), and the file
    ends equal to memory whatever the interleaving."""
    import numpy as np
    dev = make(tmp_path, FaultPlan(target="checksums", latency_rate=1.0, latency_s=1.0))
    try:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for b in (1, 2, 3):
                nursery.start_soon(functools.partial(dev.write, b, pattern(1, b),
                                                     principal=P0))
        assert trio.current_time() - t0 == 3.0
        on_disk = np.load(dev.directory / "checksums")
        assert on_disk.tolist() == dev.checksums.array.tolist()
        assert all(on_disk[b] for b in (1, 2, 3))
        for b in (1, 2, 3):
            assert await dev.read(b, 1, principal=P0) == pattern(1, b)
    finally:
        dev.close()
