"""How much a principal may keep dirty under write-back: its dirty share of its memory
(`dirty_ratio` of its allowance) and, under an I/O limit (its own or an ancestor's),
a few seconds of that limit's write-back for the limited node's whole subtree
(`dirty_limit_seconds`, hostile probe 5, L2). A writer over either writes back its
own frames first (`WriteBack._throttle`, pager/writeback.py). And which files have
dirty frames (of them, which a commit's flush leaves out)."""

from __future__ import annotations

import numpy as np

from .cache import DIRTY, WRITEBACK
from .observe import Observed


class DirtyBounds(Observed):
    """The dirty share and the limited nodes' dirty bounds."""

    #: a principal's dirty share: this fraction of its allowance (set by WriteBack)
    dirty_ratio: float
    #: a limited node's subtree keeps at most this many seconds of its limit's
    #: write-back dirty (`_dirty_room`; set by WriteBack: DIRTY_LIMIT_SECONDS)
    dirty_limit_seconds: float
    #: device blocks of each principal's stream writes on their way (set by
    #: WriteBack): counted with its dirty frames (review of probe5fix, V2)
    _behind_blocks: dict[int, int]

    def _dirty_limit(self, p: int) -> int:
        allowance = self.nframes
        if not self._global:
            m = self._max.get(p)
            if m is not None:
                allowance = min(allowance, m)
        return max(1, int(allowance * self.dirty_ratio))

    def _dirty_room(self, p: int, *, members: list[frozenset[int]] | None = None
                    ) -> int | None:
        """How many more frames `p` may dirty before a limited node on its path holds
        its dirty bound: `dirty_limit_seconds` of the node's write-back rate (at least
        one frame), counted over the node's whole subtree (a tenant's children share
        their parent's limit, so they share its bound), its write-behinds on their way
        with its dirty frames (a commit expedites both) — under `hinted` not its
        discardable dirty frames (`_Acct.disc_dirty`) nor its debt-paced ones
        (`_Acct.paced`), which nothing expedites (those a tenant pays for before its
        next requests instead: `pay_paced`, pager/aging.py). None
        when no limit is on its path. `members`, if given, gets the subtree of each node at its bound.

        Why: a commit writes every dirty frame back past its dirtier's limit (W1's
        fix) and the dirtier repays it afterwards, so a limited tenant with half the
        pool dirty at 1 MB/s owed ~32 s and dirtied at its limit all that time
        (hostile probe 5, L2). Bounded by its limit's write-back, as Linux sizes a
        device's dirty limit by its write-back bandwidth, what a commit expedites for
        it and how long its debt lasts are a few seconds of its limit."""
        lp = self._lim_path.get(p)
        if lp is None:
            return None
        acct = self._acct
        behind = self._behind_blocks
        secs = self.dirty_limit_seconds
        hinted = self._hinted
        room: int | None = None
        for _q, subtree, rate in lp:
            n = 0
            for m in subtree:
                a = acct.get(m)
                if a is not None:
                    # (under `hinted` not its discardable frames: nothing expedites
                    # them, and counted they made every later block of its other
                    # files wait for a write-back of its own: review of probe5fix, V5)
                    # (nor its debt-paced frames: no commit expedites them, and they
                    # are paid for before the writer's requests, not inside them, where
                    # a barrier waits for the write: review of tidy5, R2)
                    n += a.dirty - a.disc_dirty - a.paced if hinted else a.dirty
                if behind:
                    n += behind.get(m, 0)
            r = max(1, int(rate * secs)) - n
            if r <= 0 and members is not None:
                members.append(subtree)
            if room is None or r < room:
                room = r
        return room

    def _over_dirty_bound(self, p: int) -> bool:
        """Whether a limited node on `p`'s path has more dirty frames a commit may
        expedite than its bound (`_dirty_room` below 0): a frame of `p`'s whose
        discardable hint is cleared now, counted there already, is then debt-paced
        instead (`FrameTable._set_disc`), so what a commit may expedite for the node
        stays within its bound."""
        if not self._lim_path:
            return False
        room = self._dirty_room(p)
        return room is not None and room < 0

    def dirty_files(self) -> set[int]:
        """The files with frames dirty or under write-back (after `flush`, only
        discardable and debt-paced ones: the metadata server records them at each
        commit, because a crash may lose their data and they must then come back
        empty)."""
        st = self._state
        files = self._file[(st == DIRTY) | (st == WRITEBACK)]
        return {int(f) for f in np.unique(files) if f}

    def dirty_discardable_files(self) -> set[int]:
        """The files with frames dirty or under write-back that `flush` leaves out:
        discardable ones, and debt-paced ones (once discardable, whose data a crash
        may lose until they are written back)."""
        st = self._state
        files = self._file[((st == DIRTY) | (st == WRITEBACK)) & (self._disc | self._paced)]
        return {int(f) for f in np.unique(files) if f}

    def has_dirty(self, file: int) -> bool:
        """Whether `file` has frames dirty or under write-back."""
        st = self._state
        return bool(((self._file == file) & ((st == DIRTY) | (st == WRITEBACK))).any())
