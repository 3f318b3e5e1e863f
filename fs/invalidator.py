"""Telling the kernel what changed behind its back, without letting one tenant hold it up
for the others.

A direct client's create makes a name the kernel may have cached as missing, and a
direct client's write or the pager's dropping of a discardable file changes data the
kernel may cache: each needs a FUSE notification (`notify_inval_entry`,
`notify_inval_inode`). The kernel call can block for as long as someone holds the
directory's lock or a page of the file — a READDIR or READ this daemon has parked or
throttled, for example — so it runs in a worker thread, and it cannot be cancelled.

Before this module every notification was a system task of its own behind one shared
thread: a tenant that held one of its own directories locked (a readdir parked behind
its own throttled reads) stopped every tenant's notifications, and its queued tasks
grew the daemon by ~5 KB per create, uncharged (RELIABILITY, probe 3 F1). Now:

- each tenant (the principal's top-most ancestor below root, as for FairTurns; the one
  that made the change) has its own queue, drained by at most `LANES` worker threads
  at a time: a notification stuck in the kernel holds up only the tenant whose change
  it is, and not all of that tenant's others;
- a queue holds each notification once (a name created ten times is invalidated once)
  and at most `MAX_PENDING`; past that the tenant's further notifications are dropped
  and counted (the kernel then sees the change when its cached entry or attributes
  expire, `operations.TIMEOUT`): a flood costs memory bounded per tenant;
- at most `MAX_THREADS` worker threads in all.

A tenant can still delay its own notifications, and those of changes made in a
directory whose lock it holds (a shared, world-writable directory): the kernel call
waits for that lock whoever the change belongs to.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import trio

log = logging.getLogger(__name__)

#: notifications one tenant may have waiting; more are dropped (and counted)
MAX_PENDING = 4096
#: worker threads making notifications at once, all tenants together
MAX_THREADS = 16
#: of which one tenant's at most
LANES = 3

#: ("e", directory, name): a name appeared; ("d", inode): data changed
Key = tuple


class Invalidator:
    """Per-tenant queues of kernel notifications (see the module's docstring)."""

    def __init__(self, notify_entry: Callable[[int, bytes], None],
                 notify_data: Callable[[int], None]) -> None:
        self._notify_entry = notify_entry
        self._notify_data = notify_data
        self._queues: dict[int, collections.OrderedDict[Key, None]] = {}
        #: drainers running per tenant (each makes one call at a time)
        self._lanes: dict[int, int] = {}
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        #: notifications dropped because their tenant's queue was full, since mount
        self.dropped = 0
        self._closed = False

    def close(self) -> None:
        """The FUSE session is about to close: drop what waits, make no more calls."""
        self._closed = True
        for q in self._queues.values():
            q.clear()

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def entry(self, tenant: int, parent: int, name: bytes) -> None:
        self._add(tenant, ("e", parent, name))

    def data(self, tenant: int, ino: int) -> None:
        self._add(tenant, ("d", ino))

    def _add(self, tenant: int, key: Key) -> None:
        if self._closed:
            return
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = collections.OrderedDict()
        if key in q:
            return
        if len(q) >= MAX_PENDING:
            if not self.dropped % 1024:
                log.info("kernel notifications of tenant %d: %d waiting, dropping more "
                         "(the kernel's caches expire on their own)", tenant, len(q))
            self.dropped += 1
            return
        q[key] = None
        # Every lane alive is in a call (a lane ends when it finds the queue empty), so
        # a new notification gets a lane of its own while there are fewer than LANES.
        lanes = self._lanes.get(tenant, 0)
        if lanes < LANES:
            self._lanes[tenant] = lanes + 1
            trio.lowlevel.spawn_system_task(self._drain, tenant, q,
                                            name=f"invalidate-{tenant}")

    async def _drain(self, tenant: int, q: collections.OrderedDict[Key, None]) -> None:
        try:
            while q:
                key, _ = q.popitem(last=False)
                await trio.to_thread.run_sync(self._call, key, limiter=self._limiter)
        finally:
            # (the queue is empty here unless the run is ending)
            left = self._lanes[tenant] - 1
            if left:
                self._lanes[tenant] = left
            else:
                del self._lanes[tenant]
                if self._queues.get(tenant) is q and not q:
                    del self._queues[tenant]

    def _call(self, key: Key) -> None:
        if self._closed:
            return
        if key[0] == "e":
            self._notify_entry(key[1], key[2])
        else:
            self._notify_data(key[1])
