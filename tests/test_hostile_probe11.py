"""The eleventh hostile probe's findings (docs/RELIABILITY.md, "Stop 23: probe 11"):
work of one tenant's that held every other tenant's requests in one step of the
daemon's loop, found after the request itself had returned or in paths the tenth probe
did not reach. Each is a regression test that fails on the code before its fix.

- F2: the reaper discarded and released all the blocks a commit freed from one file in
  one step (0.2-0.3 s for an unlink of 50,000 extents); now REAP_RUNS_PER_STEP runs a
  step.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fs.commit import REAP_RUNS_PER_STEP
from test_filesystem import CALLER, ROOT, Volume
from test_hostile_probe10 import bigvol  # noqa: F401 - a fixture

BS = 4096


async def _scattered(fs, name: bytes, n: int) -> tuple[int, object]:
    """A file of `n` one-block extents whose device blocks are not adjacent (a second
    file's blocks between them): n freed runs that no merge joins."""
    h, node = fs.create(ROOT, name, 0o644, os.O_RDWR, CALLER)
    g, _other = fs.create(ROOT, name + b".gap", 0o644, os.O_RDWR, CALLER)
    for b in range(n):
        assert await fs.write(h.fh, b * BS, b"x" * BS) == BS
        assert await fs.write(g.fh, b * BS, b"y" * BS) == BS
    await fs.release(g.fh)
    assert len(fs._extents(node)) == n
    return h.fh, node


async def test_the_reaper_gives_the_loop_back_between_parts(bigvol: Volume) -> None:
    """F2. The blocks of an unlinked file of 3,000 scattered extents reach the
    allocator after the durable commit, a bounded number of runs a step; every block
    is free again and fsck is clean."""
    fs = bigvol.fs
    n = 3000
    fh, _node = await _scattered(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    free = fs.alloc.free
    await fs.unlink(ROOT, b"f")
    fs._reaper_running = True  # (as mounted: the commit queues the lists, no more)
    try:
        await fs.commit(durable=True)
    finally:
        fs._reaper_running = False
    assert fs.reaping_blocks == n
    # Another task, between its steps, sees the free count grow a part at a time
    # (before: in one step, from `free` to `free + n`).
    seen: list[int] = []
    done = False

    async def watch() -> None:
        while not done:
            if not seen or seen[-1] != fs.alloc.free:
                seen.append(fs.alloc.free)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.lowlevel.checkpoint()
        await fs._reap_queued()
        done = True
    assert seen[0] == free and len(seen) >= n // REAP_RUNS_PER_STEP, seen
    assert max(b - a for a, b in zip(seen, seen[1:])) <= REAP_RUNS_PER_STEP
    assert fs.alloc.free == free + n and fs.reaping_blocks == 0 and not fs._reap
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_a_layout_over_many_holes_and_sealed_runs_gives_the_loop_back(
        bigvol: Volume) -> None:
    """F3b. A direct client's write layout over a file of 3,000 blocks, every other one
    a hole and the rest sealed one-block runs: the holes are allocated a part a step
    (before: all in one step, and every sealed run of the range listed twice to take
    the first LAYOUT_COW_RUNS); the first LAYOUT_COW_RUNS runs are copied, the rest
    stay sealed; the contents are unchanged."""
    from fs.layouts import LAYOUT_COW_RUNS
    from fs.space import EXTENTS_PER_STEP
    from test_filesystem import read_file
    from test_hostile_probe10 import _sparse, _sparse_content, _steps_of_others
    fs = bigvol.fs
    n = 3000
    fh, node = await _sparse(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    emap = fs._extents(node)
    assert len(emap.sealed_runs(0, n)) == n // 2
    g = fs.grant_direct(node, True, True, CALLER)
    ran = await _steps_of_others(lambda: fs.layout_get(g, 0, n * BS))
    assert ran >= (n // 2) // (EXTENTS_PER_STEP // 2) - 1, ran
    assert len(emap.sealed_runs(0, n)) == n // 2 - LAYOUT_COW_RUNS
    assert not emap.holes(0, n)
    await fs.close_direct(g)
    assert await read_file(fs, node.id) == _sparse_content(n)[:node.size]
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_a_closed_files_extent_map_leaves_the_cache(bigvol: Volume, monkeypatch) -> None:
    """F1 (in part). A tenant that keeps many files looked up keeps their inodes
    cached, and every object they hold is walked at each full garbage collection
    (0.1-0.7 s with 300,000). A closed file's extent map, five containers, is dropped
    from the cache unless still in use: a file with FRESH blocks waits for the commit
    that seals them, a file another handle or a direct client's grant holds keeps it.
    The map comes back from meta.db when needed, with the same contents. (Only while
    the cache holds more than DROP_EXTENTS_CACHED inodes: below that a reopen would pay
    a query for nothing; here the bound is lowered to 100.)"""
    from fs import inodes as inodes_mod
    from test_filesystem import read_file
    fs = bigvol.fs
    keep = fs.create(ROOT, b"small", 0o644, os.O_RDWR, CALLER)[0]
    assert await fs.write(keep.fh, 0, b"s" * BS) == BS
    await fs.sync()
    small = fs.handle(keep.fh).inode
    await fs.release(keep.fh)
    assert small.extents is not None  # (a small cache: kept)
    monkeypatch.setattr(inodes_mod, "DROP_EXTENTS_CACHED", 100)
    nodes = []
    for i in range(200):
        h, node = fs.create(ROOT, b"f%d" % i, 0o644, os.O_RDWR, CALLER)
        assert await fs.write(h.fh, 0, bytes([i % 251 + 1]) * (3 * BS)) == 3 * BS
        await fs.release(h.fh)
        nodes.append(node)
    # written, not yet committed: FRESH, kept for the commit's seal
    assert all(n.extents is not None for n in nodes)
    await fs.sync()
    for n in nodes:  # committed: the next close drops them
        h = fs.open(n.id, os.O_RDONLY, CALLER)
        other = fs.open(n.id, os.O_RDONLY, CALLER)
        await fs.release(h.fh)
        assert n.extents is not None  # (another handle is open)
        await fs.release(other.fh)
    assert all(n.extents is None for n in nodes)
    # a direct client's grant shares the map: kept while it is there
    g = fs.grant_direct(nodes[0], True, False, CALLER)
    emap = fs._extents(nodes[0])
    h = fs.open(nodes[0].id, os.O_RDONLY, CALLER)
    await fs.release(h.fh)
    assert nodes[0].extents is emap
    await fs.close_direct(g)
    for i, n in enumerate(nodes):
        assert await read_file(fs, n.id) == bytes([i % 251 + 1]) * (3 * BS)
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def _pager_with_a_cached_file(tmp_path: Path):
    """A hinted pager of 1,024 frames applying file hints 64 frames at once, with 960
    frames of file 7 cached for principal 1: (device, pager, principal, those frames).
    The caller closes the device."""
    from blockdev import PrincipalId
    from pager import Pager
    from test_pager import make_device
    device = make_device(tmp_path / "dev", nblocks=4096)
    p = Pager(device, nframes=1024, policy="hinted")
    p.rehint_step = 64
    me = PrincipalId(1)
    for b in range(0, 960, 8):
        await p.read(b, 8, principal=me, file=7, fblock=b)
    frames = [int(f) for f in range(len(p._file_m)) if p._file_m[f] == 7]
    assert len(frames) == 960
    return device, p, me, frames


async def test_a_file_hint_applies_to_many_cached_pages_a_part_a_step(tmp_path: Path) -> None:
    """F6. A file hint set on a file of many cached pages re-hinted every page in one
    step (0.1-0.3 s with 100,000). Now `rehint_step` pages at once, the rest a part a
    step in `settle_hints`, which the request that set it awaits; then every page of
    the file has the hint, and pages of other files keep theirs."""
    device, p, me, frames = await _pager_with_a_cached_file(tmp_path)
    try:
        await p.read(1000, 8, principal=me, file=8, fblock=0)
        p.set_file_hints(7, priority=9, discardable=True)
        assert sum(int(p._prio_m[f]) == 9 for f in frames) == 64  # at once: one part
        steps = 0
        done = False

        async def other() -> None:  # (its steps from before settle_hints begins)
            nonlocal steps
            while not done:
                await trio.lowlevel.checkpoint()
                steps += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            await p.settle_hints()
            done = True
        assert steps >= 960 // 64 - 2, steps
        assert all(int(p._prio_m[f]) == 9 and bool(p._disc_m[f]) for f in frames)
        assert all(int(p._prio_m[f]) == 0 for f in range(len(p._file_m)) if p._file_m[f] == 8)
        p.set_file_hints(7, priority=0, discardable=False)  # and back, the same way
        await p.settle_hints()
        assert not any(int(p._prio_m[f]) or bool(p._disc_m[f]) for f in frames)
    finally:
        device.close()


async def test_a_many_extent_map_is_loaded_a_part_a_step(bigvol: Volume) -> None:
    """F5. The first touch of a file of many extents after a mount loaded its whole map
    in one step (0.07 s at 50,000 extents). `preload_extents` (an open, a truncate,
    the freeing of a file, before anything takes the map) loads LOAD_EXTENTS_PAGE rows
    a step, and the map is the one a whole load gives."""
    from fs.inodes import LOAD_EXTENTS_PAGE
    from test_filesystem import read_file
    from test_hostile_probe10 import _content, _fragmented, _steps_of_others
    fs = bigvol.fs
    n = 5000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    whole = fs._extents(node).owned_extents()
    node.extents = None  # (as after a mount)
    ran = await _steps_of_others(lambda: fs.preload_extents(node))
    assert ran >= n // LOAD_EXTENTS_PAGE - 1, ran
    assert node.extents is not None and node.extents.owned_extents() == whole
    assert await read_file(fs, node.id) == _content(n)


def test_take_written_takes_the_first_ranges_of_a_window() -> None:
    """F4. `take_written` with a limit takes the first ranges inside the window, clipped
    at its edges, and leaves the rest pending, as taking them all in turns would."""
    import random

    from kernelshim import Grant, Rights
    for seed in range(300):
        rnd = random.Random(seed)
        ranges, pos = [], 0
        for _ in range(rnd.randint(0, 30)):
            pos += rnd.randint(1, 9)
            n = rnd.randint(1, 9)
            ranges.append([pos, pos + n])
            pos += n
        a = Grant(inode=1, generation=1, extents=None, rights=Rights.RW, principal=1)  # type: ignore[arg-type]
        b = Grant(inode=1, generation=1, extents=None, rights=Rights.RW, principal=1)  # type: ignore[arg-type]
        a.written = [list(r) for r in ranges]
        b.written = [list(r) for r in ranges]
        lo = rnd.randint(0, pos + 5)
        hi = lo + rnd.randint(0, pos + 5)
        whole = a.take_written(lo, hi)
        parts: list[tuple[int, int]] = []
        limit = rnd.randint(1, 4)
        while True:
            got = b.take_written(lo, hi, limit)
            assert len(got) <= limit
            if not got:
                break
            parts += got
        assert parts == whole, seed
        assert b.written == a.written, seed


async def test_a_direct_commit_of_many_ranges_gives_the_loop_back(bigvol: Volume) -> None:
    """F4. A direct client's commit of 3,000 written ranges took and saved them all
    in one step; now COMMIT_STEP at a time. The file has every byte written, its size
    is the last range's end, and fsck is clean."""
    from fs.layouts import COMMIT_STEP
    from test_filesystem import read_file
    from test_hostile_probe10 import _steps_of_others
    fs = bigvol.fs
    n = 3000
    h, node = fs.create(ROOT, b"f", 0o644, os.O_RDWR, CALLER)
    await fs.release(h.fh)
    g = fs.grant_direct(node, True, True, CALLER)
    await fs.layout_get(g, 0, 2 * n * BS)
    for b in range(0, 2 * n, 2):
        await fs.kernel.write(g, b * BS, bytes([b % 251 + 1]) * BS)
    ran = await _steps_of_others(lambda: fs.layout_commit(g, 0, 2 * n * BS))
    assert ran >= n // COMMIT_STEP - 1, ran
    assert node.size == (2 * n - 1) * BS
    await fs.close_direct(g)
    want = b"".join((bytes([b % 251 + 1]) if b % 2 == 0 else b"\0") * BS
                    for b in range(2 * n - 1))
    assert await read_file(fs, node.id) == want
    await fs.sync()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines



async def test_a_direct_open_never_grants_on_an_inode_dropped_meanwhile(bigvol: Volume) -> None:
    """Review of stop 23, 1. A direct client's open of a file of many extents whose map
    is not cached loads it a part a step; a FORGET from the kernel meanwhile dropped the
    inode object, and the grant went on the dropped object and its map: the client then
    read the mount's later writes as zeros. The path is now resolved again: the grant's
    map is the cached inode's, and the client reads what the mount wrote."""
    from fs.service import DirectService
    from kernelshim.principals import ROOT_PRINCIPAL
    from kernelshim.service import Credentials
    from test_hostile_probe10 import _fragmented
    fs = bigvol.fs
    n = 5000
    fh, node = await _fragmented(fs, b"f", n)
    await fs.release(fh)
    await fs.sync()
    ino = node.id
    fs.forget(ino, node.lookups)  # (as after a mount: nothing cached)
    assert ino not in fs._inodes
    looked = fs.lookup(ROOT, b"f")  # (the kernel's LOOKUP; its count as the reply's)
    assert looked.extents is None
    service = DirectService(fs)
    creds = Credentials(pid=os.getpid(), uid=0, gid=0)
    root = fs.principals.by_id(ROOT_PRINCIPAL)
    out = []

    async def opener() -> None:
        out.append(await service.open_path("f", os.O_RDWR, 0, creds, root))

    async def kernel_forgets() -> None:
        await trio.lowlevel.checkpoint()
        fs.forget(ino, 1)  # the FORGET comes while the open loads the map

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        nursery.start_soon(kernel_forgets)
    g = out[0]
    cached = fs.inode(ino)
    assert g.extents is fs._extents(cached)
    h = fs.open(ino, os.O_RDWR, CALLER)
    assert await fs.write(h.fh, n * BS, b"K" * BS) == BS
    await fs.release(h.fh)
    assert bytes(await fs.kernel.read(g, n * BS, BS)) == b"K" * BS
    await fs.close_direct(g)


async def test_storage_handed_over_during_a_preload_keeps_its_new_owner(bigvol: Volume) -> None:
    """Review of stop 23, 2. A principal's storage handed to another while a map was
    being loaded in parts: the rows were retagged behind the load and the map kept the
    removed principal on its first pages (later saved back into meta.db; fsck: blocks
    charged to a principal principals.json does not have). The load is dropped then,
    and the next use loads the map whole, with the new owner."""
    import collections

    from fs.inodes import Caller
    from fs.service import DirectService
    from kernelshim.banks import Banks
    fs = bigvol.fs
    alice = fs.principals.add("alice", owner_uid=1000, banks=Banks(), caller_uid=0)
    root = fs.principals.root
    ca = Caller(CALLER.uid, CALLER.gid, CALLER.pid, principal=alice.id)
    n = 5000
    h, node = fs.create(ROOT, b"f", 0o644, os.O_RDWR, ca)
    for b in reversed(range(n)):
        await fs.write(h.fh, b * BS, bytes([b % 251 + 1]) * BS)
    await fs.release(h.fh)
    await fs.sync()
    node.extents = None  # (as after a mount)
    service = DirectService(fs)

    async def mover() -> None:
        await trio.lowlevel.checkpoint()
        fs.principals.remove("alice", 0, move_to="root", save=False)
        await service.move_storage(alice, root, by=root)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.preload_extents, node)
        nursery.start_soon(mover)
    owners = collections.Counter(e[4] for e in fs._extents(node).owned_extents())
    assert set(owners) == {root.id}, owners
    h = fs.open(node.id, os.O_RDWR, CALLER)
    await fs.fallocate(h.fh, 0x10, 0, 100 * BS)  # rewrites rows of the first pages
    await fs.release(h.fh)
    await fs.sync()
    assert {r[4] for r in fs.md.load_extents(node.id)} == {root.id}
    fs.principals.save()
    report = await bigvol.fsck()
    assert (report.errors, report.left) == (0, 0), report.lines


async def test_a_range_hint_is_in_force_when_advise_returns(tmp_path: Path) -> None:
    """Review of stop 23, 4. `advise` over more cached pages than `rehint_step` left
    the rest to whoever settled the hints next; it now settles them before it returns."""
    device, p, me, frames = await _pager_with_a_cached_file(tmp_path)
    try:
        await p.advise(7, [(0, 0, 960)], principal=me, priority=5, discardable=True)
        assert all(int(p._prio_m[f]) == 5 and bool(p._disc_m[f]) for f in frames)
        assert not p._rehint_left
    finally:
        device.close()


async def test_a_direct_grant_is_refused_on_an_inode_being_freed(bigvol: Volume) -> None:
    """Review of stop 23, 5. `grant_direct` on an inode with no name and no handle (its
    unlink is freeing it) gave a grant already revoked; it is refused, as `open` is."""
    from fs.errors import NotFound
    fs = bigvol.fs
    h, node = fs.create(ROOT, b"f", 0o644, os.O_RDWR, CALLER)
    await fs.release(h.fh)
    node.nlink = 0  # (the state `_destroy` works in: its last name gone, no handle)
    with pytest.raises(NotFound):
        fs.grant_direct(node, True, True, CALLER)
    node.nlink = 1
