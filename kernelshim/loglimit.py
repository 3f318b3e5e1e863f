"""Log lines a tenant can cause, rate-limited per tenant.

The daemon's log (`sluice.log`, in the volume directory, on the host filesystem beside
the backing store) is written for tenants' doings: a connection closed for a bad frame,
a reply queue nobody reads, a request that failed with EIO. Unlimited, any local user
grew it by a line per connection made and dropped: 33 KB a second from one process,
charged to nobody, until the host was full for every tenant (probe 16, F2).

`LogLimiter` lets each key (a tenant: "uid N" on the control socket, its top-most
principal at the FUSE boundary) log BURST lines, then one every INTERVAL seconds (a
token bucket, as the kernel's printk_ratelimit); the line that goes after a pause says
how many were left out meanwhile. It keeps at most MAX_KEYS keys (the oldest
state goes first), so the limiter's own memory is bounded too.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

#: lines a key may log at once, and then one every INTERVAL seconds
BURST = 10
INTERVAL = 10.0
#: keys whose state is kept
MAX_KEYS = 1024


class LogLimiter:
    """Rate-limited logging per key (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: key -> [tokens, when they were counted, lines left out since the last one]
        self._keys: dict[object, list[float]] = {}

    def allow(self, key: object) -> int | None:
        """None if a line for `key` must be left out now; else how many were left out
        since the last one that went (0: none)."""
        now = self._clock()
        st = self._keys.pop(key, None)  # (re-inserted last: the dict's order is age)
        if st is None:
            if len(self._keys) >= MAX_KEYS:
                del self._keys[next(iter(self._keys))]
            st = [float(BURST), now, 0.0]
        tokens = min(float(BURST), st[0] + (now - st[1]) / INTERVAL)
        st[1] = now
        self._keys[key] = st
        if tokens < 1.0:
            st[0] = tokens
            st[2] += 1
            return None
        st[0] = tokens - 1.0
        left_out, st[2] = int(st[2]), 0.0
        return left_out

    def log(self, logger: logging.Logger, level: int, key: object, msg: str,
            *args: Any, exc_info: bool = False) -> bool:
        """`logger.log(level, msg, *args)` unless `key` is over its rate; the line that
        goes after some were left out says how many. Whether it went."""
        left_out = self.allow(key)
        if left_out is None:
            return False
        if left_out:
            msg += " (%d more lines for %s left out)"
            args = (*args, left_out, key)
        logger.log(level, msg, *args, exc_info=exc_info)
        return True
