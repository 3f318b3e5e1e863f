"""The crash rules of docs/dev/invariants.md, each checked where it is kept.

- Mounted, SIGKILL of the daemon right after an unacknowledged change (before the 1 s
  timer commit): a shrinking truncate to a partial block, and an append into a partly
  filled block, come back as the old state or the new one, never a mix, and bytes lost
  past EOF never reappear when the file grows later.
- Component level, the power-loss rules (what reaches the device in which order):
  a block that a committed transaction exposes is never changed in place (its data and
  its checksum stay as committed until a later commit relocates the file block); a commit
  exposes only data a barrier made durable first; blocks freed by a commit are discarded
  and reused only after that commit is durable.
- Storage charges: live usage equals the recount from the volume after renames.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path

import pytest
import trio

from conftest import Mount
from fs import volume
from fs.filesystem import ROOT_INODE, FileSystem
from test_crash import _start_over_dead_mount
from test_filesystem import CALLER, Volume, fill, read_file, write_file

BS = 4096


# -- SIGKILL before the timer commit --------------------------------------------------------


def _kill_and_remount(m: Mount) -> None:
    m.kill()
    _start_over_dead_mount(m)


@pytest.mark.mounted
def test_shrinking_truncate_killed_before_commit_is_old_or_new(volume: Path,
                                                               mount_factory) -> None:
    """Defect 5: the partial last block was zeroed on the device at once while the new
    size waited for the commit: a crash gave the old size with fsync'd bytes zeroed."""
    m = mount_factory(volume)
    data = fill(5, 3 * BS + 100)
    outcomes = set()
    for i in range(3):
        p = m.path / f"t{i}"
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(p, BS + 1000)  # not a multiple of the block size
        _kill_and_remount(m)
        got = p.read_bytes()
        assert got in (data, data[:BS + 1000]), \
            f"round {i}: {len(got)} bytes, neither the fsync'd file nor its truncation"
        outcomes.add(len(got))
        # grown again, the bytes past the cut read as zeros
        os.truncate(p, len(data))
        if len(got) == BS + 1000:
            assert p.read_bytes() == data[:BS + 1000] + bytes(len(data) - BS - 1000)
    assert outcomes


@pytest.mark.mounted
def test_append_killed_before_commit_leaves_no_bytes_past_eof(volume: Path,
                                                              mount_factory) -> None:
    """Defect 6: an append into the last, partly filled block was written in place; after
    a crash rolled the size back, growing the file showed the lost bytes where POSIX
    requires zeros."""
    m = mount_factory(volume)
    for i in range(3):
        p = m.path / f"a{i}"
        head = fill(6 + i, 100)
        with open(p, "wb") as f:
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
        with open(p, "ab") as f:
            f.write(b"L" * 50)  # acknowledged by write(), never fsync'd
        _kill_and_remount(m)
        got = p.read_bytes()
        assert got in (head, head + b"L" * 50), f"round {i}: {got!r}"
        if got == head:
            os.truncate(p, 4000)
            assert p.read_bytes() == head + bytes(3900), "lost bytes came back past EOF"
            with open(p, "r+b") as f:  # and a write further on: zeros in between
                f.seek(5000)
                f.write(b"Z")
            assert p.read_bytes() == head + bytes(4900) + b"Z"


@pytest.mark.mounted
@pytest.mark.parametrize("extra", [(), ("--writeback",), ("--cache-mode", "kernel")],
                         ids=["default", "writeback", "kernel-cache"])
def test_synchronous_writes_survive_a_kill_right_after(volume: Path, mount_factory,
                                                       extra: tuple[str, ...]) -> None:
    """Probe 9's F4: a write through an O_SYNC or O_DSYNC descriptor, or pwritev2 with
    RWF_SYNC or RWF_DSYNC, is durable when it returns (it is acknowledged as if fsync'd).
    Direct-I/O writes reach the daemon with those flags and no fsync after them (the
    kernel's generic_write_sync is for writes through the page cache): they were
    acknowledged and lost when the daemon died before its timer commit."""
    m = mount_factory(volume, *extra)
    cases = {"osync": (os.O_SYNC, 0), "odsync": (os.O_DSYNC, 0),
             "rwf_sync": (0, os.RWF_SYNC), "rwf_dsync": (0, os.RWF_DSYNC)}
    for r in range(2):
        want = {}
        for i, (name, (oflag, rwf)) in enumerate(cases.items()):
            p = m.path / f"{name}{r}"
            data = fill(20 + 10 * r + i, BS + 300 * (i + 1))
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | oflag, 0o644)
            try:
                if rwf:
                    assert os.pwritev(fd, [data[:BS]], 0, rwf) == BS
                    assert os.pwritev(fd, [data[BS:]], BS, rwf) == len(data) - BS
                else:
                    assert os.write(fd, data[:BS]) == BS
                    assert os.write(fd, data[BS:]) == len(data) - BS
            finally:
                os.close(fd)
            want[p] = data
        # The files' names were never made durable by a directory fsync: only the
        # data of a name that survives is promised. Make the names durable with the
        # directory's fsync, then one more synchronous write to each, and kill.
        dfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        for i, (p, data) in enumerate(want.items()):
            oflag, rwf = list(cases.values())[i]
            tail = fill(90 + i, 700)
            fd = os.open(p, os.O_WRONLY | oflag)
            try:
                if rwf:
                    assert os.pwritev(fd, [tail], len(data), rwf) == len(tail)
                else:
                    os.lseek(fd, 0, os.SEEK_END)
                    assert os.write(fd, tail) == len(tail)
            finally:
                os.close(fd)
            want[p] = data + tail
        _kill_and_remount(m)
        for p, data in want.items():
            got = p.read_bytes()
            assert got == data, f"round {r}, {p.name}: {len(got)} bytes, want {len(data)}"


# -- the power-loss rules, component level -----------------------------------------------------


def committed_extents(vol: Volume, ino: int) -> list[tuple[int, int, int, int]]:
    """The file's extents as committed (a second connection sees only commits)."""
    db = sqlite3.connect(vol.path / volume.DB)
    try:
        return db.execute("SELECT file_block, dev_block, count, state FROM extents"
                          " WHERE inode=? ORDER BY file_block", (ino,)).fetchall()
    finally:
        db.close()


def device_blocks(vol: Volume, runs: list[tuple[int, int, int, int]]) -> list[bytes]:
    out = []
    with open(vol.path / "device.img", "rb") as f:
        for _fb, dev, count, _st in runs:
            f.seek(dev * BS)
            out.append(f.read(count * BS))
    return out


def stored_checksums(vol: Volume, runs: list[tuple[int, int, int, int]]) -> list[int]:
    dev = vol.kernel.device
    return [dev.stored_checksum(d + i) for _fb, d, c, _st in runs for i in range(c)]


@pytest.fixture
async def cvol(tmp_path: Path):
    v = Volume(tmp_path / "vol", size=512 * BS)
    await v.open()
    yield v
    await v.close()


async def test_committed_blocks_are_never_changed_in_place(cvol: Volume) -> None:
    """Defect 8: an un-fsync'd 1-byte overwrite of a fsync'd block changed the block and
    its checksum in place; a power loss could keep one and not the other (EIO)."""
    fs = cvol.fs
    assert fs is not None
    data = fill(8, 5 * BS + 10)
    ino = await write_file(fs, b"f", data)
    await fs.sync()
    before = committed_extents(cvol, ino)
    blocks, sums = device_blocks(cvol, before), stored_checksums(cvol, before)
    h = fs.open(ino, os.O_RDWR, CALLER)
    try:
        await fs.write(h.fh, 2 * BS + 7, b"!")        # one byte inside a block
        await fs.write(h.fh, 0, fill(9, 2 * BS))      # whole blocks
        await fs.write(h.fh, len(data), b"appended")  # into the partly filled last block
    finally:
        await fs.release(h.fh)
    # Nothing committed yet: what the committed metadata points at is untouched.
    assert committed_extents(cvol, ino) == before
    assert device_blocks(cvol, before) == blocks
    assert stored_checksums(cvol, before) == sums
    new = bytearray(data)
    new[2 * BS + 7] = ord("!")
    new[0:2 * BS] = fill(9, 2 * BS)
    new += b"appended"
    assert await read_file(fs, ino) == bytes(new)
    # After the commit the file reads the same, from relocated blocks; the old ones are
    # free again (and discarded) only now.
    await fs.commit()
    after = committed_extents(cvol, ino)
    assert after != before
    assert await read_file(fs, ino) == bytes(new)
    old_devs = {d + i for _fb, d, c, _st in before for i in range(c)}
    new_devs = {d + i for _fb, d, c, _st in after for i in range(c)}
    assert {d for d in old_devs if d not in new_devs}, "nothing was relocated"
    assert fs.alloc.used[sorted(new_devs)].all()
    # (or kept for the next relocations: used in the map, reachable by those only)
    kept = {b for s, c in fs.alloc._kept for b in range(s, s + c)}
    assert not fs.alloc.used[sorted(old_devs - new_devs - kept)].any()
    # A second overwrite after that commit relocates again (sealed once committed) ...
    h = fs.open(ino, os.O_RDWR, CALLER)
    try:
        await fs.write(h.fh, 2 * BS + 7, b"?")
    finally:
        await fs.release(h.fh)
    assert committed_extents(cvol, ino) == after
    assert device_blocks(cvol, after)[0] == device_blocks(cvol, after)[0]
    # ... and what a remount finds is the last commit plus the write after it.
    await fs.sync()
    await cvol.close()
    fs = await cvol.open()
    new[2 * BS + 7] = ord("?")
    assert await read_file(fs, ino) == bytes(new)
    report = await cvol.fsck()
    assert report.errors == 0, report.lines


async def test_shrinking_truncate_relocates_a_committed_partial_block(cvol: Volume) -> None:
    fs = cvol.fs
    assert fs is not None
    data = fill(3, 3 * BS)
    ino = await write_file(fs, b"t", data)
    await fs.sync()
    before = committed_extents(cvol, ino)
    blocks = device_blocks(cvol, before)
    await fs.setattr(ino, size=BS + 10, caller=CALLER)
    assert device_blocks(cvol, before) == blocks  # nothing zeroed in place
    assert committed_extents(cvol, ino) == before
    await fs.setattr(ino, size=3 * BS, caller=CALLER)
    assert await read_file(fs, ino) == data[:BS + 10] + bytes(2 * BS - 10)


async def test_commit_order_barrier_then_metadata_then_durable_then_free(
        cvol: Volume, monkeypatch) -> None:
    """Defect 7: the timer commit did not make the WAL durable, yet the blocks it freed
    were discarded and reused at once; a power loss brought back a file whose blocks
    now held another file's data. Rule: flush data, commit, make durable, then free."""
    fs = cvol.fs
    assert fs is not None
    events: list[str] = []
    kernel, md = cvol.kernel, cvol.md
    orig_flush, orig_commit = kernel.pager.flush, md.commit
    orig_durable, orig_discard = md.make_durable, kernel.discard
    orig_release = fs.alloc.release_now

    async def flush(**kw) -> None:
        events.append("flush")
        await orig_flush(**kw)

    def commit() -> None:
        events.append("commit")
        orig_commit()

    def durable() -> None:
        events.append("durable")
        orig_durable()

    async def discard(runs, *, principal) -> None:
        events.append("discard")
        await orig_discard(runs, principal=principal)

    def release(runs) -> None:
        events.append("release")
        orig_release(runs)

    monkeypatch.setattr(kernel.pager, "flush", flush)
    monkeypatch.setattr(md, "commit", commit)
    monkeypatch.setattr(md, "make_durable", durable)
    monkeypatch.setattr(kernel, "discard", discard)
    monkeypatch.setattr(fs.alloc, "release_now", release)

    ino = await write_file(fs, b"victim", fill(1, 10 * BS))
    await fs.commit()
    assert events[:2] == ["flush", "commit"]  # data before the metadata exposing it
    events.clear()
    await fs.unlink(ROOT_INODE, b"victim")
    await fs.commit()  # the timer's commit, not an fsync
    assert events == ["commit", "durable", "discard", "release"]
    assert fs.alloc.pending_blocks == 0
    del ino


async def test_rename_moves_the_name_charge(cvol: Volume) -> None:
    """Defect 11: creating a name charged 64 + its length, removing refunded 64 + its
    current length: every rename drifted the principal's space use."""
    fs = cvol.fs
    assert fs is not None
    root = fs.principals.get("root")
    base = root.usage.space
    await write_file(fs, b"a", b"")
    await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"a-much-longer-name", 0)
    await fs.rename(ROOT_INODE, b"a-much-longer-name", ROOT_INODE, b"bb", 0)
    await write_file(fs, b"c" * 40, b"")
    await fs.rename(ROOT_INODE, b"bb", ROOT_INODE, b"c" * 40, 0)  # over another name
    await fs.unlink(ROOT_INODE, b"c" * 40)
    assert root.usage.space == base


def usage(fs: FileSystem) -> dict[str, tuple[int, int]]:
    return {p.name: (p.usage.space, p.usage.inodes) for p in fs.principals._by_id.values()}


async def test_live_usage_equals_the_recount_after_a_random_workload(cvol: Volume) -> None:
    """Random creates, writes, truncates, renames (over names too), links and unlinks;
    then the charges kept live equal the recount a remount makes from the volume."""
    fs = cvol.fs
    assert fs is not None
    rng = random.Random(11)
    names: list[bytes] = []
    for step in range(400):
        op = rng.random()
        if op < 0.3 or not names:
            name = b"n%d-" % step + b"x" * rng.randrange(0, 60)
            await write_file(fs, name, fill(step, rng.randrange(0, 3 * BS)))
            names.append(name)
        elif op < 0.55:
            src = rng.choice(names)
            dst = b"r%d-" % step + b"y" * rng.randrange(0, 80) if rng.random() < 0.6 \
                else rng.choice(names)
            if dst != src:
                await fs.rename(ROOT_INODE, src, ROOT_INODE, dst, 0)
                names.remove(src)
                if dst not in names:
                    names.append(dst)
        elif op < 0.7:
            name = rng.choice(names)
            node = fs.lookup(ROOT_INODE, name)
            await fs.setattr(node.id, size=rng.randrange(0, 4 * BS), caller=CALLER)
            fs.forget(node.id, 1)
        elif op < 0.8:
            name = rng.choice(names)
            node = fs.lookup(ROOT_INODE, name)
            link = b"l%d" % step
            fs.link(node.id, ROOT_INODE, link, CALLER)
            names.append(link)
            fs.forget(node.id, 1)
        else:
            name = rng.choice(names)
            await fs.unlink(ROOT_INODE, name)
            names.remove(name)
        if step % 50 == 0:
            await fs.commit()
    live = usage(fs)
    await fs.sync()
    await cvol.close()
    fs = await cvol.open()
    assert usage(fs) == live


@pytest.mark.mounted
def test_direct_client_overwrites_committed_data_through_a_new_layout(mnt: Path) -> None:
    """A direct client's layout over blocks a commit has sealed is recalled (Sealed);
    the client library asks again, the server copies the blocks, and the write lands."""
    from kernelshim.client import Client
    data = fill(4, 3 * BS + 77)
    with Client.connect(mnt) as c:
        with c.open("d", "w+") as f:
            f.write(data)
            f.commit()
            f.fsync()  # commits: the blocks are sealed under the layout the client holds
            f.pwrite(b"X" * 10, 5000)
            f.pwrite(b"Y", len(data) - 1)
            f.commit()
        with c.open("d", "r+") as f:  # a fresh handle: no layout held at all
            f.pwrite(b"Z" * (BS + 2), 100)
    want = bytearray(data)
    want[5000:5010] = b"X" * 10
    want[-1:] = b"Y"
    want[100:100 + BS + 2] = b"Z" * (BS + 2)
    assert (mnt / "d").read_bytes() == bytes(want)


@pytest.mark.mounted
def test_direct_writes_over_committed_blocks_and_into_holes_of_a_sparse_file(
        mnt: Path) -> None:
    """Inside the file the client library asks for no layout: the server relocates
    committed blocks under the write itself (with the data, R1), and a hole answers
    NotAllocated, after which the library asks for a layout and writes again. Whole and
    partial blocks, one write over a committed block and a hole at once; the bytes read
    back through the client and through the mount."""
    from kernelshim.client import Client
    data = fill(7, 3 * BS)
    with open(mnt / "s", "wb") as f:
        f.write(data)
        f.truncate(10 * BS)  # blocks 3-9 are holes inside the file
        os.fsync(f.fileno())
    want = bytearray(data) + bytes(7 * BS)
    writes = [(5 * BS, b"H" * BS),              # a whole hole
              (BS + 100, b"p" * 300),           # part of a committed block
              (2 * BS + 4000, b"x" * 200),      # the end of a committed block + a hole
              (0, b"W" * BS),                   # a whole committed block
              (8 * BS + 7, b"q" * 9)]           # part of a hole
    with Client.connect(mnt) as c:
        with c.open("s", "r+") as f:
            for off, b in writes:
                assert f.pwrite(b, off) == len(b)
                want[off:off + len(b)] = b
            f.commit()
            f.fsync()
        with c.open("s", "r") as f:
            assert bytes(f.pread(len(want), 0)) == bytes(want)
    assert (mnt / "s").read_bytes() == bytes(want)


# -- failures: read-only rather than damage; errors reported once per open file ---------------


async def test_a_failed_barrier_turns_the_volume_read_only(cvol: Volume, monkeypatch,
                                                           caplog) -> None:
    import errno
    from fs.errors import ReadOnly, WriteFailed
    from kernelshim import DeviceError
    fs = cvol.fs
    assert fs is not None
    ino = await write_file(fs, b"before", fill(1, 3 * BS))
    await fs.sync()
    committed = committed_extents(cvol, ino)

    async def failing_flush(**_kw) -> None:
        raise DeviceError("fsync of the backing store failed: [Errno 5] EIO")

    h1 = fs.open(ino, os.O_RDWR, CALLER)
    h2 = fs.open(ino, os.O_RDWR, CALLER)
    h3 = fs.open(ino, os.O_RDONLY, CALLER)
    await fs.write(h1.fh, 0, b"lost?")
    monkeypatch.setattr(cvol.kernel.pager, "flush", failing_flush)
    with pytest.raises(WriteFailed) as ei:
        await fs.fsync(h1.fh, False)
    assert ei.value.errno == errno.EIO
    assert "read-only" in caplog.text
    # Each open file hears of it once, then fsync succeeds (Linux's errseq).
    with pytest.raises(WriteFailed):
        await fs.fsync(h2.fh, False)
    await fs.fsync(h1.fh, False)
    await fs.fsync(h2.fh, False)
    # Every change now gets EROFS; reads go on.
    for change in (lambda: fs.write(h1.fh, 0, b"x"),
                   lambda: fs.unlink(ROOT_INODE, b"before"),
                   lambda: fs.setattr(ino, mode=0o600, caller=CALLER)):
        with pytest.raises(ReadOnly) as ei:
            await change()
        assert ei.value.errno == errno.EROFS
    with pytest.raises(ReadOnly):
        fs.create(ROOT_INODE, b"new", 0o644, os.O_RDWR, CALLER)
    with pytest.raises(ReadOnly):
        fs.open(ino, os.O_WRONLY, CALLER)
    assert bytes(await fs.read(h3.fh, 5, 10)) == fill(1, 3 * BS)[5:15]
    # Nothing more was committed: the committed file is as it was.
    assert committed_extents(cvol, ino) == committed
    for h in (h1, h2, h3):
        await fs.release(h.fh)
    monkeypatch.undo()


@pytest.mark.mounted
def test_uncommitted_write_layout_is_trimmed_at_the_next_mount(volume: Path,
                                                                mount_factory) -> None:
    """A direct client's write layout (preallocation past EOF) that was never committed
    before the daemon died is dropped by the next mount, charges and all."""
    import json
    from conftest import sluice
    from kernelshim.client import Client
    m = mount_factory(volume)

    def root_space() -> int:
        out = json.loads(sluice("principal", "ls", str(m.path), "--json").stdout)
        rows = out["principals"] if isinstance(out, dict) else out
        return next(r for r in rows if r["name"] == "root")["usage"]["space"]

    base = root_space()
    with Client.connect(m.path) as c:
        f = c.open("direct.dat", "w")
        f.write(b"d" * 12000)  # a 4 MiB layout, nothing committed
        with open(m.path / "other", "wb") as o:  # a commit, with the layout in it
            o.write(b"o")
            o.flush()
            os.fsync(o.fileno())
        _kill_and_remount(m)
    assert os.stat(m.path / "direct.dat").st_blocks == 0
    assert root_space() - base < 64 * 1024  # the entries and one block, not 4 MiB
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


@pytest.mark.mounted
@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("grow", ["write", "truncate", "direct-commit"])
def test_uncommitted_direct_bytes_past_eof_never_show(mnt: Path, sealed: bool,
                                                      grow: str) -> None:
    """Finding D1 of the crash campaign: a direct client that wrote past EOF inside the
    file's last block and never committed (it died, or just closed) must not have those
    bytes show when the file grows later — through a write further on, a truncate up, or
    another direct client's commit (R6)."""
    from kernelshim.client import Client
    p = mnt / "f"
    head = fill(12, 2884)
    p.write_bytes(head)
    if sealed:
        with open(p, "rb+") as f:
            os.fsync(f.fileno())  # a commit: the last block is sealed
    with Client.connect(mnt) as c:
        f = c.open("f", "r+")
        c.call("layout_get", slot=f.slot, offset=3528, length=1000)
        c.shmview[:1000] = b"J" * 1000
        c.call("write", slot=f.slot, offset=3528, length=1000, buf=0)
        # never committed: the connection goes away
    assert p.read_bytes() == head
    if grow == "write":
        with open(p, "r+b") as f:
            f.seek(8000)
            f.write(b"Z")
        want = head + bytes(8000 - len(head)) + b"Z"
    elif grow == "truncate":
        os.truncate(p, 8001)
        want = head + bytes(8001 - len(head))
    else:
        with Client.connect(mnt) as c2, c2.open("f", "r+") as g:
            g.pwrite(b"Z", 8000)
        want = head + bytes(8000 - len(head)) + b"Z"
    assert p.read_bytes() == want


@pytest.mark.mounted
@pytest.mark.parametrize("grow", ["direct-commit", "truncate-then-commit"])
def test_a_direct_writers_close_keeps_another_writers_grant(mnt: Path, grow: str) -> None:
    """One direct client closes a file after writing past EOF without committing while
    another direct client holds the same file open for writing: the close does not
    revoke the other's grant (its next write and commit succeed), and the first one's
    uncommitted bytes still never show (R6) — through a commit that grows the file, or
    after a truncate up, a commit inside the new size. (The suite once saw the other
    client's commit fail with GrantRevoked when the first connection's teardown ran
    after the second open.)"""
    from kernelshim.client import Client
    p = mnt / "f"
    head = fill(13, 2884)
    p.write_bytes(head)
    with Client.connect(mnt) as c2, c2.open("f", "r+") as g:
        with Client.connect(mnt) as c:
            f = c.open("f", "r+")
            c.call("layout_get", slot=f.slot, offset=3528, length=1000)
            c.shmview[:1000] = b"J" * 1000
            c.call("write", slot=f.slot, offset=3528, length=1000, buf=0)
            f.close()  # the reply comes after the daemon's close
        assert p.read_bytes() == head
        if grow == "truncate-then-commit":
            os.truncate(p, 8001)
        g.pwrite(b"Z", 8000)
    want = head + bytes(8000 - len(head)) + b"Z"
    assert p.read_bytes() == want  # no byte of the first client's "J"s


async def test_a_file_emptied_after_a_drop_is_marked_in_the_commit_that_empties_it(
        cvol: Volume, monkeypatch) -> None:
    """Rule 4 (R7): a discardable file the pager dropped comes back, after a crash,
    whole or empty *and marked* user.sluice.discarded. `run_discarder` empties it
    (size 0 saved at once) and then waits for the writes in flight through the
    file's old grants (`drain_writes`) before it sets the mark; a commit in that
    wait stored size 0 without the mark and without the file on the `unflushed`
    list, so a crash there left an empty, unmarked cache file (found reading the code
    for the 2026-12-01 campaigns). Here a commit runs in exactly that wait."""
    fs = cvol.fs
    assert fs is not None
    h, node = fs.create(ROOT_INODE, b"c", 0o644, os.O_RDWR, CALLER)
    fs.setxattr(node.id, b"user.sluice.discardable", b"1", 0)
    await fs.write(h.fh, 0, b"x" * (3 * BS))
    await fs.commit(durable=True)
    committed: list[tuple[int, bool, list[int]]] = []
    real = fs.kernel.drain_writes

    async def drain_writes(grants):
        await fs.commit(durable=True)  # the 1 s timer's commit, landing in the wait
        db = sqlite3.connect(cvol.path / volume.DB)
        try:
            size = db.execute("SELECT size FROM inodes WHERE id=?", (node.id,)).fetchone()[0]
            mark = db.execute("SELECT 1 FROM xattrs WHERE inode=? AND name=?",
                              (node.id, b"user.sluice.discarded")).fetchone() is not None
            listed = db.execute("SELECT value FROM meta WHERE key='unflushed'").fetchone()
        finally:
            db.close()
        committed.append((size, mark, json.loads(listed[0]) if listed else []))
        await real(grants)
    monkeypatch.setattr(fs.kernel, "drain_writes", drain_writes)
    fs._on_discarded(node.id)  # what the pager calls when it drops the dirty frames
    async with fs._lock(node):
        await fs._empty_locked(node, mark=True)  # run_discarder's step
    await fs.release(h.fh)
    assert committed, "the emptying did not wait for the file's grants"
    for size, mark, listed in committed:
        # whole (not yet emptied), emptied and marked, or listed: the next mount
        # empties and marks it
        assert size == 3 * BS or mark or node.id in listed, (size, mark, listed)
    assert fs.md.get_xattr(node.id, b"user.sluice.discarded") == b"1"
