"""The data path: reads (through the pool, or around it for streams, overlaid with
resident frames so they see dirty data), fills of missing blocks charged to the
reader, read-ahead and drop-behind of sequential files, writes (into dirty frames,
or through to the device keeping resident frames current); blocks whose newest
contents a dropped discardable frame held read as zeros, never from the device
(`FrameTable._lost`). Streams around the pool: pager/stream.py. Freed blocks:
pager/freeing.py. The concurrency rules (generations,
FILLING, `_redirty`) are in docs/dev/invariants.md ("Pager")."""

from __future__ import annotations

import trio

from blockdev import BlockNo, PrincipalId, check_read_guard

from . import trace as tr
from .cache import (BYPASS_BLOCKS, CLASS_DROP_BEHIND, CLEAN, DIRTY, FILLING, WRITEBACK,
                    WRITEBACK_CLUSTER)
from .policy import NIL
from .stream import Stream


class DataPath(Stream):
    """read, read_into, write, discard."""

    def _init_datapath(self, *, readahead: int) -> None:
        self.readahead = readahead

    async def read(self, block: BlockNo, count: int, *, principal: PrincipalId,
                   file: int = 0, fblock: int = 0) -> bytearray:
        """Contents of `count` blocks from `block`, from frames where resident."""
        out = bytearray(count * self.block_size)
        await self.read_into(block, count, memoryview(out), principal=principal,
                             file=file, fblock=fblock)
        return out

    async def read_into(self, block: BlockNo, count: int, view: memoryview, *,
                        principal: PrincipalId, file: int = 0, fblock: int = 0) -> None:
        """Put the contents of `count` blocks from `block` into `view`."""
        if self._tw is not None:
            self._trace_op(tr.READ, principal, block, count, file, fblock)
        bs = self.block_size
        p = int(principal)
        # (a revoked grant's read hands out nothing: the caller's guard, run again
        # after every wait of the pool's own before frames are copied out)
        check_read_guard()
        if count > BYPASS_BLOCKS and not self._global:
            await self._read_stream(block, count, view, principal)
            return
        self._tick += count
        if file and (file in self._hints or file in self._range_hints):
            self._file_tick[file] = self._tick  # (only hinted files: a bounded map)
        where = self._where
        mem = self._mem
        state = self._state_m
        ref = self._ref_m
        pf = self._pf_m
        missing: list[int] = []
        pf_hits = 0
        for i in range(count):
            f = where.get(block + i)
            if f is None or state[f] == FILLING:
                missing.append(i)
            else:
                view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                ref[f] = True
                if pf[f]:
                    pf[f] = False
                    pf_hits += 1
        hits = count - len(missing) - pf_hits
        a = self._acct_of(p)
        self.hits += hits
        a.hits += hits
        if missing or pf_hits:
            self.misses += len(missing) + pf_hits
            a.misses += len(missing) + pf_hits
        if missing:
            await self._fill(block, missing, view, p, file, fblock)
        if self._hinted and file:
            h = self._hints.get(file)
            if h is not None and h[2]:
                self._drop_behind(block, count)
                if missing:
                    await self._read_ahead(block + count, p, file, fblock + count)

    async def _fill(self, block: int, missing: list[int], view: memoryview, p: int,
                    file: int, fblock: int) -> None:
        """Read the `missing` blocks (indexes into the request) into frames charged to
        `p` and into `view`."""
        bs = self.block_size
        mem = self._mem
        where = self._where
        state = self._state_m
        gen = self._gen_m
        pending = missing
        while pending:
            mine: list[tuple[int, int, int]] = []
            waits: list[int] = []
            done = 0
            try:
                for i in pending:
                    b = block + i
                    f = where.get(b)
                    if f is None:
                        nf, dirty_victim = self._try_alloc(p)
                        if nf == NIL:
                            if mine:
                                break  # read what we hold first (never wait holding frames)
                            nf = await self._alloc(p, dirty_victim)
                            try:
                                check_read_guard()  # (waited: frames copied below)
                            except BaseException:
                                self._give_back(nf)
                                raise
                        f = where.get(b)
                        if f is None:
                            self._map(nf, b, p, file, fblock + i, FILLING)
                            mine.append((i, nf, int(gen[nf])))
                            done += 1
                            continue
                        self._give_back(nf)
                    if state[f] == FILLING:
                        waits.append(i)
                    else:
                        view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                        self._ref_m[f] = True
                    done += 1
                k = 0
                lost = self._lost
                while k < len(mine):
                    i0 = mine[k][0]
                    if lost and block + i0 in lost:
                        # its newest contents were dropped: zeros, not the device's
                        # older ones (FrameTable._lost)
                        _, f, g = mine[k]
                        view[i0 * bs:(i0 + 1) * bs] = bytes(bs)
                        if gen[f] == g:
                            if state[f] == FILLING:
                                mem[f * bs:(f + 1) * bs] = bytes(bs)
                                state[f] = CLEAN
                            else:  # written meanwhile: the frame is newer
                                view[i0 * bs:(i0 + 1) * bs] = mem[f * bs:(f + 1) * bs]
                        self._wake_io()
                        k += 1
                        continue
                    m = k + 1
                    while m < len(mine) and mine[m][0] == mine[m - 1][0] + 1 and not (
                            lost and block + mine[m][0] in lost):
                        m += 1
                    n = m - k
                    dv = view[i0 * bs:(i0 + n) * bs]
                    await self.device.read_into(BlockNo(block + i0), n, dv,
                                                principal=PrincipalId(p))
                    for i, f, g in mine[k:m]:  # no checkpoint since the read returned
                        if gen[f] != g:
                            continue  # dropped meanwhile (discarded)
                        if state[f] == FILLING:
                            mem[f * bs:(f + 1) * bs] = view[i * bs:(i + 1) * bs]
                            state[f] = CLEAN
                        else:  # written meanwhile: the frame is newer
                            view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
                    self._wake_io()
                    k = m
            except BaseException:
                for _, f, g in mine:
                    if gen[f] == g and state[f] == FILLING:
                        self._unmap(f)
                self._wake_io()
                raise
            # Blocks another request is filling: read them ourselves, charged to us,
            # rather than wait on someone else's I/O (which runs under their bank).
            for i in waits:
                b = block + i
                dv = view[i * bs:(i + 1) * bs]
                if b in self._lost:
                    dv[:] = bytes(bs)
                else:
                    await self.device.read_into(BlockNo(b), 1, dv, principal=PrincipalId(p))
                f = where.get(b)  # no checkpoint since the read: a newer frame wins
                if f is not None and state[f] != FILLING:
                    dv[:] = mem[f * bs:(f + 1) * bs]
            pending = pending[done:]

    async def _prefetch(self, block: int, count: int, p: int, file: int, fblock: int) -> None:
        """Bring blocks into frames charged to `p` (read-ahead, willneed)."""
        count = min(count, self.device.nblocks - block)
        if count <= 0:
            return
        count = min(count, max(1, self.nframes // 2))
        missing = [i for i in range(count) if (block + i) not in self._where]
        if not missing:
            return
        self._acct_of(p).prefetched += len(missing)
        scratch = memoryview(bytearray(count * self.block_size))
        await self._fill(block, missing, scratch, p, file, fblock)
        where = self._where
        for i in missing:
            f = where.get(block + i)
            if f is not None and self._owner_m[f] == p and not self._ref_m[f]:
                self._pf_m[f] = True

    async def _read_ahead(self, block: int, p: int, file: int, fblock: int) -> None:
        """Read-ahead of a sequential file, charged to the reader. The pager knows
        device blocks, not the file's map: it reads the device blocks that follow,
        which is where the allocator puts a file's next blocks. A wrong guess costs
        frames of the reader's own bank, never data (frames hold device contents;
        only a grant can read them)."""
        await self._prefetch(block, self.readahead, p, file, fblock)

    def _drop_behind(self, block: int, count: int) -> None:
        """Frames a sequential reader has used go to the front of its reclaim order."""
        where = self._where
        for i in range(count):
            f = where.get(block + i)
            if f is not None and not self._disc_m[f]:
                self._ref_m[f] = False
                self._requeue(f, CLASS_DROP_BEHIND)

    async def write(self, block: BlockNo, data: bytes | bytearray | memoryview, *,
                    principal: PrincipalId, file: int = 0, fblock: int = 0) -> None:
        """Write whole blocks: into dirty frames (write-back) or through to the device,
        keeping resident frames current (write-through)."""
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count = len(mv) // bs
        if self._tw is not None:
            self._trace_op(tr.WRITE, principal, block, count, file, fblock)
        p = int(principal)
        if not self.writeback or (count > BYPASS_BLOCKS and self._may_bypass(
                block, count, file, fblock, p)):
            await self._write_through(block, mv, count, p, file, fblock)
            return
        self._tick += count
        if file and (file in self._hints or file in self._range_hints):
            self._file_tick[file] = self._tick  # (only hinted files: a bounded map)
        where = self._where
        mem = self._mem
        state = self._state_m
        disc = self._disc_m
        hinted = self._hinted
        lost = self._lost
        now = trio.current_time()
        limit = self._dirty_limit(p)
        acct = self._acct_of(p)
        # frames p may still dirty under the limited nodes on its path (None: none),
        # counted down as it dirties and read again after every wait (L2)
        room = self._dirty_room(p) if self._lim_path else None
        for start in range(0, count, WRITEBACK_CLUSTER):
            for i in range(start, min(count, start + WRITEBACK_CLUSTER)):
                b = block + i
                if (self._global and sum(a.dirty for a in self._acct.values()) >= limit
                        or acct.dirty >= limit
                        or room is not None and room <= 0
                        and not self._discardable_block(b, p, file, fblock + i)):
                    await self._throttle(p)
                    if room is not None:
                        room = self._dirty_room(p)
                f = where.get(b)
                if f is None:
                    nf, dirty_victim = self._try_alloc(p)
                    if nf == NIL:
                        nf = await self._alloc(p, dirty_victim)
                        if room is not None:
                            room = self._dirty_room(p)
                    f = where.get(b)
                    if f is None:
                        f = nf
                        self._map(f, b, p, file, fblock + i, CLEAN)  # new: not referenced
                    else:
                        self._give_back(nf)
                        self._ref_m[f] = True
                else:
                    self._ref_m[f] = True  # a write to a resident block is a reuse
                    if file:
                        self._retag(f, file, fblock + i)
                mem[f * bs:(f + 1) * bs] = mv[i * bs:(i + 1) * bs]
                if lost:
                    lost.discard(b)  # (its newest contents are in the frame again)
                st = state[f]
                if st == DIRTY or st == WRITEBACK:
                    if self._dirtier_m[f] != p:
                        self._take_dirty(f, p, acct)
                        if room is not None and not (hinted and disc[f]):
                            room -= 1
                    if st == WRITEBACK:
                        self._redirty_m[f] = True
                        self._dirty_since_m[f] = now
                else:  # CLEAN, or FILLING (the fill will copy this out, not over it)
                    state[f] = DIRTY
                    self._dirtier_m[f] = p
                    self._dirty_since_m[f] = now
                    acct.dirty += 1
                    if disc[f]:
                        acct.disc_dirty += 1
                    if room is not None and not (hinted and disc[f]):
                        room -= 1  # (a discardable frame is outside the bound: V5)

    def _discardable_block(self, b: int, p: int, file: int, fblock: int) -> bool:
        """Whether `p`'s write of device block `b` (`file` block `fblock`) dirties a
        discardable frame under `hinted`: one the pager never writes back on its own
        and no commit expedites, so the limited nodes' dirty bound (`_dirty_room`) has
        nothing to hold it to — every block of a discardable write past the bound ran
        `_throttle`'s whole-pool scans for nothing, ~40 ms of the loop per 1 MiB
        (review of probe5fix, V3). Its dirty share still applies. No checkpoint."""
        if not self._hinted or not file:
            return False
        f = self._where.get(b)
        if f is not None:
            return bool(self._disc_m[f])
        return ((file in self._hints or file in self._range_hints)
                and self._hints_for(file, fblock, p)[1])

    def _may_bypass(self, block: int, count: int, file: int, fblock: int,
                    owner: int) -> bool:
        """Whether a large write (a stream, as large reads) goes around the pool to the
        device, as under write-through: not under `global-lru` (the honest baseline
        caches everything), never for a discardable file (its data is not to reach
        the device unasked), and only when no block of the range is resident — a
        dirty frame or one under write-back would otherwise land over it later. From
        this check to the device write's start there is no checkpoint."""
        if self._global:
            return False
        if self._hinted and file and self._hints_for(file, fblock, owner)[1]:
            return False
        # One C loop over the range (a Python loop of 256 probes per 1 MiB write was
        # 5% of the loop's time under fio, docs/BENCHMARKS.md).
        return self._where.keys().isdisjoint(range(block, block + count))

    async def _write_through(self, block: int, mv: memoryview, count: int, p: int,
                             file: int, fblock: int) -> None:
        if self.writeback and self._may_write_behind(mv, p):
            # A stream under write-back (`_may_bypass` found no frame of the range, and
            # there was no checkpoint since): acknowledged now, on the device before the
            # next flush (pager/writeback.py).
            self._start_write_behind(block, mv, p)
            self._not_lost(block, count)  # (reads wait until it has landed)
            return
        await self.device.write(BlockNo(block), mv, principal=PrincipalId(p))
        self._not_lost(block, count)
        # No checkpoint from here on: frames end up equal to what the device holds.
        bs = self.block_size
        where = self._where
        mem = self._mem
        state = self._state_m
        install = count <= BYPASS_BLOCKS or self._global
        for i in range(count):
            b = block + i
            f = where.get(b)
            if f is None:
                if not install:
                    continue
                f, _ = self._try_alloc(p)
                if f == NIL:
                    continue  # nothing free without waiting: leave it uncached
                self._map(f, b, p, file, fblock + i, CLEAN)
            else:
                self._ref_m[f] = True
                if file:
                    self._retag(f, file, fblock + i)
            mem[f * bs:(f + 1) * bs] = mv[i * bs:(i + 1) * bs]
            if state[f] == FILLING:
                state[f] = CLEAN
            elif state[f] == WRITEBACK:
                # (write-back: a frame dirtied by a racing write and sent meanwhile) its
                # write-back may land after ours: write it again, with these bytes
                self._redirty_m[f] = True
