"""Large reads around the pool (`Stream._read_stream`): a stream of more than
BYPASS_BLOCKS blocks is read from the device uncached, overlaid with resident frames
(newer than the device: dirty, or written through), which count as the reader's hits.
The rest of the data path: pager/datapath.py."""

from __future__ import annotations

from blockdev import BlockNo, PrincipalId

from .cache import FILLING
from .reclaim import Reclaim


class Stream(Reclaim):
    """_read_stream."""

    async def _read_stream(self, block: BlockNo, count: int, view: memoryview,
                           principal: PrincipalId) -> None:
        """A large read that does not go through the pool (it would push out the small,
        hot blocks the pool is for): resident blocks are copied from their frames, the
        runs of the others read from the device, uncached. Frames are never older than
        the device (dirty, under write-back, or written through), so after each device
        read, with no checkpoint in between, frames that became resident meanwhile are
        laid over what the device returned."""
        bs = self.block_size
        where = self._where
        mem = self._mem
        state = self._state_m
        # The resident blocks of the range by one set intersection (the probes run in
        # C), not two dict probes per block in Python: a large read's range is mostly
        # not resident (docs/BENCHMARKS.md, "Direct sequential reads").
        resident = sorted(b for b in where.keys() & range(block, block + count)
                          if state[where[b]] != FILLING) if where else []
        skip: list[int] = resident
        lost = self._lost_in(block, count)
        if lost:  # zeros, never read from the device (FrameTable._lost)
            for b in lost:
                i = b - block
                view[i * bs:(i + 1) * bs] = bytes(bs)
            skip = sorted({*resident, *lost})
        # A resident block the read is served from is a hit of its principal and
        # referenced, as in a small read: large cached reads (dd bs=1M, a direct
        # client's read-ahead) counted as nothing, and looked cold to the policy
        # (probe 15, F2). The others bypass the pool (`bypassed`), neither hits nor
        # misses: nothing was loaded for them.
        ref = self._ref_m
        pf = self._pf_m
        pf_hits = 0
        for b in resident:  # (a resident frame is newer than any of them)
            f = where[b]
            i = b - block
            view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
            ref[f] = True
            if pf[f]:
                pf[f] = False
                pf_hits += 1
        if resident:
            a = self._acct_of(int(principal))
            hits = len(resident) - pf_hits
            self.hits += hits
            a.hits += hits
            if pf_hits:  # (a read-ahead block's first use counts as a miss, as above)
                self.misses += pf_hits
                a.misses += pf_hits
        self.bypassed += count - len(resident)
        # The runs between them are read from the device (decided before the first
        # checkpoint, as the copies above were made).
        lo: int = block
        for stop in (*skip, block + count):
            if stop > lo:
                first, n = lo - block, stop - lo
                await self.device.read_into(BlockNo(lo), n,
                                            view[first * bs:(first + n) * bs],
                                            principal=principal)
                if where:
                    for b in where.keys() & range(lo, stop):
                        f = where[b]
                        if state[f] != FILLING:
                            i = b - block
                            view[i * bs:(i + 1) * bs] = mem[f * bs:(f + 1) * bs]
            lo = stop + 1
