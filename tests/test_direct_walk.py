"""Path resolution of a direct client's open (issue 6, hostile probe findings 6 and 10).

Finding 6: the metadata server walks a direct client's path in one step of its event
loop, so the walk is bounded as Linux bounds it: 40 symlinks (MAXSYMLINKS), a path of
less than PATH_MAX bytes, and at most fs.service.MAX_WALK names through all the links
(ELOOP past it). 39 links of "d/../d/../..." made one open walk 64,000 names.

Finding 10: O_CREAT|O_EXCL never follows a final symlink (EEXIST, even when it dangles)
and O_NOFOLLOW refuses one (ELOOP), as open(2) through the mount does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from conftest import as_uid
from fs.service import MAX_SYMLINKS, MAX_WALK, PATH_MAX
from kernelshim.client import Client
from shim_util import pubmnt  # noqa: F401 (fixture)

pytestmark = pytest.mark.mounted


def _open_errno(c: Client, path: str, flags: int, mode: int = 0o644) -> int:
    """0 if the direct open succeeded (and closes it), else its errno."""
    try:
        r = c.call("open", path=path, flags=flags, mode=mode)
    except OSError as exc:
        return exc.errno or -1
    c.call("close", slot=r["slot"])
    return 0


def _mount_errno(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        return exc.errno or -1
    os.close(fd)
    return 0


def test_long_symlink_walk_is_refused(mnt: Path) -> None:
    """The probe's chain: 39 links, each a 4000-byte d/../d/../ walk, about 64,000
    names in all. The walk stops at MAX_WALK names with ELOOP; the kernel (no such
    bound, and not blocking anyone while it walks) still resolves it through the mount."""
    base = mnt / "chain"
    base.mkdir()
    (base / "d").mkdir()
    (base / "f").write_bytes(b"target")
    for i in range(39):
        nxt = f"s{i + 1}" if i < 38 else "f"
        os.symlink("d/../" * 799 + nxt, base / f"s{i}")
    assert (base / "s0").read_bytes() == b"target"  # the kernel follows it
    assert 39 * 1600 > MAX_WALK
    with Client.connect(mnt, shm_size=1 << 16) as c:
        assert _open_errno(c, "chain/s0", os.O_RDONLY) == errno.ELOOP
        # One such link is within the bound: about 1,600 names.
        assert _open_errno(c, "chain/s38", os.O_RDONLY) == 0
        with c.open("chain/s38", "r") as f:
            assert f.read() == b"target"
    # Nothing was created or changed by the refused walk.
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["d", "f"] + [f"s{i}" for i in range(39)])


def test_walk_bound_counts_names_not_links(mnt: Path) -> None:
    """A walk of exactly MAX_WALK names resolves; two names more is ELOOP. The names
    come from three links, well under MAX_SYMLINKS."""
    (mnt / "d").mkdir()
    (mnt / "f").write_bytes(b"ok")
    m = (MAX_WALK - 4) // 6 - 2  # "d/../" pairs per link target (under 4095 bytes)
    for j, nxt in enumerate(("a1", "a2", "f")):
        os.symlink("d/../" * m + nxt, mnt / f"a{j}")
    walked = 1 + 3 * (2 * m + 1)  # "a0", then each target's names
    pad = (MAX_WALK - walked) // 2  # "d/../" before "a0" adds two names each
    assert walked + 2 * pad in (MAX_WALK, MAX_WALK - 1)
    with Client.connect(mnt, shm_size=0) as c:
        assert _open_errno(c, "d/../" * pad + "a0", os.O_RDONLY) == 0
        assert _open_errno(c, "d/../" * (pad + 1) + "a0", os.O_RDONLY) == errno.ELOOP


def test_symlink_count_and_path_length(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"end")
    # l0 -> l1 -> ... -> l{n-1} -> f: opening l0 follows n links.
    n = MAX_SYMLINKS + 1
    for i in range(n):
        os.symlink(f"l{i + 1}" if i < n - 1 else "f", mnt / f"l{i}")
    with Client.connect(mnt, shm_size=0) as c:
        assert _open_errno(c, "l1", os.O_RDONLY) == 0  # 40 links: as Linux, allowed
        assert _open_errno(c, "l0", os.O_RDONLY) == errno.ELOOP  # 41
        assert _mount_errno(mnt / "l0", os.O_RDONLY) == errno.ELOOP
        # PATH_MAX counts the terminating NUL: 4095 bytes resolve, 4096 do not.
        assert _open_errno(c, "./" * (PATH_MAX // 2 - 1) + "ff", os.O_RDONLY) \
            == errno.ENAMETOOLONG
        assert _open_errno(c, "./" * (PATH_MAX // 2 - 1) + "f", os.O_RDONLY) == 0


def test_excl_and_nofollow_on_a_final_symlink(mnt: Path) -> None:
    """Both ways on the same names: the mount (the kernel's open) and the direct path."""
    (mnt / "v").mkdir()
    (mnt / "v" / "precious").write_bytes(b"victim's data")
    os.symlink("v/planted", mnt / "dangling")
    os.symlink("v/precious", mnt / "link")
    os.symlink("v", mnt / "dirlink")
    cases = [
        ("dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST),
        ("link", os.O_WRONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST),
        ("link", os.O_RDONLY | os.O_NOFOLLOW, errno.ELOOP),
        ("link", os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, errno.ELOOP),
        ("dangling", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, errno.ELOOP),
        ("v/precious", os.O_RDONLY | os.O_DIRECTORY, errno.ENOTDIR),
        ("link", os.O_RDONLY | os.O_DIRECTORY, errno.ENOTDIR),
        # a symlink before the last name is followed even with O_NOFOLLOW
        ("dirlink/precious", os.O_RDONLY | os.O_NOFOLLOW, 0),
    ]
    with Client.connect(mnt, shm_size=0) as c:
        for path, flags, want in cases:
            assert _mount_errno(mnt / path, flags) == want, ("mount", path, flags)
            assert _open_errno(c, path, flags) == want, ("direct", path, flags)
        # The client library's "x" relies on O_EXCL: a dangling link is not followed.
        with pytest.raises(FileExistsError):
            c.open("dangling", "x")
        # Flags the direct path does not serve are refused, not misread.
        assert _open_errno(c, "v/precious", os.O_PATH | os.O_NOFOLLOW) == errno.EINVAL
        assert _open_errno(c, "v", os.O_TMPFILE | os.O_RDWR) == errno.EOPNOTSUPP
        assert _open_errno(c, "v/new", os.O_CREAT | os.O_DIRECTORY) == errno.EINVAL
    assert not (mnt / "v" / "planted").exists()
    assert not (mnt / "v" / "new").exists()
    assert (mnt / "v" / "precious").read_bytes() == b"victim's data"
    # Without O_EXCL or O_NOFOLLOW a final link is followed, as open(2) does.
    with Client.connect(mnt, shm_size=1 << 16) as c:
        with c.open("link", "r") as f:
            assert f.read() == b"victim's data"


def test_planted_symlink_as_another_user(pubmnt: Path) -> None:  # noqa: F811
    """The probe's case: one uid plants a dangling symlink where another creates its
    file with O_EXCL; the creator gets EEXIST and nothing appears at the link's target."""
    mnt = pubmnt
    os.chmod(mnt, 0o1777)
    target = mnt / "v1001"
    target.mkdir()
    os.chown(target, 1001, 1001)
    as_uid(1000, lambda: (os.symlink("v1001/planted", mnt / "report"), {})[1])

    def victim() -> dict:
        with Client.connect(mnt, shm_size=0) as c:
            return {"direct": _open_errno(c, "report", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
                    "mount": _mount_errno(mnt / "report",
                                          os.O_WRONLY | os.O_CREAT | os.O_EXCL)}
    assert as_uid(1001, victim) == {"direct": errno.EEXIST, "mount": errno.EEXIST}
    assert not (target / "planted").exists()


def test_protected_symlinks_in_a_sticky_world_writable_directory(pubmnt: Path  # noqa: F811
                                                                 ) -> None:
    """fs.protected_symlinks=1: in a sticky world-writable directory (root's, like
    /tmp) a symlink is followed only by its owner or when the directory's owner owns
    it; a tenant's planted link steers nobody else's open (EACCES). The direct
    client's walk answers as the kernel does through the mount (with the sysctl on),
    case by case. (Fails on the old walk: it followed every link.)"""
    mnt = pubmnt
    shared = mnt / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (mnt / "secret").write_bytes(b"victim's")
    os.chmod(mnt / "secret", 0o666)
    as_uid(1000, lambda: (os.symlink("../secret", shared / "planted"), {})[1])
    os.symlink("../secret", shared / "roots")  # owned by the directory's owner
    os.chmod(mnt, 0o755)

    # The kernel applies the host's sysctl to opens through the mount (the daemon's
    # rule does not depend on it: most distributions set 1, and it is the safe one);
    # where the host has 0 only the direct side is checked.
    kernel_protects = Path("/proc/sys/fs/protected_symlinks").read_text().strip() == "1"

    def try_both(path: str) -> dict:
        with Client.connect(mnt, shm_size=0) as c:
            out = {"direct": _open_errno(c, path, os.O_RDWR)}
        mount = _mount_errno(mnt / path, os.O_RDWR)
        out["mount"] = mount if kernel_protects or mount != 0 else out["direct"]
        return out

    # Another uid follows the planted link: refused, by the kernel and the direct walk.
    assert as_uid(1001, lambda: try_both("tmp/planted")) == {
        "direct": errno.EACCES, "mount": errno.EACCES}
    # So is root (Linux makes no exception for it).
    assert try_both("tmp/planted") == {"direct": errno.EACCES, "mount": errno.EACCES}
    # Its owner may; a link of the directory's owner anyone may; and in the middle of
    # a path the rule holds as well.
    assert as_uid(1000, lambda: try_both("tmp/planted")) == {"direct": 0, "mount": 0}
    assert as_uid(1001, lambda: try_both("tmp/roots")) == {"direct": 0, "mount": 0}
    (mnt / "sub").mkdir()
    os.chmod(mnt / "sub", 0o777)
    (mnt / "sub" / "f").write_bytes(b"x")
    os.chmod(mnt / "sub" / "f", 0o666)
    as_uid(1000, lambda: (os.symlink("../sub", shared / "dirlink"), {})[1])
    assert as_uid(1001, lambda: try_both("tmp/dirlink/f")) == {
        "direct": errno.EACCES, "mount": errno.EACCES}
    # Not sticky (or not world-writable): no restriction.
    os.chmod(shared, 0o777)
    assert as_uid(1001, lambda: try_both("tmp/planted")) == {"direct": 0, "mount": 0}
    os.chmod(shared, 0o1775)
    assert as_uid(1001, lambda: try_both("tmp/planted")) == {"direct": 0, "mount": 0}


class _Steps(trio.abc.Instrument):
    """Counts the steps (runs between two checkpoints) of one task."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_long_walk_gives_the_loop_back(tmp_path: Path) -> None:
    """The metadata server's walk of ~4,000 names (within the bounds) is cut into
    steps of at most WALK_STEP names: the task serving the open runs in that many
    steps of the event loop, not one. (A component test: DirectService over a
    FileSystem, no socket.)"""
    from fs.service import WALK_STEP, DirectService
    from kernelshim.principals import ROOT_PRINCIPAL
    from kernelshim.service import Credentials
    from test_filesystem import CALLER, Volume

    v = Volume(tmp_path / "vol", size=256 * 4096)
    fs = await v.open()
    try:
        d = fs.mkdir(1, b"d", 0o755, CALLER)
        fs.forget(d.id, 1)
        h, node = fs.create(1, b"f", 0o644, os.O_RDWR, CALLER)
        await fs.release(h.fh)
        m = (MAX_WALK - 4) // 6 - 2
        for j, nxt in enumerate((b"a1", b"a2", b"f")):
            fs.symlink(1, b"a%d" % j, b"d/../" * m + nxt, CALLER)
        walked = 1 + 3 * (2 * m + 1)
        service = DirectService(fs)
        creds = Credentials(pid=os.getpid(), uid=0, gid=0)
        root = fs.principals.by_id(ROOT_PRINCIPAL)
        steps = _Steps()
        grants = []

        async def opener() -> None:
            steps.task = trio.lowlevel.current_task()
            await trio.lowlevel.checkpoint()
            grants.append(await service.open_path("a0", os.O_RDONLY, 0, creds, root))

        trio.lowlevel.add_instrument(steps)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(opener)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert grants and grants[0].inode == node.id
        await service.close(grants[0])
        assert steps.steps >= walked // WALK_STEP + 1, (steps.steps, walked)
    finally:
        await v.close()
