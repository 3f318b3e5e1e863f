"""FairTurns' hold (anticipation): while principals compete, the end of a step of a
principal with no backlog holds the backlogged steps back for HOLD_SECONDS, so that a
client waiting for each reply finds the loop idle when its next request comes; a
backlogged step is still released at least every HOLD_MAX_WAIT. On trio's MockClock:
the loop thread's wait during a hold polls `FairTurns.ready`, which here moves the
clock on instead of looking at an epoll descriptor."""

from __future__ import annotations

import bisect
import math
import socket
from typing import Any

import pytest
import trio
import trio.testing

from test_hostile import kernel  # noqa: F401 - the fixture

import kernelshim.connection as connection
from kernelshim.connection import TURN_SECONDS, FairTurns

# (getattr: on the code before the hold the tests fail on their assertions)
HOLD_SECONDS: float = getattr(connection, "HOLD_SECONDS", 0.3e-3)
HOLD_MAX_WAIT: float = getattr(connection, "HOLD_MAX_WAIT", 1e-3)

#: the client's time between a reply and its next request (well within a hold)
THINK = 40e-6
#: the daemon's time for one of its requests
SERVE = 20e-6
#: a flood request (a quantum is 8 of them)
FLOOD_REQUEST = TURN_SECONDS / 8


async def _run(mock_clock: trio.testing.MockClock, *, hold: bool, requests: int,
               think: float = THINK, floods: int = 2, clients: int = 1,
               by_flood: dict[int, list[float]] | None = None,
               may_hold: bool = True, held: list[int] | None = None,
               ) -> tuple[list[tuple[float, float]], list[float], float]:
    """Two floods (backlogged principals 1 and 2, pipelined requests without end) and a
    client of principal 3 sending `requests` requests one at a time, `think` after each
    reply (`floods` floods, principals 1..floods; a client that owns `clients`
    principals sends them in turn; `by_flood` gathers each flood's request times).
    Returns the client's requests (when each came, when its service began), the
    times of the floods' requests, and when the client's last request was served."""
    turns = FairTurns(lambda conn: None)
    if hold:
        def ready() -> bool:
            # The loop's wait: time goes on, and the client's request "comes" when its
            # timer is due (MockClock gives the loop an infinite timeout: the real
            # clock's would end the wait there).
            mock_clock.jump(5e-6)
            if trio.lowlevel.current_statistics().seconds_to_next_deadline > 0:
                return False
            trio.lowlevel.current_trio_token().run_sync_soon(lambda: None)  # (its wake-up)
            return True
        turns.ready = ready
        # (the idle poll's conditions: False as on an overloaded machine)
        turns.may_hold = lambda: may_hold
    trio.lowlevel.add_instrument(turns)
    victim: list[tuple[float, float]] = []
    flood: list[float] = []
    done = trio.Event()

    async def bulk(principal: int) -> None:
        sh = turns.share(principal)
        while not done.is_set():
            await turns.take(sh)
            t0 = trio.current_time()
            while True:
                mock_clock.jump(FLOOD_REQUEST)
                flood.append(trio.current_time())
                if by_flood is not None:
                    by_flood.setdefault(principal, []).append(trio.current_time())
                now = trio.current_time()
                if now - t0 >= turns.quantum(now):
                    break
            turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def client() -> None:
        shares = [turns.share(floods + 1 + i) for i in range(clients)]
        await trio.sleep(0.01)  # the floods compete first
        for i in range(requests):
            sh = shares[i % clients]
            await trio.sleep(think)
            came = trio.current_time()
            await turns.take(sh)
            victim.append((came, trio.current_time()))
            mock_clock.jump(SERVE)
        # A hold's end is no trio deadline: on the autojump clock the floods' steps,
        # held after the last request while no task waits for a timer, would wait
        # forever (review of victim4, R4). Wait out the hold before the end.
        await trio.sleep(HOLD_MAX_WAIT)
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            for principal in range(1, floods + 1):
                nursery.start_soon(bulk, principal)
            nursery.start_soon(client)
        end = victim[-1][1] + SERVE
    finally:
        trio.lowlevel.remove_instrument(turns)
        turns.close()
    if held is not None:
        held.append(turns.held)
    return victim, flood, end


def _behind(victim: list[tuple[float, float]], flood: list[float]) -> list[int]:
    """Per client request: the flood requests served from the end of its previous
    request (its reply) to the start of its own service."""
    out = []
    prev = victim[0][0]
    for came, start in victim:
        out.append(bisect.bisect_right(flood, start) - bisect.bisect_right(flood, prev))
        prev = start + SERVE
    return out


async def test_a_client_waiting_for_each_reply_finds_the_loop_held(
        mock_clock: trio.testing.MockClock) -> None:
    """Its next request comes THINK after its reply: with the hold, the floods' steps
    wait for it (before: a flood step of a quantum ran in every gap, and the request
    waited for the rest of it), except the one backlogged step released every
    HOLD_MAX_WAIT, so that the floods are never held longer than that."""
    victim, flood, end = await _run(mock_clock, hold=True, requests=400)
    behind = _behind(victim, flood)
    span = end - victim[0][0]
    hit = sum(1 for b in behind if b)
    # (Review of victim4, R1: no longer "at most one flood step per HOLD_MAX_WAIT in
    # the client's gaps, fewer than a tenth of its requests behind one, a median wait
    # of 0": that held the floods to ~1/7 of the loop, below their fair share; see
    # test_a_held_flood_keeps_its_fair_share_of_the_loop. Fewer than without a hold.)
    assert hit < len(victim) * 0.9, hit
    waits = sorted(start - came for came, start in victim)
    assert waits[int(len(waits) * 0.9)] <= 2 * TURN_SECONDS + FLOOD_REQUEST, waits[-10:]
    # The floods are held, not starved: a request of theirs at least every
    # HOLD_MAX_WAIT (and the quantum it may take) while the client runs.
    during = [t for t in flood if victim[0][0] <= t <= end]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) <= HOLD_MAX_WAIT + 2 * TURN_SECONDS, max(gaps)
    assert len(during) >= span / (HOLD_MAX_WAIT + 2 * TURN_SECONDS), (len(during), span)


async def test_without_a_hold_the_floods_run_in_the_clients_gaps(
        mock_clock: trio.testing.MockClock) -> None:
    """The same run without `ready` (no idle poll: nothing is held): a flood step runs
    in nearly every gap of the client's, as before the hold."""
    victim, flood, _end = await _run(mock_clock, hold=False, requests=200)
    behind = _behind(victim, flood)
    assert sum(1 for b in behind if b) > len(victim) // 2


async def test_nothing_is_held_when_the_idle_poll_would_not_poll(
        mock_clock: trio.testing.MockClock) -> None:
    """A hold spins the loop thread on `ready` as the idle poll does: where the idle
    poll would not poll (the machine overloaded, its backoff), nothing is held, and the
    floods run in the client's gaps as without a hold (review of victim4, R2: the hold
    spun up to HOLD_SECONDS each time under exactly the load of an attack)."""
    held: list[int] = []
    await _run(mock_clock, hold=True, requests=200, held=held)
    assert held[0] > 0  # (where it may, the loop is held)
    victim, flood, _end = await _run(mock_clock, hold=True, requests=200, may_hold=False,
                                     held=held)
    assert held[1] == 0, held
    behind = _behind(victim, flood)
    assert sum(1 for b in behind if b) > len(victim) // 2


async def test_a_slower_client_holds_the_loop_only_for_a_while(
        mock_clock: trio.testing.MockClock) -> None:
    """A client whose next request comes later than HOLD_SECONDS after its reply does
    not keep the floods waiting for it: the hold ends, the parked steps go on."""
    think = 3 * HOLD_SECONDS
    victim, flood, end = await _run(mock_clock, hold=True, requests=50, think=think)
    during = [t for t in flood if victim[0][0] <= t <= end]
    # Per gap of the client's, the floods ran for about think - HOLD_SECONDS.
    ran = len(during) * FLOOD_REQUEST
    assert ran >= 0.5 * len(victim) * (think - HOLD_SECONDS), (ran, len(victim))


async def test_a_lone_requests_reply_is_not_held_while_principals_compete(
        kernel: Any, tmp_path: Any, mock_clock: trio.testing.MockClock) -> None:  # noqa: F811
    """While principals compete a step gathers the replies of the requests one read
    brought (one `sendmsg` at its end); a request that came alone — a client waiting for
    each reply — had its reply held too, until the step's next `recv` and the
    connection's poll (0.03-0.045 ms a request in bench_hostile's traces). A real
    ShimServer: a lone request's reply goes out at once, the first two of three
    pipelined in one read are gathered, the last one's goes out with them."""
    from kernelshim.principals import PrincipalTable
    from kernelshim.protocol import REQUEST, Decoder, encode
    from kernelshim.server import ShimServer
    from test_hostile import _Stats

    path = tmp_path / "c.sock"
    srv = ShimServer(kernel, PrincipalTable(None), _Stats(), path)  # type: ignore[arg-type]
    corked: list[bool] = []  # per request: its reply held when its handling ended
    handle = srv._handle

    async def noting_handle(conn: Any, m: Any) -> None:
        await handle(conn, m)
        corked.append(conn.corked)

    srv._handle = noting_handle  # type: ignore[method-assign]
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def replies(n: int) -> None:
        d, got = Decoder(), 0
        while got < n:
            await trio.lowlevel.wait_readable(c)
            try:
                got += len(d.feed(c.recv(1 << 20)))
            except BlockingIOError:
                pass

    async def ticker(scope: trio.CancelScope) -> None:
        # A hold's end is no trio deadline: on the autojump clock a step held while
        # nothing else waits for a timer (the client done) would wait forever. Tick
        # until the floods see `done` (review of victim4, R4).
        while not done.is_set() or len(flood_left) < floods:
            await trio.sleep(HOLD_SECONDS / 3)

    flood_left: list[int] = []

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            c.connect(str(path))
            c.setblocking(False)
            c.send(encode(REQUEST, 1, {"op": "hello"}))
            await replies(1)
            srv.turns.contended_until = math.inf  # principals compete
            corked.clear()
            for rid in range(2, 6):  # one at a time
                c.send(encode(REQUEST, rid, {"op": "hello"}))
                await replies(1)
            c.send(b"".join(encode(REQUEST, rid, {"op": "hello"}) for rid in range(6, 9)))
            await replies(3)
            nursery.cancel_scope.cancel()
    finally:
        srv.turns.close()
        c.close()
    assert corked[:4] == [False] * 4, corked  # (before: [True, True, True, True])
    assert corked[4:] == [True, True, True], corked


@pytest.mark.parametrize(("floods", "clients"), [(1, 1), (3, 1), (1, 3), (4, 1)])
async def test_a_held_flood_keeps_its_fair_share_of_the_loop(
        mock_clock: trio.testing.MockClock, floods: int, clients: int) -> None:
    """Review of victim4 (R1): a tenant that sends one request at a time, back to back,
    held the loop for the floods' steps but one every HOLD_MAX_WAIT, whatever the
    number of principals: a heavy tenant with many requests in flight (a parallel
    build) kept ~11% of the loop beside one such client, the loop idle most of the
    rest (and less still with several). Every backlogged principal keeps at least its
    fair share, 1/N of the N principals active (the client's principals counted,
    however many it owns); the hold only gives the holders' share back to them."""
    by_flood: dict[int, list[float]] = {}
    victim, _flood, end = await _run(mock_clock, hold=True, requests=400, think=THINK,
                                     floods=floods, clients=clients, by_flood=by_flood)
    start = victim[0][0]
    span = end - start
    n = floods + clients
    for principal in range(1, floods + 1):
        ran = sum(1 for t in by_flood.get(principal, []) if start <= t <= end)
        share = ran * FLOOD_REQUEST / span
        # (a little below 1/N: the step in progress at either end of the span)
        assert share >= 0.9 / n, (principal, share, 1 / n)
