"""Write-back caching through a real mount (issue 8, the write-back part): `sluice mount
--writeback` caches writes in the pager and writes them back before the metadata
commit that exposes them (data=ordered, docs/dev/invariants.md R2); discardable files
whose dirty pages the pager drops come back empty and marked, never partial, both
while mounted and after a crash (crash rule 4).

Every figure comes from `sluice stats --json` read between steps that run real
programs (cat, dd, python) as principals with `sluice run`; nothing depends on timing:
where a commit may or may not have happened before a crash, both outcomes are
accepted and the partial one never is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, sluice

pytestmark = pytest.mark.mounted

BS = 4096
KiB = 1 << 10
MiB = 1 << 20
DISCARDED = "user.sluice.discarded"


def stats(mnt: Path) -> dict:
    return json.loads(sluice("stats", str(mnt), "--json").stdout)


def run(mnt: Path, principal: str, *cmd: str) -> str:
    r = subprocess.run([*SLUICE, "run", str(mnt), "--principal", principal, "--", *cmd],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, f"{cmd} as {principal} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def pattern(nbytes: int, seed: int) -> bytes:
    """Distinct contents per file and per block (a block of another file, or of the
    same file at another place, never matches)."""
    block = bytes([seed % 251]) * (BS - 8)
    return b"".join(block + (seed * 100000 + i).to_bytes(8, "little")
                    for i in range(-(-nbytes // BS)))[:nbytes]


#: writes argv[2:] files of int(argv[1]) bytes each (pattern() contents, seed = index)
#: into the current directory, with 64 KiB writes (cached: writes of more than 32
#: blocks to a file that is not discardable go around the pool, as large reads do)
#: and no fsync
WRITER = textwrap.dedent("""
    import sys
    BS = 4096
    def pattern(nbytes, seed):
        block = bytes([seed % 251]) * (BS - 8)
        return b"".join(block + (seed * 100000 + i).to_bytes(8, "little")
                        for i in range(-(-nbytes // BS)))[:nbytes]
    n = int(sys.argv[1])
    for k, name in enumerate(sys.argv[2:]):
        data = pattern(n, k + 1)
        with open(name, "wb") as f:
            for off in range(0, n, 64 * 1024):
                f.write(data[off:off + 64 * 1024])
""")


def check_whole_or_discarded(path: Path, want: bytes) -> bool:
    """The file is `want` exactly, or empty and marked discarded; True if discarded.
    Anything else (a half file, zeros, another file's data) fails."""
    data = path.read_bytes()
    if data == want:
        return False
    assert data == b"" and path.stat().st_size == 0, \
        f"{path.name}: {len(data)} of {len(want)} bytes, not whole and not empty"
    assert os.getxattr(path, DISCARDED) == b"1", f"{path.name} emptied but not marked"
    return True


def test_writeback_flag_and_mount_option(volume: Path, mount_factory, tmp_path: Path) -> None:
    """--writeback and -o writeback turn the pager's write-back on (sluice stats says
    so); -o nowriteback and --no-writeback turn it off; a bad spelling is one line."""
    m = mount_factory(volume, "--writeback")
    assert stats(m.path)["pager"]["writeback"] is True
    m.stop()
    m.start("-o", "writeback")
    assert stats(m.path)["pager"]["writeback"] is True
    m.stop()
    m.start("-o", "nowriteback")
    assert stats(m.path)["pager"]["writeback"] is False
    m.stop()
    m.start("--no-writeback")
    assert stats(m.path)["pager"]["writeback"] is False
    m.stop()
    r = sluice("mount", str(volume), str(m.path), "-o", "writeback=1", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "writeback" in r.stderr


def test_dirty_data_reaches_the_device_and_survives_remount(volume: Path,
                                                            mount_factory) -> None:
    """A principal writes 12 MiB (three times the 4 MiB pool) without fsync: its dirty
    pages are written back under pressure (charged to it), everything reads back
    right while mounted and after an unmount and mount."""
    m = mount_factory(volume, "--writeback", "--cache-size", "4M")
    sluice("principal", "add", str(m.path), "W")
    d = m.path / "keep"
    d.mkdir()
    names = [f"f{i}" for i in range(6)]
    run(m.path, "W", "sh", "-c", f"cd {d} && {sys.executable} -c '{WRITER}' {2 * MiB} "
        + " ".join(names))
    c = stats(m.path)["cache"]["W"]
    assert c["writeback_bytes"] >= 4 * MiB  # more than the pool: written back as it went
    assert c["discarded"] == 0
    for k, n in enumerate(names):
        assert (d / n).read_bytes() == pattern(2 * MiB, k + 1)
    m.stop()
    m.start("--writeback", "--cache-size", "4M")
    for k, n in enumerate(names):
        assert (d / n).read_bytes() == pattern(2 * MiB, k + 1)
    m.stop()
    sluice("fsck", str(volume))  # no leaked or doubly-owned block


def test_fsync_survives_kill(volume: Path, mount_factory) -> None:
    """fsync with write-back: the data and the size are on the volume when fsync
    returns; a SIGKILL of the daemon right after loses nothing."""
    m = mount_factory(volume, "--writeback")
    p = m.path / "f"
    want = pattern(3 * MiB + 123, 7)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, want)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    m.stop()
    m.start("--writeback")
    assert p.read_bytes() == want


def test_discardable_directory_is_emptied_file_by_file(volume: Path, mount_factory) -> None:
    """A discardable directory under memory pressure: principal S writes 16 files of
    1 MiB (four times the 4 MiB pool) into it with no fsync. The pager drops whole
    files' dirty pages rather than write them back: every file reads back whole or
    empty (size 0, user.sluice.discarded=1) — never a half file — some were emptied,
    and S's write-back bytes are zero. Then a write to an emptied file clears the mark
    and a truncate of another clears it too."""
    m = mount_factory(volume, "--writeback", "--cache-size", "4M")
    mnt = m.path
    sluice("principal", "add", str(mnt), "S")
    scratch = mnt / "scratch"
    scratch.mkdir()
    sluice("hint", str(scratch), "--discardable", "-q")
    names = [f"s{i:02d}" for i in range(16)]
    run(mnt, "S", "sh", "-c", f"cd {scratch} && {sys.executable} -c '{WRITER}' {MiB} "
        + " ".join(names))
    c = stats(mnt)["cache"]["S"]
    assert c["writeback_bytes"] == 0, c
    assert c["discarded"] > 0, c
    # Newest first: a whole file is read from the pool without taking frames, so
    # checking does not itself push the others out.
    emptied = [n for k, n in reversed(list(enumerate(names)))
               if check_whole_or_discarded(scratch / n, pattern(MiB, k + 1))]
    assert emptied, "nothing was discarded under a pool a quarter of the data"
    assert names[-1] not in emptied  # the file being written last was in use: whole
    # ls -l and stat through the kernel agree: size 0 for every emptied file
    out = run(mnt, "S", "stat", "-c", "%n %s", *[str(scratch / n) for n in emptied])
    assert all(line.endswith(" 0") for line in out.splitlines()), out
    # The next write clears the mark; the file holds just what was written.
    e = scratch / emptied[0]
    run(mnt, "S", "sh", "-c", f"printf hello >> {e}")
    assert e.read_bytes() == b"hello"
    with pytest.raises(OSError):
        os.getxattr(e, DISCARDED)
    if len(emptied) > 1:
        t = scratch / emptied[1]
        run(mnt, "S", "truncate", "-s", "100", str(t))
        assert t.read_bytes() == bytes(100)
        with pytest.raises(OSError):
            os.getxattr(t, DISCARDED)
    # After an unmount and mount nothing comes back half either.
    m.stop()
    m.start("--writeback", "--cache-size", "4M")
    for k, n in enumerate(names):
        data = (scratch / n).read_bytes()
        assert data in (pattern(MiB, k + 1), b"", b"hello", bytes(100)), n


def test_non_discardable_pages_beside_discardable_ones_are_written(volume: Path,
                                                                   mount_factory) -> None:
    """The same principal writes a discardable directory and a normal one under
    pressure: only discardable files are ever emptied; the normal ones read back whole
    after a remount."""
    m = mount_factory(volume, "--writeback", "--cache-size", "4M")
    mnt = m.path
    sluice("principal", "add", str(mnt), "S")
    scratch, keep = mnt / "scratch", mnt / "keep"
    scratch.mkdir()
    keep.mkdir()
    sluice("hint", str(scratch), "--discardable", "-q")
    for rnd in range(2):
        run(mnt, "S", "sh", "-c", f"cd {scratch} && {sys.executable} -c '{WRITER}' {MiB} "
            + " ".join(f"r{rnd}s{i}" for i in range(8)))
        run(mnt, "S", "sh", "-c", f"cd {keep} && {sys.executable} -c '{WRITER}' {MiB} "
            + " ".join(f"r{rnd}k{i}" for i in range(4)))
    m.stop()
    m.start("--writeback", "--cache-size", "4M")
    for rnd in range(2):
        for i in range(4):
            assert (keep / f"r{rnd}k{i}").read_bytes() == pattern(MiB, i + 1)
        for i in range(8):
            check_whole_or_discarded(scratch / f"r{rnd}s{i}", pattern(MiB, i + 1))


def test_discardable_file_after_a_crash_is_whole_or_empty(volume: Path,
                                                         mount_factory) -> None:
    """A discardable file fsync'd, then rewritten without fsync; the daemon is killed.
    It comes back as the fsync'd contents (no commit recorded the new ones) or empty
    and marked (a commit recorded it with pages not on the device), never a mix. A
    normal file written and fsync'd beside it is whole."""
    m = mount_factory(volume, "--writeback")
    mnt = m.path
    d = mnt / "cache"
    d.mkdir()
    sluice("hint", str(d), "--discardable", "-q")
    old, new = pattern(2 * MiB, 1), pattern(2 * MiB, 2)
    fd = os.open(d / "c", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, old)
        os.fsync(fd)
        os.pwrite(fd, new[:MiB], 0)
    finally:
        os.close(fd)
    want = pattern(MiB, 3)
    fd = os.open(mnt / "n", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, want)
        os.fsync(fd)  # a commit: records the discardable file as not on the device
    finally:
        os.close(fd)
    assert stats(mnt)["cache"]["root"]["writeback_bytes"] >= 2 * MiB  # its own fsync
    m.kill()
    m.stop()
    m.start("--writeback")
    assert (mnt / "n").read_bytes() == want
    data = (d / "c").read_bytes()
    assert data == b"", f"{len(data)} bytes: the commit after the rewrite recorded it"
    assert os.getxattr(d / "c", DISCARDED) == b"1"
    # Written again and fsync'd: whole after the next crash (the list the first
    # recovery emptied it by was replaced at its commit, not kept for ever).
    fd = os.open(d / "c", os.O_WRONLY)
    try:
        os.write(fd, new)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        os.getxattr(d / "c", DISCARDED)
    os.sync()
    m.kill()
    m.stop()
    m.start("--writeback")
    assert (d / "c").read_bytes() == new


def test_fsync_of_a_discardable_file_writes_it(volume: Path, mount_factory) -> None:
    """fsync of a discardable file writes its pages (and only then is it safe from a
    crash): after a kill it is whole."""
    m = mount_factory(volume, "--writeback")
    d = m.path / "cache"
    d.mkdir()
    sluice("hint", str(d), "--discardable", "-q")
    want = pattern(MiB + 5, 4)
    fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, want)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    m.stop()
    m.start("--writeback")
    assert (d / "f").read_bytes() == want
    with pytest.raises(OSError):
        os.getxattr(d / "f", DISCARDED)


# -- the pager's large-write path under write-back (component tests, no mount) -----------

def test_unaligned_stream_survives_kill_after_fsync(volume: Path, mount_factory) -> None:
    """fio's pattern: 1 MiB writes from a buffer that is not page-aligned reach the
    daemon as two requests each (1 MiB - 16 B through the write-behind, then 16 B
    merged into the edge block), then fsync; a SIGKILL right after loses nothing and
    fsck finds the volume clean."""
    import mmap
    m = mount_factory(volume, "--writeback")
    p = m.path / "stream"
    want = pattern(8 * MiB + 5000, 11)
    buf = mmap.mmap(-1, MiB + 4096)
    view = memoryview(buf)[16:16 + MiB]  # 16 bytes past a page: 257 pages per write
    before = stats(m.path)["fuse_requests"].get("write", 0)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for off in range(0, len(want), MiB):
            chunk = want[off:off + MiB]
            view[:len(chunk)] = chunk
            assert os.write(fd, view[:len(chunk)]) == len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    del view
    buf.close()
    writes = stats(m.path)["fuse_requests"]["write"] - before
    assert writes == 2 * 8 + 1, writes  # each full 1 MiB write split in two
    assert p.read_bytes() == want
    m.kill()
    m.stop()
    m.start("--writeback")
    assert p.read_bytes() == want
    m.stop()
    sluice("fsck", str(volume))


def test_unmount_lets_write_behinds_land(volume: Path, mount_factory) -> None:
    """Large writes acknowledged through the write-behind and still on their way to a
    slow device (hdd) when the volume is unmounted, with no fsync: the unmount lets
    them land (the pager's nursery is cancelled before the final sync) instead of
    failing the volume and losing them; the remount reads them back, fsck is clean."""
    m = mount_factory(volume, "--writeback", "--profile", "hdd")
    want = pattern(24 * MiB, 5)
    with open(m.path / "big", "wb", buffering=0) as f:
        for off in range(0, len(want), MiB):
            assert f.write(want[off:off + MiB]) == MiB
    m.stop()
    m.start("--writeback")
    assert (m.path / "big").read_bytes() == want
    assert stats(m.path).get("read_only") in (None, False)
    m.stop()
    sluice("fsck", str(volume))


async def test_large_writes_go_around_the_pool_unless_frames_are_resident() -> None:
    """Under write-back a write of more than BYPASS_BLOCKS blocks with nothing of its
    range resident goes to the device at once (a stream, as large reads bypass the
    pool); one that covers a dirty frame goes through the pool (a later write-back of
    that frame would land over it); a discardable file's never reaches the device."""
    from pager import BYPASS_BLOCKS, Pager
    from pager.replay import memory_device

    dev = memory_device(1024, block_size=BS)
    p = Pager(dev, nframes=256, policy="hinted", writeback=True)
    n = BYPASS_BLOCKS + 8
    big = pattern(n * BS, 1)
    await p.write(0, big, principal=1, file=5, fblock=0)
    assert p.statistics().dirty == 0  # on the device, nothing cached
    assert bytes(await dev.read(0, n, principal=0)) == big
    # a dirty frame inside the next range: the large write goes through the pool
    await p.write(200 + 3, pattern(BS, 2), principal=1, file=6, fblock=3)
    big2 = pattern(n * BS, 3)
    await p.write(200, big2, principal=1, file=6, fblock=0)
    assert p.statistics().dirty == n
    await p.flush()
    assert bytes(await dev.read(200, n, principal=0)) == big2
    # a discardable file: cached, dropped rather than written
    p.set_file_hints(7, discardable=True)
    await p.write(400, pattern(n * BS, 4), principal=1, file=7, fblock=0)
    assert p.statistics().dirty == n
    await p.flush()
    assert bytes(await dev.read(400, n, principal=0)) == bytes(n * BS)


MAPPED_WRITER = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)
    m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
    for page in range(0, 256, 16):             # 16 pages stored through the mapping
        m[page * 4096:page * 4096 + 5] = b"page!"
    m.close()                                  # the kernel writes them back (pid 0)
    os.close(fd)
""")


def test_write_back_of_a_mapping_is_charged_to_the_opener(volume: Path,
                                                          mount_factory) -> None:
    """The kernel writes a shared mapping's dirty pages back with no caller (pid 0):
    the pager's dirty frames and their write-back are charged to the principal that
    opened and mapped the file, never to root."""
    m = mount_factory(volume, "--writeback")
    mnt = m.path
    sluice("principal", "add", str(mnt), "M")
    f = mnt / "mapped"
    run(mnt, "M", sys.executable, "-c", MAPPED_WRITER, str(f))
    before = stats(mnt)["cache"]["M"]
    # dirty in M's frames, or already written back by a commit (about once a second)
    assert before["frames"] >= 16 and before["dirty"] * BS + before["writeback_bytes"] \
        >= 16 * BS, before
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)  # root's fsync: a commit writes every dirty frame back
    finally:
        os.close(fd)
    c = stats(mnt)["cache"]
    assert c["M"]["writeback_bytes"] >= 16 * BS and c["M"]["dirty"] == 0, c["M"]
    assert c.get("root", {}).get("writeback_bytes", 0) == 0, c.get("root")
    data = f.read_bytes()
    assert data.count(b"page!") == 16 and len(data) == 1 << 20


def test_a_failing_device_is_reported_at_fsync(volume: Path, mount_factory, tmp_path: Path,
                                               monkeypatch) -> None:
    """Every device write fails (an injected fault plan). With write-back the write is
    cached and succeeds; the write-back before the next commit fails, the volume turns
    read-only, and the writer's fsync gets EIO (as Linux reports write-back errors);
    after a mount without faults the file shows none of it."""
    import errno
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"write_error_rate": 1.0}))
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(plan))
    m = mount_factory(volume, "--writeback")
    monkeypatch.delenv("SLUICE_FAULT_PLAN")
    fd = os.open(m.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"z" * 3 * BS) == 3 * BS  # cached
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        (m.path / "g").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS
    assert m.daemon_alive
    assert "injected write error" in m.log.read_text()
    m.stop()
    m.start("--writeback")
    assert not (m.path / "f").exists() or (m.path / "f").read_bytes() == b""


def test_a_clean_unmount_keeps_discardable_files_and_fsck_is_clean(volume: Path,
                                                                  mount_factory) -> None:
    """Discardable files written without fsync and not dropped are written back at a
    clean unmount: whole after the next mount, and `sluice fsck --verify-data` of the
    unmounted volume finds every committed block's data."""
    m = mount_factory(volume, "--writeback")
    d = m.path / "cache"
    d.mkdir()
    sluice("hint", str(d), "--discardable", "-q")
    want = {f"c{i}": pattern(100 * KiB + i, i + 1) for i in range(4)}
    for name, data in want.items():
        (d / name).write_bytes(data)
    m.stop()
    sluice("fsck", str(volume), "--verify-data")
    m.start("--writeback")
    for name, data in want.items():
        assert (d / name).read_bytes() == data
        with pytest.raises(OSError):
            os.getxattr(d / name, DISCARDED)


def test_host_space_is_reserved_before_the_write_is_acknowledged(tmp_path: Path,
                                                                 small_tmpfs,
                                                                 mount_factory) -> None:
    """The volume's sparse backing file lives on a 2 MiB tmpfs but claims 64 MiB. With
    write-back the data reaches the host only later, so host space is reserved when
    blocks are allocated: the writer that fills the host gets ENOSPC at its write (not
    a write-back failure later), the daemon stays up, and what was acknowledged reads
    back after an unmount and mount."""
    import errno
    img = small_tmpfs("2m") / "device.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    from conftest import make_volume
    volume = make_volume(tmp_path / "vol", "64M", "--device", str(img))
    m = mount_factory(volume, "--writeback")
    chunk = pattern(64 * KiB, 3)
    fd = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        with pytest.raises(OSError) as ei:
            for _ in range(64):
                written += os.write(fd, chunk)
        assert ei.value.errno == errno.ENOSPC, ei.value
    finally:
        os.close(fd)
    assert 0 < written <= 2 << 20  # what the 2 MiB host holds, and no more
    assert m.daemon_alive
    assert "the host filesystem under the backing store is full" in m.log.read_text()
    m.stop()
    m.start("--writeback")
    data = (m.path / "big").read_bytes()
    assert data == (chunk * 64)[:written]


def test_unaligned_megabyte_writes_survive_a_crash_after_fsync(volume: Path,
                                                               mount_factory) -> None:
    """fio's pattern: 1 MiB writes from a buffer 16 bytes past a page, each reaching the
    daemon as 1 MiB - 16 B and 16 B (the 16 bytes merged into the dirty frame the first
    request left, Pager.write_within_nowait). What was fsync'd reads back exactly after
    a SIGKILL of the daemon, and the file holds nothing that was not written."""
    import mmap
    m = mount_factory(volume, "--writeback")
    f = m.path / "fio.bin"
    mm = mmap.mmap(-1, 2 * MiB)
    view = memoryview(mm)[16:16 + MiB]
    data = [pattern(MiB, i) for i in range(6)]
    before = stats(m.path)["fuse_requests"].get("write", 0)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(4):
            view[:] = data[i]
            assert os.pwrite(fd, view, i * MiB) == MiB
        os.fsync(fd)
        for i in range(4, 6):  # not fsync'd: may be lost, never garbage
            view[:] = data[i]
            assert os.pwrite(fd, view, i * MiB) == MiB
        assert stats(m.path)["fuse_requests"]["write"] - before == 12  # two per write
    finally:
        os.close(fd)
    view.release()
    mm.close()
    m.kill()
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    m.start("--writeback")
    got = f.read_bytes()
    assert len(got) >= 4 * MiB
    assert got == b"".join(data)[:len(got)]
