"""`sluice fsck` finds and repairs damage: each kind is made directly in an unmounted
volume (SQL on meta.db, bytes and checksums of the device), then the report must name
it, `--repair` must fix it and say what it did, a second plain run must be clean, and
the undamaged files must read back intact through a real mount.

The volume is filled once per module through a real mount and copied for each test.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import xxhash

from conftest import make_volume, sluice

pytestmark = pytest.mark.mounted

BS = 4096
SIZE = "32M"
NBLOCKS = (32 << 20) // BS


def _data(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


#: path -> contents of the regular files the template volume holds
FILES: dict[str, bytes] = {
    "a": _data(1, 3 * BS + 100),
    "b": _data(2, 5 * BS),
    "small": b"tiny\n",
    "dir/c": _data(3, 2 * BS),
    "dir/sub/d": _data(4, 1000),
    "p/q/r": _data(5, BS + 1),
    "x": _data(6, 4 * BS),
    "y": _data(7, 4 * BS),
}
LINKS = {"dir/a-link": "a"}   # hard links
SYMLINKS = {"sym": "a"}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A volume filled through a real mount, then unmounted."""
    from conftest import Mount
    base = tmp_path_factory.mktemp("fscktpl")
    vol = make_volume(base / "vol", SIZE)
    mp = base / "mnt"
    mp.mkdir()
    m = Mount(vol, mp, None, base / "daemon.log")
    m.start()
    try:
        for rel, data in FILES.items():
            (mp / rel).parent.mkdir(parents=True, exist_ok=True)
            (mp / rel).write_bytes(data)
        for rel, target in LINKS.items():
            os.link(mp / target, mp / rel)
        for rel, target in SYMLINKS.items():
            os.symlink(target, mp / rel)
    finally:
        m.stop()
    r = sluice("fsck", str(vol), "--verify-data", check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    return vol


@pytest.fixture
def vol(template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "vol"
    subprocess.run(["cp", "-a", "--sparse=always", str(template), str(dst)], check=True)
    return dst


# -- helpers: look at and damage an unmounted volume --------------------------------------

class DB:
    def __init__(self, vol: Path) -> None:
        self.con = sqlite3.connect(vol / "meta.db", isolation_level=None)

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.con.close()

    def q(self, sql: str, *args: object) -> list[tuple]:
        return self.con.execute(sql, args).fetchall()

    def ino(self, rel: str) -> int:
        ino = 1
        for part in rel.split("/"):
            (ino,), = self.q("SELECT inode FROM dentries WHERE parent=? AND name=?",
                             ino, part.encode())
        return ino

    def extents(self, ino: int) -> list[tuple[int, int, int, int]]:
        return self.q("SELECT file_block, dev_block, count, state FROM extents "
                      "WHERE inode=? ORDER BY file_block", ino)

    def dev_block(self, rel: str, file_block: int) -> int:
        for fb, dev, n, _st in self.extents(self.ino(rel)):
            if fb <= file_block < fb + n:
                return dev + file_block - fb
        raise AssertionError(f"{rel} has no block {file_block}")


def flip_byte(vol: Path, dev_block: int, offset: int = 100) -> None:
    fd = os.open(vol / "device.img", os.O_RDWR)
    try:
        pos = dev_block * BS + offset
        (b,) = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b ^ 0x5A]), pos)
    finally:
        os.close(fd)


def write_raw_block(vol: Path, dev_block: int, data: bytes) -> None:
    """Write a block and its checksum behind sluice's back (as a killed daemon would
    have left a block it wrote before committing its extent)."""
    assert len(data) == BS
    fd = os.open(vol / "device.img", os.O_RDWR)
    try:
        os.pwrite(fd, data, dev_block * BS)
    finally:
        os.close(fd)
    sums = np.load(vol / "checksums", mmap_mode="r+")
    sums[dev_block] = xxhash.xxh3_64_intdigest(data) or 1
    sums.flush()
    del sums


def fsck(vol: Path, *args: str) -> subprocess.CompletedProcess:
    r = sluice("fsck", str(vol), *args, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def repair_and_recheck(vol: Path, *expect: str, verify: bool = False) -> str:
    """A plain run finds the damage (exit 4), --repair fixes it (exit 1) and says what it
    did, the next plain run is clean (exit 0). Returns the repair run's report."""
    extra = ("--verify-data",) if verify else ()
    r = fsck(vol, *extra)
    assert r.returncode == 4, r.stdout + r.stderr
    assert re.search(r"\d+ errors? found$", r.stdout.strip()), r.stdout
    for text in expect:
        assert text in r.stdout, f"{text!r} not in:\n{r.stdout}"
    fixed = fsck(vol, "--repair", *extra)
    assert fixed.returncode == 1, fixed.stdout + fixed.stderr
    assert re.search(r"\d+ errors? repaired$", fixed.stdout.strip()), fixed.stdout
    assert "repaired: " in fixed.stdout
    assert "not repaired" not in fixed.stdout
    again = fsck(vol, "--verify-data")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().endswith("clean") and ", 0 bad" in again.stdout, again.stdout
    assert "error:" not in again.stdout and "note:" not in again.stdout, again.stdout
    return fixed.stdout


@pytest.fixture
def mounted(mount_factory) -> Iterator:
    """Call with a volume: mounts it, returns the mount point (torn down after)."""
    mounts = []

    def mount(vol: Path) -> Path:
        m = mount_factory(vol)
        mounts.append(m)
        return m.path
    yield mount
    for m in mounts:
        assert m.daemon_alive, "the daemon died during the test"


def assert_intact(mp: Path, *, damaged: tuple[str, ...] = ()) -> None:
    """Every file not named in `damaged` reads back exactly; links still work."""
    for rel, data in FILES.items():
        if rel in damaged:
            continue
        assert (mp / rel).read_bytes() == data, rel
    for rel, target in LINKS.items():
        if rel not in damaged and target not in damaged:
            assert (mp / rel).read_bytes() == FILES[target]
            assert os.stat(mp / rel).st_ino == os.stat(mp / target).st_ino
    for rel, target in SYMLINKS.items():
        if rel not in damaged:
            assert os.readlink(mp / rel) == target


# -- each kind of damage ----------------------------------------------------------------------

def test_template_is_clean_and_reports_progress_on_stderr(vol: Path) -> None:
    r = fsck(vol, "--verify-data")
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    # The report is on stdout, progress on stderr (and -q silences it).
    assert "fsck: verifying" in r.stderr and "checking extents" in r.stderr, r.stderr
    assert "fsck:" not in r.stdout
    q = fsck(vol, "--verify-data", "-q")
    assert q.returncode == 0 and q.stderr == "", q.stderr


def test_dangling_entries(vol: Path, mounted) -> None:
    with DB(vol) as db:
        dir_ino = db.ino("dir")
        db.q("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 9999)", b"ghost")
        db.q("INSERT INTO dentries (parent, name, inode) VALUES (8888, ?, ?)",
             b"lost-parent", db.ino("a"))
        # A file is not a directory: an entry "in" it is dangling too.
        db.q("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
             db.ino("small"), b"in-a-file", db.ino("b"))
    out = repair_and_recheck(
        vol, "dangling entry 'ghost' in inode 1 -> missing inode 9999",
        "dangling entry 'lost-parent': its directory, inode 8888, is missing",
        "dangling entry 'in-a-file'", "is not a directory")
    assert out.count("repaired: removed the entry") == 3, out
    mp = mounted(vol)
    assert sorted(os.listdir(mp)) == sorted(["a", "b", "small", "dir", "p", "x", "y", "sym"])
    assert os.stat(mp / "dir").st_ino == dir_ino
    assert_intact(mp)


def test_wrong_link_counts(vol: Path, mounted) -> None:
    with DB(vol) as db:
        a, d = db.ino("a"), db.ino("dir")
        db.q("UPDATE inodes SET nlink=5 WHERE id=?", a)
        db.q("UPDATE inodes SET nlink=9 WHERE id=?", d)
    out = repair_and_recheck(vol, f"/a (inode {a}) has link count 5, its names make 2",
                             f"/dir (inode {d}) has link count 9, its names make 3")
    assert "repaired: set it to 2" in out and "repaired: set it to 3" in out
    mp = mounted(vol)
    assert os.stat(mp / "a").st_nlink == 2 and os.stat(mp / "dir").st_nlink == 3
    # Unlinking one name leaves the other working (with nlink 5 the inode would never
    # have been freed; with too low a count it would be freed under the other name).
    os.unlink(mp / "dir" / "a-link")
    assert os.stat(mp / "a").st_nlink == 1
    assert_intact(mp, damaged=("dir/a-link",))


def test_orphaned_inode_is_freed_with_its_blocks(vol: Path, mounted) -> None:
    with DB(vol) as db:
        b = db.ino("b")
        b_blocks = [dev + i for _fb, dev, n, _st in db.extents(b) for i in range(n)]
        db.q("DELETE FROM dentries WHERE parent=1 AND name=?", b"b")
    before = fsck(vol)
    out = repair_and_recheck(vol, f"orphaned inode {b} (no name points to it)")
    assert "repaired: freed it (with its extents, xattrs)" in out
    # Its blocks were freed and, being no longer owned, discarded in the same run.
    assert f"discarded {len(b_blocks)} blocks" in out, out
    with DB(vol) as db:
        assert db.q("SELECT COUNT(*) FROM inodes WHERE id=?", b) == [(0,)]
        assert db.extents(b) == []
    sums = np.load(vol / "checksums", mmap_mode="r")
    assert not sums[b_blocks].any()
    assert _in_use(fsck(vol).stdout) == _in_use(before.stdout) - len(b_blocks)
    mp = mounted(vol)
    assert not (mp / "b").exists()
    assert_intact(mp, damaged=("b",))


def _in_use(report: str) -> int:
    line = next(x for x in report.splitlines() if " blocks in use by " in x)
    return int(line.split()[0])


def test_inode_unlinked_while_open_is_a_note_and_freed(vol: Path, mounted) -> None:
    """The state a crash leaves for a file unlinked while open: the mount frees it, so
    it is no error; --repair frees it now."""
    with DB(vol) as db:
        x = db.ino("x")
        db.q("DELETE FROM dentries WHERE parent=1 AND name=?", b"x")
        db.q("UPDATE inodes SET nlink=0 WHERE id=?", x)
    r = fsck(vol)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert f"note: inode {x} was unlinked while open" in r.stdout
    r = fsck(vol, "--repair")
    assert r.returncode == 0, r.stdout
    assert "repaired: freed it" in r.stdout and "discarded 4 blocks" in r.stdout
    r = fsck(vol, "--verify-data")
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout
    assert_intact(mounted(vol), damaged=("x",))


def test_directory_cycle_cut_off_from_the_root(vol: Path, mounted) -> None:
    """p/q/r with p's entry moved into q: p and q name each other, nothing reaches them."""
    with DB(vol) as db:
        p, q, r = db.ino("p"), db.ino("p/q"), db.ino("p/q/r")
        db.q("UPDATE dentries SET parent=? WHERE parent=1 AND name=?", q, b"p")
    out = repair_and_recheck(vol, f"orphaned inode {p} (its names are in directories cut "
                                  "off from the root)", f"orphaned inode {q}",
                             f"orphaned inode {r}",
                             "/ (inode 1) has link count 4, its names make 3")
    assert "freed it (with its extents, xattrs and entries)" in out
    with DB(vol) as db:
        for ino in (p, q, r):
            assert db.q("SELECT COUNT(*) FROM inodes WHERE id=?", ino) == [(0,)]
        assert db.q("SELECT COUNT(*) FROM dentries WHERE parent IN (?, ?)", p, q) == [(0,)]
    mp = mounted(vol)
    assert not (mp / "p").exists() and os.stat(mp).st_nlink == 3
    assert_intact(mp, damaged=("p/q/r",))


def test_second_name_of_a_directory(vol: Path, mounted) -> None:
    with DB(vol) as db:
        d = db.ino("dir/sub")
        db.q("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, ?)", b"alias", d)
    out = repair_and_recheck(vol, f"directory /dir/sub (inode {d}) has a second name "
                                  "'alias' in / (inode 1)")
    assert "repaired: removed the second name" in out
    mp = mounted(vol)
    assert not (mp / "alias").exists()
    assert_intact(mp)


def test_malformed_inode_is_freed_with_its_names(vol: Path, mounted) -> None:
    """An inode whose mode has no file type: nothing can serve it. It is freed, and the
    entry naming it is then dangling and removed."""
    with DB(vol) as db:
        s = db.ino("small")
        db.q("UPDATE inodes SET mode=? WHERE id=?", 0o644, s)
    out = repair_and_recheck(vol, f"inode {s} is malformed (mode 420",
                             f"dangling entry 'small' in inode 1 -> missing inode {s}")
    assert "repaired: freed it (with its extents and xattrs)" in out
    assert "discarded 1 blocks" in out
    mp = mounted(vol)
    assert not (mp / "small").exists()
    assert_intact(mp, damaged=("small",))


def test_extent_past_the_device_end(vol: Path, mounted) -> None:
    """b's 5-block extent moved to start at the last device block: 4 of its blocks do
    not exist. Only those are dropped; the one that exists stays mapped."""
    with DB(vol) as db:
        b = db.ino("b")
        (fb, _dev, n, _st), = db.extents(b)
        assert (fb, n) == (0, 5)
        db.q("UPDATE extents SET dev_block=? WHERE inode=?", NBLOCKS - 1, b)
        y = db.ino("y")
        db.q("UPDATE extents SET dev_block=? WHERE inode=?", NBLOCKS + 100, y)
    out = repair_and_recheck(
        vol, f"extent of /b (inode {b}) at byte offset 0 runs past the end of the device: "
             f"its last 4 blocks (from device block {NBLOCKS}) do not exist",
        f"maps device blocks {NBLOCKS + 100}+4, outside the device ({NBLOCKS} blocks)")
    assert "repaired: dropped those 4 blocks" in out and "repaired: dropped the extent" in out
    with DB(vol) as db:
        assert db.extents(b) == [(0, NBLOCKS - 1, 1, 1)]
        assert db.extents(y) == []
        # The block counts follow the drops (part of those repairs, no error of theirs).
        assert db.q("SELECT blocks FROM inodes WHERE id IN (?, ?) ORDER BY id", b, y) == \
            [(1,), (0,)]
    mp = mounted(vol)
    # The sizes stay; what was dropped reads as zeros, never EIO.
    assert (mp / "y").read_bytes() == bytes(4 * BS)
    data = (mp / "b").read_bytes()
    assert len(data) == 5 * BS and data[BS:] == bytes(4 * BS)
    assert_intact(mp, damaged=("b", "y"))


def test_blocks_owned_twice(vol: Path, mounted) -> None:
    """y's extent pointed half into x's blocks. x was written last (newer mtime): it
    keeps the two shared blocks; y loses exactly those, and keeps the rest."""
    with DB(vol) as db:
        x, y = db.ino("x"), db.ino("y")
        (_fb, xdev, _n, _st), = db.extents(x)
        (_fb, ydev, _n, _st), = db.extents(y)
        db.q("UPDATE extents SET dev_block=? WHERE inode=?", xdev + 2, y)
        db.q("UPDATE inodes SET mtime_ns = mtime_ns + 1000000000 WHERE id=?", x)
    out = repair_and_recheck(
        vol, f"device blocks {xdev + 2}+2 are owned twice: by /y (inode {y}) at byte "
             f"offset 0 and by /x (inode {x}) at byte offset {2 * BS}")
    assert (f"repaired: dropped them from /y (inode {y}) at byte offset 0 (it reads zeros "
            f"there now); /x (inode {x}) keeps them") in out, out
    with DB(vol) as db:
        assert db.extents(x) == [(0, xdev, 4, 1)]
        assert db.extents(y) == [(2, xdev + 4, 2, 1)]
    mp = mounted(vol)
    ydata = (mp / "y").read_bytes()
    assert len(ydata) == 4 * BS and ydata[:2 * BS] == bytes(2 * BS)
    assert_intact(mp, damaged=("y",))


def test_file_block_mapped_twice(vol: Path, mount_factory, mounted) -> None:
    """Two extents of one file covering the same file block: the daemon cannot even
    load such a file (EIO); the repair drops the second mapping."""
    with DB(vol) as db:
        b = db.ino("b")
        free = NBLOCKS - 10
        db.q("INSERT INTO extents (inode, file_block, dev_block, count, state) "
             "VALUES (?, 3, ?, 4, 1)", b, free)
        db.q("UPDATE inodes SET blocks=9 WHERE id=?", b)
    write_raw_block(vol, free + 3, _data(9, BS))  # past b's end: must never show up
    m = mount_factory(vol, name="first")
    with pytest.raises(OSError) as ei:
        (m.path / "b").read_bytes()
    assert ei.value.errno == errno.EIO
    m.stop()
    out = repair_and_recheck(vol, f"file blocks 3+2 of /b (inode {b}) are mapped by two "
                                  "extents")
    assert "dropped the second mapping (2 blocks at device block" in out
    assert "lie past its end of file" in out and "discarded 1 blocks" in out, out
    with DB(vol) as db:
        assert len(db.extents(b)) == 1
        assert db.q("SELECT blocks FROM inodes WHERE id=?", b) == [(5,)]
    assert_intact(mounted(vol))


def test_wrong_block_count(vol: Path, mounted) -> None:
    with DB(vol) as db:
        b = db.ino("b")
        db.q("UPDATE inodes SET blocks=99 WHERE id=?", b)
    out = repair_and_recheck(vol, f"/b (inode {b}) records 99 blocks, its extents hold 5")
    assert "repaired: set it to 5" in out
    mp = mounted(vol)
    assert os.stat(mp / "b").st_blocks == 5 * BS // 512
    assert_intact(mp)


def test_unwritten_extents_never_committed(vol: Path, mounted) -> None:
    """Blocks a write layout allocated past the end of the file, for a write that was
    never committed (the client died; its close would have trimmed them)."""
    with DB(vol) as db:
        a = db.ino("a")  # 3 blocks + 100 bytes: file blocks 0..3
        db.q("INSERT INTO extents (inode, file_block, dev_block, count, state, principal)"
             " VALUES (?, 4, ?, 3, 0, 0)", a, NBLOCKS - 20)
        db.q("UPDATE inodes SET blocks = blocks + 3 WHERE id=?", a)
    write_raw_block(vol, NBLOCKS - 19, _data(10, BS))  # written, never committed
    out = repair_and_recheck(vol, f"3 unwritten blocks of /a (inode {a}) from byte offset "
                                  f"{4 * BS} lie past its end of file: laid out for a write "
                                  "that was never committed")
    assert "repaired: dropped those 3 blocks" in out and "discarded 1 blocks" in out
    with DB(vol) as db:
        assert [e[0] for e in db.extents(a)] == [0]
        assert db.q("SELECT blocks FROM inodes WHERE id=?", a) == [(4,)]
    mp = mounted(vol)
    # Growing the file shows zeros where the uncommitted write had been.
    os.truncate(mp / "a", 8 * BS)
    assert (mp / "a").read_bytes() == FILES["a"] + bytes(8 * BS - len(FILES["a"]))
    assert_intact(mp, damaged=("a", "dir/a-link"))


def test_charges_to_a_principal_that_is_gone(vol: Path, mount_factory, mounted) -> None:
    """A principal removed from principals.json while the volume still tags storage
    with it (a crash inside `principal rm --move-to`): the mount would silently charge
    root; fsck names it and the repair zeroes the tags (charges root, explicitly)."""
    m = mount_factory(vol, name="first")
    sluice("principal", "add", str(m.path), "alice", "--space", "1M")
    sluice("run", str(m.path), "--principal", "alice", "--", sys.executable, "-c",
           f"open({str(m.path / 'alice.dat')!r}, 'wb').write(b'z' * {3 * BS})")
    m.stop()
    pj = vol / "principals.json"
    data = json.loads(pj.read_text())
    (rec,) = [r for r in data["principals"] if r["name"] == "alice"]
    data["principals"].remove(rec)
    pj.write_text(json.dumps(data))
    pj.chmod(0o600)  # a volume's files are private (fsck refuses an exposed volume)
    pid = rec["id"]
    out = repair_and_recheck(vol, f"3 blocks, 1 inodes and 1 entries are charged to principal "
                                  f"id {pid}, which principals.json does not have")
    assert "repaired: zeroed the tag: charged them to root" in out
    with DB(vol) as db:
        for table in ("inodes", "dentries", "extents"):
            assert db.q(f"SELECT COUNT(*) FROM {table} WHERE principal=?", pid) == [(0,)]
    mp = mounted(vol)
    assert (mp / "alice.dat").read_bytes() == b"z" * 3 * BS
    assert_intact(mp)


def test_principal_over_its_bank_is_a_note(vol: Path, mount_factory) -> None:
    m = mount_factory(vol, name="first")
    sluice("principal", "add", str(m.path), "bob", "--space", "1M")
    sluice("run", str(m.path), "--principal", "bob", "--", sys.executable, "-c",
           f"open({str(m.path / 'bob.dat')!r}, 'wb').write(b'z' * {100 * BS})")
    m.stop()
    pj = vol / "principals.json"
    data = json.loads(pj.read_text())
    next(r for r in data["principals"] if r["name"] == "bob")["banks"]["space"] = 4096
    pj.write_text(json.dumps(data))
    pj.chmod(0o600)  # a volume's files are private (fsck refuses an exposed volume)
    r = fsck(vol)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert "note: principal 'bob' holds" in r.stdout and "over its space bank of 4096" \
        in r.stdout


def test_checksum_mismatch_is_named_and_zeroed(vol: Path, mounted) -> None:
    with DB(vol) as db:
        c, dev = db.ino("dir/c"), db.dev_block("dir/c", 1)
    flip_byte(vol, dev)
    # Without --verify-data only metadata is checked: clean.
    r = fsck(vol)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    out = repair_and_recheck(
        vol, f"checksum mismatch in device block {dev}: /dir/c (inode {c}) bytes "
             f"{BS}..{2 * BS - 1}", "1 bad", verify=True)
    assert (f"repaired: zeroed bytes {BS}..{2 * BS - 1} of /dir/c (inode {c})") in out, out
    mp = mounted(vol)
    assert (mp / "dir" / "c").read_bytes() == FILES["dir/c"][:BS] + bytes(BS)
    assert_intact(mp, damaged=("dir/c",))


def test_checksum_mismatches_in_one_run_are_all_found(vol: Path) -> None:
    """Several bad blocks in one extent, and in a second file: every one is named."""
    with DB(vol) as db:
        bad = [db.dev_block("b", i) for i in (0, 2, 3)] + [db.dev_block("x", 3)]
    for dev in bad:
        flip_byte(vol, dev, offset=7)
    r = fsck(vol, "--verify-data")
    assert r.returncode == 4 and "4 bad" in r.stdout, r.stdout
    for dev, (name, off) in zip(bad, [("/b", 0), ("/b", 2), ("/b", 3), ("/x", 3)]):
        assert f"device block {dev}: {name} (inode" in r.stdout
        assert f"bytes {off * BS}..{(off + 1) * BS - 1}" in r.stdout
    r = fsck(vol, "--verify-data", "--repair")
    assert r.returncode == 1 and r.stdout.strip().endswith("4 errors repaired"), r.stdout
    r = fsck(vol, "--verify-data")
    assert r.returncode == 0 and ", 0 bad" in r.stdout, r.stdout


def test_leaked_blocks_are_reported_and_discarded(vol: Path, mounted) -> None:
    """Data no extent owns (a daemon killed before it committed): free space, so a note
    and exit 0, as a crashed volume must be; --repair discards it."""
    leaked = [NBLOCKS - 40, NBLOCKS - 39, NBLOCKS - 5]
    for i, b in enumerate(leaked):
        write_raw_block(vol, b, _data(20 + i, BS))
    r = fsck(vol)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert (f"note: 3 leaked blocks: device blocks holding data no extent owns "
            f"({NBLOCKS - 40}+2, {NBLOCKS - 5}+1)") in r.stdout, r.stdout
    r = fsck(vol, "--repair")
    assert r.returncode == 0 and "repaired: discarded 3 blocks" in r.stdout, r.stdout
    r = fsck(vol, "--verify-data")
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout
    sums = np.load(vol / "checksums", mmap_mode="r")
    assert not sums[leaked].any()
    assert_intact(mounted(vol))


def test_unrepairable_error_exits_4_even_with_repair(vol: Path) -> None:
    (vol / "principals.json").write_text("{not json")
    (vol / "principals.json").chmod(0o600)
    r = fsck(vol, "--repair")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "error: principals.json cannot be loaded" in r.stdout
    assert "not repaired: fsck cannot fix this" in r.stdout
    assert r.stdout.strip().endswith("1 error found, 0 repaired, 1 left"), r.stdout


def test_many_kinds_of_damage_repaired_in_one_run(vol: Path, mounted) -> None:
    with DB(vol) as db:
        a, b, x = db.ino("a"), db.ino("b"), db.ino("x")
        db.q("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 4242)", b"ghost")
        db.q("UPDATE inodes SET nlink=7 WHERE id=?", a)
        db.q("DELETE FROM dentries WHERE parent=1 AND name=?", b"x")
        (_fb, bdev, _n, _st), = db.extents(b)
        db.q("UPDATE extents SET principal=31337 WHERE inode=?", b)
        cdev = db.dev_block("dir/c", 0)
    flip_byte(vol, cdev)
    write_raw_block(vol, NBLOCKS - 3, _data(30, BS))
    r = fsck(vol, "--verify-data")
    assert r.returncode == 4 and r.stdout.strip().endswith("5 errors found"), r.stdout
    r = fsck(vol, "--verify-data", "--repair")
    assert r.returncode == 1 and r.stdout.strip().endswith("5 errors repaired"), r.stdout
    r = fsck(vol, "--verify-data")
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert "note" not in r.stdout
    mp = mounted(vol)
    assert (mp / "dir" / "c").read_bytes() == bytes(BS) + FILES["dir/c"][BS:]
    assert not (mp / "x").exists() and not (mp / "ghost").exists()
    assert_intact(mp, damaged=("x", "dir/c"))


def test_direct_writer_killed_with_the_daemon_leaves_uncommitted_layout(
        vol: Path, mount_factory, mounted) -> None:
    """The real way to get unwritten extents that nobody will commit: a direct client
    gets a write layout and writes, the layout is committed (here by another file's
    fsync), and the daemon dies before the client commits or closes."""
    from kernelshim.client import Client
    m = mount_factory(vol, name="first")
    c = Client.connect(str(m.path))
    try:
        f = c.open("direct.dat", "w")
        f.write(b"d" * (3 * BS + 10))
        fd = os.open(m.path / "small", os.O_RDONLY)
        os.fsync(fd)  # commits the metadata transaction: the layout is in meta.db
        os.close(fd)
        m.kill()
    finally:
        c.close()
    m.stop()  # clears the dead mount
    with DB(vol) as db:
        ino = db.ino("direct.dat")
        exts = db.extents(ino)
        assert exts and all(st == 0 for _fb, _dev, _n, st in exts), exts
        assert db.q("SELECT size FROM inodes WHERE id=?", ino) == [(0,)]
    laid_out = sum(n for _fb, _dev, n, _st in exts)
    # The state a crash legitimately leaves (the daemon's mount.json is still there):
    # a note, not an error; the repair (like the next mount) drops the blocks.
    r = fsck(vol)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"note: {laid_out} unwritten blocks of /direct.dat (inode {ino}) from byte "
            "offset 0 lie past its end of file: laid out for a write that was never "
            "committed (the volume was not unmounted: the next mount drops them)") \
        in r.stdout, r.stdout
    fixed = fsck(vol, "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"repaired: dropped those {laid_out} blocks" in fixed.stdout, fixed.stdout
    again = fsck(vol, "--verify-data")
    assert again.returncode == 0 and "unwritten" not in again.stdout, again.stdout
    mp = mounted(vol)
    assert (mp / "direct.dat").read_bytes() == b""
    assert_intact(mp)


# -- the repair's block arithmetic, against a model ----------------------------------------

@given(fb=st.integers(0, 50), dev=st.integers(0, 50), count=st.integers(1, 30),
       drops=st.lists(st.tuples(st.booleans(), st.integers(0, 90), st.integers(0, 40)),
                      max_size=6))
@settings(max_examples=300, deadline=None)
def test_extent_drops_remove_exactly_the_named_blocks(fb, dev, count, drops) -> None:
    """Dropping file or device ranges from an extent keeps every other block mapped
    where it was, and nothing else."""
    from fs.fsck import _Extent
    e = _Extent(1, fb, dev, count, 1, [(fb, dev, count)])
    model = {fb + i: dev + i for i in range(count)}
    for by_dev, lo, n in drops:
        before = len(model)
        if by_dev:
            got = e.drop_dev_range(lo, lo + n)
            model = {f: d for f, d in model.items() if not lo <= d < lo + n}
        else:
            got = e.drop_file_range(lo, lo + n)
            model = {f: d for f, d in model.items() if not lo <= f < lo + n}
        assert got == before - len(model)
        mapped = {f + i: d + i for f, d, k in e.pieces for i in range(k)}
        assert mapped == model
        assert all(k > 0 for _f, _d, k in e.pieces)
    assert e.held == len(model)
    assert e.changed == (len(model) != count)
