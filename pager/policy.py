"""Replacement inside one class of frames: SIEVE queues over numpy link arrays, and
the one global CLOCK of the `global-lru` baseline.

SIEVE (Zhang et al., NSDI '24) is as cheap as CLOCK — one visited bit per frame, a
hand, no list moves on a hit — and scan resistant: new frames enter at the head with
the bit clear, the hand walks from the tail towards the head clearing bits, and the
first unvisited frame it meets is evicted *in place*, so a frame that was used again
stays behind the hand while one-time blocks of a scan are taken first. Plain CLOCK
gives every newcomer the same second chance as a hot block and is several points
worse on Zipf traces.

The pager keeps one `Sieve` per (principal, class) where the class is a priority or
"discardable"; every queue shares the frame-indexed arrays `next`/`prev`, so a queue
is four integers and no per-frame Python object exists. `next` points towards the
tail (older), `prev` towards the head (newer); -1 ends a list.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

NIL = -1


def scalar_view(a: np.ndarray) -> Any:
    """A memoryview of `a`'s memory: indexing it from Python gives and takes plain
    ints (or bools, floats) several times faster than numpy scalar access, while
    vectorised scans keep using the array."""
    return a.data


class Links:
    """The link arrays every queue of one pool shares, plus the visited bits."""

    __slots__ = ("next", "prev", "visited", "queue", "nx", "pv", "vis", "qu")

    def __init__(self, nframes: int) -> None:
        self.next = np.full(nframes, NIL, dtype=np.int32)
        self.prev = np.full(nframes, NIL, dtype=np.int32)
        self.visited = np.zeros(nframes, dtype=np.bool_)
        #: the id of the queue a frame is on (-1: none)
        self.queue = np.full(nframes, NIL, dtype=np.int32)
        # the same memory as memoryviews, for fast scalar access from Python
        self.nx = scalar_view(self.next)
        self.pv = scalar_view(self.prev)
        self.vis = scalar_view(self.visited)
        self.qu = scalar_view(self.queue)


class Sieve:
    """One SIEVE queue. `evictable(f)` says whether the hand may take frame f now
    (not pinned, not under I/O); the caller then removes it."""

    __slots__ = ("links", "qid", "head", "tail", "hand", "size")

    def __init__(self, links: Links, qid: int) -> None:
        self.links = links
        self.qid = qid
        self.head = NIL
        self.tail = NIL
        self.hand = NIL
        self.size = 0

    def push(self, f: int, *, visited: bool = False) -> None:
        """Insert frame f at the head (newest)."""
        lk = self.links
        lk.qu[f] = self.qid
        lk.vis[f] = visited
        lk.pv[f] = NIL
        lk.nx[f] = self.head
        if self.head != NIL:
            lk.pv[self.head] = f
        else:
            self.tail = f
        self.head = f
        self.size += 1

    def move_all_to(self, other: Sieve) -> None:
        """Put every frame of this queue at the head of `other` (its newest), in their
        order, visited bits kept; this queue is left empty. Constant time but for the
        frames' queue ids (one vectorised pass)."""
        if self.head == NIL:
            return
        lk = self.links
        lk.queue[lk.queue == self.qid] = other.qid
        lk.nx[self.tail] = other.head
        if other.head != NIL:
            lk.pv[other.head] = self.tail
        else:
            other.tail = self.tail
        other.head = self.head
        other.size += self.size
        self.head = self.tail = self.hand = NIL
        self.size = 0

    def remove(self, f: int) -> None:
        lk = self.links
        n, p = lk.nx[f], lk.pv[f]
        if self.hand == f:
            self.hand = p  # towards the head, as SIEVE moves
        if p != NIL:
            lk.nx[p] = n
        else:
            self.head = n
        if n != NIL:
            lk.pv[n] = p
        else:
            self.tail = p
        lk.nx[f] = lk.pv[f] = lk.qu[f] = NIL
        self.size -= 1

    def victim(self, evictable: Callable[[int], bool]) -> int:
        """The frame SIEVE evicts next (not removed), or -1 when none may go now.
        Clears the visited bits it passes, as the algorithm does."""
        lk = self.links
        visited = lk.vis
        prev = lk.pv
        f = self.hand if self.hand != NIL else self.tail
        # Two rounds clear every bit once and then find a frame, unless all are busy.
        for _ in range(2 * self.size + 1):
            if f == NIL:
                f = self.tail
                if f == NIL:
                    return NIL
            if visited[f]:
                visited[f] = False
            elif evictable(f):
                self.hand = prev[f]
                return f
            f = prev[f]
        return NIL


class Clock:
    """One CLOCK over every frame of the pool (the `global-lru` baseline): the hand
    sweeps frame numbers, a set reference bit buys one more round."""

    __slots__ = ("ref", "hand", "n")

    def __init__(self, nframes: int) -> None:
        self.ref = np.zeros(nframes, dtype=np.bool_)
        self.hand = 0
        self.n = nframes

    def victim(self, evictable: Callable[[int], bool]) -> int:
        ref = scalar_view(self.ref)
        n = self.n
        hand = self.hand
        for _ in range(2 * n + 1):
            if ref[hand]:
                ref[hand] = False
            elif evictable(hand):
                self.hand = hand + 1 if hand + 1 < n else 0
                return hand
            hand = hand + 1 if hand + 1 < n else 0
        self.hand = hand
        return NIL
