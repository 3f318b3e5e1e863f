"""The write-through frame cache: hits and misses, CLOCK eviction, coherence of writes,
bypass of large reads, discard, per-principal accounting, and a model-based property
test against a plain dict of block contents."""

from __future__ import annotations

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
    dirty counts equal dirty frames, and every resident frame sits on exactly one
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
    for f in used:
        counts[int(p._owner[f])] = counts.get(int(p._owner[f]), 0) + 1
        if p._state[f] in (DIRTY, WRITEBACK):
            dirty[int(p._dirtier[f])] = dirty.get(int(p._dirtier[f]), 0) + 1
    assert p.statistics().resident == counts
    assert {k: a.resident for k, a in p._acct.items() if a.resident} == counts
    assert {k: a.dirty for k, a in p._acct.items() if a.dirty} == dirty
    assert all(a.resident >= 0 and a.dirty >= 0 for a in p._acct.values())
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
