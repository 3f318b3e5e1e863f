"""The cooperative pager: a fixed pool of frames caching device blocks, each frame
charged to a principal's memory bank, replaced per principal by policy and hints,
written back by whoever dirtied it, and given back on request by self-paging clients.

Frames. One numpy buffer holds every frame's data; per-frame state lives in numpy
arrays indexed by frame number (`FrameNo`), with no Python object per page
(pager/frames.py).

Policies (`POLICIES`):
- `global-lru`: one CLOCK over the whole pool, principals ignored, every read and write
  goes through the pool (no bypass): the kernel that only observes behaviour.
- `principal`: one SIEVE queue per principal; each principal is kept between its
  guarantee (`cache_min`) and its ceiling (`cache_max`). Hints are ignored.
- `hinted` (default): `principal` plus hints. A principal's frames sit in one SIEVE
  queue per class: discardable, sequential drop-behind, then one per priority.

Reclaim order when a frame is needed: (0) a principal at its own (or an ancestor's)
ceiling reclaims from itself; (1) else a free frame; (2) else principals above their
ceiling; (3, hinted) what principals above their guarantee said they can do without:
clean discardable frames, discardable files idle for `nframes/8` block accesses (all
their dirty frames dropped at once, no write-back) and frames a sequential reader is
done with; (4) the principal furthest above its guarantee: its drop-behind frames,
then its priorities from the lowest, and only then a discardable file still in use.
A principal is never taken below its guarantee (memcg's memory.min: a guarantee it
does not use is lent to others until it needs it, and then taken back from whoever is
above theirs); the sum of guarantees is admission-checked (`check_banks`). Priority
orders only a principal's own frames. A block read or written by several principals
stays charged to the first (memcg's rule): charges equal residency, always.

Write-back (`writeback=True`; `False` writes through, as the mount does until the
crash rules are integrated). Writes dirty frames charged to the writer; write-back I/O
is tagged with the principal that dirtied the frame, read-ahead with the one that
asked. A writer over its dirty share (`dirty_ratio` of its allowance), or under an I/O
limit at `dirty_limit_seconds` of that limit's write-back (a limited node's subtree
together), writes back its own oldest frames before going on — never another
tenant's (pager/dirty.py). `run()` writes back frames dirty for longer than
`dirty_expire`, one task per dirtier (pager/aging.py). Stream writes that bypass the
pool are written behind (acknowledged once the device has claimed their blocks;
pager/writeback.py).
Reads that bypass the pool overlay resident
frames, so they see dirty data; `discard` waits for write-back in flight on the blocks
it frees. Discardable dirty frames are never written back by the pager on its own
(reclaim, aging, throttling, `flush`): under pressure they are dropped and the file is
reported to `on_discarded(file)` — all its dirty frames go, so it is lost as a whole.
Only `writeback_file` (an explicit fsync of that file) writes them.
Clearing the hint converts a file's dirty discardable frames at once into ordinary
dirty data (never dropped, written by aging, throttling and fsync), but those that
leave their dirtier over a limited node's dirty bound are debt-paced (`_paced`): a
limited tenant's discardable writes were never held to its bound (V3), and made
expeditable at once they let it hold its dirty share in frames the next commit
writes past its limit. No barrier writes a debt-paced frame, nor expedites its
write-back: it goes at its dirtier's limit (aging; `pay_paced` before the tenant's
next requests; `write_back_paced` before an fsync of the file, outside its barrier),
and until it lands the file stays on the commit's unflushed list (review of tidy5, R2;
docs/dev/invariants.md, "Debt-paced frames").

Cooperative reclaim (`principal`, `hinted`): `run()` keeps a reserve of free frames.
When it runs low, or a principal is over its ceiling, each principal over its share
is asked to release N frames by a deadline if it has subscribers (`on_reclaim`), and
reclaimed by policy at once otherwise. The deadline is `reclaim_grace` (2 s) after
the request: room for a client's callback and a round trip on a busy host. When the
principal has dropped the frames itself (dontneed), or a subscriber says it is done
(`answer_reclaim`), or at the deadline, the pager settles the request — answered or
missed — and takes what is still above the target by policy; meanwhile direct
reclaim prefers other principals, but falls back to them rather than wait, so a
client that never answers never stalls anyone.

Hints act on the advising principal's own frames: `advise` (priority, discardable,
dontneed) never changes or drops a frame charged to another principal, even of a
block both read; a file's own hints (`set_file_hints`, its xattrs) apply to all of
its frames.

Concurrency (all on the trio thread): code between two checkpoints is atomic. A frame
in FILLING or WRITEBACK, or pinned, is never evicted. A fill that completes copies the
device data into its frame only if the frame still has its generation and is still
FILLING (a write meanwhile wins and is copied out to the reader instead). A write to
a frame under write-back sets `_redirty`, and the frame goes back to DIRTY when the
write-back lands.

Code map. `Pager` is one object made of one class per concern, each in its own
module and each building on the one before (a linear chain, so every method is
found in exactly one place and mypy checks every call):

- pager/frames.py `FrameTable`: the numpy frame state and the shared tables;
  mapping and unmapping frames, the replacement queues they sit on.
- pager/banks.py `Banks`: guarantees and ceilings, the admission check.
- pager/observe.py `Observed`: `statistics()` and the access trace.
- pager/dirty.py `DirtyBounds`: how much a principal may keep dirty (its share, and
  a few seconds of an I/O limit on its path); which files have dirty frames.
- pager/writeback.py `WriteBack`: write-back runs, throttling, `flush`,
  write-behind.
- pager/aging.py `Aging`: the aging task, one task per dirtier; the debt-paced
  frames' write-back (`pay_paced`, `write_back_paced`); an fsync's
  `writeback_file`.
- pager/replacement.py `Replacement`: victim choice by policy and bank, eviction,
  frame allocation.
- pager/reclaim.py `Reclaim` (records in pager/tickets.py): reclaim requests to
  subscribers, deadlines, the reclaim task.
- pager/stream.py `Stream`: large reads around the pool (bypass), overlaid with
  resident frames.
- pager/datapath.py `DataPath`: read, write, fill, read-ahead, discard.
- pager/hints.py `Hints`: file hints, `advise`, `forget_file`.
- here: `Pager`, the constructor and `run()`, the pager's background tasks.
"""

from __future__ import annotations

from typing import Callable

import trio

from blockdev import BlockDevice

from .cache import POLICIES
from .errors import UnknownPolicy
from .frames import FrameNo as FrameNo
from .hints import MAX_RANGE_HINTS as MAX_RANGE_HINTS
from .hints import Hints
from .tickets import ReclaimSubscription as ReclaimSubscription


class Pager(Hints):
    """The frame pool. See the module docstring."""

    def __init__(self, device: BlockDevice, *, nframes: int, policy: str = "hinted",
                 writeback: bool = False, dirty_ratio: float = 0.5,
                 dirty_expire: float = 5.0, writeback_interval: float = 1.0,
                 reclaim_grace: float = 2.0, readahead: int = 16,
                 on_discarded: Callable[[int], object] | None = None) -> None:
        if policy not in POLICIES:
            raise UnknownPolicy(f"unknown pager policy {policy!r} "
                                f"(one of {', '.join(POLICIES)})")
        super().__init__(device, nframes=nframes, policy=policy, writeback=writeback)
        self._init_banks()
        self._init_writeback(dirty_ratio=dirty_ratio, dirty_expire=dirty_expire,
                             writeback_interval=writeback_interval)
        self._init_replacement(on_discarded=on_discarded)
        self._init_reclaim(reclaim_grace=reclaim_grace)
        self._init_datapath(readahead=readahead)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pager's background work: write-back of aged dirty frames, the free
        reserve, reclaim requests and their deadlines. Start it in the mount's nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._wakeup = trio.Event()
                if not self._global:  # the baseline knows no principals, hence no shares
                    nursery.start_soon(self._reclaim_loop, name="pager reclaim")
                if self.writeback:
                    nursery.start_soon(self._aging_loop, name="pager write-back aging")
                    # stream writes acknowledged early run here (_start_write_behind)
                    self._behind_nursery = nursery
                task_status.started()
        finally:
            self._behind_nursery = None
