"""Extended attributes and symlink targets are charged (issue 6, hostile probe finding 8).

A tenant with a 1 MiB space bank stored 100 MiB of xattr values in meta.db, charged to
nobody, and on a small host filesystem filled it until the volume turned read-only for
everyone; a symlink with a 4000-byte target cost 68 bytes. Now xattr names and values
and symlink targets are charged to the inode's principal (EDQUOT past its bank),
refunded on overwrite, removal and when the inode goes, recounted at mount; an inode's
xattrs are bounded (fs.xattrs.XATTR_INODE_MAX, ENOSPC past it); and SQLite's "database
or disk is full" in a setxattr is that request's ENOSPC, not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from conftest import REPO, as_uid, run_as, sluice
from fs.errors import FsError, NoSpace
from fs.filesystem import ROOT_INODE, FileSystem
from fs.inodes import Caller
from fs.xattrs import XATTR_INODE_MAX, XATTR_SIZE_MAX
from fs import volume
from fs.metadata import Metadata
from kernelshim import Kernel
from kernelshim.banks import ENTRY_COST, Banks, QuotaExceeded
from test_filesystem import CALLER, Volume, fill, write_file

BS = 4096
MiB = 1 << 20


@pytest.fixture
async def xvol(tmp_path: Path):
    v = Volume(tmp_path / "vol", size=1024 * BS)
    await v.open()
    yield v
    await v.close()


async def reopen(v: Volume) -> FileSystem:
    """Close and load the volume again with the same principal table (a component
    test has no principals.json): the load recounts every principal's storage."""
    assert v.fs is not None
    table = v.fs.principals
    await v.close()
    v.kernel = Kernel.open(v.path, cache_bytes=64 * BS, profile=v.profile)
    v.md = Metadata(v.path / volume.DB)
    v.fs = await FileSystem.load(v.md, v.kernel, principals=table)
    return v.fs


def usage(fs: FileSystem) -> dict[str, tuple[int, int]]:
    return {p.name: (p.usage.space, p.usage.inodes) for p in fs.principals._by_id.values()}


def _tenant(fs: FileSystem, space: int, name: str = "tenant") -> Caller:
    t = fs.principals.add(name, owner_uid=1000, banks=Banks(space=space), caller_uid=0)
    return Caller(1000, 1000, os.getpid(), 0o022, t.id)


async def test_xattrs_and_symlink_targets_are_charged_and_refunded(xvol: Volume) -> None:
    fs = xvol.fs
    assert fs is not None
    caller = _tenant(fs, 4 * MiB)
    tenant = fs.principals.get("tenant")
    h, node = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, caller)
    await fs.release(h.fh)
    base = tenant.usage.space
    assert base == ENTRY_COST + 1
    fs.setxattr(node.id, b"user.big", b"v" * 60_000, 0)
    assert tenant.usage.space == base + 8 + 60_000
    fs.setxattr(node.id, b"user.big", b"w" * 10, 0)  # a smaller value refunds the rest
    assert tenant.usage.space == base + 8 + 10
    fs.setxattr(node.id, b"user.b", b"", 0)
    assert tenant.usage.space == base + 8 + 10 + 6
    fs.removexattr(node.id, b"user.big")
    assert tenant.usage.space == base + 6
    # Set by root on the tenant's file: still the inode's principal's.
    fs.setxattr(node.id, b"user.r", b"r" * 1000, 0)
    assert tenant.usage.space == base + 6 + 6 + 1000
    # The last name goes: the name, the inode and its xattrs are refunded (up the
    # chain: root holds nothing of its own).
    await fs.unlink(ROOT_INODE, b"f")
    assert tenant.usage.space == 0 and tenant.usage.inodes == 0
    assert fs.principals.get("root").usage.space == 0
    # A symlink's target is held by its inode: 4000 bytes cost 4000 bytes, not 0.
    fs.symlink(ROOT_INODE, b"s", b"t" * 4000, caller)
    assert tenant.usage.space == ENTRY_COST + 1 + 4000
    await fs.unlink(ROOT_INODE, b"s")
    assert tenant.usage.space == 0


async def test_space_bank_bounds_xattrs_and_symlinks(xvol: Volume) -> None:
    """The probe's tenant: a 1 MiB bank, 64 KiB values, one after another."""
    fs = xvol.fs
    assert fs is not None
    caller = _tenant(fs, 1 * MiB)
    tenant = fs.principals.get("tenant")
    stored = 0
    for i in range(40):
        h, node = fs.create(ROOT_INODE, b"f%d" % i, 0o644, os.O_RDWR, caller)
        await fs.release(h.fh)
        try:
            fs.setxattr(node.id, b"user.v", os.urandom(XATTR_SIZE_MAX), 0)
        except QuotaExceeded as exc:
            assert exc.errno == errno.EDQUOT
            break
        stored += 1
    assert 12 <= stored < 16, stored
    assert tenant.usage.space <= 1 * MiB
    # The refused setxattr stored nothing.
    assert fs.listxattr(fs.lookup(ROOT_INODE, b"f%d" % stored).id) == []
    # A 4 KiB bank holds one symlink of a 4000-byte target, not a second.
    small = _tenant(fs, 4096, "small")
    fs.symlink(ROOT_INODE, b"s1", b"t" * 4000, small)
    with pytest.raises(QuotaExceeded):
        fs.symlink(ROOT_INODE, b"s2", b"t" * 4000, small)
    assert fs.md.lookup(ROOT_INODE, b"s2") is None
    assert fs.principals.get("small").usage.space == ENTRY_COST + 2 + 4000


async def test_per_inode_xattr_bound(xvol: Volume) -> None:
    fs = xvol.fs
    assert fs is not None
    ino = await write_file(fs, b"f", b"")
    value = b"x" * XATTR_SIZE_MAX
    n = 0
    with pytest.raises(NoSpace):
        while True:
            fs.setxattr(ino, b"user.%d" % n, value, 0)
            n += 1
    assert n == XATTR_INODE_MAX // (XATTR_SIZE_MAX + 6)
    total = sum(len(k) + len(fs.getxattr(ino, k)) for k in fs.listxattr(ino))
    assert total <= XATTR_INODE_MAX
    assert fs.md.get_xattr(ino, b"user.%d" % n) is None
    # Replacing a value by one of the same size fits; a smaller one always does.
    fs.setxattr(ino, b"user.0", b"y" * XATTR_SIZE_MAX, 0)
    fs.setxattr(ino, b"user.1", b"small", 0)
    fs.setxattr(ino, b"user.%d" % n, b"x" * 1000, 0)


async def test_hint_xattrs_still_work_and_are_charged(xvol: Volume) -> None:
    fs = xvol.fs
    assert fs is not None
    caller = _tenant(fs, 1 * MiB)
    tenant = fs.principals.get("tenant")
    d = fs.mkdir(ROOT_INODE, b"d", 0o777, caller)
    fs.setxattr(d.id, b"user.sluice.priority", b"5", 0)
    fs.setxattr(d.id, b"user.sluice.cache", b"kernel", 0)
    before = tenant.usage.space
    h, node = fs.create(d.id, b"f", 0o644, os.O_RDWR, caller)  # inherits both hints
    await fs.release(h.fh)
    assert fs.getxattr(node.id, b"user.sluice.priority") == b"5"
    inherited = len(b"user.sluice.priority") + 1 + len(b"user.sluice.cache") + 6
    assert tenant.usage.space == before + ENTRY_COST + 1 + inherited
    with pytest.raises(FsError) as err:
        fs.setxattr(node.id, b"user.sluice.priority", b"loud", 0)
    assert err.value.errno == errno.EINVAL
    # The daemon's discarded mark is free, and only ever "1".
    with pytest.raises(FsError):
        fs.setxattr(node.id, b"user.sluice.discarded", b"x" * 60_000, 0)
    fs.setxattr(node.id, b"user.sluice.discarded", b"1", 0)
    assert tenant.usage.space == before + ENTRY_COST + 1 + inherited


async def test_live_charges_equal_the_recount(xvol: Volume) -> None:
    """Random xattr sets, overwrites and removals, symlinks, hint inheritance,
    unlinks (one while open, one renamed over), as two principals; then the live
    charges equal what a remount recounts from the volume."""
    fs = xvol.fs
    assert fs is not None
    tenant = _tenant(fs, 64 * MiB)
    rng = random.Random(6)
    d = fs.mkdir(ROOT_INODE, b"d", 0o777, tenant)
    fs.setxattr(d.id, b"user.sluice.priority", b"3", 0)
    files: list[bytes] = []
    held = None
    for step in range(300):
        who = rng.choice((CALLER, tenant))
        op = rng.random()
        if op < 0.2 or not files:
            name = b"f%d" % step
            h, node = fs.create(d.id, name, 0o644, os.O_RDWR, who)
            await fs.write(h.fh, 0, fill(step, rng.randrange(0, 2 * BS)))
            await fs.release(h.fh)
            files.append(name)
        elif op < 0.3:
            name = b"s%d" % step
            fs.symlink(d.id, name, b"t" * rng.randrange(1, 4096), who)
            files.append(name)
        elif op < 0.65:
            node = fs.lookup(d.id, rng.choice(files))
            k = b"user.k%d" % rng.randrange(6)
            fs.setxattr(node.id, k, os.urandom(rng.randrange(0, 3000)), 0)
            fs.forget(node.id, 1)
        elif op < 0.8:
            node = fs.lookup(d.id, rng.choice(files))
            names = fs.listxattr(node.id)
            if names:
                fs.removexattr(node.id, rng.choice(names))
            fs.forget(node.id, 1)
        elif op < 0.9 and len(files) > 1:
            src, dst = rng.sample(files, 2)
            await fs.rename(d.id, src, d.id, dst, 0)
            files.remove(src)
        else:
            name = rng.choice(files)
            node = fs.lookup(d.id, name)
            if held is None and node.is_reg:  # open, unlinked, xattrs set after
                held = fs.open(node.id, os.O_RDWR, CALLER)
                await fs.unlink(d.id, name)
                fs.setxattr(node.id, b"user.late", b"l" * 500, 0)
            else:
                await fs.unlink(d.id, name)
            fs.forget(node.id, 1)
            files.remove(name)
        if step % 60 == 0:
            await fs.commit()
    assert held is not None
    await fs.release(held.fh)  # the unlinked inode goes, with its xattrs' charge
    live = usage(fs)
    assert live["tenant"][0] > 0
    await fs.sync()
    fs = await reopen(xvol)
    assert usage(fs) == live


async def test_metadata_database_full_is_enospc(xvol: Volume) -> None:
    """SQLite's SQLITE_FULL (here its page limit; in the probe, the host filesystem
    under meta.db) in a setxattr is ENOSPC for that request: the transaction holding
    everyone's other changes survives, and commits."""
    fs = xvol.fs
    assert fs is not None
    await fs.sync()
    ino = await write_file(fs, b"kept", b"uncommitted but acknowledged")
    pages = fs.md.db.execute("PRAGMA page_count").fetchone()[0]
    fs.md.db.execute(f"PRAGMA max_page_count={pages + 4}")
    base = usage(fs)
    with pytest.raises(NoSpace):
        for i in range(50):
            fs.setxattr(ino, b"user.%d" % i, os.urandom(XATTR_SIZE_MAX), 0)
    assert fs.read_only is None
    assert fs.md.db.in_transaction
    stored = [k for k in fs.listxattr(ino)]
    # Charges follow what is stored: the refused value's charge was given back.
    assert usage(fs)["root"][0] == base["root"][0] + sum(
        len(k) + XATTR_SIZE_MAX for k in stored)
    fs.md.db.execute("PRAGMA max_page_count=1073741823")
    await fs.sync()
    live = usage(fs)
    await xvol.close()
    fs = await xvol.open()
    assert usage(fs) == live
    assert fs.listxattr(fs.lookup(ROOT_INODE, b"kept").id) == stored


@pytest.mark.mounted
def test_tenant_xattrs_hit_its_bank_through_the_mount(volume: Path, public_mount) -> None:
    """The probe's attack through the mount, as uid 1000 with a 1 MiB bank."""
    m = public_mount(volume)
    mnt = m.path
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o1777)

    def principals() -> dict[str, dict]:
        out = json.loads(sluice("principal", "ls", str(mnt), "--json").stdout)
        rows = out["principals"] if isinstance(out, dict) else out
        return {r["name"]: r for r in rows}

    f = mnt / "pub" / "x1000"
    as_uid(1000, lambda: (f.write_bytes(b""), {})[1])
    r = run_as(1000, 1000, [str(REPO / ".venv" / "bin" / "sluice"), "stats", str(mnt)])
    assert r.returncode == 0, r.stderr  # makes uid 1000's default principal
    sluice("principal", "set", str(mnt), "uid-1000", "--space", "1M")
    before = principals()["uid-1000"]["usage"]["space"]

    def attack() -> dict:
        # Three 64 KiB values per file (a fourth is past the per-inode bound), on as
        # many files as it takes.
        val = os.urandom(65536)
        stored = 0
        for n in range(600):
            g = f if n == 0 else mnt / "pub" / f"x1000-{n}"
            try:
                if n:
                    g.write_bytes(b"")
                for i in range(3):
                    os.setxattr(g, f"user.{i:05d}", val)
                    stored += 1
            except OSError as exc:
                return {"stored": stored, "files": n + 1, "errno": exc.errno}
        return {"stored": stored, "files": 600, "errno": 0}
    out = as_uid(1000, attack)
    assert out["errno"] == errno.EDQUOT
    assert 12 <= out["stored"] <= 16
    used = principals()["uid-1000"]["usage"]["space"]
    names = sum(ENTRY_COST + len(f"x1000-{n}") for n in range(1, out["files"]))
    assert used == before + names + out["stored"] * (10 + 65536)
    assert used <= MiB
    # Root's writes are unaffected; removing the tenant's files refunds it all.
    (mnt / "pub" / "root-file").write_bytes(b"fine")
    assert (mnt / "pub" / "root-file").read_bytes() == b"fine"
    for g in (mnt / "pub").glob("x1000*"):
        g.unlink()
    assert principals()["uid-1000"]["usage"]["space"] == before - (ENTRY_COST + len("x1000"))
