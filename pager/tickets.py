"""The records of cooperative reclaim: a subscriber's handle (`ReclaimSubscription`,
what `Pager.on_reclaim` returns) and one pending request (`_Request`). The logic that
sends, settles and enforces them is pager/reclaim.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from blockdev import PrincipalId

if TYPE_CHECKING:
    from .frames import FrameTable


class ReclaimSubscription:
    """What `on_reclaim` returns; `cancel()` stops the requests."""

    __slots__ = ("_pager", "principal", "callback")

    def __init__(self, pager: FrameTable, principal: PrincipalId,
                 callback: Callable[[int, float], object]) -> None:
        self._pager = pager
        self.principal = principal
        self.callback = callback

    def cancel(self) -> None:
        subs = self._pager._subs.get(self.principal)
        if subs and self in subs:
            subs.remove(self)
            if not subs:
                del self._pager._subs[self.principal]


class _Request:
    """A reclaim request pending for one principal: release `nframes` (down to
    `target` resident) by `deadline`. `ticket` names it to the subscribers; `released`
    counts the frames the principal dropped itself (dontneed) since it was sent;
    `answered` is set when a subscriber says it is done."""

    __slots__ = ("ticket", "nframes", "target", "deadline", "answered", "released")

    def __init__(self, ticket: int, nframes: int, target: int, deadline: float) -> None:
        self.ticket = ticket
        self.nframes = nframes
        self.target = target
        self.deadline = deadline
        self.answered = False
        self.released = 0
