#!/usr/bin/env python3
"""Hostile volume files: damage a small real volume in targeted ways and check that
sluice's offline and online tools handle it as an experienced storage user expects.

Every file of a volume directory is input from someone else: a user hands root a
damaged or crafted volume, or a crash or bit rot damages one. For each damage case the
driver copies a template volume (made once: files, directories, xattrs, a symlink, a
hard link, a multi-block file), damages the copy, and runs, each under a timeout:

1. `sluice fsck -q V`                   (the damaged volume, unchanged)
2. `sluice mount V MP`, then a reader that walks the tree and reads every file, link
   and xattr, then `sluice umount MP`  (the damaged volume, as a user would)
3. `sluice fsck -q --repair V`, then `sluice fsck -q V`

and checks, for each step:

- no Python traceback on stdout or stderr (`traceback`), no timeout (`hang`);
- an error exit (status 1) says one line (`not-one-line`);
- a repair that exits 0 or 1 leaves a volume the next plain fsck finds clean
  (`repair-not-clean`); one that exits 4 says what it could not fix;
- a mount either refuses (one line) or serves: the daemon is alive after every file
  was read (`daemon-died`), the reader finished, and no file showed a block of another
  file (`cross-file-data`: every block of the template carries the tag of its file
  and block number);
- nothing outside the volume changed: a per-case directory (root-owned files the
  symlink cases point at, standing in for /etc/shadow) keeps its listing, contents
  and times (`outside-write`), and no socket or file appears there;
- the daemon's log has no "unexpected error" (a handler bug answered EIO: reported
  as `handler-bug`, a warning).

Usage (as root, from the repository):
    .venv/bin/python scripts/volfuzz.py                  # every case
    .venv/bin/python scripts/volfuzz.py -k checksums     # cases whose name has "checksums"
    .venv/bin/python scripts/volfuzz.py --list
    .venv/bin/python scripts/volfuzz.py --json out.json --keep /tmp/vf
Exit status 0 when every case passed, 1 otherwise. `--seed` fixes the random bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]
BS = 4096
STEP_TIMEOUT = 60.0

#: the template's files: path -> number of blocks (each block tagged)
FILES = {"a.txt": 1, "big.bin": 5, "dir/b.txt": 2, "dir/sub/deep.txt": 1, "empty": 0}
SYMLINKS = {"link": "a.txt"}
HARDLINKS = {"dir/hard": "dir/b.txt"}
XATTRS = {"dir/b.txt": {"user.color": b"blue", "user.big": b"x" * 2000}}


def block_tag(path: str, n: int) -> bytes:
    """The contents of block `n` of template file `path`: its tag, repeated."""
    tag = f"<{path}#{n}>".encode()
    return (tag * (BS // len(tag) + 1))[:BS]


# -- running things --------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float

    def brief(self) -> str:
        text = (self.err.strip() or self.out.strip()).splitlines()
        last = text[-1] if text else ""
        return f"{self.name}: rc={self.rc} {last[:200]}"


def run(name: str, argv: list[str], timeout: float = STEP_TIMEOUT, **kw) -> Step:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO, start_new_session=True, errors="replace", **kw)
    try:
        out, err = p.communicate(timeout=timeout)
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # (our own child's session)
        out, err = p.communicate()
        rc = None
    return Step(name, argv, rc, out, err, time.monotonic() - t0)


def sluice(name: str, *args: str, timeout: float = STEP_TIMEOUT) -> Step:
    return run(name, [*SLUICE, *args], timeout=timeout)


# The reader runs in a child (a hang in the kernel is then the child's, under a
# timeout): it walks the mount and prints one JSON object.
READER = r"""
import errno, json, os, sys
root = sys.argv[1]
bs = int(sys.argv[2])
out = {"files": {}, "errors": []}
def note(path, exc):
    out["errors"].append([path, type(exc).__name__, getattr(exc, "errno", None)])
for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: note(e.filename, e)):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        rel = os.path.relpath(p, root)
        try:
            st = os.lstat(p)
        except OSError as exc:
            note(rel, exc); continue
        try:
            for x in os.listxattr(p, follow_symlinks=False):
                os.getxattr(p, x, follow_symlinks=False)
        except OSError as exc:
            note(rel, exc)
        if os.path.islink(p):
            try:
                os.readlink(p)
            except OSError as exc:
                note(rel, exc)
            continue
        if not os.path.isfile(p):
            continue
        tags = []
        try:
            with open(p, "rb") as f:
                n = 0
                while n < 4096:
                    b = f.read(bs)
                    if not b:
                        break
                    tags.append(None if not b.strip(b"\0") else
                                b[:b.index(b">") + 1].decode("latin-1") if b">" in b[:300]
                                else "?" + b[:16].hex())
                    n += 1
        except OSError as exc:
            note(rel, exc)
        out["files"][rel] = {"ino": st.st_ino, "tags": tags}
print(json.dumps(out))
"""


# -- the template ------------------------------------------------------------------------

def make_template(where: Path) -> dict:
    """A small volume with the template's files; returns what the checks need."""
    vol = where / "template"
    r = sluice("mkfs", "mkfs", str(vol), "--size", "16M")
    assert r.rc == 0, r.err
    mp = Path(tempfile.mkdtemp(prefix="volfuzz-mnt-"))
    try:
        r = sluice("mount", "mount", str(vol), str(mp))
        assert r.rc == 0, r.err
        try:
            for rel, n in FILES.items():
                p = mp / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"".join(block_tag(rel, i) for i in range(n)))
            for rel, target in SYMLINKS.items():
                os.symlink(target, mp / rel)
            for rel, target in HARDLINKS.items():
                os.link(mp / target, mp / rel)
            for rel, xs in XATTRS.items():
                for k, v in xs.items():
                    os.setxattr(mp / rel, k, v)
            inos = {rel: os.lstat(mp / rel).st_ino for rel in
                    [*FILES, *SYMLINKS, *HARDLINKS, "dir", "dir/sub"]}
        finally:
            r = sluice("umount", "umount", str(mp))
            assert r.rc == 0, r.err
    finally:
        os.rmdir(mp)
    nblocks = json.loads((vol / "device.json").read_text())["nblocks"]
    return {"vol": vol, "inos": inos, "nblocks": nblocks}


# -- damage --------------------------------------------------------------------------------

@dataclasses.dataclass
class Ctx:
    vol: Path
    inos: dict[str, int]
    nblocks: int
    rng: random.Random
    outside: Path  # the sentinel directory

    def sql(self, *statements: str, args: tuple = ()) -> None:
        db = sqlite3.connect(self.vol / "meta.db")
        try:
            for s in statements:
                db.execute(s, args if "?" in s else ())
            db.commit()
        finally:
            db.close()

    def ino(self, rel: str) -> int:
        return self.inos[rel]

    def extent_of(self, rel: str) -> tuple[int, int, int]:
        db = sqlite3.connect(self.vol / "meta.db")
        try:
            return db.execute("SELECT file_block, dev_block, count FROM extents WHERE inode=?"
                              " ORDER BY file_block", (self.ino(rel),)).fetchone()
        finally:
            db.close()

    def json_file(self, name: str, value: object) -> None:
        p = self.vol / name
        p.write_text(value if isinstance(value, str) else json.dumps(value))
        os.chmod(p, 0o600)  # (else the check that the volume is private answers first)

    def edit_json(self, name: str, fn: Callable[[dict], object]) -> None:
        data = json.loads((self.vol / name).read_text())
        new = fn(data)
        self.json_file(name, data if new is None else new)

    def replace(self, name: str, kind: str) -> None:
        """Replace a store file by a symlink to the sentinel, a FIFO or a directory."""
        p = self.vol / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        if kind == "symlink":
            os.symlink(self.outside / "secret", p)
        elif kind == "symlink-empty":  # SQLite would make a database in it
            os.symlink(self.outside / "empty", p)
        elif kind == "symlink-big":  # large enough to pass for a device or checksums
            os.symlink(self.outside / "big", p)
        elif kind == "fifo":
            os.mkfifo(p, 0o600)
        elif kind == "dir":
            p.mkdir(mode=0o700)

    def truncate(self, name: str, size: int | None = None, frac: float | None = None) -> None:
        p = self.vol / name
        if frac is not None:
            size = int(p.stat().st_size * frac)
        os.truncate(p, size)

    def random_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


DEEP = "[" * 100000 + "]" * 100000
HUGE_INT = "9" * 5000  # more digits than Python's int() takes by default


def _principals(ctx: Ctx, data: object) -> None:
    ctx.json_file("principals.json", data)


def _base_principals() -> dict:
    return {"root": {"banks": {}}, "principals": [
        {"id": 5, "name": "alice", "parent": "root", "owner_uid": 1000, "banks": {}},
        {"id": 6, "name": "web", "parent": "alice", "owner_uid": 1000, "banks": {}}],
        "next_id": 7}


def _cases() -> dict[str, Callable[[Ctx], None]]:
    c: dict[str, Callable[[Ctx], None]] = {}

    # meta.db: out-of-range values in rows
    c["inode-size-negative"] = lambda x: x.sql(
        f"UPDATE inodes SET size=-1 WHERE id={x.ino('a.txt')}")
    c["inode-size-huge"] = lambda x: x.sql(
        f"UPDATE inodes SET size={1 << 62} WHERE id={x.ino('big.bin')}")
    c["inode-size-int64-max"] = lambda x: x.sql(
        f"UPDATE inodes SET size={(1 << 63) - 1} WHERE id={x.ino('big.bin')}")
    c["inode-size-text"] = lambda x: x.sql(
        f"UPDATE inodes SET size='abc' WHERE id={x.ino('a.txt')}")
    c["inode-size-float"] = lambda x: x.sql(f"UPDATE inodes SET size=1.5 WHERE id={x.ino('a.txt')}")
    c["inode-blocks-overflow"] = lambda x: x.sql(
        f"UPDATE inodes SET blocks={(1 << 63) - 1} WHERE id={x.ino('big.bin')}")
    c["extent-past-device-end"] = lambda x: x.sql(
        f"UPDATE extents SET dev_block={x.nblocks + 10} WHERE inode={x.ino('big.bin')}")
    c["extent-straddles-device-end"] = lambda x: x.sql(
        f"UPDATE extents SET dev_block={x.nblocks - 2} WHERE inode={x.ino('big.bin')}")
    c["extent-negative-dev-block"] = lambda x: x.sql(
        f"UPDATE extents SET dev_block=-3 WHERE inode={x.ino('big.bin')}")
    c["extent-overlaps-another-file"] = lambda x: x.sql(
        f"UPDATE extents SET dev_block={x.extent_of('big.bin')[1] + 1} "
        f"WHERE inode={x.ino('dir/b.txt')}")
    c["extent-count-overflow"] = lambda x: x.sql(
        f"UPDATE extents SET count={1 << 62} WHERE inode={x.ino('big.bin')}")
    c["extent-count-int64-max"] = lambda x: x.sql(
        f"UPDATE extents SET count={(1 << 63) - 1} WHERE inode={x.ino('a.txt')}")
    c["extent-count-negative"] = lambda x: x.sql(
        f"UPDATE extents SET count=-5 WHERE inode={x.ino('big.bin')}")
    c["extent-file-block-huge"] = lambda x: x.sql(
        f"UPDATE extents SET file_block={(1 << 63) - 10} WHERE inode={x.ino('a.txt')}")
    c["extent-state-bogus"] = lambda x: x.sql(
        f"UPDATE extents SET state=7 WHERE inode={x.ino('a.txt')}")
    c["extent-of-directory"] = lambda x: x.sql(
        f"UPDATE extents SET inode={x.ino('dir')} WHERE inode={x.ino('a.txt')}")
    c["dir-own-ancestor"] = lambda x: x.sql(  # dir/sub holds dir: a cycle cut off from /
        f"UPDATE dentries SET parent={x.ino('dir/sub')} WHERE inode={x.ino('dir')}",
        f"UPDATE inodes SET parent={x.ino('dir/sub')} WHERE id={x.ino('dir')}")
    c["dir-entry-in-itself"] = lambda x: x.sql(
        f"INSERT INTO dentries (parent, name, inode) VALUES ({x.ino('dir')}, x'6c6f6f70', "
        f"{x.ino('dir')})")
    c["root-parent-is-subdir"] = lambda x: x.sql(
        f"UPDATE inodes SET parent={x.ino('dir/sub')} WHERE id=1",
        f"INSERT INTO dentries (parent, name, inode) VALUES ({x.ino('dir/sub')}, x'7570', 1)")
    c["entry-missing-inode"] = lambda x: x.sql(
        "INSERT INTO dentries (parent, name, inode) VALUES (1, x'67686f7374', 99999)")
    c["entry-inode-zero-and-negative"] = lambda x: x.sql(
        "INSERT INTO dentries (parent, name, inode) VALUES (1, x'7a65726f', 0)",
        "INSERT INTO dentries (parent, name, inode) VALUES (1, x'6e6567', -7)")
    c["nlink-zero-with-names"] = lambda x: x.sql(
        f"UPDATE inodes SET nlink=0 WHERE id={x.ino('dir/b.txt')}")
    c["nlink-zero-directory-with-children"] = lambda x: x.sql(
        f"UPDATE inodes SET nlink=0 WHERE id={x.ino('dir')}")
    c["nlink-negative"] = lambda x: x.sql(f"UPDATE inodes SET nlink=-1 WHERE id={x.ino('a.txt')}")
    c["nlink-huge"] = lambda x: x.sql(
        f"UPDATE inodes SET nlink={(1 << 63) - 1} WHERE id={x.ino('a.txt')}")
    for label, name in (("slash", b"x/y"), ("nul", b"x\0y"), ("empty", b""),
                        ("10000-bytes", b"n" * 10000), ("dot", b"."), ("dotdot", b"..")):
        c[f"name-{label}"] = (lambda name: lambda x: x.sql(
            f"UPDATE dentries SET name=? WHERE inode={x.ino('a.txt')}", args=(name,)))(name)
    c["name-is-text-not-blob"] = lambda x: x.sql(
        f"UPDATE dentries SET name='a-text' WHERE inode={x.ino('a.txt')}")
    c["name-is-integer"] = lambda x: x.sql(
        f"UPDATE dentries SET name=42 WHERE inode={x.ino('a.txt')}")
    c["mode-no-file-type"] = lambda x: x.sql(
        f"UPDATE inodes SET mode=420 WHERE id={x.ino('a.txt')}")
    c["mode-dir-becomes-file"] = lambda x: x.sql(
        f"UPDATE inodes SET mode={0o100644} WHERE id={x.ino('dir')}")
    c["mode-file-becomes-dir"] = lambda x: x.sql(
        f"UPDATE inodes SET mode={0o40755} WHERE id={x.ino('big.bin')}")
    c["mode-symlink-without-target"] = lambda x: x.sql(
        f"UPDATE inodes SET mode={0o120777}, target=NULL WHERE id={x.ino('a.txt')}")
    c["mode-huge"] = lambda x: x.sql(f"UPDATE inodes SET mode={1 << 40} WHERE id={x.ino('a.txt')}")
    c["root-not-a-directory"] = lambda x: x.sql(f"UPDATE inodes SET mode={0o100644} WHERE id=1")
    c["root-missing"] = lambda x: x.sql("DELETE FROM inodes WHERE id=1")
    c["uid-gid-out-of-range"] = lambda x: x.sql(
        f"UPDATE inodes SET uid=-1, gid={1 << 40} WHERE id={x.ino('a.txt')}",
        f"UPDATE inodes SET uid={(1 << 63) - 1}, gid=-5 WHERE id={x.ino('big.bin')}")
    c["times-out-of-range-and-text"] = lambda x: x.sql(
        f"UPDATE inodes SET mtime_ns='yesterday', atime_ns={(1 << 63) - 1}, "
        f"ctime_ns={-(1 << 63)} WHERE id={x.ino('a.txt')}")
    c["rdev-huge"] = lambda x: x.sql(
        f"UPDATE inodes SET mode={0o20644}, rdev={(1 << 63) - 1} WHERE id={x.ino('empty')}")
    c["symlink-target-1MB"] = lambda x: x.sql(
        f"UPDATE inodes SET target=zeroblob(1048576), size=1048576 WHERE id={x.ino('link')}")
    c["symlink-target-text-with-nul"] = lambda x: x.sql(
        f"UPDATE inodes SET target=? WHERE id={x.ino('link')}", args=("a\0b",))
    c["xattr-value-100MB"] = lambda x: x.sql(
        f"INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES ({x.ino('a.txt')}, "
        "x'757365722e68756765', zeroblob(100000000))")
    c["xattr-name-10000-bytes"] = lambda x: x.sql(
        f"INSERT INTO xattrs (inode, name, value) VALUES ({x.ino('a.txt')}, ?, x'01')",
        args=(b"user." + b"n" * 10000,))
    c["xattr-name-and-value-text"] = lambda x: x.sql(
        f"INSERT INTO xattrs (inode, name, value) VALUES ({x.ino('a.txt')}, 'user.t', 'v')")
    c["xattr-hint-garbage"] = lambda x: x.sql(
        f"INSERT INTO xattrs (inode, name, value) VALUES ({x.ino('a.txt')}, "
        "x'757365722e736c756963652e6361636865', x'fffe00')")  # user.sluice.cache
    c["xattr-of-missing-inode"] = lambda x: x.sql(
        "INSERT INTO xattrs (inode, name, value) VALUES (99999, x'757365722e61', x'01')")
    c["principal-tag-huge"] = lambda x: x.sql(
        f"UPDATE inodes SET principal={(1 << 63) - 1} WHERE id={x.ino('a.txt')}",
        f"UPDATE extents SET principal=-4 WHERE inode={x.ino('big.bin')}")
    c["inode-id-negative"] = lambda x: x.sql(
        f"UPDATE inodes SET id=-9 WHERE id={x.ino('a.txt')}",
        f"UPDATE dentries SET inode=-9 WHERE inode={x.ino('a.txt')}")

    # meta.db: the meta table, the schema
    c["meta-schema-from-the-future"] = lambda x: x.sql(
        "UPDATE meta SET value=99 WHERE key='schema'")
    c["meta-schema-missing"] = lambda x: x.sql("DELETE FROM meta WHERE key='schema'")
    c["meta-max-inodes-garbage"] = lambda x: x.sql(
        "UPDATE meta SET value='lots' WHERE key='max_inodes'")
    c["meta-max-inodes-negative"] = lambda x: x.sql(
        "UPDATE meta SET value=-1 WHERE key='max_inodes'")
    for label, value in (("garbage", "not json"), ("dict", '{"a": 1}'), ("deep", DEEP),
                         ("strings", '["x", null, 1.5]'), ("huge", f"[{HUGE_INT}]"),
                         ("missing-inodes", "[99999, -1, 0]")):
        c[f"meta-unflushed-{label}"] = (lambda value: lambda x: x.sql(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('unflushed', ?)",
            args=(value,)))(value)
    c["meta-unflushed-directory-and-symlink"] = lambda x: x.sql(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('unflushed', ?)",
        args=(json.dumps([x.ino("dir"), x.ino("link"), 1]),))
    for table in ("extents", "xattrs", "dentries", "inodes", "meta"):
        c[f"table-missing-{table}"] = (lambda t: lambda x: x.sql(f"DROP TABLE {t}"))(table)
    c["table-extents-wrong-columns"] = lambda x: x.sql(
        "DROP TABLE extents", "CREATE TABLE extents (inode INTEGER, junk TEXT)")

    # meta.db: the file
    c["meta-db-truncated-half"] = lambda x: x.truncate("meta.db", frac=0.5)
    c["meta-db-zero-length"] = lambda x: x.truncate("meta.db", 0)
    c["meta-db-not-sqlite"] = lambda x: (x.vol / "meta.db").write_bytes(x.random_bytes(65536))
    c["meta-db-text"] = lambda x: (x.vol / "meta.db").write_text("hello, I am a database\n")
    c["meta-db-header-only-garbage-pages"] = lambda x: _garble_pages(x)
    c["meta-db-wal-garbage"] = lambda x: (x.vol / "meta.db-wal").write_bytes(
        x.random_bytes(40000))
    c["meta-db-shm-garbage"] = lambda x: (x.vol / "meta.db-shm").write_bytes(
        x.random_bytes(32768))

    # checksums
    c["checksums-truncated"] = lambda x: x.truncate("checksums", frac=0.5)
    c["checksums-zero-length"] = lambda x: x.truncate("checksums", 0)
    c["checksums-longer"] = lambda x: _append(x.vol / "checksums", b"\1" * 1000000)
    c["checksums-random"] = lambda x: (x.vol / "checksums").write_bytes(
        x.random_bytes((x.vol / "checksums").stat().st_size))
    c["checksums-entries-random"] = lambda x: _random_entries(x)
    c["checksums-header-huge-shape"] = lambda x: _npy_header(
        x, "{'descr': '<u8', 'fortran_order': False, 'shape': (99999999999999,), }")
    c["checksums-header-bad-dtype"] = lambda x: _npy_header(
        x, "{'descr': '|O', 'fortran_order': False, 'shape': (4096,), }")

    # device.img
    c["device-img-shorter"] = lambda x: x.truncate("device.img", frac=0.5)
    c["device-img-zero-length"] = lambda x: x.truncate("device.img", 0)
    c["device-json-backing-outside"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(backing=str(x.outside / "secret")))
    c["device-json-block-size-zero"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(block_size=0))
    c["device-json-nblocks-huge"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(nblocks=1 << 62))
    c["device-json-nblocks-negative"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(nblocks=-1))
    c["device-json-wrong-types"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(nblocks="4096", block_size=[4096]))
    c["device-json-unknown-key"] = lambda x: x.edit_json(
        "device.json", lambda d: d.update(colour="blue"))
    c["device-json-deep"] = lambda x: x.json_file("device.json", DEEP)

    # principals.json
    c["principals-malformed"] = lambda x: x.json_file("principals.json", "{not json")
    c["principals-wrong-types"] = lambda x: _principals(x, {"root": [], "principals": "x"})
    c["principals-list"] = lambda x: _principals(x, [1, 2, 3])
    c["principals-deep"] = lambda x: x.json_file("principals.json", DEEP)
    c["principals-huge-numbers"] = lambda x: x.json_file(
        "principals.json", json.dumps(_base_principals()).replace('"next_id": 7',
                                                                   f'"next_id": {HUGE_INT}'))
    c["principals-huge-id"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 1 << 70, "name": "alice", "parent": "root", "owner_uid": 1000, "banks": {}}]})
    c["principals-float-bank"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 5, "name": "alice", "parent": "root", "owner_uid": 1000,
         "banks": {"space": 1e400}}]})
    c["principals-unknown-keys"] = lambda x: _principals(x, {**_base_principals(), "zz": 1})
    c["principals-cycle"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 5, "name": "alice", "parent": "web", "owner_uid": 1000, "banks": {}},
        {"id": 6, "name": "web", "parent": "alice", "owner_uid": 1000, "banks": {}}]})
    c["principals-missing-parent"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 6, "name": "web", "parent": "nobody", "owner_uid": 1000, "banks": {}}]})
    c["principals-duplicate-id"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 5, "name": "alice", "parent": "root", "owner_uid": 1000, "banks": {}},
        {"id": 5, "name": "bob", "parent": "root", "owner_uid": 1001, "banks": {}}]})
    c["principals-id-zero"] = lambda x: _principals(x, {**_base_principals(), "principals": [
        {"id": 0, "name": "alice", "parent": "root", "owner_uid": 1000, "banks": {}}]})

    # volume.json
    c["volume-json-malformed"] = lambda x: x.json_file("volume.json", "{format: 1")
    c["volume-json-wrong-types"] = lambda x: x.edit_json(
        "volume.json", lambda d: d.update(uuid=["x"], created_ns="now"))
    c["volume-json-not-an-object"] = lambda x: x.json_file("volume.json", "[1]")
    c["volume-json-deep"] = lambda x: x.json_file("volume.json", DEEP)
    c["volume-json-huge-number"] = lambda x: x.json_file(
        "volume.json", '{"format": 1, "uuid": "u", "created_ns": ' + HUGE_INT + "}")
    c["volume-json-unknown-keys"] = lambda x: x.edit_json("volume.json", lambda d: d.update(zz=1))
    c["volume-json-missing-uuid"] = lambda x: x.edit_json("volume.json", lambda d: d.pop("uuid"))
    c["volume-json-uuid-path"] = lambda x: x.edit_json(
        "volume.json", lambda d: d.update(uuid=f"../../../../..{x.outside}/sock"))

    # mount.json (a daemon's state: only a crashed daemon leaves one)
    c["mount-json-malformed"] = lambda x: x.json_file("mount.json", "{pid")
    c["mount-json-wrong-types"] = lambda x: x.json_file(
        "mount.json", {"mountpoint": 5, "pid": "one"})
    c["mount-json-not-an-object"] = lambda x: x.json_file("mount.json", "[1, 2]")
    c["mount-json-deep"] = lambda x: x.json_file("mount.json", DEEP)
    c["mount-json-huge-pid"] = lambda x: x.json_file(
        "mount.json", '{"mountpoint": "/nonexistent", "pid": ' + HUGE_INT + "}")
    c["mount-json-pid-1"] = lambda x: x.json_file("mount.json", {"mountpoint": "/", "pid": 1})
    c["mount-json-unknown-keys"] = lambda x: x.json_file(
        "mount.json", {"mountpoint": "/nonexistent", "pid": 999999999, "zz": [1]})

    # lock
    c["lock-symlink"] = lambda x: x.replace("lock", "symlink")
    c["lock-fifo"] = lambda x: x.replace("lock", "fifo")
    c["lock-directory"] = lambda x: x.replace("lock", "dir")

    # each store file replaced by a symlink to a file root owns elsewhere, a FIFO, a
    # directory
    for name in ("meta.db", "device.img", "checksums", "device.json", "volume.json",
                 "principals.json", "mount.json", "sluice.log", "meta.db-wal"):
        for kind in ("symlink", "fifo", "dir"):
            c[f"{name}-{kind}"] = (lambda n, k: lambda x: x.replace(n, k))(name, kind)
    for name in ("meta.db", "device.img", "checksums", "meta.db-wal", "meta.db-shm", "lock",
                 "sluice.log", "principals.json"):
        for kind in ("symlink-empty", "symlink-big"):
            c[f"{name}-{kind}"] = (lambda n, k: lambda x: x.replace(n, k))(name, kind)
    return c


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


def _garble_pages(x: Ctx) -> None:
    p = x.vol / "meta.db"
    data = bytearray(p.read_bytes())
    for off in range(4096, len(data), 4096):  # page 1 (the schema) survives
        data[off + 100:off + 400] = x.random_bytes(300)
    p.write_bytes(bytes(data))


def _random_entries(x: Ctx) -> None:
    p = x.vol / "checksums"
    data = bytearray(p.read_bytes())
    data[128:] = x.random_bytes(len(data) - 128)
    p.write_bytes(bytes(data))


def _npy_header(x: Ctx, header: str) -> None:
    p = x.vol / "checksums"
    data = bytearray(p.read_bytes())
    h = header.encode()
    h = h + b" " * (128 - 10 - len(h) - 1) + b"\n"
    data[:128] = b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h
    p.write_bytes(bytes(data))


# -- checking ------------------------------------------------------------------------------

def make_outside(outside: Path) -> Path:
    """A case's own directory of files root owns outside the volume (standing in for
    /etc/shadow): the symlink cases point at them, and nothing may change them."""
    outside.mkdir(mode=0o700, exist_ok=True)
    (outside / "secret").write_text("root:$6$secret:19000:0:99999:7:::\n")
    (outside / "empty").write_bytes(b"")
    with open(outside / "big", "wb") as f:  # 32 MiB of a pattern (the volume is 16 MiB)
        f.write(b"root-owned data. " * ((32 << 20) // 17 + 1))
    for p in outside.iterdir():
        os.chmod(p, 0o600)
    return outside


def snapshot(outside: Path) -> dict:
    out = {}
    for p in sorted(outside.rglob("*")):
        st = os.lstat(p)
        h = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, h)
    return out


@dataclasses.dataclass
class Result:
    case: str
    problems: list[str]
    warnings: list[str]
    steps: list[str]


def check_cli(step: Step, problems: list[str]) -> None:
    text = step.out + step.err
    if step.rc is None:
        problems.append(f"hang: {step.name} did not finish in {STEP_TIMEOUT:g} s")
    if "Traceback (most recent call last)" in text:
        problems.append(f"traceback: {step.name}: "
                        + (step.err.strip().splitlines() or [""])[-1][:200])
    elif step.rc == 1 and len([ln for ln in step.err.splitlines() if ln.strip()]) != 1 \
            and step.name != "fsck-repair":
        problems.append(f"not-one-line: {step.name} said {step.err.strip()[:300]!r}")


def mount_and_read(vol: Path, template: dict, problems: list[str], warnings: list[str],
                   steps: list[str]) -> None:
    mp = Path(tempfile.mkdtemp(prefix="volfuzz-mnt-"))
    log = vol / "sluice.log"
    log_before = log.stat().st_size if log.is_file() and not log.is_symlink() else 0
    try:
        r = sluice("mount", "mount", str(vol), str(mp))
        check_cli(r, problems)
        steps.append(r.brief())
        if r.rc != 0:
            if _mounted(mp):
                problems.append("mount failed but left a mount behind")
            return
        state = _mount_state(vol)
        pid = state.get("pid") if isinstance(state, dict) else None
        rd = run("read", [sys.executable, "-c", READER, str(mp), str(BS)])
        steps.append(f"read: rc={rd.rc} {rd.err.strip()[-200:]}")
        if rd.rc is None:
            problems.append("hang: reading the mounted volume did not finish")
        elif rd.rc != 0:
            problems.append(f"reader failed: {rd.err.strip()[-300:]}")
        else:
            _check_data(json.loads(rd.out), template, problems, steps)
        if not _answers(mp) or (pid and not _alive(pid)):
            problems.append("daemon-died: the mount stopped answering after the reads")
        u = sluice("umount", "umount", str(mp))
        steps.append(u.brief())
        if u.rc != 0:
            problems.append(f"umount failed: {u.brief()}")
    finally:
        if _mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            st = _mount_state(vol)
            if isinstance(st, dict) and isinstance(st.get("pid"), int) and _alive(st["pid"]):
                os.kill(st["pid"], signal.SIGKILL)  # the daemon this driver started
        try:
            os.rmdir(mp)
        except OSError:
            pass
        if log.is_file() and not log.is_symlink():
            with open(log, "rb") as f:
                f.seek(log_before)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                if "unexpected error" in line or "Traceback" in line:
                    warnings.append("handler-bug: " + line.strip()[:300])
                    break
            if "the daemon failed" in text:
                problems.append("daemon-died: " + text.strip().splitlines()[-1][:300])


def _check_data(seen: dict, template: dict, problems: list[str], steps: list[str]) -> None:
    by_ino = {}
    for rel, ino in template["inos"].items():
        if rel in FILES:
            by_ino[ino] = rel
        elif rel in HARDLINKS:
            by_ino[ino] = HARDLINKS[rel]
    for rel, info in seen["files"].items():
        orig = by_ino.get(info["ino"])
        for n, tag in enumerate(info["tags"]):
            if tag is None:
                continue
            want = f"<{orig}#{n}>" if orig else None
            if tag != want:
                problems.append(f"cross-file-data: {rel} (inode {info['ino']}) block {n} "
                                f"holds {tag!r}, expected {want!r}")
                break
    if seen["errors"]:
        steps.append(f"read errors: {seen['errors'][:6]}")


def _mount_state(vol: Path) -> object:
    p = vol / "mount.json"
    try:
        if p.is_symlink() or not p.is_file():
            return None
        return json.loads(p.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _mounted(mp: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1] == str(mp) for line in f)


def _answers(mp: Path) -> bool:
    try:
        os.statvfs(mp)
    except OSError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _verdict(step: Step) -> bool:
    """Whether fsck ran to its verdict (exit 1 is also the CLI's error exit)."""
    last = step.out.strip().splitlines()[-1:] or [""]
    return last[0].endswith((": clean", " repaired", " found", " left"))


def run_case(name: str, damage: Callable[[Ctx], None], template: dict, work: Path,
             seed: int) -> Result:
    vol = work / name
    if vol.exists():
        shutil.rmtree(vol)
    shutil.copytree(template["vol"], vol, symlinks=True)
    # A uuid of its own: it names the daemon's control socket (cases run at once).
    header = json.loads((vol / "volume.json").read_text())
    header["uuid"] = str(uuid.uuid4())
    (vol / "volume.json").write_text(json.dumps(header))
    outside = make_outside(work / f"{name}.outside")
    ctx = Ctx(vol, template["inos"], template["nblocks"], random.Random(f"{seed}:{name}"),
              outside)
    before = snapshot(outside)
    damage(ctx)
    problems: list[str] = []
    warnings: list[str] = []
    steps: list[str] = []
    r = sluice("fsck", "fsck", "-q", str(vol))
    check_cli(r, problems)
    steps.append(r.brief())
    mount_and_read(vol, template, problems, warnings, steps)
    rep = sluice("fsck-repair", "fsck", "-q", "--repair", str(vol))
    check_cli(rep, problems)
    steps.append(rep.brief())
    if rep.rc in (0, 1) and _verdict(rep):
        again = sluice("fsck-again", "fsck", "-q", str(vol))
        check_cli(again, problems)
        steps.append(again.brief())
        if again.rc != 0:
            problems.append(f"repair-not-clean: fsck --repair exited {rep.rc}, the next "
                            f"fsck exited {again.rc}: {again.out.strip()[-300:]}")
    elif rep.rc == 4 and "not repaired" not in rep.out and "still wrong" not in rep.out:
        problems.append("fsck --repair exited 4 without saying what it left")
    after = snapshot(outside)
    if after != before:
        changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        problems.append(f"outside-write: {changed}")
    return Result(name, problems, warnings, steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="pattern", help="run the cases whose name contains this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", help="work in this directory and keep it")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every step")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="cases run at once")
    args = ap.parse_args(argv)
    cases = _cases()
    if args.pattern:
        cases = {k: v for k, v in cases.items() if any(p in k for p in args.pattern.split(","))}
    if args.list:
        print("\n".join(cases))
        return 0
    if os.geteuid() != 0:
        print("volfuzz: run as root (it mounts volumes as root, as the cases assume)",
              file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="volfuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    results = []
    try:
        template = make_template(work)

        def one(item: tuple[str, Callable[[Ctx], None]]) -> Result:
            return run_case(item[0], item[1], template, work, args.seed)

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = pool.map(one, cases.items())
            for res in done:
                name = res.case
                results.append(res)
                status = "FAIL" if res.problems else ("warn" if res.warnings else "ok")
                print(f"{status:4} {name}" + ("".join(f"\n       {p}" for p in
                                                       res.problems + res.warnings)),
                      flush=True)
                if args.verbose or res.problems:
                    for s in res.steps:
                        print(f"         . {s}")
                if not args.keep:
                    shutil.rmtree(work / name, ignore_errors=True)
                    shutil.rmtree(work / f"{name}.outside", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r.problems]
    print(f"{len(results)} cases, {len(failed)} failed, "
          f"{sum(1 for r in results if r.warnings and not r.problems)} with warnings")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results],
                                              indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
