"""What the pager reports and the constants of its frame pool (the records are
frozen: `Pager.statistics()` hands out a snapshot)."""

from __future__ import annotations

import dataclasses

from blockdev import PrincipalId

#: reads of more blocks than this bypass the pool under `principal` and `hinted`
#: (streams, not working sets); under `global-lru` nothing bypasses
BYPASS_BLOCKS = 32

POLICIES = ("hinted", "principal", "global-lru")

# frame states
FREE, FILLING, CLEAN, DIRTY, WRITEBACK = range(5)

# frame classes under `hinted` (lower is reclaimed first); priorities are int16
CLASS_DISCARDABLE = -(1 << 20)
CLASS_DROP_BEHIND = -(1 << 19)

#: the longest run written back in one device request
WRITEBACK_CLUSTER = 32

#: a principal under an I/O limit (its own or an ancestor's) keeps at most this many
#: seconds of that limit's write-back dirty, with the rest of the limited node's
#: subtree (`Pager.dirty_limit_seconds`; pager/writeback.py, hostile probe 5, L2)
DIRTY_LIMIT_SECONDS = 2.0

#: write-behind (pager/writeback.py): at most this many bytes of a principal's stream
#: writes may be acknowledged and still on their way to the device
WRITE_BEHIND_BYTES = 16 << 20
#: the daemon-wide bound on write-behind bytes on their way (all principals): a tenant
#: with many principals cannot pin more than this; past it every writer writes
#: synchronously (slower, never refused)
WRITE_BEHIND_TOTAL = 64 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalCacheStats:
    frames: int
    #: the bank in frames: guarantee (own, after what children carve) and ceiling
    min: int
    max: int | None
    hits: int
    misses: int
    evictions: int
    #: discardable frames dropped (clean or dirty) without write-back
    discarded: int
    dirty: int
    writeback_bytes: int
    reclaim_sent: int
    reclaim_answered: int
    reclaim_missed: int
    #: blocks read ahead or prefetched (willneed) for this principal
    prefetched: int = 0


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
    policy: str = "hinted"
    writeback: bool = False
    dirty: int = 0
    writeback_bytes: int = 0
    discarded: int = 0
    per_principal: dict[PrincipalId, PrincipalCacheStats] = dataclasses.field(
        default_factory=dict)


