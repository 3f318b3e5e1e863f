"""Every volume file is someone else's input: a damaged or crafted volume directory
handed to root (or damaged by a crash or bit rot) must give a one-line error naming the
file, or an fsck report and a repair, or a mount that serves the rest and stays up —
never a traceback, a hang, a write outside the volume, or one file's data as another's.

Each test is the regression test of one defect found by `scripts/volfuzz.py` (see
docs/RELIABILITY.md, "Hostile volume files"); the last one runs the driver itself on a
handful of its cases.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, Mount, is_mounted, make_volume, sluice

BS = 4096
DEEP = "[" * 100000 + "]" * 100000
FILES = {"a": b"A" * (2 * BS), "b": b"B" * (3 * BS), "dir/c": b"C" * 100}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A small volume with a few files, filled through a real mount."""
    base = tmp_path_factory.mktemp("hostiletpl")
    vol = make_volume(base / "vol", "16M")
    mp = base / "mnt"
    mp.mkdir()
    m = Mount(vol, mp, None, base / "daemon.log")
    m.start()
    try:
        for rel, data in FILES.items():
            (mp / rel).parent.mkdir(parents=True, exist_ok=True)
            (mp / rel).write_bytes(data)
        os.setxattr(mp / "a", "user.k", b"v")
    finally:
        m.stop()
    return vol


@pytest.fixture
def vol(template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "vol"
    subprocess.run(["cp", "-a", "--sparse=always", str(template), str(dst)], check=True)
    return dst


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files root owns elsewhere (standing in for /etc/shadow): an empty one, a small
    one and one large enough to pass for the device."""
    d = tmp_path / "outside"
    d.mkdir(mode=0o700)
    (d / "empty").write_bytes(b"")
    (d / "secret").write_text("root:$6$x:19000:0:99999:7:::\n")
    (d / "big").write_bytes(b"root-owned. " * (3 << 20))
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def sql(vol: Path, *statements: str, args: tuple = ()) -> None:
    db = sqlite3.connect(vol / "meta.db", isolation_level=None)
    try:
        for s in statements:
            db.execute(s, args if "?" in s else ())
    finally:
        db.close()


def ino(vol: Path, rel: str) -> int:
    db = sqlite3.connect(vol / "meta.db")
    try:
        i = 1
        for part in rel.split("/"):
            (i,), = db.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                               (i, part.encode())).fetchall()
        return i
    finally:
        db.close()


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1 (fsck: 8, it could not check the volume) with one line on stderr that
    says each of `words`; no traceback."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == (8 if "fsck" in r.args else 1), (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


# -- the small JSON files ------------------------------------------------------------------

@pytest.mark.parametrize("name, text, words", [
    ("volume.json", DEEP, ["volume.json", "nested too deeply"]),
    ("volume.json", "[1]", ["volume.json", "not a volume header"]),
    ("volume.json", '{"format": 1, "created_ns": 5}', ["volume.json", "uuid"]),
    ("device.json", DEEP, ["device.json", "nested too deeply"]),
    ("device.json", '{"format": 1, "block_size": 0, "nblocks": 4096, "backing": '
     '"device.img", "profile": "none", "uuid": "u"}', ["device.json", "block size 0"]),
])
def test_malformed_json_headers_are_one_line_errors(vol: Path, name: str, text: str,
                                                    words: list[str]) -> None:
    """Deep nesting was a RecursionError, a list an AttributeError, a missing key a
    KeyError, block size 0 a ZeroDivisionError: tracebacks from fsck and mount."""
    (vol / name).write_text(text)
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60), *words)
    one_line_error(sluice("fsck", "-q", "--repair", str(vol), check=False, timeout=60),
                   *words)


def test_unknown_keys_in_device_json_are_ignored(vol: Path) -> None:
    """A key the format does not know was a TypeError (DeviceGeometry(**header))."""
    header = json.loads((vol / "device.json").read_text())
    (vol / "device.json").write_text(json.dumps({**header, "colour": "blue"}))
    r = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr


def test_a_uuid_that_is_a_path_is_refused(vol: Path, outside: Path) -> None:
    """The uuid names the control socket /run/sluice/UUID.sock: '../..' in it would put
    the socket anywhere."""
    header = json.loads((vol / "volume.json").read_text())
    header["uuid"] = f"../../../..{outside}/sock"
    (vol / "volume.json").write_text(json.dumps(header))
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60),
                   "volume.json", "is not a UUID")


def _name_backing(vol: Path, backing: str) -> None:
    header = json.loads((vol / "device.json").read_text())
    header["backing"] = backing
    (vol / "device.json").write_text(json.dumps(header))


@pytest.mark.parametrize("via", ["path", "symlink"])
def test_a_volume_may_not_name_a_backing_its_owner_does_not_own(vol: Path, outside: Path,
                                                                 tmp_path: Path,
                                                                 via: str) -> None:
    """A volume handed to root by another user (its directory theirs) named a root-owned
    file as its absolute backing — or a symbolic link of the user's to it: root's mount
    and fsck read it, and wrote it, as the volume's device. The backing must belong to
    the volume's owner."""
    big = outside / "big"
    before = big.read_bytes()
    os.chmod(big, 0o600)
    if via == "symlink":
        link = tmp_path / "link"
        link.symlink_to(big)
        os.chown(link, 1001, 1001, follow_symlinks=False)
        big = link
    _name_backing(vol, str(big))
    for p in [vol, *vol.iterdir()]:
        os.chown(p, 1001, 1001, follow_symlinks=False)
    # Root refuses another user's volume outright (`check_owned`, probe 4, V1) ...
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60),
                   "belongs to uid 1001")
    one_line_error(sluice("fsck", "-q", "--repair", str(vol), check=False, timeout=60),
                   "belongs to uid 1001")
    r = _mount(vol, tmp_path)
    try:
        one_line_error(r, "belongs to uid 1001")
    finally:
        if is_mounted(tmp_path / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    # ... and the device layer refuses such a backing on its own, whoever opens it.
    from blockdev import BlockDevice, FormatError
    with pytest.raises(FormatError, match=f"backing {big} belongs to uid 0, the volume "
                                          f"to uid 1001"):
        BlockDevice.open(vol)
    assert (outside / "big").read_bytes() == before


@pytest.mark.parametrize("kind", ["char-device", "fifo", "directory", "exposed-file"])
def test_an_absolute_backing_must_be_a_private_file_or_a_block_device(
        vol: Path, tmp_path: Path, kind: str) -> None:
    """device.json could name /dev/watchdog (which a mere open arms), a FIFO, a
    directory, or a file others may read: each was opened read-write as the device."""
    words = ["neither a regular file nor a block device"]
    if kind == "char-device":
        target = "/dev/null"
    elif kind == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target, 0o600)
    elif kind == "directory":
        target = str(tmp_path)
    else:
        target = str(tmp_path / "img")
        with open(target, "wb") as f:
            f.truncate(64 << 20)
        os.chmod(target, 0o644)
        words = ["open to other users (0644)", "chmod go-rwx"]
    if kind == "char-device" and os.stat(target).st_uid != os.geteuid():
        pytest.skip("/dev/null is not root's here")
    _name_backing(vol, target)
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60), target, *words)


def test_mkfs_makes_a_file_backing_private(tmp_path: Path) -> None:
    """`mkfs --device FILE` formats the file: it becomes private like device.img, once
    the volume is made (a failed mkfs leaves its mode alone)."""
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    os.chmod(img, 0o644)
    vol = make_volume(tmp_path / "vol", "64M", "--device", str(img))
    assert os.stat(img).st_mode & 0o777 == 0o600
    r = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    small = tmp_path / "small"
    with open(small, "wb") as f:
        f.truncate(8 * 4096)
    os.chmod(small, 0o644)
    r = sluice("mkfs", "--size", "64M", "--device", str(small), str(tmp_path / "vol2"),
               check=False, timeout=60)
    one_line_error(r, str(small), "too small")
    assert os.stat(small).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["device.json", "principals.json"])
def test_a_fifo_in_place_of_a_json_file_is_refused_not_waited_on(vol: Path,
                                                                 name: str) -> None:
    """fsck read the FIFO and waited for a writer forever."""
    (vol / name).unlink(missing_ok=True)
    os.mkfifo(vol / name, 0o600)
    r = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert "Traceback" not in r.stderr
    assert name in r.stdout + r.stderr
    assert "a FIFO, not a regular file" in r.stdout + r.stderr


@pytest.mark.parametrize("data", [
    {"root": {"banks": {}}, "principals": [{"id": 1 << 70, "name": "alice",
                                            "parent": "root", "owner_uid": 1000,
                                            "banks": {}}]},
    {"root": {"banks": {"space": "lots"}}, "principals": []},
    {"root": {"banks": {}}, "principals": [{"id": 5, "name": "a/b", "parent": "root",
                                            "owner_uid": 1000, "banks": {}}]},
])
def test_principals_json_values_out_of_range_are_refused(tmp_path: Path, data: dict) -> None:
    """Ids past 64 bits, a bank that is a string, a name with '/' were loaded as they
    were, and failed later inside the daemon (the scheduler's int64 arrays, a
    comparison of a string with a number)."""
    from kernelshim.principals import PrincipalError, PrincipalTable
    (tmp_path / "principals.json").write_text(json.dumps(data))
    with pytest.raises(PrincipalError, match="principals.json"):
        PrincipalTable.load(tmp_path)


# -- store files replaced by links to files elsewhere ------------------------------------

@pytest.mark.parametrize("name, target", [
    ("meta.db", "empty"), ("meta.db-wal", "big"), ("device.img", "big"),
    ("checksums", "big"), ("lock", "empty"),
])
def test_store_files_are_never_followed_through_a_symlink(vol: Path, outside: Path,
                                                          name: str, target: str) -> None:
    """SQLite followed meta.db to a file elsewhere (and made its -wal beside it); the
    device opened device.img or checksums through a link and a repair would have
    discarded and zeroed blocks of the file it named."""
    before = snapshot(outside)
    (vol / name).unlink(missing_ok=True)
    os.symlink(outside / target, vol / name)
    for args in (("-q",), ("-q", "--repair")):
        r = sluice("fsck", *args, str(vol), check=False, timeout=60)
        one_line_error(r, name, "is a symbolic link, not a regular file")
    assert snapshot(outside) == before


def test_a_lock_that_is_a_fifo_is_refused(vol: Path) -> None:
    (vol / "lock").unlink(missing_ok=True)
    os.mkfifo(vol / "lock", 0o600)
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60),
                   "lock is a FIFO, not a regular file")


# -- meta.db -----------------------------------------------------------------------------

@pytest.mark.parametrize("statement, words", [
    ("UPDATE meta SET value=99 WHERE key='schema'", ["schema version is 99"]),
    ("DELETE FROM meta WHERE key='schema'", ["no schema version"]),
    ("DROP TABLE xattrs", ["table xattrs is missing"]),
])
def test_a_database_of_another_schema_is_refused(vol: Path, statement: str,
                                                 words: list[str]) -> None:
    """The schema version was never read: a database from a newer sluice was checked
    (and repaired) as if it were this one's."""
    sql(vol, statement)
    one_line_error(sluice("fsck", "-q", str(vol), check=False, timeout=60), "meta.db",
                   *words)


def test_fsck_repairs_columns_out_of_range(vol: Path) -> None:
    """A size past MAX_FILE_SIZE and ids out of range were clean to fsck; a mode past
    64 bits was an OverflowError traceback."""
    a, b, c = ino(vol, "a"), ino(vol, "b"), ino(vol, "dir/c")
    sql(vol, f"UPDATE inodes SET size={1 << 62}, uid=-1 WHERE id={a}",
        f"UPDATE inodes SET mtime_ns='yesterday', gid={1 << 40} WHERE id={b}",
        f"UPDATE inodes SET mode={1 << 40} WHERE id={c}")
    r = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert r.returncode == 4, r.stdout + r.stderr
    for text in (f"inode {a}: size {1 << 62} is out of range", f"inode {a}: uid -1",
                 f"inode {b}: mtime_ns 'yesterday' is not an integer",
                 f"inode {c} is malformed (mode {1 << 40}"):
        assert text in r.stdout, r.stdout
    fixed = sluice("fsck", "-q", "--repair", str(vol), check=False, timeout=60)
    assert fixed.returncode == 1, fixed.stdout + fixed.stderr
    assert f"set it to {2 * BS}" in fixed.stdout  # (a's size: the end of its extents)
    again = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert again.returncode == 0, again.stdout


def test_fsck_removes_xattr_rows_no_sluice_could_write(vol: Path) -> None:
    """A value over 64 KiB, a name that is text, an xattr of a missing inode: fsck
    found the volume clean."""
    a = ino(vol, "a")
    sql(vol, f"INSERT INTO xattrs VALUES ({a}, x'757365722e68756765', zeroblob(1000000))",
        f"INSERT INTO xattrs VALUES ({a}, 'user.text', x'01')",
        "INSERT INTO xattrs VALUES (99999, x'757365722e61', x'01')")
    r = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "its value is 1000000 bytes" in r.stdout
    assert "its name is a text" in r.stdout
    assert "its inode is missing" in r.stdout
    assert sluice("fsck", "-q", "--repair", str(vol), check=False).returncode == 1
    again = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert again.returncode == 0, again.stdout


@pytest.mark.parametrize("key, value, fix", [
    ("max_inodes", -1, "set it to 4096"), ("max_inodes", "lots", "set it to 4096"),
    ("unflushed", "not json", "emptied the list"), ("unflushed", '["x"]', "emptied the list"),
])
def test_fsck_repairs_the_volume_values_the_mount_refuses_or_ignores(vol: Path, key: str,
                                                                     value: object,
                                                                     fix: str) -> None:
    """max_inodes -1 made the mount refuse ('run sluice fsck --repair') while fsck found
    the volume clean; a garbage unflushed list was clean to fsck too."""
    sql(vol, "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", args=(key, value))
    r = sluice("fsck", "-q", "--repair", str(vol), check=False, timeout=60)
    assert r.returncode == 1 and fix in r.stdout, r.stdout + r.stderr
    again = sluice("fsck", "-q", str(vol), check=False, timeout=60)
    assert again.returncode == 0, again.stdout


# -- mounting a damaged volume -------------------------------------------------------------

def _mount(vol: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    mp = tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    return sluice("mount", str(vol), str(mp), *extra, check=False, timeout=60)


@pytest.fixture
def unmount(tmp_path: Path):
    yield
    mp = tmp_path / "mnt"
    if is_mounted(mp):  # (also a dead mount, which os.path.ismount does not see)
        r = sluice("umount", str(mp), check=False)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


@pytest.mark.mounted
@pytest.mark.parametrize("what", ["negative", "past-the-end", "shared"])
def test_mount_refuses_extents_outside_the_device_or_shared(vol: Path, tmp_path: Path,
                                                            unmount, what: str) -> None:
    """A negative device block was marked used at the other end of the device (numpy's
    negative index) and mounted; an extent another file also maps was a 'daemon
    failed: ValueError'. Now the mount refuses, naming meta.db and the inode."""
    a, b = ino(vol, "a"), ino(vol, "b")
    (dev,), = sqlite3.connect(vol / "meta.db").execute(
        f"SELECT dev_block FROM extents WHERE inode={b}").fetchall()
    new = {"negative": -1, "past-the-end": 10 ** 6, "shared": dev}[what]
    sql(vol, f"UPDATE extents SET dev_block={new} WHERE inode={a}")
    r = _mount(vol, tmp_path)
    one_line_error(r, "meta.db", "run sluice fsck --repair",
                   "which another extent maps too" if what == "shared" else f"inode {a}")


@pytest.mark.mounted
@pytest.mark.parametrize("statement", ["DELETE FROM inodes WHERE id=1",
                                       f"UPDATE inodes SET mode={0o100644} WHERE id=1",
                                       "UPDATE inodes SET uid=-1 WHERE id=1"])
def test_mount_refuses_a_volume_without_a_usable_root(vol: Path, tmp_path: Path, unmount,
                                                      statement: str) -> None:
    """The mount went live with no root directory (every request then failed)."""
    sql(vol, statement)
    one_line_error(_mount(vol, tmp_path), "meta.db", "the root directory (inode 1)")


@pytest.mark.mounted
def test_a_named_inode_with_link_count_zero_is_not_freed(vol: Path, tmp_path: Path,
                                                         unmount) -> None:
    """The mount freed it at its last close (or forget), leaving its name dangling and
    its data gone; now it answers EIO and fsck sets the count from its names."""
    a = ino(vol, "a")
    sql(vol, f"UPDATE inodes SET nlink=0 WHERE id={a}")
    assert _mount(vol, tmp_path).returncode == 0
    mp = tmp_path / "mnt"
    with pytest.raises(OSError) as ei:
        (mp / "a").read_bytes()
    assert ei.value.errno == errno.EIO
    assert (mp / "b").read_bytes() == FILES["b"]
    assert sluice("umount", str(mp), check=False).returncode == 0
    r = sluice("fsck", "-q", "--repair", str(vol), check=False, timeout=60)
    assert r.returncode == 1 and "has link count 0, its names make 1" in r.stdout, r.stdout
    assert "dangling" not in r.stdout
    assert _mount(vol, tmp_path).returncode == 0
    assert (mp / "a").read_bytes() == FILES["a"]


@pytest.mark.mounted
def test_damaged_entries_leave_the_rest_of_the_directory_listable(vol: Path, tmp_path: Path,
                                                                  unmount) -> None:
    """An entry named 'x/y' failed the whole listing (the kernel refuses such a name
    with EIO), an inode row with a size that is text was an unexpected TypeError; an
    entry whose name is the integer 42 was listed as 42 NUL bytes."""
    a, b = ino(vol, "a"), ino(vol, "b")
    sql(vol, f"UPDATE dentries SET name=? WHERE inode={a}", args=(b"x/y",))
    sql(vol, f"UPDATE inodes SET size='big' WHERE id={b}")
    sql(vol, "INSERT INTO dentries (parent, name, inode) VALUES (1, 42, "
             f"{ino(vol, 'dir')})")
    assert _mount(vol, tmp_path).returncode == 0
    mp = tmp_path / "mnt"
    assert sorted(os.listdir(mp)) == ["dir"]
    with pytest.raises(OSError) as ei:
        os.stat(mp / "b")
    assert ei.value.errno == errno.EIO
    assert (mp / "dir" / "c").read_bytes() == FILES["dir/c"]
    assert sluice("umount", str(mp), check=False).returncode == 0
    log = (vol / "sluice.log").read_text()
    assert "unexpected error" not in log
    assert "(run sluice fsck)" in log


@pytest.mark.mounted
@pytest.mark.parametrize("value", ["not json", DEEP, '["x"]'])
def test_a_damaged_unflushed_list_does_not_stop_the_mount(vol: Path, tmp_path: Path,
                                                          unmount, value: str) -> None:
    """The list of discardable files to empty was parsed unchecked: a JSONDecodeError,
    a RecursionError or a ValueError failed the mount ('daemon failed')."""
    sql(vol, "INSERT OR REPLACE INTO meta (key, value) VALUES ('unflushed', ?)",
        args=(value,))
    r = _mount(vol, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mnt" / "a").read_bytes() == FILES["a"]


@pytest.mark.mounted
def test_an_oversized_xattr_value_is_eio_not_loaded(vol: Path, tmp_path: Path,
                                                    unmount) -> None:
    """A 100 MB value (no sluice writes one over 64 KiB) was read into the daemon's
    memory for every getxattr, then refused by the size check (ERANGE)."""
    a = ino(vol, "a")
    sql(vol, f"INSERT INTO xattrs VALUES ({a}, x'757365722e68756765', zeroblob(100000000))")
    assert _mount(vol, tmp_path).returncode == 0
    mp = tmp_path / "mnt"
    with pytest.raises(OSError) as ei:
        os.getxattr(mp / "a", "user.huge")
    assert ei.value.errno == errno.EIO
    assert os.getxattr(mp / "a", "user.k") == b"v"


@pytest.mark.mounted
def test_sighup_with_the_log_replaced_by_a_symlink_keeps_the_daemon(vol: Path, tmp_path: Path,
                                                                    outside: Path,
                                                                    unmount) -> None:
    """SIGHUP reopens sluice.log with O_NOFOLLOW: a link put in its place raised ELOOP
    out of the signal watcher and the daemon died, leaving the mount dead."""
    before = snapshot(outside)
    assert _mount(vol, tmp_path).returncode == 0
    pid = json.loads((vol / "mount.json").read_text())["pid"]
    (vol / "sluice.log").unlink()
    os.symlink(outside / "secret", vol / "sluice.log")
    os.kill(pid, signal.SIGHUP)
    time.sleep(1.0)
    assert (tmp_path / "mnt" / "a").read_bytes() == FILES["a"]
    os.kill(pid, 0)
    assert snapshot(outside) == before


@pytest.mark.mounted
def test_a_mount_json_fifo_is_replaced_not_read(vol: Path, tmp_path: Path, unmount) -> None:
    """`sluice mount` read mount.json to clean a dead mount: a FIFO there made it wait
    forever."""
    os.mkfifo(vol / "mount.json", 0o600)
    r = _mount(vol, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mnt" / "a").read_bytes() == FILES["a"]


# -- the driver ------------------------------------------------------------------------------

@pytest.mark.mounted
@pytest.mark.slow
def test_volfuzz_quick() -> None:
    """A handful of the driver's cases (seeded), through its own checks."""
    cases = ("extent-overlaps-another-file,name-slash,xattr-value-100MB,"
             "meta-db-not-sqlite,checksums-truncated,principals-cycle,mount-json-deep,"
             "device.img-symlink-big")
    r = subprocess.run([sys.executable, "scripts/volfuzz.py", "--seed", "7", "-j", "2",
                        "-k", cases], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 cases, 0 failed" in r.stdout, r.stdout
