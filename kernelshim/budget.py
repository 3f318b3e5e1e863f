"""A direct request's schedule points within its first moments, answered in place.

A FUSE handler's schedule points within `HANDLER_CHECKPOINT_BUDGET` of its start (the
device scheduler's `cancel_shielded_checkpoint` when a channel is free, an uncontended
`trio.Lock`, `trio.lowlevel.checkpoint`) are answered by sluice's binding without a
pass of the event loop (pyfuse3 `run_handler`, docs/dev/invariants.md). A direct
client's request went around the loop at each of them: on a 4 KiB read that misses
the pager, the scheduler's schedule point cost about 25 µs (a pass of the loop: the
epoll system call, the instruments' hooks, the task's wake-up), a fifth of the round
trip, where a FUSE read of the same block paid nothing (docs/BENCHMARKS.md, "Direct
4 KiB reads: the schedule points a FUSE read does not pay").

`run_within_budget` gives the shim's requests the same rule: it drives the request's
coroutine in the calling task and answers a schedule point passed within `budget`
seconds of the request's start with "go on" at once. A request that really waits (an
event, a lock another task holds, a thread, a timer) or passes a schedule point later
gives the loop back as usual; cancellation is unaffected (`checkpoint()` still checks
for it after its schedule point, without yielding unless cancelled). The budget is the
shim's turn while principals contend (TURN_SECONDS), as for the FUSE handlers: no one
waits longer behind a direct request than behind a FUSE one, or behind the step of
pipelined requests the same task may serve anyway (FairTurns' quantum). Alone, with no
FUSE request queued, the server gives a request the rest of that quantum instead
(`ShimServer._request_budget`): the step would hold the loop that long anyway. A large
request's deliberate yields between slices (`FileOps._yield_if_hogging`) are schedule
points too: one that comes within the budget is answered in place like any other, so
a metadata request queued meanwhile waits at most the budget (and the slice then in
progress) longer for its turn.
"""

from __future__ import annotations

import time
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import trio

try:
    # What trio's schedule points yield to the loop: a request for nothing but a turn,
    # answered with Value(None) (as sluice's binding does for FUSE handlers).
    from outcome import Value as _Value
    from trio._core._traps import CancelShieldedCheckpoint as _CHECKPOINT
except ImportError:  # another trio: every schedule point is the loop's
    _CHECKPOINT = _Value = None  # type: ignore[assignment,misc]

T = TypeVar("T")

#: set by `yield_to_loop` for the one schedule point it passes: a yield made on purpose
#: (to let others run), which `run_within_budget` hands to the loop, not answers in place
_deliberate = False


async def yield_to_loop() -> None:
    """Give the event loop back for one batch on purpose, also inside
    `run_within_budget` (which would answer a plain schedule point in place and end the
    in-place phase there: from then on every schedule point is the loop's). A request
    that yields to let others run — between the slices of a large read, metadata first —
    must really yield, or the serve loop, believing it did, lets one step run on for
    many requests (review of direct3, D1)."""
    global _deliberate
    _deliberate = True
    try:
        await trio.lowlevel.cancel_shielded_checkpoint()
    finally:
        _deliberate = False


@types.coroutine
def run_within_budget(coro: Coroutine[Any, Any, T], budget: float) -> Generator[Any, Any, T]:
    """`await coro`, with its schedule points within `budget` seconds of now answered in
    place (see the module docstring; the budget is wall time, `time.perf_counter`, as
    in the binding: it bounds how long the loop is held, whatever clock trio runs on).
    Everything the coroutine yields after that, and
    everything the loop sends or throws back, passes through unchanged (PEP 380)."""
    global _deliberate
    start = time.perf_counter()
    try:
        value = coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    if value is _CHECKPOINT and _CHECKPOINT is not None:
        deadline = start + budget
        while value is _CHECKPOINT and not _deliberate and time.perf_counter() < deadline:
            try:
                value = coro.send(_Value(None))
            except StopIteration as e:
                return e.value  # type: ignore[no-any-return]
    while True:
        _deliberate = False  # (seen: this one goes to the loop; no other task sees it)
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown into the coroutine, as await does
            try:
                value = coro.throw(exc)
            except StopIteration as e:
                return e.value  # type: ignore[no-any-return]
        else:
            try:
                value = coro.send(sent)
            except StopIteration as e:
                return e.value  # type: ignore[no-any-return]
