"""Hybrid waiting for the reply of a small data request: poll briefly, then sleep.

A 4 KiB read through the direct path is one request and one reply on the control
socket. When the client and the daemon run on two CPUs that are otherwise idle, the
client falling asleep in `recv` and being woken by the daemon's reply costs a wake-up
of a halted CPU — on this project's VMs an inter-processor interrupt through the
hypervisor, more than the daemon's whole work for the read (docs/BENCHMARKS.md,
"Direct 4 KiB reads: hybrid polling"). Polling the socket for a short while instead
(`recv(MSG_DONTWAIT)`) takes the reply without that wake-up, as the kernel's hybrid
polling of NVMe completions and io_uring's busy-poll do.

Polling only pays when the daemon runs on another CPU while the client polls. When
both share a CPU (a loaded machine), the polling client takes the CPU the daemon needs
and the reply comes later. So polling here is bounded (`SPIN_SECONDS`) and adaptive:
two polls in a row that end without the reply switch polling off for the next
`skip` requests, and `skip` doubles with every further failure (up to `MAX_SKIP`),
halving again with each success (one failure alone, a reply that was late once, only
counts towards the next). On a loaded machine polling therefore stays off nearly always (one
failed poll of at most SPIN_SECONDS per MAX_SKIP requests); on an idle one it stays on.

This module holds only the decision (no socket); the sync client's `_data_call` uses
it (`kernelshim/client.py`). The trio client never polls: its waits give the event
loop to the application's other tasks.
"""

from __future__ import annotations

#: the longest one request polls for its reply before sleeping (seconds): longer than
#: a 4 KiB read's round trip on an idle two-CPU machine (about 100-150 µs including the
#: wake-up of the daemon), far shorter than a scheduler time slice
SPIN_SECONDS = 250e-6
#: requests that sleep without polling after the first failed poll
MIN_SKIP = 8
#: ... and at most, after many failures in a row
MAX_SKIP = 4096


class HybridWait:
    """Whether (and how long) to poll for the next reply, learned from the last polls.

    `budget()` before a wait: seconds to poll (0: sleep at once). `polled(ok)` after a
    wait that polled: whether the reply came while polling."""

    __slots__ = ("spin", "skip", "_backoff", "_fails", "polls", "hits")

    def __init__(self, spin: float = SPIN_SECONDS) -> None:
        if not 0 <= spin <= 0.01:
            raise ValueError(f"spin must be between 0 and 0.01 seconds, not {spin!r}")
        #: seconds one wait may poll (0: never poll)
        self.spin = spin
        #: waits left that sleep without polling
        self.skip = 0
        self._backoff = MIN_SKIP
        #: failed polls in a row
        self._fails = 0
        #: waits that polled, and of them those whose reply came while polling
        self.polls = 0
        self.hits = 0

    def budget(self) -> float:
        if not self.spin:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return self.spin

    def polled(self, ok: bool) -> None:
        self.polls += 1
        if ok:
            self.hits += 1
            self._fails = 0
            self._backoff = max(MIN_SKIP, self._backoff // 2)
            return
        self._fails += 1
        if self._fails >= 2:
            self.skip = self._backoff
            self._backoff = min(MAX_SKIP, self._backoff * 2)
