"""What the kernel offers of the layers below it beyond the data path: the pager's
file hints, reclaim subscriptions and traces, its events (a discardable file dropped)
and state (write-back, dirty discardable files), and statistics of the pager and the
device. The metadata server asks for these here and never touches `kernel.pager` or
`kernel.device` (tests/test_layers.py checks it).

`Kernel` inherits `LowerLayers`; it owns nothing but the two references it uses.
"""

from __future__ import annotations

from typing import Callable, Collection

import trio

from blockdev import BlockDevice, DeviceStatistics, PrincipalId
from pager import Pager, PagerStatistics, ReclaimSubscription


class LowerLayers:
    """The pager's and the device's services, through the kernel (see the module)."""

    pager: Pager
    device: BlockDevice

    @property
    def writeback(self) -> bool:
        """Whether the pager caches writes (write-back) rather than writing through."""
        return self.pager.writeback

    def on_discarded(self, callback: Callable[[int], None]) -> None:
        """Have `callback(inode)` called when the pager drops the dirty pages of a
        discardable file (synchronously, from inside its reclaim: it must not block)."""
        self.pager.on_discarded = callback

    def dirty_discardable_files(self) -> set[int]:
        """The files with dirty frames a barrier leaves out: discardable ones, and
        debt-paced ones (dirtied while discardable, hint since cleared; a crash may
        lose them until written back). An fsync of the file or `writeback_file`
        writes them."""
        return self.pager.dirty_discardable_files()

    def device_statistics(self, principals: Collection[int] | None = None
                          ) -> DeviceStatistics:
        """The device's and its scheduler's statistics (an immutable record), with the
        rows of `principals` only if given."""
        return self.device.statistics(principals)

    def pager_statistics(self, principals: Collection[int] | None = None
                         ) -> PagerStatistics:
        """The pager's statistics (an immutable record), with the rows of
        `principals` only if given."""
        return self.pager.statistics(principals)

    def set_file_hints(self, inode: int, *, priority: int | None = None,
                       discardable: bool | None = None, sequential: bool | None = None) -> None:
        """A file's hints for all its pages (the metadata server pushes its
        user.sluice.* xattrs here at open and when they change); None: unchanged."""
        self.pager.set_file_hints(inode, priority=priority, discardable=discardable,
                                  sequential=sequential)

    def forget_file(self, inode: int) -> None:
        """The file is gone (its last name and handle): the pager drops its hints."""
        self.pager.forget_file(inode)

    async def settle_hints(self) -> None:
        """Finish applying file hints to cached pages, a part a step of the loop
        (`set_file_hints` and `forget_file` apply them to a bounded number of pages at
        once): the caller awaits this before its request returns."""
        await self.pager.settle_hints()

    def on_reclaim(self, principal: PrincipalId,
                   callback: Callable[[int, int, float], object]) -> ReclaimSubscription:
        """Subscribe `callback(ticket, nframes, seconds_left)` to the pager's requests
        that `principal` release frames; `cancel()` the handle to stop. The callback
        must not block (it runs in the pager's reclaim task). Answered by the
        principal's dontneed advice and `answer_reclaim(principal, ticket)`."""
        pager = self.pager

        def asked(nframes: int, deadline: float) -> None:
            req = pager.pending_reclaim(principal)
            callback(req[0] if req else 0, nframes,
                     max(0.0, deadline - trio.current_time()))

        return pager.on_reclaim(principal, asked)

    def answer_reclaim(self, principal: PrincipalId, ticket: int, released: int = 0) -> bool:
        """`principal` is done with reclaim request `ticket` (False: not pending)."""
        return self.pager.answer_reclaim(principal, released, ticket=ticket)

    def start_trace(self, sink) -> None:
        """Have the pager log every block access into `sink` (a binary file; the
        format is the pager's, read by pager/replay.py) until stop_trace()."""
        self.pager.start_trace(sink)

    def stop_trace(self) -> None:
        self.pager.stop_trace()

    def written_blocks(self):  # -> numpy array of block numbers
        """Device blocks that hold data (for scrubbing and fsck)."""
        return self.device.written_blocks()
