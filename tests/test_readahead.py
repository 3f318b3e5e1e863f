"""The direct client's pipelined and read-ahead reads return what the file holds: after
writes, truncates and appends through the same client, with two files read in turns
through one shared buffer, across the end of a file that then grows, and with reads
of every size against a small buffer. (Speed is for scripts/bench_direct.py.)"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from kernelshim.client import Client

pytestmark = pytest.mark.mounted

MiB = 1 << 20


def _read_all(f, req: int, size: int) -> bytes:
    out = bytearray()
    buf = bytearray(req)
    while True:
        n = f.readinto(buf, len(out))
        if not n:
            return bytes(out)
        out += buf[:n]
        assert len(out) <= size


def test_sequential_reads_of_every_size(mnt: Path) -> None:
    data = os.urandom(5 * MiB + 12345)
    (mnt / "f").write_bytes(data)
    for shm in (1 << 16, 1 * MiB, 8 * MiB):
        with Client.connect(mnt, shm_size=shm) as c:
            with c.open("f") as f:
                for req in (4096, 100_000, 1 * MiB, 4 * MiB + 1, 7 * MiB):
                    assert _read_all(f, req, len(data)) == data, (shm, req)
                # sequential through the position too
                f.seek(0)
                parts = [f.read(777_777) for _ in range(8)]
                assert b"".join(parts) == data
                assert f.read(10) == b""


def test_read_ahead_sees_the_clients_own_writes(mnt: Path) -> None:
    size = 6 * MiB
    model = bytearray(os.urandom(size))
    (mnt / "f").write_bytes(model)
    rng = random.Random(7)
    with Client.connect(mnt) as c:
        f = c.open("f", "r+")
        g = c.open("f", "r+")  # a second handle of the same client: writes drop it too
        pos = 0
        for step in range(60):
            if step % 5 == 4:
                off = rng.randrange(size - 5000)
                patch = os.urandom(rng.choice([1, 4096, 5000]))
                (g if step % 10 == 4 else f).pwrite(patch, off)
                (g if step % 10 == 4 else f).commit()
                model[off:off + len(patch)] = patch
                continue
            n = rng.choice([4096, 65536, MiB])
            if pos >= size:
                pos = 0
            got = f.pread(n, pos)
            assert got == model[pos:pos + n], (step, pos, n)
            pos += len(got)
        f.truncate(3 * MiB)
        del model[3 * MiB:]
        assert f.pread(MiB, 2 * MiB) == model[2 * MiB:]  # runs into the new end
        g.close()
        f.close()


def test_two_files_read_in_turns_share_one_buffer(mnt: Path) -> None:
    a, b = os.urandom(3 * MiB), os.urandom(3 * MiB + 1)
    (mnt / "a").write_bytes(a)
    (mnt / "b").write_bytes(b)
    with Client.connect(mnt, shm_size=2 * MiB) as c:
        fa, fb = c.open("a"), c.open("b")
        got_a, got_b = bytearray(), bytearray()
        while len(got_a) < len(a) or len(got_b) < len(b):
            got_a += fa.pread(300_000, len(got_a))
            got_b += fb.pread(500_000, len(got_b))
        assert got_a == a and got_b == b
        fa.close()
        fb.close()


def test_a_file_that_grows_after_its_end_was_read(mnt: Path) -> None:
    (mnt / "log").write_bytes(b"a" * 100_000)
    with Client.connect(mnt) as c:
        f = c.open("log")
        assert f.read() == b"a" * 100_000
        assert f.read(MiB) == b""
        with open(mnt / "log", "ab") as w:  # grows through the mount
            w.write(b"b" * 3000)
        assert f.read(MiB) == b"b" * 3000
        f.close()


def test_read_ahead_off(mnt: Path) -> None:
    """With read_ahead=False a sequential reader sees a write through the mount that
    landed between two of its reads (the coherence read-ahead gives up)."""
    (mnt / "f").write_bytes(b"x" * (4 * MiB))
    with Client.connect(mnt) as c:
        f = c.open("f", read_ahead=False)
        assert f.read(MiB) == b"x" * MiB
        assert f.read(MiB) == b"x" * MiB
        with open(mnt / "f", "r+b") as w:
            w.seek(2 * MiB)
            w.write(b"y" * MiB)
        assert f.read(MiB) == b"y" * MiB
        f.close()


async def test_cancelled_trio_reads_leave_the_client_consistent(mnt: Path) -> None:
    """A trio read cancelled while it waits for the daemon (with read-ahead pieces in
    flight) waits for its requests before giving the shared buffer back: the reads
    after it return the file's bytes."""
    from kernelshim.client import AsyncClient
    data = os.urandom(8 * MiB)
    (mnt / "f").write_bytes(data)
    c = await AsyncClient.connect(mnt, shm_size=4 * MiB)
    try:
        await _cancel_reads(c, data)
    finally:
        await c.aclose()


async def _cancel_reads(c, data: bytes) -> None:
    import trio
    import trio.testing
    f = await c.open("f")
    pos = 0
    for i in range(12):
        assert await f.pread(MiB, pos) == data[pos:pos + MiB]  # sequential: reads ahead
        pos += MiB

        async def doomed(at: int = pos + (i % 3) * 4096) -> None:
            await f.readinto(bytearray(MiB + i), at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert await f.pread(MiB, pos) == data[pos:pos + MiB], i
        pos = (pos + MiB) % (6 * MiB)
    assert await f.read(100) == data[:100]
    await f.close()


# -- the read-ahead window against other writers ----------------------------------------
#
# docs/dev/protocol.md: a read served from read-ahead may miss a write by another process
# that completed after an earlier read of the same stream, but only inside READ_AHEAD
# bytes past the end of the last read that returned before the write completed. Past
# that, and after a truncate, nothing stale may come back; and whatever comes back is
# bytes the file held (never another file's, never freed blocks).

BS = 4096


def _check_window(got: bytes, old: bytes, new: bytes, stale_below: int, what: str) -> None:
    """Every block of `got` is the old or the new version of that block; at and past
    `stale_below`, the new one."""
    assert len(got) == len(new), what
    for o in range(0, len(got), BS):
        g = got[o:o + BS]
        if o + BS > stale_below:
            assert g == new[o:o + BS], f"{what}: stale block at {o} (window ends at {stale_below})"
        elif g not in (old[o:o + BS], new[o:o + BS]):
            # A block may straddle two read requests (of an unaligned stream), one
            # served before the write and one after: each byte must be one of the two.
            a, b = old[o:o + BS], new[o:o + BS]
            assert all(x in (y, z) for x, y, z in zip(g, a, b)), f"{what}: foreign bytes at {o}"


@pytest.mark.parametrize("req", [100_000, MiB, 4 * MiB])
def test_read_ahead_misses_a_mount_write_only_inside_its_window(mnt: Path, req: int) -> None:
    from kernelshim.clientcore import READ_AHEAD
    size = 24 * MiB
    old, new = os.urandom(size), os.urandom(size)
    (mnt / "f").write_bytes(old)
    with Client.connect(mnt) as c, c.open("f") as f:
        got = bytearray()
        buf = bytearray(req)
        for _ in range(3):  # the second read on is sequential: read-ahead runs
            got += buf[:f.readinto(buf, len(got))]
        last_end = len(got)
        with open(mnt / "f", "r+b") as w:  # another process's write, completed
            w.write(new)
        while True:
            n = f.readinto(buf, len(got))
            if not n:
                break
            got += buf[:n]
    assert got[:last_end] == old[:last_end]
    _check_window(bytes(got), old, new, last_end + READ_AHEAD, f"req {req}")


def test_read_ahead_during_concurrent_mount_writes(mnt: Path) -> None:
    """A writer overwrites the file through the mount while a direct client streams it:
    every block read is the old or the new one, and once the writer is done, reads
    return the new data from READ_AHEAD past the read that saw it finish."""
    import threading
    from kernelshim.clientcore import READ_AHEAD
    size = 32 * MiB
    old, new = os.urandom(size), os.urandom(size)
    (mnt / "f").write_bytes(old)
    done = threading.Event()

    def writer() -> None:
        with open(mnt / "f", "r+b", buffering=0) as w:
            for o in range(0, size, 256 << 10):
                w.write(new[o:o + (256 << 10)])
        done.set()

    t = threading.Thread(target=writer, name="mount-writer")
    with Client.connect(mnt) as c, c.open("f") as f:
        got = bytearray()
        buf = bytearray(MiB)
        seen_done_at = None
        for _ in range(2):
            got += buf[:f.readinto(buf, len(got))]
        t.start()
        try:
            while True:
                if seen_done_at is None and done.is_set():
                    seen_done_at = len(got)
                if len(got) >= size:
                    if seen_done_at is not None:
                        break
                    t.join()  # read it all again once the writer is done
                    got.clear()
                    continue
                got += buf[:f.readinto(buf, len(got))]
        finally:
            t.join()
    _check_window(bytes(got), old, new, seen_done_at + READ_AHEAD, "concurrent")


def test_truncate_through_the_mount_during_read_ahead(mnt: Path) -> None:
    """The file is cut short through the mount while a direct client has read-ahead in
    flight, and another file then takes the freed blocks: the client gets only bytes
    the file held (its read-ahead, inside the window) or GrantRevoked/EOF — never the
    other file's data — and a fresh open reads the new size."""
    from kernelshim.clientcore import READ_AHEAD
    from kernelshim.errors import GrantRevoked
    size = 16 * MiB
    old, other = os.urandom(size), os.urandom(size)
    (mnt / "f").write_bytes(old)
    with Client.connect(mnt) as c:
        f = c.open("f")
        got = bytearray()
        buf = bytearray(MiB)
        for _ in range(2):
            got += buf[:f.readinto(buf, len(got))]
        last_end = len(got)
        os.truncate(mnt / "f", MiB)
        (mnt / "other").write_bytes(other)
        with pytest.raises(GrantRevoked):  # the truncate revoked the grant
            while True:
                n = f.readinto(buf, len(got))
                assert n, "end of file before the revoked grant was noticed"
                got += buf[:n]
        assert got == old[:len(got)], "bytes that were not the file's came back"
        assert len(got) <= last_end + READ_AHEAD, (len(got), last_end)
        f.close()
        with c.open("f") as g:
            assert g.read() == old[:MiB]
