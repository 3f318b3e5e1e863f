"""The shim kernel over a real block device and pager: the data path through extent
maps, rights, mint and revoke, and revoke's fencing of in-flight requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from kernelshim import (FRESH, UNWRITTEN, WRITTEN, BadRequest, BlockDevice, ExtentMap,
                        GrantRevoked, Kernel, NotAllocated, PrincipalId, Rights, RightsError,
                        Sealed)

BS = 4096
P1 = PrincipalId(1)
P2 = PrincipalId(2)
# Maps the tests write through hold FRESH data (written since the last commit: writable
# in place); sealed WRITTEN blocks are the copy-on-write tests' business.
W, U = FRESH, UNWRITTEN


def fill(seed: int, n: int) -> bytes:
    return bytes((seed + i * 7) % 256 for i in range(n))


def open_kernel(tmp_path: Path, *, profile: str | None = None, nblocks: int = 256) -> Kernel:
    d = tmp_path / "vol"
    d.mkdir(exist_ok=True)
    BlockDevice.format(d, size=nblocks * BS, block_size=BS)
    return Kernel.open(d, cache_bytes=64 * BS, profile=profile)


@pytest.fixture
def kernel(tmp_path: Path):
    k = open_kernel(tmp_path)
    yield k
    k.close()


def rw_grant(kernel: Kernel, emap: ExtentMap, rights: Rights = Rights.RW, ino: int = 7):
    return kernel.grant(inode=ino, generation=1, extents=emap, rights=rights, principal=P1)


# -- the data path ------------------------------------------------------------------------


async def test_read_write_through_extents(kernel: Kernel) -> None:
    # file blocks 0-1 -> dev 10-11, 2-3 -> dev 40-41, 4-5 hole, 6-7 -> dev 20-21
    emap = ExtentMap([(0, 10, 2, W), (2, 40, 2, W), (6, 20, 2, W)])
    g = rw_grant(kernel, emap)
    data = fill(1, 4 * BS)
    assert await kernel.write(g, 0, data) == len(data)
    assert bytes(await kernel.read(g, 0, 4 * BS)) == data
    # the bytes landed on the mapped device blocks
    assert await kernel.device.read(10, 2, principal=P1) == data[:2 * BS]
    assert await kernel.device.read(40, 2, principal=P1) == data[2 * BS:]
    # an unaligned read across the extent boundary
    assert bytes(await kernel.read(g, BS + 5, BS + 10)) == data[BS + 5:2 * BS + 15]
    # a read covering written blocks, a hole and more written blocks
    await kernel.write(g, 6 * BS, fill(2, 2 * BS))
    got = bytes(await kernel.read(g, 3 * BS, 5 * BS))
    assert got == data[3 * BS:] + bytes(2 * BS) + fill(2, 2 * BS)
    assert await kernel.read(g, 100, 0) == b""


async def test_holes_and_unwritten_extents_read_as_zeros(kernel: Kernel) -> None:
    # device blocks 30-33 hold stale data of some earlier owner
    await kernel.device.write(30, fill(9, 4 * BS), principal=P2)
    emap = ExtentMap([(2, 30, 4, U)])
    g = rw_grant(kernel, emap)
    assert bytes(await kernel.read(g, 0, 8 * BS)) == bytes(8 * BS)
    assert bytes(await kernel.read(g, 2 * BS + 17, 100)) == bytes(100)  # one unwritten seg
    assert bytes(await kernel.read(g, 17, 100)) == bytes(100)  # one hole seg
    # written through the grant but not committed: still zeros to readers
    await kernel.write(g, 2 * BS, fill(3, BS))
    assert bytes(await kernel.read(g, 2 * BS, BS)) == bytes(BS)
    emap.mark_written(2, 1)  # the metadata server's commit
    assert bytes(await kernel.read(g, 2 * BS, 2 * BS)) == fill(3, BS) + bytes(BS)


async def test_partial_block_writes_merge(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 50, 3, W)])
    g = rw_grant(kernel, emap)
    base = fill(4, 3 * BS)
    await kernel.write(g, 0, base)
    # inside one block
    await kernel.write(g, 100, b"x" * 50)
    # head and tail partial, across all three blocks
    await kernel.write(g, BS - 10, b"y" * (BS + 20))
    # a tail-partial write of the first part of the last block
    await kernel.write(g, 2 * BS, b"z" * 10)
    expect = bytearray(base)
    expect[100:150] = b"x" * 50
    expect[BS - 10:2 * BS + 10] = b"y" * (BS + 20)
    expect[2 * BS:2 * BS + 10] = b"z" * 10
    assert bytes(await kernel.read(g, 0, 3 * BS)) == bytes(expect)
    # and the device agrees (the pager is write-through)
    assert await kernel.device.read(50, 3, principal=P1) == expect


async def test_partial_write_into_unwritten_block_pads_with_zeros(kernel: Kernel) -> None:
    await kernel.device.write(60, fill(5, 2 * BS), principal=P2)  # stale contents
    emap = ExtentMap([(0, 60, 2, U)])
    g = rw_grant(kernel, emap)
    await kernel.write(g, BS + 1000, b"q" * 10)
    await kernel.write(g, 5, b"p" * 3)
    emap.mark_written(0, 2)
    expect = bytearray(2 * BS)
    expect[5:8] = b"ppp"
    expect[BS + 1000:BS + 1010] = b"q" * 10
    assert bytes(await kernel.read(g, 0, 2 * BS)) == bytes(expect)


async def test_write_into_hole_is_not_allocated(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 80, 2, W)])
    g = rw_grant(kernel, emap)
    await kernel.write(g, 0, fill(6, 2 * BS))
    with pytest.raises(NotAllocated):
        await kernel.write(g, 2 * BS, b"a")
    # a write that is only partly allocated writes nothing at all
    with pytest.raises(NotAllocated):
        await kernel.write(g, BS, b"b" * (2 * BS))
    assert bytes(await kernel.read(g, 0, 2 * BS)) == fill(6, 2 * BS)
    assert kernel.device.written_blocks().tolist() == [80, 81]
    assert g.inflight == 0


async def test_bad_requests(kernel: Kernel) -> None:
    g = rw_grant(kernel, ExtentMap([(0, 1, 1, W)]))
    with pytest.raises(BadRequest):
        await kernel.read(g, -1, 10)
    with pytest.raises(BadRequest):
        await kernel.read(g, 0, -1)
    with pytest.raises(BadRequest):
        await kernel.write(g, -5, b"x")
    assert await kernel.write(g, 0, b"") == 0
    assert g.inflight == 0


async def test_large_read_spanning_many_blocks(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 100, 40, W), (40, 150, 10, W)])
    g = rw_grant(kernel, emap)
    data = fill(8, 50 * BS)
    await kernel.write(g, 0, data)
    assert bytes(await kernel.read(g, 0, 50 * BS)) == data
    assert bytes(await kernel.read(g, 3, 45 * BS)) == data[3:3 + 45 * BS]
    assert kernel.pager.statistics().bypassed_blocks > 0


async def test_sealed_blocks_are_never_written_in_place(kernel: Kernel) -> None:
    await kernel.device.write(90, fill(1, BS), principal=P2)
    emap = ExtentMap([(0, 90, 1, WRITTEN), (1, 91, 1, U)])
    g = rw_grant(kernel, emap)
    with pytest.raises(Sealed):
        await kernel.write(g, 100, b"x" * 10)
    with pytest.raises(Sealed):  # touching a sealed block at all is refused, whole
        await kernel.write(g, BS - 1, b"yz")
    assert await kernel.device.read(90, 1, principal=P2) == fill(1, BS)
    assert g.written == [] and g.inflight == 0
    # copy-on-write: the data goes to the fresh block, merged with the old contents
    cow = ExtentMap([(0, 95, 1, FRESH)])
    await kernel.write(g, 100, b"x" * 10, cow=cow)
    assert await kernel.device.read(90, 1, principal=P2) == fill(1, BS)  # untouched
    new = bytes(await kernel.device.read(95, 1, principal=P2))
    assert new == fill(1, BS)[:100] + b"x" * 10 + fill(1, BS)[110:]
    # the grant still reads the old block until the caller relocates the extent
    assert bytes(await kernel.read(g, 0, BS)) == fill(1, BS)
    emap.relocate(0, 95, 1)
    assert bytes(await kernel.read(g, 0, BS)) == new


async def test_barrier_holds_writes_and_waits_for_those_in_flight(tmp_path: Path,
                                                                   autojump_clock) -> None:
    """A commit inside a barrier sees every write that started before it, finished, and no
    write runs while it commits (exact on the MockClock with a slow device)."""
    kernel = open_kernel(tmp_path, profile="hdd")
    order: list[tuple[str, float]] = []
    try:
        g = rw_grant(kernel, ExtentMap([(0, 10, 4, U)]))

        async def writer(tag: str, delay: float) -> None:
            await trio.sleep(delay)
            await kernel.write(g, 0, b"w" * BS)
            order.append((f"{tag} done", trio.current_time()))

        async with trio.open_nursery() as n:
            n.start_soon(writer, "first", 0)
            n.start_soon(writer, "second", 0.0005)
            await trio.sleep(0.0001)  # the first write is in flight
            async with kernel.barrier():
                order.append(("commit", trio.current_time()))
                await trio.sleep(0.001)  # the second write arrives and waits meanwhile
            order.append(("resumed", trio.current_time()))
    finally:
        kernel.close()
    assert [tag for tag, _t in order] == ["first done", "commit", "resumed", "second done"]
    assert order[1][1] >= order[0][1]
    assert order[3][1] > order[1][1] + 0.001


def script_preflushes(kernel: Kernel, monkeypatch: pytest.MonkeyPatch,
                      arrivals: list[int], then=None) -> list[int]:
    """Replace the device's flush: each flush before the barrier holds writes (a
    pre-flush) is logged (the MiB unflushed when it starts) and then a stream "writes"
    the next of `arrivals` MiB during it (`then(round)` runs there too, if given); the
    flush under the barrier is the real one. Returns the log."""
    dev = kernel.device
    real = dev.flush
    script = iter(arrivals)
    seen: list[int] = []

    async def flush(*, principal: PrincipalId = PrincipalId(0)) -> None:
        if kernel._barrier is not None:  # the flush under the barrier
            await real(principal=principal)
            return
        seen.append(dev.unflushed_bytes >> 20)
        await real(principal=principal)
        if then is not None:
            await then(len(seen))
        dev.unflushed_bytes = next(script, 0) << 20  # what a stream wrote meanwhile

    monkeypatch.setattr(dev, "flush", flush)
    dev.unflushed_bytes = 600 << 20
    return seen


R4 = {"preflush_rounds": 4}


@pytest.mark.parametrize("arrivals, kw, preflushed", [
    ([300, 150, 75, 40], R4, [600, 300, 150, 75]),  # flushes outpace a stream: 4
    ([440, 320, 230, 100], R4, [600, 440, 320, 230]),  # each a quarter smaller: 4
    ([300, 5], R4, [600, 300]),  # what is left is below PREFLUSH_BYTES: held flush's
    ([600, 300], R4, [600]),  # the stream outpaces the flushes: one, as before
    # a stream a little slower than the flushes: one, not four full-size rounds
    # (review of fio3, F3: [600, 599, 598, 597])
    ([599, 598, 597, 596], R4, [600]),
    ([460, 300], R4, [600]),  # shrinks by less than a quarter (PREFLUSH_SHRINK)
    ([300, 150], {"durable": True}, [600]),  # an fsync's barrier: one, as before
    ([300, 150], {}, [600]),  # any barrier a caller waits on: one unless asked
])
async def test_barrier_preflushes_while_each_flush_leaves_less(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch, arrivals: list[int],
        kw: dict, preflushed: list[int]) -> None:
    """A barrier that finds much written since the last flush flushes before it holds
    writes back, and — when its caller asks for more rounds (`preflush_rounds`: the
    periodic commit; every barrier a caller waits on gets one) — again while a
    stream's writes during the flush (`arrivals`, MiB) are still PREFLUSH_BYTES or
    more and at most PREFLUSH_SHRINK (3/4) of what that flush made durable: the flush
    under the barrier, while every writer waits, has only the rest. (One pre-flush
    only, before: fio's writes waited 0.1-0.3 s per commit, docs/BENCHMARKS.md.)"""
    from kernelshim.kernel import PREFLUSH_BYTES, PREFLUSH_SHRINK
    seen = script_preflushes(kernel, monkeypatch, arrivals)
    async with kernel.barrier(**kw):
        pass
    assert seen == preflushed
    assert sum(seen) <= 600 * (1 + 0.75 + 0.75 ** 2 + 0.75 ** 3)  # docs/dev/invariants.md
    assert PREFLUSH_BYTES == 8 << 20 and PREFLUSH_SHRINK == 0.75


async def test_barrier_stops_preflushing_when_asked(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stop_preflush` (true once an fsync's commit waits for the periodic one) is
    checked before every round after the first: no round starts once it is true."""
    stop = [False]

    async def after(round_: int) -> None:
        stop[0] = round_ >= 2  # an fsync arrives during the second round

    seen = script_preflushes(kernel, monkeypatch, [300, 150, 75, 40], then=after)
    async with kernel.barrier(preflush_rounds=4, stop_preflush=lambda: stop[0]):
        pass
    assert seen == [600, 300]


async def test_fsync_write_back_of_a_discardable_file_preflushes_once(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of fio3, F1: an fsync of a discardable file writes its frames back under
    `Kernel.writeback_file`'s barrier, which its caller waits for: one pre-flush under
    a stream, charged to that caller, not up to PREFLUSH_ROUNDS (it was 600, 300, 150,
    75 MiB)."""
    seen = script_preflushes(kernel, monkeypatch, [300, 150, 75, 40])
    charged: list[PrincipalId] = []
    real = kernel.device.flush

    async def flush(*, principal: PrincipalId = PrincipalId(0)) -> None:
        charged.append(principal)
        await real(principal=principal)

    monkeypatch.setattr(kernel.device, "flush", flush)
    written: list[int] = []

    async def writeback_file(inode: int, *, principal: PrincipalId = PrincipalId(0)) -> None:
        written.append(inode)

    async def write_back_dirty(**kw) -> None:
        pass

    monkeypatch.setattr(kernel.pager, "writeback", True, raising=False)
    monkeypatch.setattr(kernel.pager, "dirty_discardable_files", lambda: {7})
    monkeypatch.setattr(kernel.pager, "dirty_files", lambda: set())
    monkeypatch.setattr(kernel.pager, "writeback_file", writeback_file)
    monkeypatch.setattr(kernel.pager, "write_back_dirty", write_back_dirty)
    assert await kernel.writeback_file(7, principal=P2)
    assert seen == [600] and written == [7]
    assert charged and set(charged) == {P2}


async def test_preflush_rounds_write_back_what_was_dirtied_during_the_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of fio3, F4 (write-back on, as a --writeback mount): before each pre-flush
    round the frames dirtied during the one before are written back, so each round's
    flush covers them and the flush under the barrier has only what came during the
    last; the barrier still puts every block on the device."""
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=64 * BS, writeback=True)
    try:
        emap = ExtentMap([(0, 10, 8, FRESH)])
        g = rw_grant(k, emap)
        await k.write(g, 0, fill(0, BS))
        dirty_at_flush: list[bool] = []

        async def during(round_: int) -> None:  # the stream writes the next block
            await k.write(g, round_ * BS, fill(round_, BS))

        seen = script_preflushes(k, monkeypatch, [300, 150, 75, 40], then=during)
        scripted = k.device.flush

        async def flush(*, principal: PrincipalId = PrincipalId(0)) -> None:
            if k._barrier is None:
                dirty_at_flush.append(k.pager.has_dirty(7))
            await scripted(principal=principal)

        monkeypatch.setattr(k.device, "flush", flush)
        async with k.barrier(preflush_rounds=4):
            assert not k.pager.has_dirty(7)
        assert seen == [600, 300, 150, 75]
        assert dirty_at_flush == [False, False, False, False]  # written back before each
        for i in range(5):  # block 0 and the four written during the rounds
            assert await k.device.read(10 + i, 1, principal=P1) == fill(i, BS)
    finally:
        k.close()


async def test_wait_quiescent_waits_for_older_requests_only(tmp_path: Path,
                                                           autojump_clock) -> None:
    kernel = open_kernel(tmp_path, profile="hdd")
    times: dict[str, float] = {}
    try:
        g = rw_grant(kernel, ExtentMap([(0, 10, 4, W)]))

        async def read(tag: str, delay: float) -> None:
            await trio.sleep(delay)
            await kernel.read(g, 0, BS)
            times[tag] = trio.current_time()

        async with trio.open_nursery() as n:
            n.start_soon(read, "old", 0)
            await trio.sleep(0.0001)
            assert kernel._in_epoch  # the old read is in flight
            n.start_soon(read, "new", 0.0002)  # starts after the grace period began
            await kernel.wait_quiescent()
            times["quiet"] = trio.current_time()
    finally:
        kernel.close()
    assert times["old"] <= times["quiet"] < times["new"]


async def test_wait_quiescent_of_some_files_waits_for_their_requests_only(
        tmp_path: Path, autojump_clock) -> None:
    """A grace period for blocks freed from one file does not wait for a request held
    in flight on another (a tenant's reads held by its own I/O limit held up the reuse
    of everyone's freed blocks)."""
    kernel = open_kernel(tmp_path, profile="hdd")
    times: dict[str, float] = {}
    try:
        slow = rw_grant(kernel, ExtentMap([(0, 10, 4, W)]), ino=7)
        other = rw_grant(kernel, ExtentMap([(0, 20, 4, W)]), ino=8)
        held = trio.Event()

        async def read() -> None:
            await kernel.read(other, 0, BS)  # an hdd read: milliseconds in flight
            times["old"] = trio.current_time()

        async def held_read() -> None:
            # a request on inode 7 held in flight (as by its principal's I/O limit)
            epoch = kernel._enter(slow, Rights.READ)
            try:
                await held.wait()
            finally:
                kernel._leave(slow, epoch)
            times["slow"] = trio.current_time()

        async with trio.open_nursery() as n:
            n.start_soon(held_read)
            n.start_soon(read)
            await trio.sleep(0.0001)
            assert "old" not in times
            await kernel.wait_quiescent([8])  # blocks freed from inode 8
            times["quiet 8"] = trio.current_time()
            assert "old" in times and "slow" not in times
            with trio.move_on_after(5):
                await kernel.wait_quiescent()  # every file: waits for the held one
                times["quiet all"] = trio.current_time()
            assert "quiet all" not in times
            held.set()
            await kernel.wait_quiescent([7])
    finally:
        kernel.close()
    assert times["old"] <= times["quiet 8"] < times["slow"]
    assert not kernel._in_inode and not kernel._in_epoch


async def test_discard_forgets_cached_blocks(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 70, 2, W)])
    g = rw_grant(kernel, emap)
    await kernel.write(g, 0, fill(2, 2 * BS))
    await kernel.read(g, 0, 2 * BS)  # resident in the pager
    await kernel.discard([(70, 2)], principal=P1)
    assert bytes(await kernel.read(g, 0, 2 * BS)) == bytes(2 * BS)
    assert kernel.written_blocks().tolist() == []
    await kernel.sync()


# -- rights, mint, revoke -------------------------------------------------------------------


async def test_rights_are_checked(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 5, 1, W)])
    rw = rw_grant(kernel, emap)
    await kernel.write(rw, 0, b"hello")
    ro = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.READ, principal=P1)
    wo = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.WRITE, principal=P1)
    none = kernel.grant(inode=7, generation=1, extents=emap, rights=Rights.NONE, principal=P1)
    with pytest.raises(RightsError):
        await kernel.write(ro, 0, b"x")
    with pytest.raises(RightsError):
        await kernel.read(wo, 0, 5)
    with pytest.raises(RightsError):
        await kernel.read(none, 0, 5)
    assert bytes(await kernel.read(ro, 0, 5)) == b"hello"
    await kernel.write(wo, 0, b"HELLO")
    assert bytes(await kernel.read(ro, 0, 5)) == b"HELLO"
    for g in (rw, ro, wo, none):
        assert g.inflight == 0


async def test_mint(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 5, 1, W)])
    parent = rw_grant(kernel, emap)
    child = kernel.mint(parent, Rights.READ)
    assert child.rights == Rights.READ and child.parent is parent
    assert child in parent.children
    assert child.principal == parent.principal and child.extents is parent.extents
    assert child.inode == parent.inode and child.generation == parent.generation
    await kernel.write(parent, 0, b"abc")
    assert bytes(await kernel.read(child, 0, 3)) == b"abc"
    with pytest.raises(RightsError):
        await kernel.write(child, 0, b"x")
    # more rights than the parent holds
    with pytest.raises(RightsError):
        kernel.mint(child, Rights.RW)
    with pytest.raises(RightsError):
        kernel.mint(child, Rights.WRITE)
    assert kernel.mint(child, Rights.READ).rights == Rights.READ
    assert kernel.mint(parent, Rights.RW).rights == Rights.RW
    assert kernel.mint(parent, Rights.NONE).rights == Rights.NONE
    assert len(kernel.grants_for(7)) == 5
    assert kernel.live_grants == 5


async def test_revoke_fails_later_requests_including_minted_children(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 5, 1, W)])
    parent = rw_grant(kernel, emap)
    child = kernel.mint(parent, Rights.READ)
    grandchild = kernel.mint(child, Rights.READ)
    other = rw_grant(kernel, emap)  # another grant on the same inode
    await kernel.revoke(parent)
    for g in (parent, child, grandchild):
        assert g.revoked
        with pytest.raises(GrantRevoked):
            await kernel.read(g, 0, 1)
        with pytest.raises(GrantRevoked):
            kernel.mint(g, Rights.NONE)
    with pytest.raises(GrantRevoked):
        await kernel.write(parent, 0, b"x")
    # the unrelated grant is untouched
    assert not other.revoked
    await kernel.write(other, 0, b"ok")
    assert kernel.grants_for(7) == [other]
    assert kernel.live_grants == 1
    # revoking twice is harmless; release is revoke without waiting
    await kernel.revoke(parent)
    kernel.release(other)
    assert other.revoked and kernel.live_grants == 0 and kernel.grants_for(7) == []


async def test_revoking_a_child_leaves_the_parent(kernel: Kernel) -> None:
    emap = ExtentMap([(0, 5, 1, W)])
    parent = rw_grant(kernel, emap)
    child = kernel.mint(parent, Rights.READ)
    await kernel.revoke(child)
    assert child.revoked and not parent.revoked
    assert bytes(await kernel.read(parent, 0, 1)) == b"\0"
    with pytest.raises(GrantRevoked):
        await kernel.read(child, 0, 1)


@pytest.mark.parametrize("through_child", [False, True])
async def test_revoke_waits_for_in_flight_request(tmp_path: Path, autojump_clock,
                                                  through_child: bool) -> None:
    kernel = open_kernel(tmp_path, profile="hdd")
    try:
        emap = ExtentMap([(0, 100, 8, W)])
        g = rw_grant(kernel, emap)
        # written behind the pager, so the read below misses and goes to the device
        await kernel.device.write(100, fill(3, 8 * BS), principal=P1)
        reader = kernel.mint(g, Rights.READ) if through_child else g
        events: list[tuple[str, float]] = []
        result: list[bytes] = []

        async def do_read() -> None:
            data = await kernel.read(reader, 0, 8 * BS)
            result.append(bytes(data))
            events.append(("read done", trio.current_time()))

        async def do_revoke() -> None:
            await kernel.revoke(g)
            events.append(("revoke done", trio.current_time()))

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_read)
            await trio.testing.wait_all_tasks_blocked()
            assert reader.inflight == 1  # past the check, waiting for the device
            nursery.start_soon(do_revoke)
            await trio.testing.wait_all_tasks_blocked()
            # the revoke has marked the grants but is still waiting for the read
            assert g.revoked and reader.revoked
            assert events == []
            assert trio.current_time() == t0
            # a request that starts now fails at once
            with pytest.raises(GrantRevoked):
                await kernel.read(reader, 0, BS)
            with pytest.raises(GrantRevoked):
                await kernel.write(g, 0, b"x")
        assert [e[0] for e in events] == ["read done", "revoke done"]
        assert events[1][1] >= events[0][1] > t0
        # the in-flight read finished normally with the right data
        assert result == [fill(3, 8 * BS)]
        assert reader.inflight == 0
        with pytest.raises(GrantRevoked):
            await kernel.read(reader, 0, BS)
    finally:
        kernel.close()


async def test_revoke_with_nothing_in_flight_returns_at_once(tmp_path: Path,
                                                             autojump_clock) -> None:
    kernel = open_kernel(tmp_path, profile="hdd")
    try:
        g = rw_grant(kernel, ExtentMap([(0, 100, 1, W)]))
        await kernel.read(g, 0, 10)
        t0 = trio.current_time()
        await kernel.revoke(g)
        assert trio.current_time() == t0
    finally:
        kernel.close()


async def test_revoke_waits_for_several_in_flight_requests(tmp_path: Path,
                                                           autojump_clock) -> None:
    kernel = open_kernel(tmp_path, profile="hdd")
    try:
        emap = ExtentMap([(0, 100, 4, W)])
        g = rw_grant(kernel, emap)
        done: list[str] = []

        async def writer(i: int) -> None:
            await kernel.write(g, i * BS, fill(i, BS))
            done.append(f"write {i}")

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(writer, i)
            await trio.testing.wait_all_tasks_blocked()
            assert g.inflight == 3  # one at the device, two queued (depth 1)
            await kernel.revoke(g)
            assert g.inflight == 0
            assert sorted(done) == ["write 0", "write 1", "write 2"]
    finally:
        kernel.close()


async def test_partial_write_into_a_resident_fresh_block_merges_in_its_frame(
        tmp_path: Path) -> None:
    """Under write-back, a write of part of one FRESH block whose frame is resident
    (fio's 16-byte request after 1 MiB - 16 B) is merged in the frame itself: the
    file reads the merge, the kernel counts the file as written (R8), the grant
    records the bytes, and the barrier's flush puts the merged block on the device.
    Elsewhere (unwritten, not resident) it merges as before."""
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=256 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=64 * BS, writeback=True)
    try:
        emap = ExtentMap([(0, 10, 1, FRESH), (1, 11, 1, UNWRITTEN), (2, 12, 1, FRESH)])
        g = rw_grant(k, emap)
        first = fill(3, BS - 16)
        await k.write(g, 0, first)  # the block's frame: resident, dirty
        frame = k.pager._where[10]
        async with k.barrier():  # clean, on the device; the flush forgets the file
            pass
        assert not k.may_be_unflushed(7)
        await k.write(g, BS - 16, b"0123456789abcdef")
        assert k.pager._where[10] == frame and k.may_be_unflushed(7)
        assert g.wrote_in(BS - 16, BS)
        assert bytes(await k.read(g, 0, BS)) == first + b"0123456789abcdef"
        await k.write(g, BS + 5, b"xyz")  # unwritten: merged with zeros
        emap.mark_written(1, 1)  # (the metadata server's part)
        await k.write(g, 2 * BS + 1, b"uv")  # fresh, not resident: read, merged
        assert bytes(await k.read(g, BS, 2 * BS)) == \
            bytes(5) + b"xyz" + bytes(BS - 8) + bytes(1) + b"uv" + bytes(BS - 3)
        async with k.barrier():
            pass
        assert await k.device.read(10, 1, principal=P1) == first + b"0123456789abcdef"
    finally:
        k.close()


# -- the merge of a partly written block (probe 6, W2; review of probe 6) -----------------


@pytest.mark.parametrize("meanwhile", ["sealed", "punched"])
async def test_a_write_that_waited_for_a_merged_block_and_then_fails_lets_the_block_go(
        tmp_path: Path, autojump_clock, meanwhile: str) -> None:
    """Review of probe 6, R1. A partial write that waited for another's merge of the same
    block looks at the map again once it holds the block; there it may find the block
    unmapped (a hole: NotAllocated — a truncate or punch unmaps, revokes, and only
    then waits for the writes in flight) or sealed (Sealed: through the mount a
    commit's barrier waits for the write first). The write fails — and must let the
    block go. (Before: the look
    again ran outside the try whose finally releases, so the block stayed held for
    good: every later partial write of it waited forever inside `_enter_write`, and
    the volume's next barrier, every commit and fsync, with it.)"""
    kernel = open_kernel(tmp_path, profile="hdd")
    try:
        emap = ExtentMap([(0, 10, 1, U)])  # (the mount's grant holds the live map)
        a, b = rw_grant(kernel, emap), rw_grant(kernel, emap)
        failed: list[Exception] = []

        async def second() -> None:
            try:
                await kernel.write(b, 300, b"b" * 10)
            except (Sealed, NotAllocated) as e:
                failed.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(kernel.write, a, 100, b"a" * 10)
            await trio.testing.wait_all_tasks_blocked()
            assert kernel._merging.busy(7, 0)  # a: merging block 0, writing it
            n.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()  # b: waiting for block 0
            if meanwhile == "sealed":
                emap.mark_written(0, 1)  # (a commit of a's bytes, sealed)
                emap.seal()
            else:
                emap.remove(0, 1)  # (a punch)
        assert len(failed) == 1, failed
        assert not kernel._merging.busy(7, 0)
        assert b.inflight == 0
        with trio.fail_after(5):  # the block is free: a later partial write runs
            if meanwhile == "sealed":
                await kernel.write(b, 300, b"c" * 10, cow=ExtentMap([(0, 20, 1, FRESH)]))
            else:
                emap.add(0, 30, 1, U)
                await kernel.write(b, 300, b"c" * 10)
        assert not kernel._merging.busy(7, 0)
    finally:
        kernel.close()


async def test_merge_locks_a_cancelled_waiter_keeps_nothing() -> None:
    """Review of probe 6 (checked, held): a write holding its first block and waiting
    for its last, cancelled there (its connection closed, unmount), gives the first
    back; the holder's release then leaves no entry behind (bounded state)."""
    from kernelshim.mergelocks import MergeLocks

    m = MergeLocks()
    assert not await m.acquire(7, (2,))  # the holder
    with trio.CancelScope() as cs:
        async with trio.open_nursery() as n:
            n.start_soon(m.acquire, 7, (0, 2))
            await trio.testing.wait_all_tasks_blocked()
            assert m.busy(7, 0) and m.busy(7, 2)  # 0 taken, waiting for 2
            cs.cancel()
    assert not m.busy(7, 0) and m.busy(7, 2)
    m.release(7, (2,))
    assert not m.busy(7, 2) and not m._held
