"""Application hints: a file's own (`set_file_hints`, from its xattrs) apply to all
of its frames; range hints (`advise`: priority, discardable, willneed, dontneed) act
on the advising principal's own frames only, never on another principal's frames of
the same blocks."""

from __future__ import annotations

import numpy as np
import trio

from blockdev import BankTree, PrincipalId

from . import trace as tr
from .cache import CLEAN, DIRTY, FREE
from .freeing import Freeing
from .policy import NIL

#: range hints (advise priority/discardable) kept per file and principal; older ones
#: are forgotten
MAX_RANGE_HINTS = 64
#: ... and per tenant (a principal below root and its subtree), over all files: past
#: it, the lists of the tenant's (file, principal) advised least recently are forgotten
MAX_TENANT_RANGE_HINTS = 4096
#: blocks an `advise` range looks up one by one; longer ranges scan the pool instead
SCAN_BLOCKS = 1024


class Hints(Freeing):
    """set_file_hints, advise, forget_file."""

    def set_file_hints(self, file: int, *, priority: int | None = None,
                       discardable: bool | None = None, sequential: bool | None = None) -> None:
        """The hints of a whole file (its xattrs); None leaves a hint as it is."""
        prio, disc, seq = self._hints.get(file, (0, False, False))
        if priority is not None:
            prio = max(-32768, min(32767, int(priority)))
        if discardable is not None:
            disc = bool(discardable)
        if sequential is not None:
            seq = bool(sequential)
        if (prio, disc, seq) == (0, False, False):
            self._hints.pop(file, None)
        else:
            self._hints[file] = (prio, disc, seq)
        self._rehint(np.flatnonzero((self._file == file) & (self._state != FREE)))

    def _rehint(self, frames: np.ndarray) -> None:
        step = self.rehint_step
        if step is not None and len(frames) > step:
            # A file of many cached frames (a 400 MB file in a 1 GiB pool: 0.1-0.3 s of
            # the loop in one step: probe 11, F6): the rest in parts, `settle_hints`.
            self._rehint_left.append(frames[step:])
            frames = frames[:step]
        for f in frames.tolist():
            prio, disc, _ = self._hints_for(int(self._file_m[f]), int(self._fblock_m[f]),
                                            int(self._owner_m[f]))
            if prio != self._prio_m[f] or disc != self._disc_m[f]:
                self._prio_m[f] = prio
                self._set_disc(f, disc)
                if self._links.qu[f] != NIL:
                    self._requeue(f)

    async def settle_hints(self) -> None:
        """Apply the file hints `_rehint` left (`rehint_step` frames a step of the
        loop): the metadata server awaits this before the request that changed a
        file's hints (or removed the file) returns, so the hints are in force when it
        does. A frame reused meanwhile gets its new file's hints, as `_rehint` always
        computes them from the frame's file."""
        step = self.rehint_step or 1024
        while self._rehint_left:
            frames = self._rehint_left[0]
            if len(frames) > step:
                self._rehint_left[0] = frames[step:]
                frames = frames[:step]
            else:
                self._rehint_left.pop(0)
            self._rehint_part(frames)
            if self._rehint_left:
                await trio.lowlevel.checkpoint()

    def _rehint_part(self, frames: np.ndarray) -> None:
        step, self.rehint_step = self.rehint_step, None
        try:
            self._rehint(frames)
        finally:
            self.rehint_step = step

    def forget_file(self, file: int) -> None:
        """The file is gone: drop its hints."""
        if self._tw is not None:
            self._trace_op(tr.FORGET, 0, 0, 0, file, 0)
        self._hints.pop(file, None)
        for owner in list(self._range_hints.get(file, ())):
            self._drop_range_hints(file, owner)
        self._file_tick.pop(file, None)
        self._rehint(np.flatnonzero((self._file == file) & (self._state != FREE)))

    async def advise(self, file: int, runs: list[tuple[int, int, int]], *,
                     principal: PrincipalId, priority: int | None = None,
                     discardable: bool | None = None, willneed: bool = False,
                     dontneed: bool = False) -> None:
        """Hints for ranges of a file: `runs` are (file block, device block, count).
        priority/discardable stick to the range; willneed reads it in (charged to
        `principal`); dontneed drops its frames now (dirty ones written back first,
        discardable dirty ones dropped and the file reported). Only `hinted` acts on
        them; the other policies record and ignore them.

        A tenant acts on its own pages only: priority, discardable and dontneed touch
        the frames charged to `principal` (now, and those it brings in later), never
        another principal's frames of the same blocks — a shared block is charged to
        the first principal that brought it in, and only that one's hints move it.
        (Several tenants may read one file; one of them must not be able to drop or
        reorder the others' cached pages.) willneed charges what it reads in to
        `principal` and leaves blocks resident for others as they are. A file's own
        hints (`set_file_hints`, from its xattrs, set by a writer) apply to every
        frame of the file."""
        if self._tw is not None:
            flags = ((tr.F_WILLNEED if willneed else 0) | (tr.F_DONTNEED if dontneed else 0)
                     | (tr.F_SET_PRIORITY if priority is not None else 0)
                     | (tr.F_SET_DISCARDABLE if discardable is not None else 0)
                     | (tr.F_DISCARDABLE if discardable else 0))
            for fb, db, n in runs:
                self._tw.add(trio.current_time(), int(principal), n, file, fb, db,
                             tr.ADVISE, flags, priority or 0)
        if priority is not None or discardable is not None:
            p = int(principal)
            self._add_range_hints(file, p, [(fb, fb + n, priority, discardable)
                                            for fb, _db, n in runs])
            frames = []
            for f, _b, fblock in self._owned_frames_in(runs, p):
                self._retag_hint(f, file, fblock)
                frames.append(f)
            self._rehint(np.array(frames, dtype=np.int64))
            # in force on every frame of the range when this returns, applied a part a
            # step (review of stop 23, 4)
            await self.settle_hints()
        if not self._hinted:
            return
        p = int(principal)
        if willneed:
            for fb, db, n in runs:
                await self._prefetch(db, n, p, file, fb)
        if dontneed:
            for f, b, _fblock in self._owned_frames_in(runs, p):
                await self._drop_frame(f, b, p)
            self._poke()

    def _add_range_hints(self, file: int, p: int,
                         new: list[tuple[int, int, int | None, bool | None]]) -> None:
        """Keep `p`'s new range hints on `file`, within the bounds: its own oldest
        ranges on the file past MAX_RANGE_HINTS are forgotten (never another's, which a
        tenant could otherwise flush with its own), and past MAX_TENANT_RANGE_HINTS
        for its tenant, the tenant's lists advised least recently (never another
        tenant's). Kept per file and principal: a frame's hints are looked up in its
        owner's list only, so one tenant's ranges (250 children x 64 on one file)
        no longer cost every other tenant's reads of the file a scan of them all
        (another's reads fell from 23 to 4.9 MB/s: probe 20, F3)."""
        tenant = self._tenant(p)
        order = self._hint_lists.setdefault(tenant, {})
        if (file, p) not in order:
            self._drop_range_hints(file, p)  # (kept for another tenant before a move)
        lst = self._range_hints.setdefault(file, {}).setdefault(p, [])
        before = len(lst)
        lst.extend(new)
        if len(lst) > MAX_RANGE_HINTS:
            del lst[:len(lst) - MAX_RANGE_HINTS]
        self._hint_total[tenant] = self._hint_total.get(tenant, 0) + len(lst) - before
        order.pop((file, p), None)
        order[(file, p)] = None  # (the most recently advised last)
        while self._hint_total[tenant] > MAX_TENANT_RANGE_HINTS:
            old_file, old_p = next(iter(order))
            self._drop_range_hints(old_file, old_p)

    def _drop_range_hints(self, file: int, p: int) -> None:
        """Forget `p`'s range hints on `file` (the frames keep what they were given)."""
        by_owner = self._range_hints.get(file)
        lst = by_owner.pop(p, None) if by_owner is not None else None
        if by_owner is not None and not by_owner:
            del self._range_hints[file]
        if lst is None:
            return
        for tenant, order in self._hint_lists.items():
            if (file, p) in order:
                del order[(file, p)]
                self._hint_total[tenant] -= len(lst)
                if not order:
                    del self._hint_lists[tenant]
                    del self._hint_total[tenant]
                break

    def configure_banks(self, tree: BankTree) -> None:
        """The banks (`Banks.configure_banks`), and the range hints' counts per
        tenant after a move in the tree (`_retenant_range_hints`)."""
        super().configure_banks(tree)
        self._retenant_range_hints()

    def _retenant_range_hints(self) -> None:
        """The principal tree changed (`configure_banks`): count every list of range
        hints under its owner's tenant now, in the order they were advised, and hold
        each tenant to MAX_TENANT_RANGE_HINTS again. A principal moved under another
        tenant kept its lists counted under the old one until it advised that file
        again: the old tenant's own advice then pushed out lists that were another
        tenant's by then, and the new tenant's bound did not see them (review of stop
        28, F4). Work: one step per list kept, on a principal change (a costly,
        rate-limited operation)."""
        if not self._hint_lists:
            return
        old = self._hint_lists
        self._hint_lists = {}
        self._hint_total = {}
        for order in old.values():
            for file, p in order:
                lst = self._range_hints.get(file, {}).get(p)
                if lst is None:
                    continue
                tenant = self._tenant(p)
                self._hint_lists.setdefault(tenant, {})[(file, p)] = None
                self._hint_total[tenant] = self._hint_total.get(tenant, 0) + len(lst)
        for tenant in list(self._hint_total):
            while self._hint_total.get(tenant, 0) > MAX_TENANT_RANGE_HINTS:
                old_file, old_p = next(iter(self._hint_lists[tenant]))
                self._drop_range_hints(old_file, old_p)

    def _tenant(self, p: int) -> int:
        """The principal below root whose subtree holds `p` (p itself when its parent
        is root or unknown)."""
        q = p
        seen = set()
        while True:
            parent = self._parent.get(q)
            if parent is None or parent == 0 or parent in seen:
                return q
            seen.add(q)
            q = parent

    def _owned_frames_in(self, runs: list[tuple[int, int, int]],
                         p: int) -> list[tuple[int, int, int]]:
        """(frame, device block, file block) of the resident frames charged to `p` that
        hold a block of `runs`. Work bounded by the pool, not by the range: a range
        longer than SCAN_BLOCKS is matched against the pool's frames in one vectorised
        pass (a hint over a 1 GiB file looked up each of its 262,144 blocks)."""
        out: list[tuple[int, int, int]] = []
        if sum(n for _fb, _db, n in runs) <= SCAN_BLOCKS:
            owner = self._owner_m
            for fb, db, n in runs:
                for k in range(n):
                    f = self._where.get(db + k)
                    if f is not None and owner[f] == p:
                        out.append((f, db + k, fb + k))
            return out
        if not runs:
            return out
        r = np.array(sorted((db, n, fb) for fb, db, n in runs), dtype=np.int64)
        starts, counts, fbs = r[:, 0], r[:, 1], r[:, 2]
        cand = np.flatnonzero((self._owner == p) & (self._state != FREE)
                              & (self._frame_block >= 0))
        blocks = self._frame_block[cand]
        i = np.searchsorted(starts, blocks, side="right") - 1
        ok = i >= 0
        i = np.where(ok, i, 0)
        ok &= blocks < starts[i] + counts[i]
        where = self._where
        for f, b, k in zip(cand[ok].tolist(), blocks[ok].tolist(), i[ok].tolist()):
            if where.get(b) == f:
                out.append((f, b, int(fbs[k]) + b - int(starts[k])))
        out.sort(key=lambda t: t[1])
        return out

    def _retag_hint(self, f: int, file: int, fblock: int) -> None:
        self._file_m[f] = file
        self._fblock_m[f] = fblock

    async def _drop_frame(self, f: int, b: int, p: int) -> None:
        """dontneed: drop frame `f` (holding device block `b`) if it is still charged to
        `p` (frames charged to other principals stay). A dirty discardable frame takes
        its whole file's dirty discardable frames with it (the file is lost as a whole,
        and reported); other dirty frames are written back first.

        Only frames `p` dirtied itself (or clean ones): a frame `p` brought in but
        another principal dirtied stays, left to that one's write-back (throttling,
        aging, the next commit). Writing it back now would spend the dirtier's I/O
        bank at a time `p` chose — and charging it to `p` instead would make `p` pay
        for another's data — and dropping it, discardable, would lose the dirtier's
        data on `p`'s word (hostile probe 5, L4). Its memory stays charged to `p`
        until reclaim takes it (once clean, or written back by its dirtier)."""
        owner = self._owner_m
        if self._where.get(b) != f or owner[f] != p or not self._evictable(f):
            return  # (changed while an earlier frame was written back)
        if self._state_m[f] == DIRTY and self._dirtier_m[f] != p:
            return  # another's dirty data: its own write-back's business
        if self._state_m[f] == DIRTY:
            if self._disc_m[f]:
                a = self._acct_of(p)
                a.discarded += 1
                before = a.resident
                self._drop_discardable_file(f)
                self._released(p, before - a.resident)
                return
            g = int(self._gen_m[f])
            await self._writeback_frames(self._cluster(f))
            if (self._gen_m[f] != g or not self._evictable(f)
                    or self._state_m[f] != CLEAN or owner[f] != p):
                return
        self._unmap(f)
        self._released(p, 1)
