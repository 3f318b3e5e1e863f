"""FairTurns' side poll: a request of a principal with no backlog that comes during a
batch ends the backlogged step in progress after its current request (trio polls only
between batches: before, it waited for the step's whole quantum and the rest of the
batch). On trio's MockClock, with real sockets for the side poll."""

from __future__ import annotations

import collections
import dataclasses
import socket

import trio
import trio.testing

from kernelshim.connection import TURN_SECONDS, FairTurns, Share


@dataclasses.dataclass(eq=False)
class _Conn:
    """What FairTurns' side poll looks at of a connection."""

    sock: socket.socket
    turn: Share
    reading: bool = False
    side: bool = False


def _quiet_waiting(turns: FairTurns) -> bool:
    # (getattr: on the code before the side poll the test fails on its assertions)
    return bool(getattr(turns, "quiet_waiting", lambda: False)())


def _watch(turns: FairTurns, conn: _Conn) -> None:
    getattr(turns, "watch", lambda c: None)(conn)


async def test_a_request_that_comes_during_a_batch_ends_the_backlogged_step(
        mock_clock: trio.testing.MockClock) -> None:
    """Two floods (steps of pipelined requests of TURN_SECONDS / 8, a quantum each)
    and a victim sending one request at a time, which comes while a flood's step is in
    progress: no flood request is served between its arrival and its service (the
    step in progress ends after its current request, a released or rescheduled
    backlogged step parks before it begins, and the next poll picks the request up).
    The floods still serve every request, at least one per step, in turn."""
    turns = FairTurns(lambda conn: None)
    trio.lowlevel.add_instrument(turns)
    # (batch, who, clock) of every request served, and of each arrival of the victim's
    ran: list[tuple[int, str, float]] = []
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    pending = 0
    done = trio.Event()
    per_step: list[int] = []
    cut: list[int] = []  # requests served by each step the side poll cut short

    async def bulk(principal: int, n: int) -> None:
        nonlocal pending
        sh = turns.share(principal)
        served = 0
        step = 0
        while served < n:
            await turns.take(sh)
            step += 1
            t0 = trio.current_time()
            k = 0
            while served < n:
                mock_clock.jump(TURN_SECONDS / 8)  # one request
                served += 1
                k += 1
                ran.append((turns._batch, f"bulk{principal}", trio.current_time()))
                if k == 2 and step % 3 == 0 and not pending:
                    b.send(b"x")  # the victim's request comes during this step
                    pending += 1
                    ran.append((turns._batch, "arrival", trio.current_time()))
                now = trio.current_time()
                if now - t0 >= turns.quantum(now):
                    break
                if now < turns.contended_until and served < n and _quiet_waiting(turns):
                    cut.append(k)
                    break
            per_step.append(k)
            if served < n:
                turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def victim() -> None:
        nonlocal pending
        sh = turns.share(3)
        conn = _Conn(a, sh)
        while not done.is_set():
            conn.reading = True
            _watch(turns, conn)
            with trio.move_on_after(1):
                await trio.lowlevel.wait_readable(a)
            conn.reading = False
            if not pending:
                continue
            await turns.take(sh)
            a.recv(16)
            pending -= 1
            ran.append((turns._batch, "victim", trio.current_time()))
            mock_clock.jump(TURN_SECONDS / 4)  # (then back to its wait, as the server's)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            async with trio.open_nursery() as floods:
                floods.start_soon(bulk, 1, 400)
                floods.start_soon(bulk, 2, 400)
            done.set()
            b.send(b"x")
    finally:
        trio.lowlevel.remove_instrument(turns)
        getattr(turns, "close", lambda: None)()
        a.close()
        b.close()
    arrivals = [i for i, (_, w, _t) in enumerate(ran) if w == "arrival"]
    assert len(arrivals) >= 15, len(arrivals)
    for i in arrivals:
        j = next(k for k in range(i + 1, len(ran)) if ran[k][1] == "victim")
        # At most one flood request: a step deferred once already (by this side poll
        # or a poll's requests) runs in the next batch, maybe before the victim, but
        # ends after its first request (before: the rest of the quantum, 6 requests).
        between = [w for _, w, _t in ran[i + 1:j]]
        assert len(between) <= 1, (ran[i], between)
        assert ran[j][0] - ran[i][0] <= 2, (ran[i], ran[j])
    assert len(cut) >= len(arrivals) - 1 and max(cut) <= 2, cut
    # the floods: every request served, at least one a step, one backlogged step a batch
    counts = collections.Counter(w for _, w, _t in ran)
    assert counts["bulk1"] == counts["bulk2"] == 400
    assert min(per_step) >= 1
    batches = collections.Counter(bt for bt, w, _t in ran if w.startswith("bulk"))
    steps_in = collections.Counter()
    last: dict[str, int] = {}
    for bt, w, _t in ran:
        if w.startswith("bulk") and last.get(w) != bt:
            steps_in[bt] += 1
            last[w] = bt
    first = min(batches)
    assert max(c for bt, c in steps_in.items() if bt > first + 1) == 1, steps_in


async def test_a_flood_alone_is_not_cut_short(mock_clock: trio.testing.MockClock) -> None:
    """Alone, a principal's steps are never cut by the side poll (it is looked at only
    while principals compete), even with another principal's request waiting."""
    turns = FairTurns(lambda conn: None)
    trio.lowlevel.add_instrument(turns)
    a, b = socket.socketpair()
    conn = _Conn(a, turns.share(3), reading=True)
    try:
        turns.watch(conn)
        b.send(b"x")
        assert turns.quiet_waiting()  # (what the server asks only while they compete)
        sh = turns.share(1)
        await turns.take(sh)
        assert trio.current_time() >= turns.contended_until
        for _ in range(5):
            turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()
            await turns.take(sh)
        assert sh.parked == 0 and turns.preempted == 0
    finally:
        trio.lowlevel.remove_instrument(turns)
        turns.close()
        a.close()
        b.close()


def test_only_a_waiting_reader_of_a_principal_without_backlog_counts() -> None:
    """The side poll counts a readable socket only when its reader waits for it and its
    tenant has no backlog; any other readable socket (a flood's, a reader held back by
    its send queue) leaves the set, so that it is not seen at every look, and comes
    back when its reader waits again; a closed connection's socket is taken out."""
    turns = FairTurns(lambda conn: None)
    turns._batch = 100
    pairs = [socket.socketpair() for _ in range(3)]
    quiet, flood, held = (_Conn(p[0], turns.share(i)) for i, p in enumerate(pairs))
    try:
        turns.share(1).backlog = 97  # the flood gave a turn up with work left lately
        for c in (quiet, flood, held):
            c.reading = c is not held
            turns.watch(c)
            assert c.side
        assert not turns.quiet_waiting()  # nothing readable
        pairs[1][1].send(b"x")
        pairs[2][1].send(b"x")
        assert not turns.quiet_waiting()
        assert not flood.side and not held.side and quiet.side  # out until they wait
        pairs[0][1].send(b"x")
        assert turns.quiet_waiting()
        assert turns.quiet_waiting()  # (level-triggered: until its reader reads)
        quiet.reading = False
        assert not turns.quiet_waiting()
        assert not quiet.side
        # back when the reader waits again; a tenant whose backlog is old counts
        turns._batch = 200
        for c in (quiet, flood):
            c.reading = True
            turns.watch(c)
        assert turns.quiet_waiting()
        turns.unwatch(quiet)
        turns.unwatch(flood)
        assert not turns._side_conns and not turns.quiet_waiting()
    finally:
        turns.close()
        for x, y in pairs:
            x.close()
            y.close()
