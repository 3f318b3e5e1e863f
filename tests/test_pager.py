"""The pager (pager/pool.py): hits and misses, eviction, coherence of writes, bypass of
large reads, discard, per-principal accounting and a model-based property test (the
first part, from the write-through cache it replaced); then the policies, write-back,
banks (guarantees, ceilings, admission), hints, discardable files, cooperative reclaim
on trio's MockClock, and traces with their replay. tests/test_pager_policy.py holds the
property tests of the invariants under every policy."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdev import BlockDevice, PrincipalId
from pager import BYPASS_BLOCKS, Pager

BS = 512
P0 = PrincipalId(0)
P1 = PrincipalId(1)
P2 = PrincipalId(2)


def blk(seed: int, count: int = 1) -> bytes:
    return b"".join(bytes([(seed * 7 + i) % 255 + 1]) * BS for i in range(count))


def make_device(path: Path, *, nblocks: int = 128, profile: str = "none") -> BlockDevice:
    path.mkdir(parents=True, exist_ok=True)
    BlockDevice.format(path, size=nblocks * BS, block_size=BS, profile=profile)
    return BlockDevice.open(path)


@pytest.fixture
def device(tmp_path: Path):
    d = make_device(tmp_path / "dev")
    yield d
    d.close()


def check_invariants(p: Pager) -> None:
    """The pool's invariants (pager/cache.py): the block index and the frame arrays
    agree, frames are conserved (free + resident = pool), charges equal residency,
    dirty counts (and dirty discardable and debt-paced counts) equal dirty frames (and
    dirty discardable and debt-paced frames), and every resident frame sits on exactly one
    queue of the principal charged for it."""
    from pager.cache import DIRTY, FREE, WRITEBACK
    for b, f in p._where.items():
        assert p._frame_block[f] == b
    used = [f for f in range(p.nframes) if p._frame_block[f] >= 0]
    assert len(used) == len(p._where)
    assert sorted(p._where.values()) == sorted(used)
    assert len(set(p._free)) == len(p._free)
    assert set(p._free).isdisjoint(used)
    assert len(p._free) + len(used) == p.nframes
    assert all(p._state[f] == FREE for f in p._free)
    assert all(p._state[f] != FREE for f in used)
    counts: dict[int, int] = {}
    dirty: dict[int, int] = {}
    disc_dirty: dict[int, int] = {}
    paced: dict[int, int] = {}
    assert not p._paced[p._free].any() if p._free else True
    for f in used:
        counts[int(p._owner[f])] = counts.get(int(p._owner[f]), 0) + 1
        if p._state[f] in (DIRTY, WRITEBACK):
            d = int(p._dirtier[f])
            dirty[d] = dirty.get(d, 0) + 1
            if p._disc[f]:
                disc_dirty[d] = disc_dirty.get(d, 0) + 1
            if p._paced[f]:
                paced[d] = paced.get(d, 0) + 1
        else:
            assert not p._paced[f], "only a dirty frame is debt-paced"
    assert p.statistics().resident == counts
    assert {k: a.resident for k, a in p._acct.items() if a.resident} == counts
    assert {k: a.dirty for k, a in p._acct.items() if a.dirty} == dirty
    # the dirty discardable frames each principal dirtied, kept count of (V5)
    assert {k: a.disc_dirty for k, a in p._acct.items() if a.disc_dirty} == disc_dirty
    # the debt-paced frames each principal dirtied (review of tidy5, R2): never
    # discardable too
    assert {k: a.paced for k, a in p._acct.items() if a.paced} == paced
    assert not (p._paced & p._disc).any()
    assert all(a.resident >= 0 and a.dirty >= 0 for a in p._acct.values())
    # a block whose newest contents were dropped has no dirty frame (its newest
    # contents would be there again: review of stop 24, D)
    assert not any(int(p._frame_block[f]) in p._lost for f in used
                   if p._state[f] in (DIRTY, WRITEBACK)), p._lost
    if p.policy != "global-lru":
        for f in used:
            qid = int(p._links.queue[f])
            assert qid >= 0 and p._queues[qid] in p._pq[int(p._owner[f])].values()
        assert sum(q.size for q in p._queues) == len(used)
        for q in p._queues:  # walk each list: sizes and links agree
            n, f = 0, q.head
            while f != -1:
                n += 1
                assert p._links.queue[f] == q.qid
                f = int(p._links.next[f])
            assert n == q.size


async def check_frames_match_device(p: Pager) -> None:
    for b, f in p._where.items():
        assert bytes(p._frames[f]) == await p.device.read(b, 1, principal=P0), f"block {b}"


# -- hits, misses, eviction -------------------------------------------------------------


async def test_hits_and_misses_are_counted(device: BlockDevice) -> None:
    await device.write(0, blk(1, 8), principal=P0)
    p = Pager(device, nframes=16)
    assert await p.read(0, 4, principal=P0) == blk(1, 8)[:4 * BS]
    s = p.statistics()
    assert (s.hits, s.misses, s.frames_used) == (0, 4, 4)
    assert await p.read(0, 4, principal=P0) == blk(1, 8)[:4 * BS]
    s = p.statistics()
    assert (s.hits, s.misses) == (4, 4)
    assert await p.read(2, 4, principal=P0) == blk(1, 8)[2 * BS:6 * BS]
    s = p.statistics()
    assert (s.hits, s.misses, s.frames_used, s.frames) == (6, 6, 6, 16)
    check_invariants(p)


async def test_misses_are_coalesced_into_runs(device: BlockDevice) -> None:
    await device.write(0, blk(2, 8), principal=P0)
    p = Pager(device, nframes=16)
    await p.read(1, 1, principal=P1)
    await p.read(4, 1, principal=P1)
    before = {s.principal: s for s in device.statistics().per_principal}[P1]
    assert before.reads == 2
    # blocks 0, 2-3 and 5-7 are missing: three device requests
    assert await p.read(0, 8, principal=P1) == blk(2, 8)
    after = {s.principal: s for s in device.statistics().per_principal}[P1]
    assert after.reads - before.reads == 3
    assert after.bytes_read - before.bytes_read == 6 * BS


async def test_clock_eviction_gives_a_second_chance(device: BlockDevice) -> None:
    await device.write(0, blk(3, 8), principal=P0)
    p = Pager(device, nframes=4)
    for b in range(4):
        await p.read(b, 1, principal=P0)
    s = p.statistics()
    assert (s.frames_used, s.evictions) == (4, 0)
    # Pool full, every reference bit set: the hand clears them all and evicts the frame
    # it started at (block 0's).
    assert await p.read(4, 1, principal=P0) == blk(3, 8)[4 * BS:5 * BS]
    s = p.statistics()
    assert (s.frames_used, s.evictions) == (4, 1)
    assert 0 not in p._where and set(p._where) == {1, 2, 3, 4}
    # Block 1 is referenced again; the next miss passes it over and evicts block 2.
    await p.read(1, 1, principal=P0)
    await p.read(5, 1, principal=P0)
    assert set(p._where) == {1, 3, 4, 5}
    assert p.statistics().evictions == 2
    hits = p.hits
    await p.read(1, 1, principal=P0)
    assert p.hits == hits + 1
    misses = p.misses
    assert await p.read(2, 1, principal=P0) == blk(3, 8)[2 * BS:3 * BS]
    assert p.misses == misses + 1
    check_invariants(p)
    await check_frames_match_device(p)


async def test_one_frame_pool(device: BlockDevice) -> None:
    await device.write(0, blk(4, 3), principal=P0)
    p = Pager(device, nframes=0)  # at least one frame
    assert p.nframes == 1
    # a multi-block read larger than the pool still returns every block
    assert await p.read(0, 3, principal=P0) == blk(4, 3)
    assert p.statistics().frames_used == 1
    assert p.statistics().evictions == 2
    check_invariants(p)


# -- writes --------------------------------------------------------------------------------


async def test_write_keeps_resident_frames_coherent(device: BlockDevice) -> None:
    await device.write(0, blk(5, 4), principal=P0)
    p = Pager(device, nframes=8)
    await p.read(0, 4, principal=P0)
    await p.write(1, blk(9, 2), principal=P0)
    hits = p.hits
    assert await p.read(0, 4, principal=P0) == blk(5, 4)[:BS] + blk(9, 2) + blk(5, 4)[3 * BS:]
    assert p.hits == hits + 4  # served from the (updated) frames
    # write-through: the device has it too
    assert await device.read(1, 2, principal=P0) == blk(9, 2)
    check_invariants(p)


async def test_small_write_installs_frames_for_the_writer(device: BlockDevice) -> None:
    p = Pager(device, nframes=8)
    await p.write(10, blk(6, 3), principal=P2)
    s = p.statistics()
    assert s.frames_used == 3 and s.resident == {P2: 3}
    misses = p.misses
    assert await p.read(10, 3, principal=P1) == blk(6, 3)
    assert p.misses == misses  # all hits


async def test_large_write_updates_resident_frames_only(device: BlockDevice) -> None:
    p = Pager(device, nframes=8)
    await p.read(5, 1, principal=P0)
    await p.read(50, 1, principal=P0)
    n = BYPASS_BLOCKS + 8
    await p.write(0, blk(7, n), principal=P0)
    assert p.statistics().frames_used == 2  # nothing new installed
    hits = p.hits
    assert await p.read(5, 1, principal=P0) == blk(7, n)[5 * BS:6 * BS]
    assert p.hits == hits + 1
    assert await p.read(50, 1, principal=P0) == bytes(BS)  # beyond the write: unchanged
    check_invariants(p)
    await check_frames_match_device(p)


async def test_large_reads_bypass_the_cache(device: BlockDevice) -> None:
    await device.write(0, blk(8, 64), principal=P0)
    p = Pager(device, nframes=8)
    n = BYPASS_BLOCKS + 1
    assert await p.read(0, n, principal=P0) == blk(8, 64)[:n * BS]
    s = p.statistics()
    assert (s.bypassed_blocks, s.hits, s.misses, s.frames_used) == (n, 0, 0, 0)
    # exactly BYPASS_BLOCKS goes through the cache (and here evicts in a small pool)
    assert await p.read(0, BYPASS_BLOCKS, principal=P0) == blk(8, 64)[:BYPASS_BLOCKS * BS]
    s = p.statistics()
    assert s.bypassed_blocks == n and s.misses == BYPASS_BLOCKS and s.frames_used == 8


async def test_a_large_read_of_cached_blocks_counts_their_hits(device: BlockDevice) -> None:
    """Probe 15, F2: a read of more than BYPASS_BLOCKS served from resident frames
    (dd bs=1M of a cached file, a direct client's read-ahead) counted as neither hits
    nor misses, and left the frames looking cold. Its resident blocks are now hits of
    the reader, and referenced; the rest bypass the pool as before."""
    await device.write(0, blk(8, 64), principal=P0)
    p = Pager(device, nframes=64, policy="principal")
    await p.read(0, 16, principal=P1)  # 16 resident (misses)
    for f in range(64):
        p._ref_m[f] = False
    n = 48
    assert await p.read(0, n, principal=P2) == blk(8, 64)[:n * BS]
    s = p.statistics()
    assert s.per_principal[P2].hits == 16 and s.per_principal[P2].misses == 0
    assert s.bypassed_blocks == n - 16 and s.hits == 16
    assert all(p._ref_m[p._where[b]] for b in range(16))
    check_invariants(p)


async def test_bypass_read_does_not_evict_hot_blocks(device: BlockDevice) -> None:
    p = Pager(device, nframes=4)
    await p.read(100, 4, principal=P0)
    await p.read(0, 64, principal=P0)
    assert set(p._where) == {100, 101, 102, 103}
    assert p.evictions == 0


async def test_discard_drops_frames(device: BlockDevice) -> None:
    await device.write(0, blk(9, 4), principal=P0)
    p = Pager(device, nframes=8)
    await p.read(0, 2, principal=P1)
    await p.read(2, 2, principal=P2)
    assert p.statistics().resident == {P1: 2, P2: 2}
    await p.discard(1, 2, principal=P0)
    s = p.statistics()
    assert s.frames_used == 2
    assert s.resident == {P1: 1, P2: 1}
    assert await p.read(0, 4, principal=P0) == blk(9, 4)[:BS] + bytes(2 * BS) + blk(9, 4)[3 * BS:]
    assert p.misses == 4 + 2  # the discarded blocks came from the device again
    assert device.stored_checksum(1) == device.stored_checksum(2) == 0
    # discarding blocks that are not resident is fine; freed frames are reused first
    await p.discard(60, 4, principal=P0)
    check_invariants(p)


async def test_per_principal_resident_counts(device: BlockDevice) -> None:
    p = Pager(device, nframes=6)
    await p.read(0, 3, principal=P1)
    await p.read(3, 2, principal=P2)
    assert p.statistics().resident == {P1: 3, P2: 2}
    # a hit does not move the charge
    await p.read(0, 1, principal=P2)
    assert p.statistics().resident == {P1: 3, P2: 2}
    # filling the pool and evicting moves frames to the new principal
    await p.read(10, 4, principal=P0)
    s = p.statistics()
    assert sum(s.resident.values()) == s.frames_used == 6
    assert s.resident[P0] == 4
    assert s.evictions == 3
    check_invariants(p)


async def test_concurrent_read_and_write_of_a_block_stay_coherent(tmp_path: Path,
                                                                  autojump_clock) -> None:
    """A long read miss and a short write to one of its blocks overlap on a deep queue:
    whichever finishes first, the frame ends up with the written data."""
    device = make_device(tmp_path / "dev", profile="ssd")
    try:
        await device.write(0, blk(1, 16), principal=P0)
        p = Pager(device, nframes=32)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: p.read(0, 16, principal=P1))
            nursery.start_soon(lambda: p.write(3, blk(42), principal=P2))
        assert await p.read(3, 1, principal=P0) == blk(42)
        check_invariants(p)
        await check_frames_match_device(p)
    finally:
        device.close()


# -- property test -------------------------------------------------------------------------

NBLOCKS = 48

op_strategy = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NBLOCKS - 1), st.integers(1, 40),
              st.integers(0, 255), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, NBLOCKS - 1), st.integers(1, 40),
              st.just(0), st.integers(0, 3)),
    st.tuples(st.just("discard"), st.integers(0, NBLOCKS - 1), st.integers(0, 12),
              st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nframes=st.integers(1, 10), ops=st.lists(op_strategy, max_size=40))
def test_pager_matches_dict_model(nframes: int, ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as td:
        device = make_device(Path(td), nblocks=NBLOCKS)
        try:
            trio.run(_run_model, device, nframes, ops)
        finally:
            device.close()


async def _run_model(device: BlockDevice, nframes: int, ops: list[tuple]) -> None:
    p = Pager(device, nframes=nframes)
    model: dict[int, bytes] = {}

    def expect(b: int, n: int) -> bytes:
        return b"".join(model.get(i, bytes(BS)) for i in range(b, b + n))

    for kind, b, n, seed, who in ops:
        n = min(n, NBLOCKS - b)
        if kind == "write":
            data = b"".join(bytes([(seed + i) % 255 + 1]) * BS for i in range(n))
            await p.write(b, data, principal=PrincipalId(who))
            for i in range(n):
                model[b + i] = data[i * BS:(i + 1) * BS]
        elif kind == "read":
            assert await p.read(b, n, principal=PrincipalId(who)) == expect(b, n)
        else:
            await p.discard(b, n, principal=PrincipalId(who))
            for i in range(b, b + n):
                model.pop(i, None)
        check_invariants(p)
        assert p.statistics().frames_used <= nframes
    # finally every block reads as the model says, through the cache and around it
    assert await p.read(0, NBLOCKS, principal=P0) == expect(0, NBLOCKS)
    for b in range(0, NBLOCKS, 8):
        assert await p.read(b, 8, principal=P0) == expect(b, 8)
    await check_frames_match_device(p)


# == the cooperative pager: policies, write-back, hints, reclaim, traces ===================

from blockdev import BankNode  # noqa: E402
from pager import POLICIES, GuaranteeExceeded, UnknownPolicy, read_trace  # noqa: E402
from pager import trace as tr  # noqa: E402
from pager.cache import CLEAN, DIRTY  # noqa: E402
from pager.replay import memory_device, replay_async  # noqa: E402

ROOT = PrincipalId(0)


def banks(**spec: tuple[int, int | None]) -> dict:
    """A bank tree: root plus principals named p1, p2... -> (min frames, max frames)."""
    tree = {ROOT: BankNode(ROOT, None, "root")}
    for name, (mn, mx) in spec.items():
        pid = PrincipalId(int(name[1:]))
        tree[pid] = BankNode(pid, ROOT, name, cache_min=mn * BS,
                             cache_max=None if mx is None else mx * BS)
    return tree


def dev_writes(device: BlockDevice, p: PrincipalId) -> int:
    for s in device.statistics().per_principal:
        if s.principal == p:
            return s.bytes_written
    return 0


def test_unknown_policy_is_a_clear_error(device: BlockDevice) -> None:
    with pytest.raises(UnknownPolicy, match="unknown pager policy 'lru'"):
        Pager(device, nframes=4, policy="lru")


@pytest.mark.parametrize("policy", POLICIES)
async def test_every_policy_reads_and_writes_coherently(device: BlockDevice, policy: str) -> None:
    for wb in (False, True):
        p = Pager(device, nframes=6, policy=policy, writeback=wb)
        await p.write(0, blk(wb + 1, 20), principal=P1)
        assert await p.read(0, 20, principal=P2) == blk(wb + 1, 20)
        assert await p.read(5, 3, principal=P2) == blk(wb + 1, 20)[5 * BS:8 * BS]
        check_invariants(p)
        await p.flush()
        assert await device.read(0, 20, principal=P0) == blk(wb + 1, 20)
        check_invariants(p)


async def test_global_lru_does_not_bypass_large_reads(device: BlockDevice) -> None:
    await device.write(0, blk(8, 64), principal=P0)
    p = Pager(device, nframes=8, policy="global-lru")
    assert await p.read(0, 64, principal=P0) == blk(8, 64)
    s = p.statistics()
    assert s.bypassed_blocks == 0 and s.misses == 64 and s.frames_used == 8
    assert s.evictions == 56


# -- write-back ----------------------------------------------------------------------------


async def test_writeback_keeps_data_in_frames_until_flush(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, writeback=True)
    await p.write(3, blk(4, 2), principal=P1)
    assert dev_writes(device, P1) == 0
    assert await device.read(3, 2, principal=P0) == bytes(2 * BS)  # not yet on the device
    assert await p.read(3, 2, principal=P2) == blk(4, 2)
    s = p.statistics()
    assert s.dirty == 2 and s.per_principal[P1].dirty == 2
    await p.flush()
    assert await device.read(3, 2, principal=P0) == blk(4, 2)
    s = p.statistics()
    assert s.dirty == 0 and s.per_principal[P1].writeback_bytes == 2 * BS
    assert dev_writes(device, P1) == 2 * BS  # tagged with the principal that dirtied
    check_invariants(p)


async def test_writeback_is_charged_to_the_dirtier_whoever_evicts(device: BlockDevice) -> None:
    p = Pager(device, nframes=4, policy="global-lru", writeback=True)
    await p.write(0, blk(1, 4), principal=P1)
    await p.read(20, 4, principal=P2)  # evicts P1's dirty frames: written back first
    assert await device.read(0, 4, principal=P0) == blk(1, 4)
    assert dev_writes(device, P1) == 4 * BS and dev_writes(device, P2) == 0
    assert p.statistics().per_principal[P1].writeback_bytes == 4 * BS
    check_invariants(p)


async def test_bypassing_read_sees_dirty_frames(device: BlockDevice) -> None:
    await device.write(0, blk(2, 40), principal=P0)
    p = Pager(device, nframes=8, writeback=True)
    await p.write(10, blk(9), principal=P1)
    n = BYPASS_BLOCKS + 4
    got = await p.read(0, n, principal=P2)
    # the stream read the others past the pool; the resident block came from its frame
    assert p.statistics().bypassed_blocks == n - 1
    assert got == blk(2, 40)[:10 * BS] + blk(9) + blk(2, 40)[11 * BS:n * BS]
    buf = bytearray(n * BS)
    await p.read_into(0, n, memoryview(buf), principal=P2)
    assert buf == got


async def test_writeback_file_flushes_that_file_only(device: BlockDevice) -> None:
    p = Pager(device, nframes=16, writeback=True)
    await p.write(0, blk(1, 2), principal=P1, file=7, fblock=0)
    await p.write(8, blk(2, 2), principal=P2, file=8, fblock=0)
    await p.writeback_file(7)
    assert await device.read(0, 2, principal=P0) == blk(1, 2)
    assert await device.read(8, 2, principal=P0) == bytes(2 * BS)
    assert dev_writes(device, P2) == 0
    assert p.statistics().per_principal[P2].dirty == 2


async def test_dirty_throttle_writes_back_the_writers_own_frames(device: BlockDevice) -> None:
    p = Pager(device, nframes=16, policy="principal", writeback=True, dirty_ratio=0.25)
    await p.write(40, blk(3, 2), principal=P2)  # P2 dirties 2 frames, under its share
    await p.write(0, blk(4, 12), principal=P1)  # P1's share is 4 dirty frames
    s = p.statistics()
    assert s.per_principal[P1].dirty <= 4
    assert s.per_principal[P1].writeback_bytes >= 8 * BS
    assert s.per_principal[P2].dirty == 2 and dev_writes(device, P2) == 0
    await p.flush()
    assert await device.read(0, 12, principal=P0) == blk(4, 12)


async def test_dirty_frames_are_written_back_after_their_age(device: BlockDevice,
                                                            autojump_clock) -> None:
    p = Pager(device, nframes=16, writeback=True, dirty_expire=5.0, writeback_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await p.write(0, blk(5, 3), principal=P1)
        await trio.sleep(4.5)
        assert p.statistics().dirty == 3
        await trio.sleep(2.0)  # the aging pass at t=6 finds them 5 s old
        assert p.statistics().dirty == 0
        assert await device.read(0, 3, principal=P0) == blk(5, 3)
        nursery.cancel_scope.cancel()


async def test_discard_waits_for_writeback_in_flight(tmp_path: Path, autojump_clock) -> None:
    """A freed block's write-back that is in flight lands before the hole punch, never
    after it (the block would come back to life for the next owner)."""
    device = make_device(tmp_path / "dev", profile="hdd")
    try:
        p = Pager(device, nframes=8, writeback=True)
        await p.write(5, blk(6), principal=P1)
        order = []

        async def flusher() -> None:
            await p.flush()
            order.append("flushed")

        async def discarder() -> None:
            await trio.sleep(0.0001)  # the write-back is in flight now
            assert p._state[p._where[5]] == 4  # WRITEBACK
            await p.discard(5, 1, principal=P0)
            order.append("discarded")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher)
            nursery.start_soon(discarder)
        assert order.index("discarded") >= 0
        assert device.stored_checksum(5) == 0
        assert await p.read(5, 1, principal=P0) == bytes(BS)
        check_invariants(p)
    finally:
        device.close()


async def test_stream_write_is_acknowledged_before_it_lands_and_flush_waits(
        device: BlockDevice) -> None:
    """Under write-back a stream write from an immutable buffer (a FUSE payload) is
    acknowledged at once and lands from a task of the pager (write-behind); a read of
    its blocks waits for it, and flush returns only once it is on the device."""
    p = Pager(device, nframes=8, writeback=True)
    n = BYPASS_BLOCKS + 8
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        first, second = blk(3, n), blk(4, n)
        await p.write(0, first, principal=P1)
        assert device.data.pread(0, n * BS) == bytes(n * BS)  # not landed yet
        assert await p.read(0, n, principal=P2) == first  # waits for it
        await p.write(n, second, principal=P1)
        await p.write(n, first, principal=P1)  # claimed after: lands after
        await p.flush()
        assert device.data.pread(0, 2 * n * BS) == first + first
        assert dev_writes(device, P1) == 3 * n * BS  # charged to the writer
        assert p.statistics().frames_used == 0  # a stream: no frame taken
        nursery.cancel_scope.cancel()


async def test_stream_write_from_a_mutable_buffer_is_not_written_behind(
        device: BlockDevice) -> None:
    """A buffer the caller may change after the reply (a direct client's shared memory)
    is written before the write returns."""
    p = Pager(device, nframes=8, writeback=True)
    n = BYPASS_BLOCKS + 8
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        buf = bytearray(blk(5, n))
        await p.write(0, buf, principal=P1)
        buf[:] = bytes(len(buf))
        assert device.data.pread(0, n * BS) == blk(5, n)
        nursery.cancel_scope.cancel()


async def test_failed_write_behind_fails_every_later_flush(tmp_path: Path) -> None:
    """Acknowledged data that did not reach the device is an error of every later
    flush (the volume then turns read-only), never silently forgotten."""
    from blockdev import DeviceError, FaultPlan
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=128 * BS, block_size=BS)
    device = BlockDevice.open(d, fault_plan=FaultPlan(write_error_blocks=frozenset({50})))
    try:
        p = Pager(device, nframes=8, writeback=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run)
            await p.write(40, blk(6, BYPASS_BLOCKS + 8), principal=P1)  # acknowledged
            for _ in range(2):
                with pytest.raises(DeviceError, match="write-behind of device blocks 40"):
                    await p.flush()
            nursery.cancel_scope.cancel()
    finally:
        device.close()


async def test_discard_drops_dirty_frames_unwritten(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, writeback=True)
    await p.write(2, blk(7, 2), principal=P1)
    await p.discard(2, 2, principal=P1)
    await p.flush()
    assert dev_writes(device, P1) == 0
    assert p.statistics().frames_used == 0


# -- banks: guarantees and ceilings ----------------------------------------------------------


async def test_guarantee_protects_a_working_set_from_a_stream(device: BlockDevice) -> None:
    for policy in ("principal", "hinted"):
        p = Pager(device, nframes=16, policy=policy)
        p.configure_banks(banks(p1=(8, None)))
        for _ in range(3):
            await p.read(0, 8, principal=P1)
            for b in range(16, 120, 4):  # P2 streams 4-block reads through the pool
                await p.read(b, 4, principal=P2)
        s = p.statistics().per_principal
        assert s[P1].frames == 8 and s[P1].hits == 16 and s[P1].misses == 8
        check_invariants(p)
    g = Pager(device, nframes=16, policy="global-lru")
    g.configure_banks(banks(p1=(8, None)))
    for _ in range(3):
        await g.read(0, 8, principal=P1)
        for b in range(16, 120, 4):
            await g.read(b, 4, principal=P2)
    assert g.statistics().per_principal[P1].hits == 0  # the baseline ignores banks


async def test_unused_guarantee_is_lent_and_taken_back(device: BlockDevice) -> None:
    p = Pager(device, nframes=10, policy="principal")
    p.configure_banks(banks(p1=(6, None)))
    await p.read(0, 10, principal=P2)  # P1 uses nothing: P2 may use the whole pool
    assert p.statistics().resident == {P2: 10}
    await p.read(50, 6, principal=P1)  # P1 needs its guarantee: taken from P2
    assert p.statistics().resident == {P1: 6, P2: 4}
    await p.read(20, 10, principal=P2)  # P2 cannot take it back
    assert p.statistics().resident == {P1: 6, P2: 4}
    check_invariants(p)


async def test_ceiling_makes_a_principal_reclaim_from_itself(device: BlockDevice) -> None:
    p = Pager(device, nframes=16, policy="principal")
    p.configure_banks(banks(p1=(0, 4)))
    await p.read(0, 4, principal=P2)
    await p.read(20, 12, principal=P1)
    s = p.statistics()
    assert s.resident == {P1: 4, P2: 4}
    assert s.per_principal[P1].max == 4 and s.per_principal[P1].evictions == 8


async def test_ceiling_of_a_parent_covers_its_children(device: BlockDevice) -> None:
    tree = {ROOT: BankNode(ROOT, None, "root"),
            PrincipalId(5): BankNode(PrincipalId(5), ROOT, "team", cache_max=6 * BS),
            P1: BankNode(P1, PrincipalId(5), "a"), P2: BankNode(P2, PrincipalId(5), "b")}
    p = Pager(device, nframes=16, policy="hinted")
    p.configure_banks(tree)
    await p.read(0, 4, principal=P1)
    await p.read(10, 5, principal=P2)
    r = p.statistics().resident
    assert r[P1] + r[P2] == 6


@pytest.mark.parametrize("policy", ["principal", "hinted", "global-lru"])
async def test_a_removed_principals_frames_go_to_its_nearest_ancestor(
        device: BlockDevice, policy: str) -> None:
    """Probe 15, F3: a principal removed from the bank tree (`principal rm`) kept its
    frames, clean and dirty, under its dead id: listed for nobody, under no ceiling (a
    tenant that made and removed children held three times its cache_max). They now
    go to its nearest ancestor still in the tree, which counts them and whose ceiling
    then binds: its next reads evict its own frames, not others'."""
    team = PrincipalId(5)
    tree = {ROOT: BankNode(ROOT, None, "root"),
            team: BankNode(team, ROOT, "team", cache_max=8 * BS),
            P1: BankNode(P1, team, "a"), P2: BankNode(P2, ROOT, "b")}
    p = Pager(device, nframes=16, policy=policy, writeback=True)
    p.configure_banks(tree)
    await p.read(0, 6, principal=P1)
    await p.write(10, b"d" * (2 * BS), principal=P1)  # two dirty frames it dirtied
    await p.read(20, 4, principal=P2)
    assert p.statistics().resident == {P1: 8, P2: 4}
    gone = {k: v for k, v in tree.items() if k != P1}
    p.configure_banks(gone)
    s = p.statistics()
    assert s.resident == {team: 8, P2: 4}
    assert s.per_principal[team].dirty == 2
    check_invariants(p)
    # the team's ceiling binds the frames it took over: its reads evict its own
    # (global-lru has no ceilings: one LRU for everyone)
    await p.read(40, 4, principal=team)
    if policy != "global-lru":
        assert p.statistics().resident == {team: 8, P2: 4}
    check_invariants(p)
    await p.flush()
    assert p.statistics().per_principal[team].dirty == 0
    check_invariants(p)


def test_sum_of_guarantees_is_admission_checked(device: BlockDevice) -> None:
    p = Pager(device, nframes=10)
    p.check_banks(banks(p1=(6, None), p2=(4, None)))
    with pytest.raises(GuaranteeExceeded, match=r"add up to 5\.5KiB, more than the "
                                                r"pager's pool of 5\.0KiB \(10 frames"):
        p.check_banks(banks(p1=(6, None), p2=(5, None)))
    # children carve from their parent: counted once
    tree = {ROOT: BankNode(ROOT, None, "root"),
            PrincipalId(5): BankNode(PrincipalId(5), ROOT, "team", cache_min=8 * BS),
            P1: BankNode(P1, PrincipalId(5), "a", cache_min=5 * BS),
            P2: BankNode(P2, PrincipalId(5), "b", cache_min=3 * BS)}
    p.check_banks(tree)


# -- hints ---------------------------------------------------------------------------------


async def test_priority_orders_a_principals_own_pages(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, policy="hinted")
    p.set_file_hints(1, priority=5)
    p.set_file_hints(2, priority=-5)
    await p.read(0, 4, principal=P1, file=1, fblock=0)
    await p.read(10, 4, principal=P1, file=2, fblock=0)
    await p.read(20, 4, principal=P1, file=3, fblock=0)  # priority 0
    assert not any(b in p._where for b in range(10, 14))  # the low-priority file went
    assert all(b in p._where for b in range(0, 4))


async def test_priority_does_not_push_out_another_principal(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, policy="hinted")
    p.configure_banks(banks(p1=(4, None)))
    p.set_file_hints(2, priority=100)
    await p.read(0, 4, principal=P1, file=1)
    for b in range(10, 40, 2):
        await p.read(b, 2, principal=P2, file=2, fblock=b)
    assert all(b in p._where for b in range(0, 4))
    assert p.statistics().resident == {P1: 4, P2: 4}


async def test_discardable_dirty_file_is_dropped_whole_without_writeback(device: BlockDevice) -> None:
    dropped: list[int] = []
    p = Pager(device, nframes=8, policy="hinted", writeback=True, on_discarded=dropped.append)
    p.set_file_hints(9, discardable=True)
    await p.write(0, blk(1, 4), principal=P1, file=9, fblock=0)
    for b in range(20, 60, 2):  # the file goes idle; pressure from reads
        await p.read(b, 2, principal=P1, file=3, fblock=b)
    assert dropped == [9]
    assert not any(b in p._where for b in range(0, 4))  # all of it, not part
    s = p.statistics()
    assert s.per_principal[P1].writeback_bytes == 0 and s.discarded == 4
    assert dev_writes(device, P1) == 0
    check_invariants(p)


@pytest.mark.parametrize("how", ["dontneed", "reclaim"])
@pytest.mark.parametrize("span", [1, 4, BYPASS_BLOCKS + 8])
async def test_a_dropped_dirty_frame_never_shows_the_blocks_older_contents(
        device: BlockDevice, how: str, span: int) -> None:
    """Probe 12, F1: under write-back, a discardable file's overwrite goes into a block
    that another file freed and whose old bytes are still on the device (a relocation
    into a kept block); dropping the dirty frame left the device's old bytes to every
    read of the block until the file was emptied: another tenant's data. A dropped
    block reads as zeros until it is written again, through a small read, a large one
    (around the pool), a read-ahead and a partial block's merge alike, and nothing of
    the old bytes reaches the reader's buffer even for a moment."""
    old = b"SECRET-B" * (BS // 8)
    await device.write(8, old * 40, principal=P0)  # the other tenant's freed blocks
    p = Pager(device, nframes=max(8, span + 8), policy="hinted", writeback=True)
    p.set_file_hints(9, discardable=True)
    await p.write(8, blk(1, 4), principal=P1, file=9, fblock=0)  # relocated there
    if how == "dontneed":
        await p.advise(9, [(0, 8, 4)], principal=P1, dontneed=True)
    else:
        for b in [*range(60, 126, 2)] * 2:  # the file goes idle; pressure from reads
            await p.read(b, 2, principal=P1, file=3, fblock=b)
    assert not any(b in p._where for b in range(8, 12))
    assert dev_writes(device, P1) == 0  # dropped, never written

    got = await p.read(8, span, principal=P2, file=9)
    n = min(span, 4) * BS
    assert bytes(got[:n]) == bytes(n)  # zeros, not the old bytes
    assert bytes(got[n:]) == (old * 40)[:len(got) - n]  # (blocks never dropped)
    # the reader's buffer never held them (a direct client's shared buffer is read
    # by the client while the daemon fills it): the device is not read for them
    reads: list[tuple[int, int]] = []
    real = device.read_into

    async def spy(block, count, view, *, principal):
        reads.append((int(block), count))
        await real(block, count, view, principal=principal)
    device.read_into = spy  # type: ignore[method-assign]
    try:
        await p.advise(9, [(0, 8, 4)], principal=P2, dontneed=True)
        got = await p.read(8, span, principal=P2, file=9)
    finally:
        del device.read_into
    assert not any(b <= blkno < b + n for b, n in reads for blkno in range(8, 12)), reads
    assert bytes(got[:n]) == bytes(n)
    # written again (freed and reused by a file kept whole), the block reads what was
    # written, from its frame and from the device
    await p.write(9, blk(5), principal=P1, file=10, fblock=0)
    assert bytes(await p.read(9, 1, principal=P2, file=10)) == blk(5)
    await p.flush()
    assert p._lost == {8, 10, 11}
    assert await device.read(9, 1, principal=P0) == blk(5)
    await p.forget_runs([(8, 1), (10, 2)], principal=P0)  # freed: no map reads them
    assert not p._lost
    check_invariants(p)


async def test_a_partial_write_into_a_dropped_blocks_frame_is_read_back(
        device: BlockDevice) -> None:
    """Review of stop 24, D: the in-frame merge of part of a block
    (`write_within_nowait`) left the block among the dropped ones: a large read then
    gave zeros over the new bytes, and every read did once the frame was evicted,
    though the device held them."""
    p = Pager(device, nframes=64, policy="hinted", writeback=True)
    p.set_file_hints(9, discardable=True)
    await p.write(8, blk(1), principal=P1, file=9, fblock=0)
    await p.advise(9, [(0, 8, 1)], principal=P1, dontneed=True)
    assert p._lost == {8}
    assert bytes(await p.read(8, 1, principal=P1, file=9)) == bytes(BS)  # a zero frame
    p.set_file_hints(9, discardable=False)
    assert p.write_within_nowait(8, 0, b"HELLO", principal=P1, file=9, fblock=0)
    assert not p._lost
    check_invariants(p)
    want = b"HELLO" + bytes(BS - 5)
    assert bytes(await p.read(8, 1, principal=P1, file=9)) == want
    assert bytes(await p.read(8, BYPASS_BLOCKS + 8, principal=P1))[:BS] == want
    await p.flush()
    await p.advise(9, [(0, 8, 1)], principal=P1, dontneed=True)  # clean: evicted
    assert 8 not in p._where
    assert bytes(await p.read(8, 1, principal=P1, file=9)) == want


async def test_without_hints_the_same_dirty_pages_are_written_back(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, policy="principal", writeback=True)
    p.set_file_hints(9, discardable=True)  # recorded, ignored by `principal`
    await p.write(0, blk(1, 4), principal=P1, file=9, fblock=0)
    for b in range(20, 60, 2):
        await p.read(b, 2, principal=P1, file=3, fblock=b)
    assert await device.read(0, 4, principal=P0) == blk(1, 4)
    assert p.statistics().per_principal[P1].writeback_bytes == 4 * BS


async def test_flush_does_not_write_discardable_pages_but_fsync_does(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, policy="hinted", writeback=True)
    p.set_file_hints(9, discardable=True)
    await p.write(0, blk(1, 2), principal=P1, file=9, fblock=0)
    await p.write(4, blk(2, 2), principal=P1, file=10, fblock=0)
    await p.flush()
    assert await device.read(0, 2, principal=P0) == bytes(2 * BS)
    assert await device.read(4, 2, principal=P0) == blk(2, 2)
    await p.writeback_file(9)
    assert await device.read(0, 2, principal=P0) == blk(1, 2)


async def test_clean_discardable_pages_go_first(device: BlockDevice) -> None:
    p = Pager(device, nframes=8, policy="hinted")
    p.set_file_hints(4, discardable=True)
    await p.read(0, 4, principal=P1, file=1)
    await p.read(0, 4, principal=P1, file=1)  # referenced
    await p.read(10, 4, principal=P1, file=4)
    await p.read(10, 4, principal=P1, file=4)  # referenced too, still first to go
    await p.read(20, 4, principal=P1, file=5)
    assert all(b in p._where for b in range(0, 4))
    assert p.statistics().per_principal[P1].discarded == 4


async def test_willneed_prefetches_and_dontneed_drops(device: BlockDevice) -> None:
    await device.write(30, blk(3, 6), principal=P0)
    p = Pager(device, nframes=16, policy="hinted")
    await p.advise(1, [(0, 30, 6)], principal=P2, willneed=True)
    s = p.statistics().per_principal[P2]
    assert s.frames == 6 and s.prefetched == 6
    assert await p.read(30, 6, principal=P2, file=1) == blk(3, 6)
    await p.advise(1, [(0, 30, 3)], principal=P2, dontneed=True)
    assert p.statistics().per_principal[P2].frames == 3
    assert await p.read(30, 6, principal=P2) == blk(3, 6)
    # the other policies record hints and do not act on them
    q = Pager(device, nframes=16, policy="principal")
    await q.advise(1, [(0, 30, 6)], principal=P2, willneed=True)
    assert q.statistics().frames_used == 0


async def test_advise_acts_only_on_the_advising_principals_frames(device: BlockDevice) -> None:
    """Two tenants read blocks of one file; the frames are charged to whoever brought
    them in first. P2's dontneed drops its own frames and leaves P1's resident; P2's
    priority and discardable hints move its own frames only, now and when it brings
    blocks in later, never P1's (P2 could otherwise push P1's pages out or make them
    droppable). A file's own hints (set_file_hints, from its xattrs) apply to all."""
    from pager.cache import CLASS_DISCARDABLE
    await device.write(0, blk(4, 16), principal=P0)
    p = Pager(device, nframes=32, policy="hinted", writeback=True)
    await p.read(0, 8, principal=P1, file=7, fblock=0)    # P1's frames
    await p.read(8, 4, principal=P2, file=7, fblock=8)    # P2's frames
    assert p.statistics().resident == {P1: 8, P2: 4}
    # dontneed of the whole file by P2: only its own four frames go
    await p.advise(7, [(0, 0, 16)], principal=P2, dontneed=True)
    assert p.statistics().resident == {P1: 8}
    assert all(b in p._where for b in range(8))
    # P2 reads the blocks P1 holds: hits, still charged to P1
    assert await p.read(0, 8, principal=P2, file=7, fblock=0) == blk(4, 16)[:8 * BS]
    assert p.statistics().resident == {P1: 8}
    # P2's priority and discardable ranges do not touch P1's frames ...
    await p.advise(7, [(0, 0, 16)], principal=P2, priority=-50, discardable=True)
    assert all(p._prio[p._where[b]] == 0 and not p._disc[p._where[b]] for b in range(8))
    # ... but apply to the frames P2 brings in (now or later)
    await p.read(12, 4, principal=P2, file=7, fblock=12)
    assert all(p._disc[p._where[b]] for b in range(12, 16))
    # nor do they apply to P1's frames of that range brought in later
    await p.read(8, 4, principal=P1, file=7, fblock=8)
    assert all(not p._disc[p._where[b]] and p._prio[p._where[b]] == 0 for b in range(8, 12))
    # P1's own hints move its own frames
    await p.advise(7, [(0, 0, 4)], principal=P1, priority=9)
    assert [int(p._prio[p._where[b]]) for b in range(6)] == [9, 9, 9, 9, 0, 0]
    # a dirty frame charged to P1 is not written back or dropped by P2's dontneed
    await p.write(2, blk(9), principal=P1, file=7, fblock=2)
    await p.advise(7, [(2, 2, 1)], principal=P2, dontneed=True)
    assert 2 in p._where and p.statistics().per_principal[P1].writeback_bytes == 0
    # P2's many ranges push out only its own oldest ones, never P1's
    from pager.pool import MAX_RANGE_HINTS
    for k in range(MAX_RANGE_HINTS + 5):
        await p.advise(7, [(k % 16, k % 16, 1)], principal=P2, priority=k % 7)
    rh = p._range_hints[7]
    assert len(rh[2]) == MAX_RANGE_HINTS
    assert rh[1] == [(0, 4, 9, None)]
    # the file's own hints (a writer's xattrs) apply to every frame, whoever's
    p.set_file_hints(7, discardable=True)
    assert all(p._disc[p._where[b]] for b in range(16))
    assert p._links.qu[p._where[0]] == p._pq[1][CLASS_DISCARDABLE].qid
    check_invariants(p)
    # the other policies ignore dontneed altogether; never mind whose frames
    q = Pager(device, nframes=16, policy="principal")
    await q.read(0, 4, principal=P1, file=7)
    await q.advise(7, [(0, 0, 4)], principal=P1, dontneed=True)
    assert q.statistics().resident == {P1: 4}


async def test_sequential_reads_ahead_and_drops_behind(device: BlockDevice) -> None:
    await device.write(0, blk(5, 64), principal=P0)
    p = Pager(device, nframes=16, policy="hinted", readahead=4)
    p.set_file_hints(3, sequential=True)
    await p.read(40, 4, principal=P1, file=1)
    await p.read(40, 4, principal=P1, file=1)  # a referenced working set
    for b in range(0, 32, 2):
        assert await p.read(b, 2, principal=P1, file=3, fblock=b) == blk(5, 64)[b * BS:(b + 2) * BS]
    s = p.statistics().per_principal[P1]
    assert s.prefetched > 0
    # a read-ahead block's first use counts as a miss (comparable with MIN), but the
    # stream went to the device in fewer, larger requests than it was read in
    reads = {x.principal: x for x in device.statistics().per_principal}[P1].reads
    assert reads < 1 + 16
    assert all(b in p._where for b in range(40, 44))  # drop-behind spared the working set


# -- cooperative reclaim -----------------------------------------------------------------------


async def test_reclaim_requests_with_a_deadline(device: BlockDevice, autojump_clock) -> None:
    """Two self-paging clients over their ceiling: the one that complies chooses what it
    gives up; the one that ignores the request loses frames by policy at the deadline;
    a third principal's reads never wait for either."""
    p = Pager(device, nframes=32, policy="hinted", reclaim_grace=2.0)
    got: dict[int, list] = {1: [], 2: []}

    def complying(n: int, deadline: float) -> None:
        got[1].append((n, deadline))
        nursery.start_soon(release, n)

    async def release(n: int) -> None:
        await trio.sleep(0.5)  # thinks it over
        # gives up its *last* blocks, which policy would not have chosen first
        await p.advise(1, [(8 - n, 8 - n, n)], principal=P1, dontneed=True)
        p.answer_reclaim(P1, n)

    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        h1 = p.on_reclaim(P1, complying)
        p.on_reclaim(P2, lambda n, d: got[2].append((n, d)))
        await p.read(0, 8, principal=P1, file=1)
        await p.read(20, 8, principal=P2, file=2)
        t0 = trio.current_time()
        p.configure_banks(banks(p1=(0, 4), p2=(0, 4)))
        await trio.sleep(0.1)
        assert got[1] == [(4, t0 + 2.0)] and got[2] == [(4, t0 + 2.0)]
        # meanwhile another principal reads without waiting for anyone's deadline
        t = trio.current_time()
        await p.read(40, 8, principal=P0)
        assert trio.current_time() == t
        await trio.sleep(1.0)  # the complying client answered at t0 + 0.5
        assert all(b in p._where for b in range(0, 4))
        assert not any(b in p._where for b in range(4, 8))
        assert all(b in p._where for b in range(20, 28))  # not yet: deadline pending
        await trio.sleep(1.0)  # past the deadline
        assert sum(b in p._where for b in range(20, 28)) == 4
        s = p.statistics().per_principal
        assert (s[P1].reclaim_sent, s[P1].reclaim_answered, s[P1].reclaim_missed) == (1, 1, 0)
        assert (s[P2].reclaim_sent, s[P2].reclaim_answered, s[P2].reclaim_missed) == (1, 0, 1)
        assert s[P1].frames == 4 and s[P2].frames == 4
        h1.cancel()
        assert P1 not in p._subs
        nursery.cancel_scope.cancel()
    check_invariants(p)


async def test_reclaim_settles_when_released_and_counts_who_answered(
        device: BlockDevice, autojump_clock) -> None:
    """A request settles as soon as the principal dropped what was asked (no need to
    wait for the deadline); an answer naming another ticket answers nothing; and a
    silent principal whose frames went some other way (here: freed) still counts as
    missed, with nothing more taken from it."""
    p = Pager(device, nframes=32, policy="hinted", reclaim_grace=5.0)
    asked: dict[int, list] = {1: [], 2: []}
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        p.on_reclaim(P1, lambda n, d: asked[1].append((n, d)))
        p.on_reclaim(P2, lambda n, d: asked[2].append((n, d)))
        await p.read(0, 8, principal=P1, file=1)
        await p.read(20, 8, principal=P2, file=2)
        t0 = trio.current_time()
        p.configure_banks(banks(p1=(0, 4), p2=(0, 4)))
        await trio.sleep(0.1)
        assert asked[1] == [(4, t0 + 5.0)] and asked[2] == [(4, t0 + 5.0)]
        ticket1, n1, _ = p.pending_reclaim(P1)
        ticket2, _, _ = p.pending_reclaim(P2)
        assert n1 == 4 and ticket1 != ticket2
        assert not p.answer_reclaim(P1, 4, ticket=ticket2)  # not P1's request
        await p.advise(1, [(0, 0, 4)], principal=P1, dontneed=True)  # its first blocks
        await trio.sleep(0.1)
        assert p.pending_reclaim(P1) is None and trio.current_time() < t0 + 1
        s = p.statistics().per_principal
        assert (s[P1].reclaim_sent, s[P1].reclaim_answered, s[P1].reclaim_missed) == (1, 1, 0)
        assert s[P1].frames == 4 and all(b in p._where for b in range(4, 8))
        assert not p.answer_reclaim(P1, 0, ticket=ticket1)  # settled already
        await p.discard(20, 4, principal=P0)  # P2's frames go, but not by P2's doing
        await trio.sleep(6.0)
        s = p.statistics().per_principal
        assert (s[P2].reclaim_sent, s[P2].reclaim_answered, s[P2].reclaim_missed) == (1, 0, 1)
        assert s[P2].frames == 4 and s[P2].evictions == 0
        nursery.cancel_scope.cancel()
    check_invariants(p)


async def test_unsubscribed_principal_over_its_ceiling_is_reclaimed_at_once(
        device: BlockDevice, autojump_clock) -> None:
    p = Pager(device, nframes=32, policy="principal")
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await p.read(0, 10, principal=P1)
        p.configure_banks(banks(p1=(0, 3)))
        await trio.sleep(0.01)
        assert p.statistics().resident == {P1: 3}
        nursery.cancel_scope.cancel()


# -- traces ----------------------------------------------------------------------------------


async def test_trace_records_every_access_and_replays(device: BlockDevice, tmp_path: Path) -> None:
    p = Pager(device, nframes=8, policy="hinted", writeback=True)
    path = tmp_path / "t.trace"
    with open(path, "wb") as f:
        p.start_trace(f)
        p.set_file_hints(3, priority=2, discardable=True)
        await p.write(0, blk(1, 2), principal=P1, file=3, fblock=0)
        await p.read(0, 2, principal=P2, file=3, fblock=0)
        await p.read(10, 1, principal=P1, file=4, fblock=7)
        await p.advise(4, [(7, 10, 1)], principal=P1, dontneed=True)
        await p.discard(0, 2, principal=P1)
        await p.writeback_file(4)
        p.stop_trace()
    recs = read_trace(path)
    assert [tr.OP_NAMES[o] for o in recs["op"]] == [
        "write", "read", "read", "advise", "discard", "writeback_file"]
    assert recs["principal"].tolist() == [1, 2, 1, 1, 1, 0]
    assert recs["block"].tolist()[:5] == [0, 0, 10, 10, 0]
    assert recs["fblock"].tolist()[:4] == [0, 0, 7, 7]
    assert recs["count"].tolist()[:5] == [2, 2, 1, 1, 2]
    assert recs["priority"][0] == 2 and recs["flags"][0] & tr.F_DISCARDABLE
    assert recs["flags"][3] & tr.F_DONTNEED
    assert (recs["time"] >= 0).all()
    for policy in POLICIES:
        r = await replay_async(recs, policy=policy, nframes=8)
        assert r.reads == 3 and r.hits == 2 and r.per_principal[2].hits == 2
        assert r.writeback_bytes == 0  # discarded before any write-back


def test_trace_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello world, not a trace")
    with pytest.raises(tr.TraceFormatError, match="is not a sluice trace"):
        read_trace(bad)
    recs = tr.make_records([(0.0, 1, 1, 0, 0, 5, tr.READ, 0, 0)])
    tr.write_trace(tmp_path / "ok", recs)
    (tmp_path / "cut").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(tr.TraceFormatError, match="truncated"):
        read_trace(tmp_path / "cut")
    assert read_trace(tmp_path / "ok")["block"].tolist() == [5]


def test_a_trace_names_its_principals(tmp_path: Path) -> None:
    """The names trailer (pager/trace.py): the records read as before, the names come
    with them, the header says SLTRACE2 (a reader of SLTRACE1 alone refuses it rather
    than take the names for records), and a trailer cut short is an error, not records."""
    recs = tr.make_records([(0.0, 1, 1, 0, 0, 5, tr.READ, 0, 0)] * 2)
    path = tmp_path / "named"
    tr.write_trace(path, recs)
    assert tr.load_trace(path)[1] == {}
    with open(path, "r+b") as f:
        tr.name_principals(f, {0: "root", 1: "db"})
    assert path.read_bytes()[:8] == b"SLTRACE2"
    records, names = tr.load_trace(path)
    assert records["block"].tolist() == [5, 5] and names == {0: "root", 1: "db"}
    assert read_trace(path)["block"].tolist() == [5, 5]
    (tmp_path / "cut").write_bytes(path.read_bytes()[:-5])
    with pytest.raises(tr.TraceFormatError, match="names of principals are missing"):
        read_trace(tmp_path / "cut")


def _named_trace(path: Path, blob: bytes, *, magic: bytes = b"SLTRACE2", flags: int = 1,
                 length: int | None = None) -> Path:
    """A trace of one record with `blob` as its names trailer, made by hand."""
    recs = tr.make_records([(0.0, 1, 1, 0, 0, 5, tr.READ, 0, 0)])
    head = magic + struct.pack("<II", tr.TRACE_DTYPE.itemsize, flags)
    n = len(blob) if length is None else length
    path.write_bytes(head + recs.tobytes() + blob + b"SLNAMES1" + struct.pack("<II", n, 0))
    return path


@pytest.mark.parametrize("blob, what", [
    (b"[" * 100_000 + b"]" * 100_000, "nested past the recursion limit"),
    (b'{"1": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "a nested value"),
    (b'{"1": [1, 2]}', "a name that is not a string"),
    (b'{"1": NaN}', "NaN"),
    (b'{"1": "\\u001b[31mEVIL\\nroot"}', "a name with control characters"),
    (b'{"-5": "x"}', "a negative id"),
    (b'{" 7 ": "x"}', "an id with spaces"),
    (b'{"1_0": "x"}', "an id with an underscore"),
    (b'{"1": ""}', "an empty name"),
    (b'{"1": "' + b"x" * 300 + b'"}', "a name too long"),
    (b"\xff\xfe", "bytes that are not UTF-8"),
    (b'["root"]', "a list"),
])
def test_a_hostile_names_trailer_is_one_error(tmp_path: Path, blob: bytes,
                                              what: str) -> None:
    """A trace is anyone's file: a names trailer that is not a JSON object of decimal
    ids and printable names is a TraceFormatError (one line from pager.replay), never a
    traceback, a name that rewrites the terminal, or records (review of stop 32)."""
    path = _named_trace(tmp_path / "t", blob)
    with pytest.raises(tr.TraceFormatError, match="not a JSON object of ids"):
        tr.load_trace(path)


def test_a_trace_header_with_unknown_flags_or_a_huge_trailer_is_refused(
        tmp_path: Path) -> None:
    ok = b'{"1": "db"}'
    assert tr.load_trace(_named_trace(tmp_path / "ok", ok))[1] == {1: "db"}
    with pytest.raises(tr.TraceFormatError, match="unknown header flags 0x3"):
        tr.load_trace(_named_trace(tmp_path / "f3", ok, flags=3))
    with pytest.raises(tr.TraceFormatError, match="unknown header flags 0x1"):
        tr.load_trace(_named_trace(tmp_path / "v1", ok, magic=b"SLTRACE1"))
    with pytest.raises(tr.TraceFormatError, match="unknown header flags 0x0"):
        tr.load_trace(_named_trace(tmp_path / "f0", ok, flags=0))
    big = b'{"1": "' + b"x" * 200 + b'"' + b', "2": "y"' * 110_000 + b"}"
    with pytest.raises(tr.TraceFormatError, match="more than the 1048576"):
        tr.load_trace(_named_trace(tmp_path / "big", big))
    with pytest.raises(tr.TraceFormatError, match="missing or cut short"):
        tr.load_trace(_named_trace(tmp_path / "long", ok, length=0xFFFFFFFF))


async def test_memory_device_is_a_real_device() -> None:
    d = memory_device(64, block_size=BS)
    await d.write(3, blk(2, 2), principal=P1)
    assert await d.read(3, 2, principal=P0) == blk(2, 2)
    assert await d.read(10, 1, principal=P0) == bytes(BS)
    await d.discard(3, 1, principal=P0)
    assert await d.read(3, 2, principal=P0) == bytes(BS) + blk(2, 2)[BS:]


async def test_a_client_that_never_answers_stalls_nobody(device: BlockDevice,
                                                        autojump_clock) -> None:
    """While a reclaim request to a silent client is pending, another principal that
    needs frames gets them at once (from the silent one's, if nobody else has any),
    and the silent principal is held to its ceiling at the deadline."""
    p = Pager(device, nframes=16, policy="hinted", reclaim_grace=10.0)
    p.low_watermark = 0  # no free reserve: the full pool alone asks for nothing
    asked: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        p.on_reclaim(P2, lambda n, d: asked.append((n, d)))
        await p.read(0, 16, principal=P2)  # the whole pool
        p.configure_banks(banks(p2=(0, 8)))
        await trio.sleep(0.1)
        assert asked == [(8, pytest.approx(10.0))]
        t = trio.current_time()
        assert await p.read(40, 6, principal=P1) == bytes(6 * BS)
        assert trio.current_time() == t  # no wait for the deadline
        assert p.statistics().resident == {P1: 6, P2: 10}
        await trio.sleep(10.0)
        s = p.statistics()
        assert s.resident == {P1: 6, P2: 8}
        assert s.per_principal[P2].reclaim_missed == 1
        nursery.cancel_scope.cancel()
    check_invariants(p)


async def test_a_client_that_missed_a_request_is_not_spared_by_the_next(
        device: BlockDevice, autojump_clock) -> None:
    """A principal with a reclaim request pending is left to answer it — but not once it
    has missed one: a subscriber that never answers always has a request pending and
    would keep its frames at everyone else's expense (hostile probe 3, F2: another
    tenant's working set went from 34% hits to 1%)."""
    P3 = PrincipalId(3)
    p = Pager(device, nframes=16, policy="hinted", reclaim_grace=10.0)
    p.low_watermark = 0
    asked: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        p.on_reclaim(P2, lambda n, d: asked.append((n, d)))
        await p.read(0, 12, principal=P2)
        await p.read(20, 4, principal=P3)
        p.configure_banks(banks(p2=(0, 8)))
        await trio.sleep(10.1)  # the first request: missed, trimmed by policy
        s = p.statistics()
        assert s.per_principal[P2].reclaim_missed == 1 and s.resident[P2] == 8
        await p.read(40, 4, principal=P1)
        assert p.statistics().resident == {P1: 4, P2: 8, P3: 4}
        p.configure_banks(banks(p2=(0, 7)))  # a second request, pending
        await trio.sleep(0.1)
        assert len(asked) == 2 and p.pending_reclaim(P2) is not None
        t = trio.current_time()
        await p.read(50, 2, principal=P1)
        assert trio.current_time() == t
        # the frames came from P2, furthest above its guarantee, not from P3
        assert p.statistics().resident == {P1: 6, P2: 6, P3: 4}
        nursery.cancel_scope.cancel()
    check_invariants(p)


async def test_a_stream_does_not_push_out_a_working_set_below_an_equal_share(
        tmp_path: Path, autojump_clock) -> None:
    """Default banks (no guarantees): P1 loops over a working set of a quarter of the
    pool while P2 streams through several times the pool. Background reclaim takes
    from those above an equal share first, so P1's set stays resident; before, every
    principal gave in proportion to its size (hostile probe 3, F3: ~34% hits)."""
    device = make_device(tmp_path / "dev", nblocks=1024)
    for policy in ("principal", "hinted"):
        p = Pager(device, nframes=64, policy=policy)
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run)
            for rnd in range(8):
                await p.read(0, 16, principal=P1, file=1)
                for b in range(100 + rnd * 96, 100 + rnd * 96 + 96, 4):
                    await p.read(b, 4, principal=P2, file=2, fblock=b - 100)
                    await trio.sleep(0.001)  # the reclaim task runs between reads
            s = p.statistics().per_principal[P1]
            assert s.misses <= 16 + 4, (policy, s.misses, s.hits)
            nursery.cancel_scope.cancel()
        check_invariants(p)
    device.close()


def test_replay_command_compares_policies(tmp_path: Path, capsys) -> None:
    from pager.replay import main
    rows = [(0.0, 1, 1, 3, i % 40, i % 40, tr.READ, 0, 0) for i in range(400)]
    rows += [(0.0, 2, 1, 4, i, 100 + i, tr.READ, tr.F_SEQUENTIAL, 0) for i in range(200)]
    tr.write_trace(tmp_path / "t", tr.make_records(rows))
    assert main([str(tmp_path / "t"), "--frames", "64"]) == 0
    out = capsys.readouterr().out
    assert "600 records, cache 64 frames" in out
    lines = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[2:]}
    assert lines[("hinted", "all")][2:4] == ["600", "0.600"]  # 360 loop hits of 600 reads
    assert main([str(tmp_path / "missing")]) == 1
    assert "python -m pager.replay: cannot read" in capsys.readouterr().err


async def test_write_during_a_fill_wins(tmp_path: Path, autojump_clock) -> None:
    """A write-back write to a block whose fill is in flight lands in the FILLING frame;
    the fill then leaves the frame alone (it is newer) and hands the reader the new
    data. Nothing older ever overwrites it."""
    device = make_device(tmp_path / "dev", profile="hdd")
    try:
        await device.write(3, blk(1), principal=P0)
        p = Pager(device, nframes=8, writeback=True)
        got = {}

        async def reader() -> None:
            got["r"] = await p.read(3, 1, principal=P1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.0001)  # the fill is in flight
            assert p._state[p._where[3]] == 1  # FILLING
            await p.write(3, blk(2), principal=P2)
        assert got["r"] == blk(2)
        f = p._where[3]
        assert p._state[f] == DIRTY and bytes(p._frames[f]) == blk(2)
        assert await device.read(3, 1, principal=P0) == blk(1)
        await p.flush()
        assert await device.read(3, 1, principal=P0) == blk(2)
        check_invariants(p)
    finally:
        device.close()


async def test_failed_fill_leaves_no_frame_behind(device: BlockDevice) -> None:
    """A device error during a fill frees the frames it had taken (nothing half-filled
    stays resident) and reaches the reader."""
    from blockdev import ChecksumError
    await device.write(0, blk(1, 4), principal=P0)
    device._csum[2] ^= 1  # block 2 now fails its checksum
    p = Pager(device, nframes=8)
    with pytest.raises(ChecksumError):
        await p.read(0, 4, principal=P1)
    assert p.statistics().frames_used == 0
    check_invariants(p)
    assert await p.read(0, 2, principal=P1) == blk(1, 4)[:2 * BS]


async def test_sieve_resists_a_scan_that_clock_does_not(device: BlockDevice) -> None:
    """Within a principal, SIEVE keeps blocks that were used again over a one-time
    scan; the baseline's CLOCK gives the scan's blocks the same second chance and
    loses the hot ones."""
    kept = {}
    for policy in ("principal", "global-lru"):
        p = Pager(device, nframes=8, policy=policy)
        for _ in range(2):
            for b in range(4):
                await p.read(b, 1, principal=P1)
        for b in range(20, 44):  # a scan three times the pool
            await p.read(b, 1, principal=P1)
        kept[policy] = sum(b in p._where for b in range(4))
        check_invariants(p)
    assert kept == {"principal": 4, "global-lru": 0}


def test_no_pager_class_is_over_400_lines() -> None:
    """Issue 7: `Pager` is made of one class per concern (pager/pool.py's docstring
    lists them), none over about 400 lines, and the public names stay where callers
    import them from."""
    import ast

    import pager
    from pager import pool

    root = Path(pager.__file__).parent
    sizes = {}
    for path in sorted(root.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert sizes and max(sizes.values()) <= 400, sizes
    assert pager.Pager is pool.Pager and pager.ReclaimSubscription is pool.ReclaimSubscription
    assert pager.FrameNo is pool.FrameNo and pool.MAX_RANGE_HINTS == 64


@pytest.mark.parametrize("policy", ["hinted", "global-lru"])
async def test_write_within_a_resident_frame_is_a_merged_write(device: BlockDevice,
                                                              policy: str) -> None:
    """`write_within_nowait` (part of a block written into its resident frame: fio's
    16-byte requests) leaves the pool as `write` of the merged block would: contents,
    dirty state and dirtier, the charge moved to the new dirtier, `_redirty` of a
    frame under write-back; and it does nothing when it cannot (not resident,
    write-through, the writer over its dirty share)."""
    from pager.cache import DIRTY, WRITEBACK
    p = Pager(device, nframes=8, policy=policy, writeback=True)
    assert not p.write_within_nowait(5, 3, b"xyz", principal=P1)  # not resident
    await p.write(5, blk(1), principal=P1, file=9, fblock=0)
    await p.flush()  # clean, equal to the device
    f = p._where[5]
    assert p._state[f] != DIRTY
    assert p.write_within_nowait(5, 3, b"xyz", principal=P2, file=9, fblock=0)
    want = blk(1)[:3] + b"xyz" + blk(1)[6:]
    assert p._state[f] == DIRTY and p._dirtier[f] == P2
    assert await p.read(5, 1, principal=P0) == want
    assert p.statistics().per_principal[P2].dirty == 1
    assert p.write_within_nowait(5, BS - 2, b"ab", principal=P1, file=9, fblock=0)
    want = want[:BS - 2] + b"ab"
    s = p.statistics()
    assert p._dirtier[f] == P1 and s.per_principal[P1].dirty == 1 and s.dirty == 1
    p._state[f] = WRITEBACK  # a write-back on its way: written again when it lands
    assert p.write_within_nowait(5, 0, b"q", principal=P1, file=9, fblock=0)
    assert p._redirty[f]
    p._state[f] = DIRTY
    p._redirty[f] = False
    want = b"q" + want[1:]
    await p.flush()
    assert await device.read(5, 1, principal=P0) == want
    check_invariants(p)
    through = Pager(device, nframes=8, writeback=False)
    await through.read(5, 1, principal=P1)
    assert not through.write_within_nowait(5, 0, b"z", principal=P1)
    # over its dirty share: `write` throttles the writer, this does nothing
    await p.write(6, blk(2), principal=P1)
    p.dirty_ratio = 1e-9
    assert not p.write_within_nowait(5, 0, b"z", principal=P1)
    assert await p.read(5, 1, principal=P0) == want


async def test_range_hints_are_bounded_per_tenant_and_looked_up_per_owner(
        device: BlockDevice) -> None:
    """Probe 20, F3: range hints were one list per file, scanned whole for every frame
    of the file mapped, with 64 kept per principal and no bound across a tenant's
    children: 250 children's hints on one file made another tenant's reads of it scan
    16,000 entries a block (23 -> 4.9 MB/s). Now they are kept per file and principal
    (a frame looks in its owner's list only) and a tenant's principals keep at most
    MAX_TENANT_RANGE_HINTS together, its least recently advised lists forgotten first;
    another tenant's hints are never pushed out."""
    from pager.hints import MAX_RANGE_HINTS, MAX_TENANT_RANGE_HINTS
    tenant, victim = PrincipalId(10), PrincipalId(20)
    children = [PrincipalId(100 + i) for i in range(100)]
    tree = {ROOT: BankNode(ROOT, None, "root"),
            tenant: BankNode(tenant, ROOT, "t"), victim: BankNode(victim, ROOT, "v")}
    for c in children:
        tree[c] = BankNode(c, tenant, f"c{c}")
    p = Pager(device, nframes=64, policy="hinted")
    p.configure_banks(tree)
    await p.advise(7, [(0, 0, 4)], principal=victim, priority=5)
    for c in children:
        for k in range(MAX_RANGE_HINTS):
            await p.advise(7, [(k % 32, k % 32, 1)], principal=c, priority=k % 7)
    rh = p._range_hints[7]
    theirs = sum(len(lst) for owner, lst in rh.items() if owner != victim)
    assert theirs <= MAX_TENANT_RANGE_HINTS < len(children) * MAX_RANGE_HINTS
    assert p._hint_total[tenant] == theirs
    assert children[0] not in rh and len(rh[children[-1]]) == MAX_RANGE_HINTS
    assert rh[victim] == [(0, 4, 5, None)]
    # the victim's frames get the victim's hints, the tenant's theirs
    await p.read(0, 4, principal=victim, file=7, fblock=0)
    assert [int(p._prio[p._where[b]]) for b in range(4)] == [5, 5, 5, 5]
    await p.read(40, 1, principal=children[-1], file=7, fblock=30)
    assert int(p._prio[p._where[40]]) == (MAX_RANGE_HINTS - 2) % 7 == 6
    # a removed file takes its hints and their count with it
    p.forget_file(7)
    assert not p._range_hints and not p._hint_total and not p._hint_lists
    check_invariants(p)


async def test_range_hints_of_a_principal_moved_to_another_tenant_count_there(
        device: BlockDevice) -> None:
    """Review of stop 28, F4: a principal moved under another tenant kept its range
    hints counted under the old tenant until it advised that file again, so the old
    tenant's own advice then pushed out the moved principal's lists (another tenant's
    by now) and the new tenant's bound did not see them. The counts follow the tree."""
    from pager.hints import MAX_RANGE_HINTS, MAX_TENANT_RANGE_HINTS
    a, b, c = PrincipalId(10), PrincipalId(20), PrincipalId(100)
    files = MAX_TENANT_RANGE_HINTS // MAX_RANGE_HINTS

    def tree(c_parent: PrincipalId) -> dict:
        return {ROOT: BankNode(ROOT, None, "root"), a: BankNode(a, ROOT, "a"),
                b: BankNode(b, ROOT, "b"), c: BankNode(c, c_parent, "c")}

    p = Pager(device, nframes=64, policy="hinted")
    p.configure_banks(tree(a))
    for f in range(files):
        for k in range(MAX_RANGE_HINTS):
            await p.advise(1000 + f, [(k, k, 1)], principal=c, priority=3)
    assert p._hint_total[a] == MAX_TENANT_RANGE_HINTS
    p.configure_banks(tree(b))  # c moves to tenant b
    assert p._hint_total.get(a, 0) == 0 and p._hint_total[b] == MAX_TENANT_RANGE_HINTS
    for f in range(files):  # tenant a's own advice, up to its bound
        for k in range(MAX_RANGE_HINTS):
            await p.advise(2000 + f, [(k, k, 1)], principal=a, priority=5)
    assert all(len(p._range_hints[1000 + f][c]) == MAX_RANGE_HINTS for f in range(files))
    assert p._hint_total[a] == p._hint_total[b] == MAX_TENANT_RANGE_HINTS
    # tenant b's bound counts c's lists now: b's own advice pushes out c's oldest
    await p.advise(3000, [(0, 0, 1)], principal=b, priority=1)
    assert c not in p._range_hints.get(1000, {}) and p._hint_total[b] == MAX_TENANT_RANGE_HINTS - MAX_RANGE_HINTS + 1
    check_invariants(p)
