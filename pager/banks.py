"""The principals' memory banks as the pager sees them: guarantees (`cache_min`, a
protection as memcg's memory.min) and ceilings (`cache_max`) in frames, the
admission check of the guarantees against the pool, and who is at a ceiling
(a principal's own or an ancestor's)."""

from __future__ import annotations

import logging

from blockdev import ROOT_PRINCIPAL, BankTree, format_size_approx

from .errors import GuaranteeExceeded
from .frames import FrameTable

log = logging.getLogger(__name__)


class Banks(FrameTable):
    """Memory banks pushed down by kernelshim (`configure_banks`)."""

    def _init_banks(self) -> None:
        #: every principal's memory bank (min, max, parent), pushed down by kernelshim
        self.banks: BankTree = {}
        self._min: dict[int, int] = {}
        self._max: dict[int, int] = {}
        self._parent: dict[int, int | None] = {}
        #: per principal under an I/O limit: the limited nodes on its path (itself
        #: and its ancestors), each with its subtree's principals and its write-back
        #: rate in frames per second (`_limited_paths`; the dirty bound, L2)
        self._lim_path: dict[int, list[tuple[int, frozenset[int], float]]] = {}

    def _protections(self, tree: BankTree) -> dict[int, int]:
        """Each principal's own guarantee in bytes: its cache_min less what its children
        carve from it (the sum over the tree is what must fit in the pool)."""
        carved: dict[int, int] = {}
        for node in tree.values():
            if node.parent is not None:
                carved[node.parent] = carved.get(node.parent, 0) + node.cache_min
        return {pid: max(0, node.cache_min - carved.get(pid, 0)) for pid, node in tree.items()}

    def check_banks(self, tree: BankTree) -> None:
        """Raise GuaranteeExceeded when the guarantees in `tree` add up to more than
        the pool (called at mount and before a principal's bank is added or changed)."""
        total = sum(self._protections(tree).values())
        pool = self.nframes * self.block_size
        if total > pool:
            raise GuaranteeExceeded(
                f"memory guarantees (cache_min) add up to {format_size_approx(total)}, "
                f"more than the pager's pool of {format_size_approx(pool)} "
                f"({self.nframes} frames; see the mount's --cache-size)")

    def configure_banks(self, tree: BankTree) -> None:
        """The principals' memory banks changed (or the mount started). Guarantees past
        the pool are logged and honoured only as far as frames exist (the admission
        check, `check_banks`, is the caller's)."""
        old_parent = self._parent
        self.banks = tree
        if tree:
            self._hand_over_frames(tree, old_parent)
        bs = self.block_size
        prot = self._protections(tree)
        self._min = {pid: v // bs for pid, v in prot.items() if v >= bs}
        self._max = {pid: node.cache_max // bs for pid, node in tree.items()
                     if node.cache_max is not None}
        self._parent = {pid: node.parent for pid, node in tree.items()}
        self._lim_path = self._limited_paths(tree)
        if sum(self._min.values()) > self.nframes:
            log.error("memory guarantees exceed the pager's pool of %d frames", self.nframes)
        self._poke()

    def _hand_over_frames(self, tree: BankTree, old_parent: dict[int, int | None]) -> None:
        """Principals gone from `tree` (`principal rm`) that still hold frames: each
        hands its frames, and the dirty frames it dirtied, to its nearest ancestor
        still in the tree (root at worst), whose ceiling and statistics they count in
        from now on. They stayed charged to the removed id, listed for nobody and under
        no ceiling: a tenant that made and removed children kept any multiple of its
        cache_max resident (probe 15, F3)."""
        gone = [p for p, a in self._acct.items()
                if p in old_parent and p not in tree and (a.resident or a.dirty)]
        for p in gone:
            heir: int | None = old_parent.get(p)
            seen = {p}
            while heir is not None and heir not in tree and heir not in seen:
                seen.add(heir)
                heir = old_parent.get(heir)
            if heir is None or heir not in tree:
                heir = ROOT_PRINCIPAL
            a, h = self._acct[p], self._acct_of(heir)
            # Vectorised, and each of its queues spliced whole onto the heir's queue of
            # the same class: a per-frame move held the loop 322 ms at 65,536 frames
            # (review of stop 25, 12). (A free frame's owner and dirtier are unused.)
            self._owner[self._owner == p] = heir
            self._dirtier[self._dirtier == p] = heir
            for cls, q in list(self._pq.get(p, {}).items()):
                q.move_all_to(self._queue(heir, cls))
            h.resident += a.resident
            a.resident = 0
            h.dirty += a.dirty
            h.disc_dirty += a.disc_dirty
            h.paced += a.paced
            a.dirty = a.disc_dirty = a.paced = 0

    def _limited_paths(self, tree: BankTree) -> dict[int, list[tuple[int, frozenset[int],
                                                                         float]]]:
        """For each principal with an I/O limit on its path (its own or an ancestor's):
        (limited node, the principals of its subtree, its write-back rate in frames per
        second), nearest first. The rate is the tighter of the limit in bytes/s (in
        frames) and in IOPS, counting every frame as a request of its own (write-back
        of scattered frames is one request each): the rate at which that node's
        subtree's dirty frames can surely reach the device. Empty under `global-lru`
        (no principals)."""
        if self._global:
            return {}
        bs = self.block_size
        rate: dict[int, float] = {}
        for pid, node in tree.items():
            r = []
            if node.io_limit_bps:
                r.append(node.io_limit_bps / bs)
            if node.io_limit_iops:
                r.append(float(node.io_limit_iops))
            if r:
                rate[pid] = min(r)
        if not rate:
            return {}
        parent: dict[int, int | None] = {pid: node.parent for pid, node in tree.items()}

        def path(p: int) -> list[int]:
            out: list[int] = []
            seen: set[int] = set()
            q: int | None = p
            while q is not None and q not in seen:
                seen.add(q)
                out.append(q)
                q = parent.get(q)
            return out

        paths = {pid: path(pid) for pid in tree}
        members: dict[int, set[int]] = {q: set() for q in rate}
        for pid, ps in paths.items():
            for q in ps:
                if q in members:
                    members[q].add(pid)
        frozen = {q: frozenset(m) for q, m in members.items()}
        return {pid: [(q, frozen[q], rate[q]) for q in ps if q in rate]
                for pid, ps in paths.items() if any(q in rate for q in ps)}

    def _ancestors(self, p: int) -> list[int]:
        out = []
        seen = set()
        q = self._parent.get(p)
        while q is not None and q not in seen:
            seen.add(q)
            out.append(q)
            q = self._parent.get(q)
        return out

    def _subtree_resident(self, q: int) -> int:
        total = 0
        for p, a in self._acct.items():
            if a.resident and (p == q or q in self._ancestors(p)):
                total += a.resident
        return total

    def _at_max(self, p: int) -> int | None:
        """The principal whose ceiling `p` would pass with one more frame (p itself or
        an ancestor), or None."""
        if not self._max:
            return None
        m = self._max.get(p)
        if m is not None and self._acct_of(p).resident >= m:
            return p
        for q in self._ancestors(p):
            m = self._max.get(q)
            if m is not None and self._subtree_resident(q) >= m:
                return q
        return None
