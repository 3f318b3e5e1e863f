# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Space: allocating blocks for a write (charged to the principal, the copy-on-write
reserve kept), relocating sealed blocks, host space under write-back, fallocate
(preallocate, punch hole, zero range) and giving back unused preallocation."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import trio

from kernelshim import (ExtentMap, FRESH, Grant, HOLE, PrincipalId, ROOT_PRINCIPAL, Rights,
                        SluiceError, UNWRITTEN)
from kernelshim.extents import block_span, blocks_to_cover, partial_edges, whole_blocks

from .allocator import Allocator
from .errors import BadHandle, FileTooLarge, InvalidArgument, NoSpace, NotSupported
from .inodes import Inode, MAX_FILE_SIZE, now_ns

if TYPE_CHECKING:
    from .filesystem import FileSystem


#: fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


#: extents a truncate or an unlink unmaps in one step of the loop (~0.3 ms; a file of
#: 50,000 extents unmapped in one step held every tenant's requests 0.1-0.2 s); the
#: default of `FileSystem.extents_per_step`, which the crash harness may set lower
#: (SLUICE_EXTENTS_PER_STEP, read in fs/mount.py) so that every few-extent file goes
#: through the parts and their crash rules
EXTENTS_PER_STEP = 128


def _take_tail(pool: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The last `n` blocks of the runs in `pool` (fewer if it has fewer), in order,
    cut off the pool's end."""
    out: list[tuple[int, int]] = []
    while n and pool:
        start, count = pool[-1]
        got = min(n, count)
        out.append((start + count - got, got))
        if got == count:
            pool.pop()
        else:
            pool[-1] = (start, count - got)
        n -= got
    out.reverse()
    return out


class Space:
    """Allocation and fallocate (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: the block allocator (`alloc`) and the copy-on-write reserve."""

    #: extents a part of a truncate, unlink, punch, zero or allocation looks at
    extents_per_step: int = EXTENTS_PER_STEP

    #: the free-block map (blocks freed by the open transaction wait in it)
    alloc: Allocator
    #: blocks new allocations leave free, so that overwriting committed data (which
    #: is relocated, see docs/dev/invariants.md R1) still works on a full volume
    cow_reserve: int

    def _refund_runs(self: FileSystem, runs: list[tuple[int, int, int]]) -> None:
        bs = self.block_size
        per_owner: dict[int, int] = {}  # one refund per owner, not per run
        for _dev, count, owner in runs:
            per_owner[owner] = per_owner.get(owner, 0) + count
        for owner, count in per_owner.items():
            self.principals.refund(self.principal(owner), space=count * bs)

    async def _release_unmapped(self: FileSystem, freed: list[tuple[int, int, int]],
                                revoked: list[Grant], *, refund: bool = True,
                                ino: int | None = None) -> None:
        """The one home of revoke -> drain -> refund -> free (docs/dev/invariants.md
        R3). The caller has unmapped `freed` (dev_block, count, owner) from a file's
        map and revoked every grant that could still address those blocks (`revoked`:
        revoke_nowait's or `_regrant`'s result), with no checkpoint in between, and has
        saved the shorter map in the open transaction. Here: refund the owners (unless
        the blocks were replaced for the same owners), wait until no write through the
        old grants is in flight (their principals' I/O limits waived: `drain_writes`),
        then hand the blocks to the allocator, which reuses them only after the commit
        that saved the map is durable and no request on the file that began before is
        in flight (the reaper's grace period: reads through the old grants may still
        be, and must not hold a truncate or an unlink, which may hold a directory's
        lock in the host kernel, for as long as a throttled tenant likes)."""
        if refund:
            self._refund_runs(freed)
        if revoked:
            await self.kernel.drain_writes(revoked)
        if freed:
            # (`ino`: the file they were unmapped from; their grace period waits only
            # for the requests on it — None: for every request in flight)
            self.alloc.free_later([(d, c) for d, c, _o in freed],
                                  None if ino is None else (ino,))

    async def _cow_blocks(self: FileSystem, emap: ExtentMap, b0: int, count: int, *,
                          principal: PrincipalId = ROOT_PRINCIPAL) -> ExtentMap | None:
        """Fresh device blocks for the sealed blocks of [b0, b0+count), as a map of the
        same file blocks (None when nothing there is sealed). Not charged: each replaces
        a block of the same owner, freed by the same transaction."""
        runs = emap.sealed_runs(b0, count)
        if not runs:
            return None
        await self._ensure_free(sum(c for _, c in runs), reserve=False, relocation=True)
        cow = ExtentMap()
        got: list[tuple[int, int]] = []
        for fb, cnt in runs:
            # No goal: where the last allocation ended (the allocator's cursor). The
            # block a relocation replaces is taken by definition, and a scan onwards
            # from it cost a 4 KiB random overwrite ~13 µs (a numpy window scan
            # through the file's own blocks), found the holes the last commits freed
            # there, whose host space the discard had punched (a reservation each:
            # fstatvfs and fallocate), and dragged the cursor among them. From the
            # cursor, a burst of overwrites lays its new blocks one after another,
            # each found without a scan in a chunk already reserved, and a
            # sequential overwrite stays sequential (docs/BENCHMARKS.md, "Direct 4 KiB
            # random writes"). The relocations' own cursor, not the one new data
            # takes: a file growing meanwhile keeps the blocks it continues into
            # (review of direct4, A2). Before the cursor, the blocks the last commits
            # freed that the reaper kept host-backed (`Allocator.keep`): no hole punch
            # when they were freed, no host reservation now (direct5).
            for start, length in self.alloc.allocate(cnt, relocation=True):
                cow.add(fb, start, length, FRESH)
                got.append((start, length))
                fb += length
        await self._reserve_host_space(got, relocation=True, cow=True, principal=principal)
        return cow

    async def _reserve_host_space(self: FileSystem, runs: list[tuple[int, int]], *,
                                  relocation: bool = False, cow: bool = False,
                                  principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """Host space under newly allocated blocks is reserved before the write into
        them is acknowledged (with write-back the data reaches the host later, in a
        write-back that must not fail for lack of space), with the headroom the
        device keeps for the metadata database: under write-through too, a tenant
        that filled a host smaller than the volume otherwise made the next commit
        fail and the volume read-only for everyone (hostile probe 5, H1). On failure
        (ENOSPC) the blocks go back to the free list unused. A `relocation` (COW: the
        same transaction frees the old blocks) may use half of that headroom, so that
        overwrites and a shrinking truncate still work on a full host (P5).
        `principal`: whose allocation (a refusal is logged once per principal and
        interval, L1). `cow`: `runs` came from `allocate(relocation=True)` and may be
        kept blocks, which go back to the kept pool on failure (`give_back`), never
        into the map's free blocks."""
        if not runs or len(runs) <= EXTENTS_PER_STEP and self.kernel.host_reserved(runs):
            return  # (the common case: inside chunks reserved already, R6; many runs:
            #          `reserve` looks at them a part a step)
        try:
            try:
                await self.kernel.reserve(runs, relocation=relocation, principal=principal)
            except SluiceError as exc:
                # A full host: the freed blocks the reaper kept host-backed for the
                # next relocations (`KEEP_FREED_BYTES`) give their space back first, as
                # the punch when they were freed did, and the reservation is tried
                # again (review of direct5, K1: else up to 32 MiB of free blocks held
                # host space and new data got ENOSPC).
                if exc.errno != errno.ENOSPC or not self.alloc.kept_blocks or \
                        not await self.discard_kept():
                    raise
                await self.kernel.reserve(runs, relocation=relocation, principal=principal)
        except BaseException:
            if cow:
                self.alloc.give_back(runs)
            else:
                self.alloc.release_now(runs)
            raise

    async def _ensure_free(self: FileSystem, need: int, *, reserve: bool = True,
                           relocation: bool = False) -> None:
        """Make sure `need` blocks can be allocated (NoSpace otherwise): a new allocation
        leaves the copy-on-write reserve alone, a relocation (`reserve=False`) may use it.
        The kept freed blocks (`Allocator.keep`) count as free: a `relocation` takes
        them as they are; for another allocation, which may not, they are discarded
        and released into the map first if the map's free blocks are too few."""
        keep = self.cow_reserve if reserve else 0

        def room() -> int:
            return self.alloc.free + self.alloc.kept_blocks - keep

        if need > room() and (self.alloc.pending_blocks or self._reap) and \
                need <= room() + self.alloc.pending_blocks + self.reaping_blocks:
            if self.alloc.pending_blocks:
                await self.commit()  # blocks freed by the open transaction become usable
            # ... once their grace period is over
            await self.wait_reaped(lambda: need <= room())
        if not relocation and self.alloc.kept_blocks and need > self.alloc.free - keep:
            await self.discard_kept()
        if need > (room() if relocation else self.alloc.free - keep):
            raise NoSpace(f"no space left on device ({max(0, room())} "
                          f"blocks free, {need} needed)")

    async def _blocks_that_fit(self: FileSystem, emap: ExtentMap, b0: int, count: int,
                               principal: PrincipalId) -> int:
        """How many blocks of [b0, b0+count), from b0 on, a write could allocate now: the
        holes among them fit in the free space and in the principal's space banks."""
        if self.alloc.pending_blocks:
            await self.commit()
        def room() -> int:  # (kept blocks too: `_ensure_free` frees them if needed)
            return self.alloc.free + self.alloc.kept_blocks - self.cow_reserve

        if self._reap and room() < count:
            await self.wait_reaped(lambda: room() >= count)
        budget = room()
        for q in self.principal(principal).chain():
            if q.banks.space is not None:
                budget = min(budget, (q.banks.space - q.usage.space) // self.block_size)
        for fb, cnt in emap.holes(b0, count):
            if cnt > budget:
                return fb - b0 + max(budget, 0)
            budget -= cnt
        return count

    async def _allocate(self: FileSystem, node: Inode, emap: ExtentMap, b0: int, count: int,
                        principal: PrincipalId) -> int:
        """Map the holes in [b0, b0+count) to newly allocated unwritten extents charged
        to `principal`; returns the number of blocks allocated. A range over more
        than EXTENTS_PER_STEP extents is counted, then mapped, EXTENTS_PER_STEP
        extents a step of the loop (`_allocate_in_parts`: a fallocate over a sparse
        file of 20,000 extents held the loop ~0.12 s in one step)."""
        end = b0 + count
        holes, pos = emap.holes_upto(b0, end, self.extents_per_step)
        many = pos < end
        need = (await self._tally(emap, b0, end))[1] if many else sum(c for _, c in holes)
        if not need:
            return 0
        who = self.principal(principal)
        self.principals.charge(who, space=need * self.block_size)
        try:
            await self._ensure_free(need)
            if many:
                await self._allocate_in_parts(node, emap, b0, end, need, principal)
            else:
                await self._allocate_blocks(node, emap, holes, principal)
        except BaseException:
            self.principals.refund(who, space=need * self.block_size)
            raise
        return need

    async def _allocate_blocks(self: FileSystem, node: Inode, emap: ExtentMap,
                               holes: list[tuple[int, int]], principal: PrincipalId) -> None:
        got: list[tuple[int, int, int]] = []
        for fb, cnt in holes:
            goal = emap.goal(fb)
            for start, length in self.alloc.allocate(cnt, goal):
                got.append((fb, start, length))
                fb += length
        await self._reserve_host_space([(start, length) for _fb, start, length in got],
                                       principal=principal)
        # One merge pass for many holes (a file of many one-block holes: one add()
        # each was O(holes x extents) in one step, as the punch was: RELIABILITY
        # 2026-12-01).
        emap.add_many([(fb, start, length, UNWRITTEN, principal) for fb, start, length in got])
        node.blocks = emap.blocks

    async def _allocate_in_parts(self: FileSystem, node: Inode, emap: ExtentMap, b0: int,
                                 end: int, need: int, principal: PrincipalId) -> None:
        """`_allocate` of a range over many extents, whose `need` hole blocks are
        counted and charged. All the blocks are allocated and their host space
        reserved first, in one call (all or nothing, as the charge: no other tenant's
        allocation between two parts can make it fail half done); then the holes are
        found and mapped to them in file order, EXTENTS_PER_STEP / 2 extents a step of
        the loop, shielded, each part saved (a crash in between loses UNWRITTEN
        reservations only, which read as zeros as the holes did; those past EOF,
        before a growing fallocate saves its size, the next mount drops: R4). The
        caller holds the node's lock: only these parts change the map meanwhile. The
        pool's blocks ascend with the file, so the runs still merge with each other."""
        pool = self.alloc.allocate(need, emap.goal(b0))
        await self._reserve_host_space(pool, principal=principal)
        pool.reverse()  # taken from its end: its first run first
        pos = b0
        try:
            with trio.CancelScope(shield=True):
                while pos < end:
                    # (half a part's extents: each hole is a new row to save)
                    holes, pos = emap.holes_upto(pos, end, max(1, self.extents_per_step // 2))
                    runs: list[tuple[int, int, int, int, int]] = []
                    for fb, cnt in holes:
                        while cnt:
                            start, have = pool[-1]
                            got = min(cnt, have)
                            runs.append((fb, start, got, UNWRITTEN, principal))
                            if got == have:
                                pool.pop()
                            else:
                                pool[-1] = (start + got, have - got)
                            fb += got
                            cnt -= got
                    emap.add_many(runs)
                    node.blocks = emap.blocks
                    # Saved part by part (one save of 10,000 new rows: ~30 ms in one
                    # step), the count with its extents.
                    self._save_extents(node)
                    self._save(node, "blocks")
                    if pos < end:
                        await trio.lowlevel.checkpoint()
        finally:
            if pool:  # (only if a part failed: the pool holds exactly `need`)
                self.alloc.release_now(pool)

    async def fallocate(self: FileSystem, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file, for the principal it was opened for.

        - mode 0 / KEEP_SIZE: the holes of the range become UNWRITTEN extents charged to
          the principal (EDQUOT or ENOSPC now, all or nothing, never at a later write);
          mode 0 grows the size to the end of the range (R6 first).
        - PUNCH_HOLE|KEEP_SIZE: whole blocks of the range are unmapped and freed as
          truncate frees them (revoke, drain, free after the durable commit: R3); the
          partial blocks at its ends get zeros written (relocated if sealed: R1).
        - ZERO_RANGE [|KEEP_SIZE]: as PUNCH_HOLE, but the range stays allocated: whole
          data blocks are replaced by fresh UNWRITTEN blocks of the same owner, holes are
          allocated and charged as by mode 0; without KEEP_SIZE the size grows.
        Every other mode: EOPNOTSUPP."""
        self._writable()
        h = self.handle(fh)
        if not h.writable:
            raise BadHandle("file not open for writing")
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        op = mode & ~FALLOC_FL_KEEP_SIZE
        if op not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) or \
                op == FALLOC_FL_PUNCH_HOLE and not keep_size:
            raise NotSupported(f"fallocate mode {mode:#x} is not supported")
        if offset < 0 or length <= 0:
            raise InvalidArgument("fallocate needs offset >= 0 and length > 0")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FileTooLarge("fallocate past the maximum file size")
        node = h.inode
        principal = h.grant.principal
        bs = self.block_size
        # Before the lock, priced at the blocks it will write (probe 20, F3; review of
        # 5422135, F3): for a hole punched or a range zeroed, each block the range
        # covers only partly that holds data (zeros merged in); when the file grows,
        # its last block if partly covered and holding data (`_zero_past_eof`). Holes
        # and unwritten blocks are written nothing.
        emap0 = self._extents(node)

        def holds_data(pos: int) -> bool:
            seg = emap0.segments(pos // bs, 1)[0]
            return seg.dev_block != HOLE and seg.state != UNWRITTEN
        writes = sum(1 for a, _b in partial_edges(offset, end, bs) if holds_data(a)) if op else 0
        if not keep_size and end > node.size and node.size % bs and holds_data(node.size):
            writes += 1
        await self.kernel.repay_limit(principal, writes * bs, ios=max(1, writes))
        async with self._lock(node):
            emap = self._extents(node)
            grows = not keep_size and end > node.size
            fields = ["blocks"]
            if op == 0:
                b0, b1 = block_span(offset, length, bs)
                if grows:
                    # Charge first: a refusal changes nothing, not even the last block.
                    await self._allocate(node, emap, b0, b1 - b0, principal)
                    await self._zero_past_eof(node, node.size, end, principal)  # R6
                else:
                    await self._allocate(node, emap, b0, b1 - b0, principal)
                self._save_extents(node)
            else:
                if op == FALLOC_FL_ZERO_RANGE:
                    await self._reserve_zero_range(node, emap, offset, end, principal)
                    if grows:
                        await self._zero_past_eof(node, node.size, end, principal)  # R6
                await self._zero_partial_blocks(node, emap, offset, end, principal)
                await self._unmap_whole_blocks(node, emap, offset, end,
                                               replace=op == FALLOC_FL_ZERO_RANGE,
                                               principal=principal)
                # The holes ZERO_RANGE allocated are saved here when no whole data
                # block was replaced (_unmap_whole_blocks saved nothing then): the
                # blocks count below must never be saved without its extents.
                self._save_extents(node)
            # Every mode changes the file's times and drops set-ID bits, as Linux's
            # local filesystems do (`file_modified`): mode 0 and KEEP_SIZE within
            # the file left mtime alone, so make and rsync saw no change (probe 21, F5).
            node.mtime_ns = node.ctime_ns = now_ns()
            fields += ["mtime_ns", "ctime_ns"]
            if self._kill_priv(h, save=False):
                fields.append("mode")
            if grows:
                node.size = end
                fields.append("size")
            node.blocks = emap.blocks
            self._save(node, *dict.fromkeys(fields))

    async def _reserve_zero_range(self: FileSystem, node: Inode, emap: ExtentMap, lo: int, hi: int,
                                  principal: PrincipalId) -> None:
        """ZERO_RANGE's checks, before anything changes: the whole data blocks it will
        replace fit in the free space (the old ones are free only after the commit),
        then the holes of the range are allocated (charged to `principal`)."""
        bs = self.block_size
        f0, f1 = whole_blocks(lo, hi, bs)
        replace = (await self._tally(emap, f0, f1))[0] if f1 > f0 else 0
        b0, b1 = block_span(lo, hi - lo, bs)
        holes = (await self._tally(emap, b0, b1))[1]
        # Replacing data blocks may use the copy-on-write reserve, as an overwrite may;
        # the holes are new allocations and leave it alone.
        await self._ensure_free(replace + holes, reserve=False)
        if holes:
            await self._allocate(node, emap, b0, b1 - b0, principal)

    async def _tally(self: FileSystem, emap: ExtentMap, f0: int, f1: int) -> tuple[int, int]:
        """(data blocks, hole blocks) of file blocks [f0, f1), counted EXTENTS_PER_STEP
        extents a step of the loop. The caller holds the node's lock: the map does
        not change in between."""
        data = holes = 0
        pos = f0
        while True:
            d, h, pos = emap.tally(pos, f1, self.extents_per_step)
            data += d
            holes += h
            if pos >= f1:
                return data, holes
            await trio.lowlevel.checkpoint()

    async def _zero_partial_blocks(self: FileSystem, node: Inode, emap: ExtentMap, lo: int, hi: int,
                                   principal: PrincipalId) -> None:
        """Write zeros over [lo, hi) inside the blocks the range covers only partly, where
        they hold data (holes and unwritten blocks read as zeros already). A sealed block
        is relocated, not zeroed in place (R1)."""
        for a, b in partial_edges(lo, hi, self.block_size):
            await self._zero_within_block(node, emap, a, b, principal)

    async def _zero_within_block(self: FileSystem, node: Inode, emap: ExtentMap, lo: int,
                                 hi: int, principal: PrincipalId, *,
                                 keep_pending: bool = False) -> None:
        """Write zeros over [lo, hi), which lies inside one block, if that block holds
        data (a hole or an unwritten block reads as zeros already), through a grant of
        the metadata server's own, as a write (a sealed block is relocated: R1).
        `keep_pending` (R6): not over the bytes live grants wrote and have not
        committed yet (`Kernel.write`)."""
        seg = emap.segments(lo // self.block_size, 1)[0]
        if seg.dev_block == HOLE or seg.state == UNWRITTEN:
            return
        g = self.kernel.grant(inode=node.id, generation=node.generation, extents=emap,
                              rights=Rights.WRITE, principal=principal, charge=False)
        try:
            await self._write_data(node, g, lo, bytes(hi - lo), keep_pending=keep_pending)
        finally:
            self.kernel.release(g)

    async def _unmap_whole_blocks(self: FileSystem, node: Inode, emap: ExtentMap, lo: int,
                                  hi: int, *, replace: bool,
                                  principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """Free the data blocks wholly inside [lo, hi) as truncate does: unmap them and
        revoke every grant on the file with no checkpoint in between, wait until no
        request through the old grants is in flight, then free them for reuse after
        the commit (R3). With `replace`, each freed run is mapped again at once to fresh
        UNWRITTEN blocks of the same owner (ZERO_RANGE keeps the range allocated).

        A punch of more than EXTENTS_PER_STEP extents is done in parts from the end of
        the range, one step of the loop each (a punch of 20,000 extents held every
        tenant's requests ~0.15 s in one step): each part is one change of the map,
        saved, with its grants revoked and its blocks released; a crash between two
        parts finds the range's end punched and its start not yet, as ext4's punch,
        which restarts its journal transaction, may leave it. ZERO_RANGE (`replace`)
        is cut the same way (it was one step, ~0.25 s at 20,000 extents): its
        replacement blocks are all allocated, and their host space reserved, before
        the first part, so that no other tenant's allocation between two parts can
        leave it half done with ENOSPC; each part takes its runs from the end of that
        pool, so the range's new blocks still ascend with the file. The parts run
        shielded, as a truncate's do: a part's map change is whole, and the pool's
        blocks no part took go back at the end."""
        bs = self.block_size
        f0, f1 = whole_blocks(lo, hi, bs)
        f1 = min(f1, emap.end_block())
        if f1 <= f0:
            return
        pool: list[tuple[int, int]] = []
        if replace:
            data = (await self._tally(emap, f0, f1))[0]
            if not data:
                return
            await self._ensure_free(data, reserve=False)
            # The replacement blocks are allocated and their host space reserved before
            # the map changes, as every other allocation is (a later write into them
            # allocates nothing, so it would never meet the headroom check: second
            # review of probe 5, R3). They stand in for blocks the same transactions
            # free: a relocation. ENOSPC here leaves the file untouched.
            pool = self.alloc.allocate(data, emap.goal(f0))
            await self._reserve_host_space(pool, relocation=True, principal=principal)
        try:
            with trio.CancelScope(shield=True):
                while f1 > f0:
                    g0 = max(f0, emap.start_back(f1, self.extents_per_step))
                    await self._unmap_part(node, emap, g0, f1, pool=pool if replace else None,
                                           principal=principal)
                    f1 = g0
                    if f1 > f0:
                        await trio.lowlevel.checkpoint()
        finally:
            if pool:
                self.alloc.release_now(pool)

    async def _unmap_part(self: FileSystem, node: Inode, emap: ExtentMap, f0: int, f1: int, *,
                          pool: list[tuple[int, int]] | None,
                          principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """One part of `_unmap_whole_blocks`: file blocks [f0, f1); with `pool` (a
        ZERO_RANGE), each data run that goes is mapped again to UNWRITTEN blocks taken
        from the pool's end (what it takes is removed from the list)."""
        if pool is not None:
            # The part's data blocks beyond what the pool holds (only a direct client's
            # layout committed between two parts adds data under the node lock) are
            # allocated and reserved before the map changes, as the pool was (review
            # of stop 23, 6: afterwards, an ENOSPC left the map without the runs that
            # went and their blocks neither freed nor mapped).
            need = emap.tally(f0, f1, len(emap) + 1)[0]
            have = 0
            for _s, c in reversed(pool):  # (the blocks `_take_tail` would take)
                have += c
                if have >= need:
                    break
            short = need - have
            if short > 0:
                await self._ensure_free(short, reserve=False)
                more = self.alloc.allocate(short, emap.goal(f0))
                await self._reserve_host_space(more, relocation=True, principal=principal)
                pool[:0] = more  # (taken from the end: the pool's own blocks first)
        # From here to the regrant: no checkpoint (the map and the grants change as one).
        # One pass over the range (remove_data), not one map edit per run: each edit
        # moves the tail of the map, and a punch of a file of N one-block extents was
        # O(N^2) in this step, which nothing else shares (RELIABILITY 2026-12-01).
        # A punch (no pool) frees UNWRITTEN runs too, as ext4 does: fallocate's
        # reservation of a range is given back when a hole is punched over it (probe
        # 16, F4); ZERO_RANGE keeps them, already zeros and allocated.
        gone = emap.remove_data(f0, f1 - f0, unwritten=pool is None)
        if not gone:
            return
        freed = [(dev, n, owner) for _fb, dev, n, owner in gone]
        if pool is not None:
            need = sum(n for _at, _dev, n, _owner in gone)
            left = _take_tail(pool, need)
            assert sum(c for _s, c in left) == need, (need, left)  # (allocated above)
            fresh: list[tuple[int, int, int, int, int]] = []
            for at, _dev, n, owner in gone:
                while n:
                    start, have = left[0]
                    got = min(n, have)
                    fresh.append((at, start, got, UNWRITTEN, owner))
                    left[0] = (start + got, have - got)
                    if not left[0][1]:
                        left.pop(0)
                    at += got
                    n -= got
            emap.add_many(fresh)
        old_grants = self._regrant(node)
        self._save_extents(node)
        node.blocks = emap.blocks
        self._save(node, "blocks")
        await self._release_unmapped(freed, old_grants, refund=pool is None,
                                     ino=node.id)

    async def _trim_preallocation(self: FileSystem, node: Inode) -> None:
        """The file's last open handle closed: give back the UNWRITTEN blocks a
        KEEP_SIZE fallocate reserved past its end. (The volume cannot tell them from a
        crashed direct client's write layout, which the next mount drops: see
        FileSystem.load. So the reservation lasts while the file is open.)"""
        if node.nlink == 0 or not node.is_reg or self.read_only is not None or \
                self.kernel.grants_for(node.id):
            return
        bs = self.block_size
        emap = self._extents(node)
        keep = blocks_to_cover(node.size, bs)
        if emap.end_block() <= keep:
            return
        async with self._lock(node):
            if node.opens or self.kernel.grants_for(node.id):
                return
            if any(s.dev_block != HOLE and s.state != UNWRITTEN
                   for s in emap.segments(keep, emap.end_block() - keep)):
                return  # not only preallocation (fsck reports it)
            freed = emap.remove_owned(keep)  # no grant on the file: none to revoke
            node.blocks = emap.blocks
            self._save_extents(node)
            self._save(node, "blocks")
            await self._release_unmapped(freed, [], ino=node.id)
        self.on_attr_changed(node.id)  # st_blocks changed behind the kernel's back
