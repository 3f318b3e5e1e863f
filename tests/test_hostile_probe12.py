"""Hostile probe 12 (stop 24): can one tenant read what another wrote?

- F1 (tests/test_pager.py, `test_a_dropped_dirty_frame_never_shows_the_blocks_older_
  contents`): a dropped dirty discardable frame left a kept block's previous owner's
  bytes readable.
- F2 (here): a direct client's read held at its own I/O limit when the owner's chmod
  revoked its grant went on afterwards and returned what the owner wrote after the
  chmod. The shim kernel now checks the grant again when the device lets the read go
  (`Kernel.read_into(..., revocable=True)`, what the direct client's reads use).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from blockdev.scheduler import READ
from kernelshim import FRESH, ROOT_PRINCIPAL, BlockDevice, ExtentMap, GrantRevoked, Kernel, Rights

BS = 4096


@pytest.fixture
def kernel(tmp_path: Path):
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=64 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=16 * BS)  # write-through
    yield k
    k.close()


def _grant(kernel: Kernel, rights: Rights):
    return kernel.grant(inode=2, generation=1, extents=ExtentMap([(0, 8, 4, FRESH)]),
                        rights=rights, principal=ROOT_PRINCIPAL, charge=False)


def _held_at_the_limit(monkeypatch: pytest.MonkeyPatch, kernel: Kernel, kind: str,
                       principal: object = None) -> tuple[trio.Event, trio.Event]:
    """The device's requests of `kind` (of `principal`, or anyone's) wait, as at their
    principal's I/O limit, until the first event is set; the second is set when one
    does."""
    gate, held = trio.Event(), trio.Event()
    serve = kernel.device._serve

    async def at_the_limit(p, block, nbytes, k):
        if k == kind and principal in (None, p) and not gate.is_set():
            held.set()
            await gate.wait()
        return await serve(p, block, nbytes, k)
    monkeypatch.setattr(kernel.device, "_serve", at_the_limit)
    return gate, held


async def _read_outcome(kernel: Kernel, grant, buf: bytearray, out: list[object], *,
                        revocable: bool) -> None:
    """A read of the grant's first len(buf) bytes: its length, or the GrantRevoked."""
    try:
        out.append(await kernel.read_into(grant, 0, memoryview(buf), revocable=revocable))
    except GrantRevoked as exc:
        out.append(exc)


@pytest.mark.parametrize("revocable", [True, False])
async def test_a_read_held_at_its_limit_does_not_outlive_its_grants_revoke(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch, revocable: bool) -> None:
    owner = _grant(kernel, Rights.RW)
    await kernel.write(owner, 0, b"public!!" * (4 * BS // 8))
    await kernel.pager.forget_runs([(8, 4)], principal=ROOT_PRINCIPAL)  # a miss, below
    reader = _grant(kernel, Rights.READ)
    gate, held = _held_at_the_limit(monkeypatch, kernel, READ)  # the reader's I/O limit
    buf = bytearray(BS)
    outcome: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(_read_outcome, kernel, reader, buf, outcome,
                                             revocable=revocable))
        await held.wait()
        kernel.revoke_nowait(reader)  # the owner's chmod 600
        await kernel.write(owner, 0, b"SECRET-D" * (BS // 8))  # after the chmod returned
        gate.set()
    if revocable:  # a direct client's read: refused, nothing of the new bytes
        assert isinstance(outcome[0], GrantRevoked)
        assert b"SECRET-D" not in buf
    else:  # the mount's own reads go on (their grants are renewed under them)
        assert outcome == [BS]


# -- L1: the control socket is found only at a sluice mount's root ----------------------

@pytest.mark.mounted
def test_the_control_xattr_is_reserved_and_found_only_at_a_mount_root(
        mnt: Path, tmp_path: Path) -> None:
    """A tenant set `user.sluice.control` on its own directory (in the volume, or on the
    host) naming a socket of its own; root's `sluice stats` of that directory then
    talked to the tenant's fake daemon. The name is now sluice's alone in the volume,
    and the client believes it only at the root of a fuse.sluice mount, naming a socket
    its daemon's user owns."""
    import errno
    import os
    import socket as socketmod

    from kernelshim.client import CONTROL_XATTR, control_socket
    real = control_socket(mnt)
    assert real.endswith(".sock")
    d = mnt / "u1"
    d.mkdir()
    for target in (d, mnt):
        with pytest.raises(OSError) as ei:
            os.setxattr(target, CONTROL_XATTR, b"/tmp/fake.sock")
        assert ei.value.errno == errno.EPERM
        with pytest.raises(OSError) as ei:
            os.removexattr(target, CONTROL_XATTR)
        assert ei.value.errno in (errno.EPERM, errno.ENODATA)
    assert control_socket(mnt) == real
    with pytest.raises(OSError, match="not a mounted sluice volume"):
        control_socket(d)
    # a host directory that names a socket: not a sluice mount at all
    host = tmp_path / "fake"
    host.mkdir()
    fake = socketmod.socket(socketmod.AF_UNIX)
    fake.bind(str(tmp_path / "fake.sock"))
    try:
        os.setxattr(host, CONTROL_XATTR, str(tmp_path / "fake.sock").encode())
    except OSError:
        pytest.skip("the host's tmp filesystem takes no user xattrs")
    finally:
        fake.close()
    with pytest.raises(OSError, match="not a mounted sluice volume"):
        control_socket(host)


# -- L2: protected_regular on the direct path ----------------------------------------------

@pytest.mark.mounted
def test_a_direct_create_open_of_a_planted_file_in_a_sticky_directory_is_refused(
        mnt: Path) -> None:
    """Linux's fs.protected_regular=1 (fs/namei.c `may_create_in_sticky`), as the direct
    path already has protected_symlinks: an O_CREAT open of an existing regular file in a
    sticky world-writable directory, owned by neither the opener nor the directory's
    owner, is EACCES (root included) — a victim's open(path, "w") would otherwise write
    into a file a tenant planted there to read it. Without O_CREAT, or for the
    opener's own files or the directory owner's, it opens as before."""
    import os

    from kernelshim.client import Client
    pub = mnt / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    planted = pub / "report.txt"
    planted.write_bytes(b"")
    os.chmod(planted, 0o666)
    os.chown(planted, 1000, 1000)
    mine = pub / "mine.txt"
    mine.write_bytes(b"root's")
    with Client.connect(mnt) as c:
        for mode in ("w", "a", "a+", "w+"):
            with pytest.raises(PermissionError):
                c.open("pub/report.txt", mode)
        with c.open("pub/report.txt", "r+") as f:  # no O_CREAT: as Linux
            f.write(b"fine")
        with c.open("pub/mine.txt", "w") as f:
            f.write(b"mine")
    assert planted.read_bytes() == b"fine" and mine.read_bytes() == b"mine"


async def test_a_read_that_waited_for_a_frame_is_checked_again(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Review of stop 24, B: a direct read whose fill waited for a frame (its own dirty
    victim written back at its I/O limit) copied, once the wait ended, the frame the
    owner wrote after the chmod — no device read, so no check. The pool runs the
    read's guard after its own waits too."""
    from blockdev import PrincipalId
    from blockdev.scheduler import WRITE
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=16 * BS, writeback=True)
    try:
        k.pager.dirty_ratio = 1.0  # (the whole pool may be dirty: a victim is written)
        owner = _grant(k, Rights.RW)
        await k.write(owner, 0, b"public!!" * (4 * BS // 8))
        await k.pager.flush()
        await k.pager.forget_runs([(8, 4)], principal=ROOT_PRINCIPAL)
        r = PrincipalId(7)
        k.pager._max[7] = 12  # (the reader's ceiling: its victims are its own)
        mine = k.grant(inode=3, generation=1, extents=ExtentMap([(0, 100, 64, FRESH)]),
                       rights=Rights.RW, principal=r, charge=False)
        await k.write(mine, 0, b"m" * (12 * BS))
        reader = k.grant(inode=2, generation=1, extents=ExtentMap([(0, 8, 4, FRESH)]),
                         rights=Rights.READ, principal=r, charge=False)
        # the reader's write-back of its own dirty victim, at its I/O limit
        gate, held = _held_at_the_limit(monkeypatch, k, WRITE, r)
        buf = bytearray(BS)
        out: list[object] = []

        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(_read_outcome, k, reader, buf, out,
                                           revocable=True))
            await held.wait()
            k.revoke_nowait(reader)  # the owner's chmod 600
            with trio.move_on_after(2):
                await k.write(_grant(k, Rights.RW), 0, b"SECRET-D" * (BS // 8))
            gate.set()
        assert isinstance(out[0], GrantRevoked) and b"SECRET-D" not in buf
    finally:
        k.close()


def test_a_users_own_sluice_mount_is_trusted_by_that_user_only(
        tmp_path: Path, monkeypatch) -> None:
    """Review of stop 24, C: any user may mount a FUSE filesystem of its own typed
    fuse.sluice on a directory it owns; its xattr, its socket and its owner agree. A
    client of another uid (root included) refuses it, as FUSE trusts a user's daemon
    for that user only."""
    import os
    import socket as socketmod

    from kernelshim import client
    sock = tmp_path / "s.sock"
    s = socketmod.socket(socketmod.AF_UNIX)
    s.bind(str(sock))
    try:
        monkeypatch.setattr(client.os, "getxattr", lambda path, name: str(sock).encode())
        monkeypatch.setattr(client, "sluice_mount_owner", lambda path: 1000)
        monkeypatch.setattr(client.os, "geteuid", lambda: 0)
        with pytest.raises(OSError, match="uid 1000's own mount"):
            client.control_socket(tmp_path)
        monkeypatch.setattr(client.os, "geteuid", lambda: 1000)
        with pytest.raises(OSError, match="not a socket of the mount's daemon"):
            client.control_socket(tmp_path)  # (its owner is root here, not 1000)
        monkeypatch.setattr(client, "sluice_mount_owner", lambda path: os.getuid())
        monkeypatch.setattr(client.os, "geteuid", os.getuid)
        assert client.control_socket(tmp_path) == str(sock)
    finally:
        s.close()
