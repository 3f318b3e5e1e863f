"""Capability grants on the direct path, against a real daemon: forged and wrong-right
slots, out-of-range requests, mint and revoke, fencing (truncate, unlink, chmod revoke
grants before their blocks can be reused), permission checks for unprivileged uids, and
data-path correctness against an in-memory model cross-checked through the FUSE mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio

from conftest import make_volume
from shim_util import GID, UID, pubmnt, user_popen, user_python  # noqa: F401 (fixture)
from kernelshim.client import AsyncClient, Client
from kernelshim.errors import GrantRevoked, NotAllocated, RightsError
from kernelshim.grants import Rights
from kernelshim.protocol import MAX_FRAME, ProtocolError

pytestmark = pytest.mark.mounted

BS = 4096


def extents(volume: Path, ino: int) -> list[tuple[int, int, int, int]]:
    """The committed extents of inode `ino`: (file_block, dev_block, count, state)."""
    db = sqlite3.connect(f"file:{volume}/meta.db?mode=ro", uri=True)
    try:
        return db.execute("SELECT file_block, dev_block, count, state FROM extents "
                          "WHERE inode=? ORDER BY file_block", (ino,)).fetchall()
    finally:
        db.close()


def dev_blocks(exts: list[tuple[int, int, int, int]]) -> set[int]:
    return {d + i for _fb, d, c, _st in exts for i in range(c)}


def wait_free(mnt: Path, blocks: int, timeout: float = 10.0) -> None:
    """Wait until `blocks` blocks are free (freed blocks are reusable after the commit)."""
    deadline = time.monotonic() + timeout
    while os.statvfs(mnt).f_bavail < blocks:
        assert time.monotonic() < deadline, "freed blocks never became reusable"
        time.sleep(0.05)


def live_grants(c: Client) -> int:
    return c.call("stats")["fs"]["live_grants"]


# -- 4. slots, rights, ranges, mint, revoke ------------------------------------------------

def test_forged_slot_is_ebadf(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"data")
    with Client.connect(mnt) as c:
        for op, args in (("read", dict(offset=0, length=4, buf=0)),
                         ("write", dict(offset=0, length=4, buf=0)),
                         ("stat", {}), ("mint", dict(rights=1)), ("revoke", {}),
                         ("close", {}), ("layout_get", dict(offset=0, length=4096))):
            with pytest.raises(OSError) as ei:
                c.call(op, slot=999, **args)
            assert ei.value.errno == errno.EBADF, op
        # A slot number of another connection is not a capability in this one.
        with Client.connect(mnt) as other:
            f = other.open("f")
            assert f.slot == 1
            with pytest.raises(OSError) as ei:
                c.call("read", slot=f.slot, offset=0, length=4, buf=0)
            assert ei.value.errno == errno.EBADF
            assert f.read() == b"data"


def test_wrong_rights(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x" * 10000)
    with Client.connect(mnt) as c:
        r = c.open("f", "r")
        assert r.rights == Rights.READ
        for op, args in (("write", dict(offset=0, length=10, buf=0)),
                         ("layout_get", dict(offset=0, length=4096)),
                         ("commit", dict(offset=0, length=10)),
                         ("truncate", dict(size=0))):
            with pytest.raises(RightsError):
                c.call(op, slot=r.slot, **args)
        with pytest.raises(RightsError):
            r.pwrite(b"y", 0)
        w = c.open("f", "r+")
        wo = w.mint(Rights.WRITE)
        with pytest.raises(RightsError):
            wo.pread(10, 0)
        assert r.pread(5, 0) == b"xxxxx"
    assert (mnt / "f").read_bytes() == b"x" * 10000


def test_out_of_range_requests(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"z" * 5000)
    with Client.connect(mnt) as c:
        f = c.open("f", "r+")
        # Blocks 0 and 1 are allocated; a hole is not, and needs a layout first.
        for off in (2 * BS, 1 << 30, 10 * BS + 17):
            with pytest.raises(NotAllocated):
                c.call("write", slot=f.slot, offset=off, length=10, buf=0)
        with pytest.raises(NotAllocated):  # straddles the last allocated block
            c.call("write", slot=f.slot, offset=2 * BS - 5, length=10, buf=0)
        for op, args in (("read", dict(offset=-1, length=10, buf=0)),
                         ("write", dict(offset=-4096, length=10, buf=0)),
                         ("read", dict(offset=0, length=1 << 40, buf=0)),
                         ("write", dict(offset=0, length=MAX_FRAME << 20, buf=0)),
                         ("read", dict(offset=0, length=-1, buf=0)),
                         ("read", dict(offset=0, length=10, buf=len(c.shm))),
                         ("read", dict(offset=0, length=4096, buf=len(c.shm) - 10)),
                         ("layout_get", dict(offset=-1, length=10)),
                         ("truncate", dict(size=-1)),
                         ("commit", dict(offset=0, length=-5))):
            with pytest.raises(ProtocolError):
                c.call(op, slot=f.slot, **args)
        # Ranges the protocol admits but the file system does not.
        for op, args in (("layout_get", dict(offset=1 << 55, length=4096)),
                         ("commit", dict(offset=1 << 61, length=1)),
                         ("truncate", dict(size=1 << 55))):
            with pytest.raises(OSError) as ei:
                c.call(op, slot=f.slot, **args)
            assert ei.value.errno in (errno.EINVAL, errno.EFBIG), op
        assert f.stat()["size"] == 5000
        # Nothing was damaged; the grant still works.
        assert f.pread(5000, 0) == b"z" * 5000
        f.pwrite(b"ok", 1 << 20)
        f.commit()
        assert f.size() == (1 << 20) + 2
    data = (mnt / "f").read_bytes()
    assert data[:5000] == b"z" * 5000 and data[5000:1 << 20] == bytes((1 << 20) - 5000)
    assert data[1 << 20:] == b"ok"


def test_mint_and_revoke(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"0123456789" * 1000)
    with Client.connect(mnt) as c:
        base = live_grants(c)
        rw = c.open("f", "r+")
        ro = rw.mint(Rights.READ)
        assert ro.rights == Rights.READ
        none = ro.mint(Rights.NONE)
        assert none.rights == Rights.NONE
        assert ro.pread(10, 5) == b"5678901234"
        with pytest.raises(RightsError):
            ro.pwrite(b"x", 0)
        with pytest.raises(RightsError):
            ro.mint(Rights.RW)
        with pytest.raises(RightsError):
            ro.mint(Rights.WRITE)
        with pytest.raises(RightsError):
            none.mint(Rights.READ)
        with pytest.raises(RightsError):
            none.pread(1, 0)
        assert none.stat()["size"] == 10000  # no rights still names the file
        # An independent grant on the same file (another open).
        other = c.open("f", "r")
        grand = ro.mint(Rights.READ)
        assert live_grants(c) == base + 5
        ro.revoke()
        for h in (ro, none, grand):  # the revoked grant and all minted from it
            with pytest.raises(GrantRevoked):
                h.pread(1, 0)
            with pytest.raises(GrantRevoked):
                h.stat()
            with pytest.raises(GrantRevoked):
                h.mint(Rights.NONE)
        assert live_grants(c) == base + 2
        # Its parent and the other open are untouched.
        assert rw.pread(3, 0) == b"012" and other.pread(3, 1) == b"123"
        rw.pwrite(b"AB", 0)
        rw.commit()
        assert other.pread(4, 0) == b"AB23"
        # Revoking the root grant of an open takes the rest of its family.
        kid = rw.mint(Rights.READ)
        rw.revoke()
        for h in (rw, kid):
            with pytest.raises(GrantRevoked):
                h.pread(1, 0)
        rw.pwrite(b"x", 0)  # a small write is pipelined: its error comes with the next call
        with pytest.raises(GrantRevoked):
            rw.pread(1, 0)
        with pytest.raises(GrantRevoked):  # a larger one waits for its reply
            rw.pwrite(b"x" * (1 << 20), 0)
        assert other.pread(2, 0) == b"AB"
        with pytest.raises(GrantRevoked):  # the pipelined write's error stays for close
            rw.close()
        for h in (ro, none, grand, kid, other):
            h.close()
        assert live_grants(c) == base
    assert (mnt / "f").read_bytes()[:4] == b"AB23"


# -- 5. fencing -------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path: Path, mount_factory):
    """A 2 MiB volume (512 blocks), so a new file has to reuse freed blocks."""
    vol = make_volume(tmp_path / "smallvol", "2M")
    m = mount_factory(vol, name="small")
    yield m
    assert m.daemon_alive


A_DATA = b"A" * (64 * BS)
B_DATA = bytes(range(256)) * (64 * BS // 256)


def _fill(mnt: Path) -> None:
    """F: 64 blocks of A_DATA; then a filler takes every other block of the volume."""
    with open(mnt / "F", "wb") as f:
        f.write(A_DATA)
        os.fsync(f.fileno())
    free = os.statvfs(mnt).f_bavail
    with open(mnt / "filler", "wb") as f:
        f.write(b"\xee" * (free * BS))
        os.fsync(f.fileno())
    assert os.statvfs(mnt).f_bavail == 0


class Hammer(threading.Thread):
    """Reads F through its own client as fast as it can until its grant is revoked."""

    def __init__(self, mnt: Path) -> None:
        super().__init__(daemon=True)
        self.c = Client.connect(mnt)
        self.f = self.c.open("F", "r")
        self.results: list[bytes] = []
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.results.append(self.f.pread(64 * BS, 0))
                self.first.set()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            self.first.set()

    def finish(self) -> None:
        self.join(10)  # its grant was revoked: it stops on its own
        self.stop.set()
        self.join(30)
        self.c.close()


def assert_reused(b_blocks: list[int], f_blocks: list[int]) -> None:
    """B's blocks are F's freed ones, but for the few the volume's copy-on-write reserve
    (free blocks that new data leaves alone) may have given it."""
    reused = set(b_blocks) & set(f_blocks)
    assert len(reused) >= len(b_blocks) - 16, "B did not reuse F's freed blocks"


def _check_fenced(a: Client, fa, hammer: Hammer) -> None:
    # Every read that succeeded saw F's old data, never a byte of B's.
    assert hammer.results, "the hammer never read"
    assert all(r == A_DATA for r in hammer.results)
    assert isinstance(hammer.error, GrantRevoked), hammer.error
    with pytest.raises(GrantRevoked):
        fa.pread(64 * BS, 0)
    with pytest.raises(GrantRevoked):
        fa.pread(10, 0)
    # A fresh open sees the truth: F is empty, B holds B's data.
    with a.open("F") as again:
        assert again.read() == b""
    with a.open("B") as b:
        assert b.read() == B_DATA


def test_fencing_truncate_through_fuse(small) -> None:
    mnt = small.path
    _fill(mnt)
    ino = os.stat(mnt / "F").st_ino
    f_blocks = dev_blocks(extents(small.volume, ino))
    assert len(f_blocks) == 64
    with Client.connect(mnt) as a:
        fa = a.open("F", "r")
        assert fa.pread(64 * BS, 0) == A_DATA
        minted = fa.mint(Rights.READ)
        hammer = Hammer(mnt)
        hammer.start()
        assert hammer.first.wait(10)
        try:
            os.truncate(mnt / "F", 0)
            wait_free(mnt, 64)  # freed, committed, reusable
            with open(mnt / "B", "wb") as f:
                f.write(B_DATA)
                os.fsync(f.fileno())
        finally:
            hammer.finish()
        b_blocks = dev_blocks(extents(small.volume, os.stat(mnt / "B").st_ino))
        assert_reused(b_blocks, f_blocks)
        _check_fenced(a, fa, hammer)
        with pytest.raises(GrantRevoked):
            minted.pread(10, 0)
    assert (mnt / "B").read_bytes() == B_DATA
    assert (mnt / "F").read_bytes() == b""


def test_fencing_truncate_by_another_client(small) -> None:
    mnt = small.path
    _fill(mnt)
    f_blocks = dev_blocks(extents(small.volume, os.stat(mnt / "F").st_ino))
    with Client.connect(mnt) as a, Client.connect(mnt) as b:
        fa = a.open("F", "r")
        assert fa.pread(100, 0) == A_DATA[:100]
        hammer = Hammer(mnt)
        hammer.start()
        assert hammer.first.wait(10)
        try:
            with b.open("F", "r+") as fb:
                assert fb.truncate(0) == 0
            wait_free(mnt, 64)
            # B writes a new file through the protocol, with a layout of exactly its size
            # (the volume has no room for File's usual 4 MiB preallocation).
            n = len(B_DATA)
            res = b.call("open", path="B", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL,
                         mode=0o644)
            slot = res["slot"]
            assert b.call("layout_get", slot=slot, offset=0, length=n)["allocated"] == 64
            b.shmview[:n] = B_DATA
            assert b.call("write", slot=slot, offset=0, length=n, buf=0)["n"] == n
            assert b.call("commit", slot=slot, offset=0, length=n)["size"] == n
            b.call("fsync", slot=slot)
            b.call("close", slot=slot)
        finally:
            hammer.finish()
        b_blocks = dev_blocks(extents(small.volume, os.stat(mnt / "B").st_ino))
        assert_reused(b_blocks, f_blocks)
        _check_fenced(a, fa, hammer)
    assert (mnt / "B").read_bytes() == B_DATA


def test_unlink_last_link_revokes(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"keep me")
    os.link(mnt / "f", mnt / "g")
    with Client.connect(mnt) as c:
        h = c.open("f", "r")
        w = c.open("g", "r+")
        kid = h.mint(Rights.READ)
        os.unlink(mnt / "f")  # one name left: nothing is revoked
        assert h.pread(7, 0) == b"keep me" and kid.pread(4, 0) == b"keep"
        with open(mnt / "g", "rb") as local:  # a FUSE open keeps the inode, not grants
            os.unlink(mnt / "g")
            for x in (h, w, kid):
                with pytest.raises(GrantRevoked):
                    x.pread(1, 0)
            w.pwrite(b"x", 0)  # pipelined: the error comes with the next call on w
            with pytest.raises(GrantRevoked):
                w.commit()
            assert local.read() == b"keep me"
        with pytest.raises(FileNotFoundError):
            c.open("g", "r")


def test_writer_close_keeps_readers(mnt: Path) -> None:
    """A writer's close drops its unused preallocation past EOF: that must not revoke
    other clients' read grants (they never touch blocks past EOF)."""
    (mnt / "shared").write_bytes(b"hello")
    with Client.connect(mnt) as a, Client.connect(mnt) as b:
        reader = b.open("shared", "r")
        assert reader.pread(5, 0) == b"hello"
        with a.open("shared", "r+") as w:
            w.pwrite(b"J", 0)  # a 4 MiB layout: preallocation past EOF
        assert reader.pread(5, 0) == b"Jello"
        assert os.stat(mnt / "shared").st_blocks == 8  # the preallocation is gone
        # The truncating client keeps its own grant; the others' are revoked.
        with a.open("shared", "r+") as w:
            assert w.truncate(2) == 2
            assert w.pread(10, 0) == b"Je"
            w.pwrite(b"!", 2)
        with pytest.raises(GrantRevoked):
            reader.pread(5, 0)
    assert (mnt / "shared").read_bytes() == b"Je!"


def test_chmod_revokes_nonroot_holder_only(pubmnt: Path) -> None:
    mnt = pubmnt
    f = mnt / "secret"
    f.write_bytes(b"top secret data")
    os.chmod(f, 0o644)
    p = user_popen(f"""
        import sys
        from kernelshim.client import Client
        from kernelshim.errors import GrantRevoked
        c = Client.connect({str(mnt)!r})
        f = c.open("secret", "r")
        print("ready", f.pread(3, 0).decode(), c.whoami()["uid"], flush=True)
        sys.stdin.readline()
        try:
            print("read", f.pread(3, 0).decode(), flush=True)
        except GrantRevoked:
            print("revoked", flush=True)
    """)
    with p:
        try:
            assert p.stdout.readline().split() == ["ready", "top", str(UID)], p.stderr.read()
            with Client.connect(mnt) as root:
                rf = root.open("secret", "r")
                os.chmod(f, 0)
                out, err = p.communicate("go\n", timeout=60)
                assert out.strip() == "revoked", err
                assert p.returncode == 0, err
                # Root may still read a 000 file: its grant survives the chmod.
                assert rf.pread(15, 0) == b"top secret data"
        finally:
            if p.poll() is None:
                p.kill()


def test_chmod_keeps_grants_still_allowed(pubmnt: Path) -> None:
    mnt = pubmnt
    """A chmod that leaves the holder its access (here: other r stays) revokes nothing."""
    f = mnt / "pub"
    f.write_bytes(b"public")
    os.chmod(f, 0o644)
    p = user_popen(f"""
        import sys
        from kernelshim.client import Client
        from kernelshim.errors import GrantRevoked
        c = Client.connect({str(mnt)!r})
        f = c.open("pub", "r")
        print("ready", flush=True)
        for line in sys.stdin:
            try:
                print("read", f.pread(6, 0).decode(), flush=True)
            except GrantRevoked:
                print("revoked", flush=True)
    """)
    with p:
        try:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
            os.chmod(f, 0o604)
            p.stdin.write("1\n")
            assert p.stdout.readline().strip() == "read public"
            os.chmod(f, 0o640)  # other loses r: revoked
            p.stdin.write("2\n")
            assert p.stdout.readline().strip() == "revoked"
            os.chmod(f, 0o644)  # a revoke is for good
            p.stdin.write("3\n")
            assert p.stdout.readline().strip() == "revoked"
            p.stdin.close()
            assert p.wait(30) == 0, p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()


# -- 6. permissions on the direct path --------------------------------------------------------

def test_nonroot_permissions_direct(pubmnt: Path) -> None:
    mnt = pubmnt
    (mnt / "private").write_bytes(b"root only")
    os.chmod(mnt / "private", 0o600)
    (mnt / "readable").write_bytes(b"anyone may read")
    os.chmod(mnt / "readable", 0o644)
    (mnt / "rootdir").mkdir()
    os.chmod(mnt / "rootdir", 0o755)
    (mnt / "closed").mkdir()
    os.chmod(mnt / "closed", 0o700)
    (mnt / "closed" / "inner").write_bytes(b"x")
    os.chmod(mnt / "closed" / "inner", 0o666)
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o777)
    out = user_python(f"""
        import errno, os
        from kernelshim.client import Client
        c = Client.connect({str(mnt)!r})
        def code(fn):
            try:
                fn()
            except PermissionError as e:
                return "EACCES" if e.errno == errno.EACCES else f"PermissionError {{e.errno}}"
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
            return "ok"
        print("private_r", code(lambda: c.open("private", "r")))
        print("private_w", code(lambda: c.open("private", "r+")))
        print("readable_w", code(lambda: c.open("readable", "r+")))
        print("readable_trunc", code(lambda: c.open("readable", "w")))
        print("create_rootdir", code(lambda: c.open("rootdir/mine", "w")))
        print("search_closed", code(lambda: c.open("closed/inner", "r")))
        with c.open("readable", "r") as f:
            print("readable_r", f.read().decode().replace(" ", "_"))
        with c.open("pub/mine", "w", perms=0o600) as f:
            f.write(b"my own data")
        with c.open("pub/mine", "r+") as f:
            f.pwrite(b"MY", 0)
        with c.open("pub/mine", "a") as f:
            f.write(b"!")
        with c.open("pub/mine") as f:
            print("own", f.read().decode().replace(" ", "_"))
    """)
    got = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert got == {"private_r": "EACCES", "private_w": "EACCES", "readable_w": "EACCES",
                   "readable_trunc": "EACCES", "create_rootdir": "EACCES",
                   "search_closed": "EACCES", "readable_r": "anyone_may_read",
                   "own": "MY_own_data!"}
    st = os.stat(mnt / "pub" / "mine")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, 0o600)
    assert (mnt / "pub" / "mine").read_bytes() == b"MY own data!"
    assert not (mnt / "rootdir" / "mine").exists()
    assert (mnt / "readable").read_bytes() == b"anyone may read"


# -- 7. data path correctness ------------------------------------------------------------------

def _size_choice(rng: random.Random) -> int:
    return rng.choice([1, 7, BS - 1, BS, BS + 1, 2 * BS - 3, 3 * BS, rng.randint(1, 5 * BS),
                       rng.randint(1, 300_000)])


def _offset_choice(rng: random.Random, size: int) -> int:
    k = rng.randint(0, max(1, size // BS + 1))
    return rng.choice([0, size, max(0, size - 1), k * BS, k * BS - 1 if k else 0, k * BS + 1,
                       rng.randint(0, size + 1),
                       size + rng.randint(1, 3 * BS),           # a gap past EOF
                       size + rng.randint(1 << 20, 12 << 20)])  # sparse, far past EOF


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_io_matches_model(mnt: Path, seed: int) -> None:
    rng = random.Random(seed)
    name = f"model-{seed}.bin"
    model = bytearray()
    # A small shared buffer: large writes and reads go in several requests.
    with Client.connect(mnt, shm_size=rng.choice([4096, 64 << 10, 8 << 20])) as c:
        f = c.open(name, "w+")
        for step in range(80):
            op = rng.choices(["write", "read", "truncate", "fuse"], [6, 4, 1, 1])[0]
            if op == "write":
                n = _size_choice(rng)
                off = _offset_choice(rng, len(model))
                if off > 24 << 20:
                    off = rng.randint(0, len(model))
                data = rng.randbytes(n)
                assert f.pwrite(data, off) == n
                if off > len(model):
                    model += bytes(off - len(model))
                model[off:off + n] = data
                if rng.random() < 0.3:
                    f.commit()
            elif op == "read":
                f.commit()
                off = _offset_choice(rng, len(model))
                n = _size_choice(rng)
                assert f.pread(n, off) == bytes(model[off:off + n]), (step, off, n)
            elif op == "truncate":
                new = rng.choice([0, len(model) // 2, len(model) + rng.randint(1, 3 * BS),
                                  max(0, len(model) - rng.randint(1, BS)),
                                  rng.randint(0, len(model) + 1)])
                assert f.truncate(new) == new
                if new < len(model):
                    del model[new:]
                else:
                    model += bytes(new - len(model))
            else:
                f.commit()
                assert (mnt / name).read_bytes() == model, step
            if rng.random() < 0.2:
                assert f.size() == len(model)  # (commits)
        f.close()
        with c.open(name) as g:
            assert g.read() == model
    assert os.path.getsize(mnt / name) == len(model)
    assert (mnt / name).read_bytes() == model


def test_holes_append_truncate(mnt: Path) -> None:
    with Client.connect(mnt) as c:
        with c.open("sparse", "w") as f:
            f.pwrite(b"tail", (100 << 20) + 3)
        st = os.stat(mnt / "sparse")
        assert st.st_size == (100 << 20) + 7
        assert st.st_blocks * 512 < 8 << 20  # a hole, not 100 MiB of zeros
        with open(mnt / "sparse", "rb") as local:
            local.seek(50 << 20)
            assert local.read(1 << 20) == bytes(1 << 20)
            local.seek(100 << 20)
            assert local.read() == bytes(3) + b"tail"
        with c.open("sparse") as f:
            assert f.pread(8, (100 << 20) - 1) == bytes(4) + b"tail"
            assert f.pread(10, 0) == bytes(10)
        # Append: every write lands at the current end, also after another writer grew it.
        with c.open("log", "a") as f:
            f.write(b"one\n")
            f.write(b"two\n")
            f.commit()  # writes are visible to others once committed
            with open(mnt / "log", "ab") as local:
                local.write(b"fuse\n")
            f.write(b"three\n")
        assert (mnt / "log").read_bytes() == b"one\ntwo\nfuse\nthree\n"
        # Truncate down into a block, then up again: the cut-off bytes read as zeros.
        data = bytes(range(256)) * 64  # 16 KiB
        with c.open("t", "w+") as f:
            f.write(data)
            assert f.truncate(5000) == 5000
            assert f.pread(10000, 0) == data[:5000]
            assert (mnt / "t").read_bytes() == data[:5000]
            assert f.truncate(3 * BS + 5) == 3 * BS + 5
            assert f.pread(20000, 0) == data[:5000] + bytes(3 * BS + 5 - 5000)
            f.pwrite(b"Z", 20000)
        assert (mnt / "t").read_bytes() == data[:5000] + bytes(20000 - 5000) + b"Z"
        # Truncate through FUSE; the client's next open sees it.
        os.truncate(mnt / "t", 10)
        with c.open("t") as f:
            assert f.read() == data[:10]


def test_uncommitted_partial_blocks_merge(mnt: Path) -> None:
    """Small writes into the same block before any commit keep each other's bytes (the
    kernel merges partial blocks of unwritten extents with zeros: the client commits)."""
    with Client.connect(mnt) as c:
        with c.open("pieces", "w") as f:
            for piece in (b"abc", b"def", b"g" * 5000, b"h"):
                f.write(piece)
            f.pwrite(b"XY", 1)
            f.pwrite(b"tail", 3 * BS - 2)
        with c.open("pieces") as f:
            want = bytearray(b"abcdef" + b"g" * 5000 + b"h")
            want[1:3] = b"XY"
            want += bytes(3 * BS - 2 - len(want)) + b"tail"
            assert f.read() == want
    assert (mnt / "pieces").read_bytes() == want


def test_grant_survives_inode_eviction(mnt: Path) -> None:
    """The kernel forgetting the inode (dentry/inode cache dropped) must not leave a direct
    client's grant with an extent map the file system no longer uses."""
    with Client.connect(mnt) as c:
        f = c.open("evict", "w+")
        f.write(b"a" * 5000)
        f.commit()
        os.stat(mnt / "evict")  # a kernel lookup; its forget may come any time
        try:
            with open("/proc/sys/vm/drop_caches", "w") as dc:
                dc.write("2\n")
        except OSError as exc:
            pytest.skip(f"cannot drop the kernel's inode cache: {exc}")
        f.pwrite(b"b" * 10, 10 << 20)  # a new layout, then a write through the old grant
        f.commit()
        with open(mnt / "evict", "ab") as local:
            local.write(b"fuse")
        assert f.pread(4, (10 << 20) + 10) == b"fuse"  # sees extents FUSE added
        f.close()
    data = (mnt / "evict").read_bytes()
    assert len(data) == (10 << 20) + 14
    assert data[:5000] == b"a" * 5000 and data[10 << 20:] == b"b" * 10 + b"fuse"


def test_large_transfer_straddling_shm(mnt: Path) -> None:
    """Bigger than the shared buffer and unaligned: chunked both ways."""
    rng = random.Random(7)
    data = rng.randbytes((20 << 20) + 12345)
    with Client.connect(mnt, shm_size=1 << 20) as c:
        with c.open("big", "w") as f:
            f.pwrite(data, 777)
        with c.open("big") as f:
            assert f.size() == len(data) + 777
            assert f.pread(len(data), 777) == data
            assert f.pread(1000, 0) == bytes(777) + data[:223]
    with open(mnt / "big", "rb") as local:
        assert local.read() == bytes(777) + data


async def test_async_client_basics(mnt: Path) -> None:
    rng = random.Random(11)
    data = rng.randbytes(3 * BS + 123)
    c = await AsyncClient.connect(mnt)
    async with c:
        assert c.info["principal"] == "root"
        f = await c.open("async.bin", "w+")
        assert await f.pwrite(data, 0) == len(data)
        await f.pwrite(b"far", 5 << 20)
        assert await f.size() == (5 << 20) + 3
        assert await f.pread(len(data), 0) == data
        assert await f.pread(10, (5 << 20) - 7) == bytes(7) + b"far"
        assert await f.truncate(BS + 1) == BS + 1
        assert await f.read() == data[:BS + 1]
        await f.fsync()
        await f.close()
        async with await c.open("async.log", "a") as g:
            await g.write(b"x")
            await g.write(b"yz")
        async with await c.open("async.log") as g:
            assert await g.read() == b"xyz"
        async with await c.open("async.pieces", "w") as g:  # same block, no commit between
            await g.pwrite(b"ab", 0)
            await g.pwrite(b"cd", 2)
            await g.pwrite(b"e" * BS, 4)
        assert (mnt / "async.pieces").read_bytes() == b"abcd" + b"e" * BS
        async with await c.open("async.bin", "r") as g:
            with pytest.raises(RightsError):
                await g.pwrite(b"nope", 0)
            with pytest.raises(GrantRevoked):
                await c.call("revoke", slot=g.slot)
                await g.pread(1, 0)
        # Several tasks share the one connection.
        results: dict[int, bytes] = {}

        async def reader(i: int) -> None:
            async with await c.open("async.bin") as h:
                results[i] = await h.pread(BS, i)

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(reader, i)
        assert results == {i: data[:BS + 1][i:i + BS] for i in range(8)}
    assert (mnt / "async.bin").read_bytes() == data[:BS + 1]
    assert (mnt / "async.log").read_bytes() == b"xyz"


def test_commit_takes_only_what_was_written(mnt: Path) -> None:
    """A commit over a laid-out span makes exactly the bytes written through the grant
    part of the file: laid-out blocks never written stay unwritten, past-EOF layouts do
    not grow the file, and close gives back the unused preallocation."""
    with Client.connect(mnt) as c:
        f = c.open("span.bin", "w")
        c.call("layout_get", slot=f.slot, offset=0, length=1 << 20)
        c.shmview[:100] = b"w" * 100
        c.call("write", slot=f.slot, offset=8192, length=100, buf=0)
        # Commit the whole laid-out span: only bytes 8192..8292 were written.
        size = c.call("commit", slot=f.slot, offset=0, length=1 << 20)["size"]
        assert size == 8292
        assert os.stat(mnt / "span.bin").st_size == 8292
        data = (mnt / "span.bin").read_bytes()
        assert data == bytes(8192) + b"w" * 100
        # A second commit with nothing new written changes nothing.
        assert c.call("commit", slot=f.slot, offset=0, length=1 << 30)["size"] == 8292
        f.close()
        with c.open("span.bin", "r") as g:
            g.fsync()  # commits the metadata transaction, so meta.db shows the extents
    st = os.stat(mnt / "span.bin")
    # Three blocks cover 8292 bytes; the rest of the 1 MiB layout was given back.
    assert st.st_blocks * 512 <= 3 * 4096
    with sqlite3.connect(mnt.parent / "vol" / "meta.db") as db:
        rows = db.execute("SELECT file_block, count, state FROM extents WHERE inode=?"
                          " ORDER BY file_block", (st.st_ino,)).fetchall()
    written = [(fb, n) for fb, n, state in rows if state == 1]
    assert written == [(2, 1)], rows  # only the block that holds the written bytes


def test_direct_open_follows_relative_symlinks_and_stops_loops(mnt: Path) -> None:
    (mnt / "real").write_bytes(b"target data")
    os.symlink("real", mnt / "alias")
    os.symlink("loop2", mnt / "loop1")
    os.symlink("loop1", mnt / "loop2")
    with Client.connect(mnt) as c:
        with c.open("alias") as f:
            assert f.read() == b"target data"
        with pytest.raises(OSError) as ei:
            c.open("loop1")
        assert ei.value.errno == errno.ELOOP
        with pytest.raises(FileNotFoundError):
            c.open("missing")


# -- pipelined writes ----------------------------------------------------------------------

def test_pipelined_writes_keep_order_and_fill_holes(mnt: Path) -> None:
    """Small writes return before their reply (several in the ring at once, wrapping it);
    the daemon serves them in order, so the same client reads them back before any
    commit, overlapping writes end as the last one says, writes into holes inside the
    file are laid out by the daemon (WRITE_ALLOC), and after the commit the mount shows
    exactly the model."""
    size = 2 << 20
    (mnt / "p").write_bytes(b"")
    os.truncate(mnt / "p", size)  # all holes
    rng = random.Random(7)
    model = bytearray(size)
    with Client.connect(mnt) as c:
        assert c.buffer.ring > 0
        f = c.open("p", "r+")
        for i in range(600):  # many more than WRITE_WINDOW, over the ring's size
            n = rng.choice([BS, BS, 2 * BS, 100, 4 * BS + 17, 64 << 10])
            off = rng.choice([rng.randrange(0, size // BS) * BS,
                              rng.randrange(0, 64) * BS])  # often the same blocks again
            off = min(off, size - n)
            data = rng.randbytes(n)
            assert f.pwrite(data, off) == n
            model[off:off + n] = data
            if i % 97 == 0:
                assert len(c.buffer.pending) > 0
                # a read through the same client comes after the writes sent before it
                k = rng.randrange(0, size - BS)
                assert f.pread(BS, k) == bytes(model[k:k + BS]), i
        f.commit()
        assert not c.buffer.pending
        assert (mnt / "p").read_bytes() == model
        f.close()


def test_pipelined_write_errors_come_with_the_next_call(mnt: Path) -> None:
    """A pipelined write that fails (here: through a grant revoked behind the client's
    back) is reported by the file's next call, once; fsync and close report it too,
    after doing their own work. A read-only file's writes are never pipelined."""
    (mnt / "e").write_bytes(b"e" * 10000)
    with Client.connect(mnt) as c:
        ro = c.open("e", "r")
        with pytest.raises(RightsError):  # at once: the client knows its rights
            ro.pwrite(b"x", 0)
        w = c.open("e", "r+")
        w.pwrite(b"1", 0)
        w.fsync()
        with Client.connect(mnt) as other:  # a truncate elsewhere revokes w's grant
            with other.open("e", "r+") as t:
                t.truncate(5)
        assert w.pwrite(b"2", 1) == 1  # returns: the error is in flight
        with pytest.raises(GrantRevoked):  # a later write raises it and keeps it ...
            w.pwrite(b"3", 2)
        with pytest.raises(GrantRevoked):  # ... for fsync, which clears it
            w.fsync()
        w.close()  # reported once: nothing left to say
        assert (mnt / "e").read_bytes() == b"1eeee"
        ro.close()
    for call in ("close", "commit"):
        (mnt / "e").write_bytes(b"e" * 10000)
        with Client.connect(mnt) as c:
            w = c.open("e", "r+")
            w2 = w.mint(Rights.RW)
            w2.revoke()  # (w, its parent, stays live)
            w2.pwrite(b"z", 0)
            with pytest.raises(GrantRevoked):
                getattr(w2, call)()
            w.close()


def test_fsynced_pipelined_writes_survive_a_killed_daemon(volume: Path, mount_factory) -> None:
    """"Acknowledged" keeps its meaning: when fsync returns, every pipelined write before
    it is durable, even if the daemon is killed right after."""
    m = mount_factory(volume)
    (m.path / "d").write_bytes(bytes(1 << 20))
    rng = random.Random(3)
    model = bytearray(1 << 20)
    with Client.connect(m.path) as c:
        f = c.open("d", "r+")
        for _ in range(300):
            off = rng.randrange(0, (1 << 20) // BS) * BS
            data = rng.randbytes(BS)
            f.pwrite(data, off)
            model[off:off + BS] = data
        f.fsync()
        m.kill()
    m.start()  # over the dead mount: wait for the new daemon to take it
    deadline = time.monotonic() + 30
    while True:
        try:
            if int(json.loads((volume / "mount.json").read_text())["pid"]) == m.proc.pid:
                break
        except (OSError, ValueError):
            pass
        assert m.daemon_alive and time.monotonic() < deadline
        time.sleep(0.02)
    assert (m.path / "d").read_bytes() == model


def test_two_partial_writes_into_one_fresh_block_both_stay(mnt: Path, monkeypatch) -> None:
    """Hostile-probe round 2, F6: a client that does not commit between two partial
    writes into the same fresh (unwritten, uncommitted) block kept only the second —
    the kernel merged the block with zeros again, as if the first had never been
    written. The client library commits in between (`_needs_commit`); switched off
    here, it is the raw protocol's case: both writes must survive the commit."""
    from kernelshim import clientcore
    monkeypatch.setattr(clientcore, "_needs_commit", lambda *a, **k: False)
    (mnt / "f6").write_bytes(b"")
    with Client.connect(mnt) as c:
        f = c.open("f6", "r+")
        assert f.pwrite(b"AAA", 0) == 3
        assert f.pwrite(b"BBB", 10) == 3
        assert f.pwrite(b"CCC", BS - 3) == 3  # the same block's end
        f.commit()
    got = (mnt / "f6").read_bytes()
    assert got == b"AAA" + bytes(7) + b"BBB" + bytes(BS - 16) + b"CCC"
