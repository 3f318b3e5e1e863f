"""The frame pool: device blocks cached in one numpy buffer, each frame charged to
the principal whose request brought it in.

This is the stand-in for the cooperative pager (policies, hints, reclaim requests
come with the pager work): a write-through cache with one global CLOCK. Because it
is write-through, the device always holds the newest data, so a large (sequential)
read may bypass the cache without a coherence check and without evicting the small,
hot blocks the cache is for.

State (all on the event loop thread; no checkpoint between a lookup and its use):
- `_where`: device block -> frame number, for resident frames only
- `_frame_block[f]`: the block frame f holds, or -1 when free
- `_owner[f]`: the principal charged for frame f
- `_ref[f]`: CLOCK reference bit
Invariant: `_where[b] == f` iff `_frame_block[f] == b`; `_resident[p]` is the number
of frames with `_owner == p`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from blockdev import BankTree, BlockDevice, BlockNo, PrincipalId

#: reads of more blocks than this bypass the cache (they are streams, not working sets)
BYPASS_BLOCKS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class PagerStatistics:
    frames: int
    frames_used: int
    hits: int
    misses: int
    bypassed_blocks: int
    evictions: int
    #: principal -> resident frames charged to it
    resident: dict[PrincipalId, int]


class Pager:
    """A fixed pool of frames caching device blocks. See the module docstring."""

    def __init__(self, device: BlockDevice, *, nframes: int) -> None:
        self.device = device
        self.block_size = bs = device.block_size
        self.nframes = nframes = max(1, nframes)
        self._frames = np.zeros((nframes, bs), dtype=np.uint8)
        #: the same memory as bytes: frame f is _mem[f * bs:(f + 1) * bs] (memoryview
        #: copies cost half of numpy's per-block assignment)
        self._mem = memoryview(self._frames.reshape(-1).data)
        self._frame_block = np.full(nframes, -1, dtype=np.int64)
        self._owner = np.zeros(nframes, dtype=np.int32)
        self._ref = np.zeros(nframes, dtype=np.bool_)
        self._where: dict[int, int] = {}
        self._free = list(range(nframes - 1, -1, -1))
        self._hand = 0
        self._resident: dict[PrincipalId, int] = {}
        self.hits = self.misses = self.bypassed = self.evictions = 0
        #: every principal's memory bank (min, max, parent), pushed down by kernelshim
        self.banks: BankTree = {}

    def configure_banks(self, tree: BankTree) -> None:
        """The principals' memory banks changed (or the mount started)."""
        self.banks = tree

    # -- frame bookkeeping -----------------------------------------------------

    def _take_frame(self) -> int:
        if self._free:
            return self._free.pop()
        ref = self._ref
        n = self.nframes
        hand = self._hand
        while ref[hand]:
            ref[hand] = False
            hand = hand + 1 if hand + 1 < n else 0
        f = hand
        self._hand = hand + 1 if hand + 1 < n else 0
        self._drop(f)
        self.evictions += 1
        self._free.pop()  # _drop pushed f
        return f

    def _drop(self, f: int) -> None:
        b = int(self._frame_block[f])
        if b >= 0:
            del self._where[b]
            self._frame_block[f] = -1
            p = PrincipalId(int(self._owner[f]))
            self._resident[p] -= 1
            self._free.append(f)

    def _install(self, block: int, data: memoryview, principal: PrincipalId) -> None:
        f = self._where.get(block)
        if f is None:
            f = self._take_frame()
            self._where[block] = f
            self._frame_block[f] = block
            self._owner[f] = principal
            self._resident[principal] = self._resident.get(principal, 0) + 1
        bs = self.block_size
        self._mem[f * bs:(f + 1) * bs] = data
        self._ref[f] = True

    # -- data path ---------------------------------------------------------------

    async def read(self, block: BlockNo, count: int, *, principal: PrincipalId) -> bytearray:
        """Contents of `count` blocks from `block`, from frames where resident."""
        out = bytearray(count * self.block_size)
        await self.read_into(block, count, memoryview(out), principal=principal)
        return out

    async def read_into(self, block: BlockNo, count: int, view: memoryview, *,
                        principal: PrincipalId) -> None:
        """Put the contents of `count` blocks from `block` into `view`."""
        if count > BYPASS_BLOCKS:
            self.bypassed += count
            await self.device.read_into(block, count, view, principal=principal)
            return
        bs = self.block_size
        where = self._where
        missing: list[int] = []
        for i in range(count):
            f = where.get(block + i)
            if f is None:
                missing.append(i)
            else:
                view[i * bs:(i + 1) * bs] = self._mem[f * bs:(f + 1) * bs]
                self._ref[f] = True
        self.hits += count - len(missing)
        if not missing:
            return
        self.misses += len(missing)
        # Coalesce the misses into runs, one device request each.
        j = 0
        while j < len(missing):
            k = j
            while k + 1 < len(missing) and missing[k + 1] == missing[k] + 1:
                k += 1
            first, n = missing[j], k - j + 1
            dv = view[first * bs:(first + n) * bs]
            await self.device.read_into(BlockNo(block + first), n, dv, principal=principal)
            for i in range(n):
                # The read awaited: another request may have installed the block meanwhile;
                # _install then just refreshes it with the same (device-current) data.
                self._install(block + first + i, dv[i * bs:(i + 1) * bs], principal)
            j = k + 1

    async def write(self, block: BlockNo, data: bytes | bytearray | memoryview, *,
                    principal: PrincipalId) -> None:
        """Write whole blocks through to the device, keeping resident frames current."""
        await self.device.write(block, data, principal=principal)
        bs = self.block_size
        mv = memoryview(data).cast("B")
        count = len(mv) // bs
        where = self._where
        if count <= BYPASS_BLOCKS:
            for i in range(count):
                self._install(block + i, mv[i * bs:(i + 1) * bs], principal)
        elif where:
            for i in range(count):
                f = where.get(block + i)
                if f is not None:
                    self._mem[f * bs:(f + 1) * bs] = mv[i * bs:(i + 1) * bs]

    async def discard(self, block: BlockNo, count: int, *, principal: PrincipalId) -> None:
        """Forget blocks: drop their frames and discard them on the device."""
        where = self._where
        if where:
            for b in range(block, block + count):
                f = where.get(b)
                if f is not None:
                    self._drop(f)
        await self.device.discard(block, count, principal=principal)

    async def flush(self) -> None:
        """Make all completed writes durable (write-through: only the device to flush)."""
        await self.device.flush()

    def statistics(self) -> PagerStatistics:
        return PagerStatistics(self.nframes, len(self._where), self.hits, self.misses,
                               self.bypassed, self.evictions,
                               {p: n for p, n in sorted(self._resident.items()) if n})
