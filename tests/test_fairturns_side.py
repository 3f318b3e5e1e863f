"""FairTurns' side poll: a request of a principal with no backlog that comes during a
batch ends the backlogged step in progress after its current request (trio polls only
between batches: before, it waited for the step's whole quantum and the rest of the
batch). On trio's MockClock, with real sockets for the side poll."""

from __future__ import annotations

import collections
import dataclasses
import math
import socket
from typing import Any

import trio
import trio.testing

from test_hostile import kernel  # noqa: F401 - the fixture

from kernelshim.connection import SIDE_BACKLOG_BATCHES, TURN_SECONDS, FairTurns, Share


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
            # (a complete request: as the server, out of the side poll's hits)
            getattr(turns, "side_hits", set()).discard(conn)
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


async def test_a_dribbler_cuts_at_most_one_step_in_a_while(
        mock_clock: trio.testing.MockClock) -> None:
    """Review V1: a principal with no backlog that keeps a byte arriving in its socket
    during every step (a dribbled partial frame, a request whose reply it does not wait
    for) made every look of the side poll positive, and every backlogged step was cut
    to one request (mean 1.25 requests a step, 1051 batches for 800 requests; without
    the side poll 10.0 and 120). Its reader woke and served no complete request: its
    tenant counts as backlogged for SIDE_BACKLOG_BATCHES batches, so it cuts at most
    one step in that many batches. (The harness: the first test's model of the
    server's step and reader; the reader reads the byte, decodes nothing, and waits
    again, as the server's.)"""
    turns = FairTurns(lambda conn: None)
    trio.lowlevel.add_instrument(turns)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    per_step: list[int] = []
    done = trio.Event()
    batch0 = turns._batch

    async def bulk(principal: int, n: int) -> None:
        sh = turns.share(principal)
        served = 0
        while served < n:
            await turns.take(sh)
            t0 = trio.current_time()
            k = 0
            while served < n:
                mock_clock.jump(TURN_SECONDS / 8)
                served += 1
                k += 1
                try:
                    b.send(b"x")  # the dribbler: a byte during every step
                except BlockingIOError:
                    pass
                now = trio.current_time()
                if now - t0 >= turns.quantum(now):
                    break
                if now < turns.contended_until and served < n and _quiet_waiting(turns):
                    break
            per_step.append(k)
            if served < n:
                turns.backlogged(sh)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def dribbler() -> None:
        sh = turns.share(3)
        conn = _Conn(a, sh)
        while not done.is_set():
            conn.reading = True
            _watch(turns, conn)
            with trio.move_on_after(1):
                await trio.lowlevel.wait_readable(a)
            conn.reading = False
            await turns.take(sh)
            try:
                a.recv(1)  # a byte: no complete request
            except BlockingIOError:
                pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribbler)
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
    batches = turns._batch - batch0
    mean = sum(per_step) / len(per_step)
    assert mean > 6, (mean, batches, turns.preempted)  # a quantum is 8 requests
    assert turns.preempted <= batches // SIDE_BACKLOG_BATCHES + 2, (turns.preempted, batches)
    assert turns.side_misses >= 1
    assert batches < 200, batches  # without the side poll ~120


def test_a_reused_descriptor_is_watched() -> None:
    """Review V4: a connection whose socket was closed without `unwatch` and whose
    descriptor number a new connection got: the kernel dropped the old entry when the
    socket closed, so `epoll.modify` failed (ENOENT, swallowed) and the new connection
    was not watched. Now the stale entry is dropped and the socket registered."""
    turns = FairTurns(lambda conn: None)
    turns._batch = 100
    a1, b1 = socket.socketpair()
    old = _Conn(a1, turns.share(1), reading=True)
    turns.watch(old)
    fd = a1.fileno()
    a1.close()  # (closed without unwatch)
    b1.close()
    a2, b2 = socket.socketpair()
    if a2.fileno() != fd:
        a2, b2 = b2, a2
    assert a2.fileno() == fd
    new = _Conn(a2, turns.share(2), reading=True)
    try:
        turns.watch(new)
        assert new.side and not old.side
        assert turns._side_conns[fd] is new
        b2.send(b"x")
        assert turns.quiet_waiting()
    finally:
        turns.close()
        a2.close()
        b2.close()


def test_a_watch_after_a_cut_for_nothing_costs_the_tenant_the_side_poll() -> None:
    """Review V1, unit: a socket the side poll counted whose reader waits again without
    having served a complete request: its tenant counts as backlogged there for
    SIDE_BACKLOG_BATCHES batches; a reader that served one (the server takes it out of
    `side_hits`) keeps it."""
    turns = FairTurns(lambda conn: None)
    turns._batch = 100
    pairs = [socket.socketpair() for _ in range(2)]
    honest, dribbler = (_Conn(p[0], turns.share(i + 1), reading=True)
                        for i, p in enumerate(pairs))
    try:
        for c, (_x, y) in zip((honest, dribbler), pairs):
            turns.watch(c)
            y.send(b"x")
            assert turns.quiet_waiting()
            assert c in turns.side_hits
            c.sock.recv(16)  # its reader woke and read
        turns.side_hits.discard(honest)  # (a complete request: the server's part)
        turns._batch = 101
        for c in (honest, dribbler):
            turns.watch(c)
        assert dribbler.turn.side_miss == 101 and honest.turn.side_miss < 0
        assert turns.side_misses == 1 and not turns.side_hits
        pairs[1][1].send(b"x")
        assert not turns.quiet_waiting()  # the dribbler's byte: not counted
        pairs[0][1].send(b"x")
        assert turns.quiet_waiting()  # the honest one's request: counted
        # after SIDE_BACKLOG_BATCHES batches the dribbler counts again
        turns._batch = 101 + SIDE_BACKLOG_BATCHES + 1
        pairs[0][0].recv(16)
        turns.side_hits.clear()
        turns.watch(dribbler)
        assert turns.quiet_waiting()
    finally:
        turns.close()
        for x, y in pairs:
            x.close()
            y.close()


async def test_a_servers_flood_step_ends_for_a_request_that_comes_during_it(
        kernel: Any, tmp_path: Any, mock_clock: trio.testing.MockClock) -> None:  # noqa: F811
    """Review V2, the server's own cut (`_serve_requests_of`): a real ShimServer, one
    principal pipelining 3000 requests on one connection, another sending one request
    at a time on its own, each sent while the flood's step is serving (from inside the
    step, as a client on another CPU would). Time stands still (MockClock): the flood's
    step would never use its quantum, so only the side poll's cut ends it; the
    one-at-a-time requests each wait for at most the flood's request in progress and
    one more (the flood's step released into the batch before the victim runs), not
    for the rest of the read (hundreds)."""
    from kernelshim.principals import PrincipalTable
    from kernelshim.protocol import REQUEST, encode
    from kernelshim.server import ShimServer
    from test_hostile import _Stats

    path = tmp_path / "c.sock"
    srv = ShimServer(kernel, PrincipalTable(None), _Stats(), path)  # type: ignore[arg-type]
    victim_sh, flood_sh = srv.turns.share(1001), srv.turns.share(1002)
    order = iter([victim_sh, flood_sh])
    srv.turns.turn_of = lambda principal: next(order)  # type: ignore[method-assign]
    events: list[str] = []
    handle = srv._handle
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rid = 100
    pending = False
    arrivals = 0

    async def logging_handle(conn: Any, m: Any) -> None:
        nonlocal rid, pending, arrivals
        if conn.turn is flood_sh:
            events.append("flood")
            if not pending and arrivals < 10 and events.count("flood") % 100 == 20:
                rid += 1
                victim.send(encode(REQUEST, rid, {"op": "hello"}))
                events.append("arrival")
                pending = True
                arrivals += 1
        elif events:
            events.append("victim")
            pending = False
        await handle(conn, m)

    srv._handle = logging_handle  # type: ignore[method-assign]

    n = 3000
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            for s in (victim, flood):  # (connected in this order: their shares above)
                await _handshake(s, path)
            srv.turns.contended_until = math.inf  # principals compete
            backlog = memoryview(b"".join(encode(REQUEST, i, {"op": "hello"})
                                          for i in range(2, n + 2)))

            async def send_all() -> None:
                view = backlog
                while view:
                    await trio.lowlevel.wait_writable(flood)
                    try:
                        view = view[flood.send(view):]
                    except BlockingIOError:
                        pass

            nursery.start_soon(send_all)
            await _replies(flood, n)
            nursery.cancel_scope.cancel()
    finally:
        srv.turns.close()
        victim.close()
        flood.close()
    waited = []
    for i, e in enumerate(events):
        if e == "arrival" and "victim" in events[i:]:
            j = events.index("victim", i)
            waited.append(events[i + 1:j].count("flood"))
    print("flood requests each one-at-a-time request waited for:", waited,
          "cut:", srv.turns.preempted)
    assert max(waited) <= 2, waited  # (the server's cut disabled: [2981], the rest)
    assert events.count("flood") == n + 1  # (and its hello)
    assert arrivals == 10 and events.count("victim") == 10, events.count("victim")
    assert srv.turns.preempted >= 10


async def test_stats_gives_way_between_parts_to_a_request_that_comes(
        kernel: Any, tmp_path: Any, mock_clock: trio.testing.MockClock) -> None:  # noqa: F811
    """`stats` is served a part at a time; a request of a principal with no backlog
    that comes while one part is built waits for that part, not for the rest of the
    operation (FairTurns.part_done: the side poll, as between a flood's requests).
    Time stands still (MockClock), so the quantum never ends the step: only the cut
    does. A real ShimServer; the metadata service's parts are counted as built."""
    from kernelshim.principals import PrincipalTable
    from kernelshim.protocol import REQUEST, encode
    from kernelshim.server import ShimServer
    from test_hostile import _Stats

    path = tmp_path / "c.sock"
    stats = _Stats()
    srv = ShimServer(kernel, PrincipalTable(None), stats, path)  # type: ignore[arg-type]
    victim_sh, admin_sh = srv.turns.share(1001), srv.turns.share(1002)
    order = iter([victim_sh, admin_sh])
    srv.turns.turn_of = lambda principal: next(order)  # type: ignore[method-assign]
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list[str] = []
    handle = srv._handle

    def parts(*, names: Any = None, context: Any = (), by_kind: Any = True) -> Any:
        for i in range(12):
            events.append(f"part{i}")
            if i == 2:  # the victim's request comes while the third part is built
                victim.send(encode(REQUEST, 7, {"op": "hello"}))
                events.append("arrival")
            yield f"k{i}", i

    stats.statistics_parts = parts  # type: ignore[method-assign]

    async def logging_handle(conn: Any, m: Any) -> None:
        if conn.turn is victim_sh and events:
            events.append("victim")
        await handle(conn, m)

    srv._handle = logging_handle  # type: ignore[method-assign]

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            for s in (victim, admin):  # (connected in this order: their shares above)
                await _handshake(s, path)
            srv.turns.contended_until = math.inf  # principals compete
            admin.send(encode(REQUEST, 2, {"op": "stats"}))
            got = await _replies(admin, 1)
            await _replies(victim, 1)
            nursery.cancel_scope.cancel()
    finally:
        srv.turns.close()
        victim.close()
        admin.close()
    print(events)
    assert got[0].payload["k11"] == 11  # every part in the reply
    assert events.index("victim") < events.index("part11"), events
    # it waited for the part in progress (and the next, built before the batch ended)
    assert events.index("victim") <= events.index("arrival") + 3, events


async def test_refusals_give_way_to_a_request_that_comes(
        kernel: Any, tmp_path: Any, mock_clock: trio.testing.MockClock) -> None:  # noqa: F811
    """The refused connections due at once are answered up to REFUSALS_PER_STEP a step
    (a write and a close each, 5-15 us), fewer when a request of a principal with no
    backlog comes meanwhile: it waits for the refusal in progress, not for all of them.
    Time stands still (MockClock); a real ShimServer."""
    from kernelshim.principals import PrincipalTable
    from kernelshim.protocol import REQUEST, encode
    from kernelshim.server import REFUSALS_PER_STEP, ShimServer
    from test_hostile import _Stats

    path = tmp_path / "c.sock"
    srv = ShimServer(kernel, PrincipalTable(None), _Stats(), path)  # type: ignore[arg-type]
    victim_sh = srv.turns.share(1001)
    srv.turns.turn_of = lambda principal: victim_sh  # type: ignore[method-assign]
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list[str] = []
    handle = srv._handle
    refuse = srv._refuse_now

    def logging_refuse(sock: Any, reply: bytes) -> None:
        events.append("refusal")
        if events.count("refusal") == 2:
            victim.send(encode(REQUEST, 7, {"op": "hello"}))
            events.append("arrival")
        refuse(sock, reply)

    srv._refuse_now = logging_refuse  # type: ignore[method-assign]

    async def logging_handle(conn: Any, m: Any) -> None:
        if events:
            events.append("victim")
        await handle(conn, m)

    srv._handle = logging_handle  # type: ignore[method-assign]
    peers = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            await _handshake(victim, path)
            srv.turns.contended_until = math.inf  # principals compete
            for _ in range(REFUSALS_PER_STEP):  # refused connections, all due
                a, b = socket.socketpair()
                peers.append(b)
                srv._refused.append((trio.current_time() - 1,
                                     trio.socket.from_stdlib_socket(a), b"no"))
            srv._refused_wake.set()
            for _ in range(100_000):  # (time stands still: checkpoints, not sleeps)
                if "victim" in events and not srv._refused:
                    break
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        told = [b.recv(8) for b in peers]
    finally:
        srv.turns.close()
        victim.close()
        for b in peers:
            b.close()
    print(events)
    assert events.count("refusal") == REFUSALS_PER_STEP
    i = events.index("arrival")
    assert events[i + 1] == "victim", events  # before the refusals still due
    assert told == [b"no"] * REFUSALS_PER_STEP  # and each refused peer told


async def _handshake(s: socket.socket, path: Any) -> None:
    """Connect `s` to the server at `path`, non-blocking, and say hello (its reply read)."""
    from kernelshim.protocol import REQUEST, encode
    s.connect(str(path))
    s.setblocking(False)
    s.send(encode(REQUEST, 1, {"op": "hello"}))
    await _replies(s, 1)


async def _replies(s: socket.socket, n: int) -> list[Any]:
    """The next `n` replies on non-blocking socket `s` (a Decoder of its own)."""
    from kernelshim.protocol import Decoder
    d = Decoder()
    got: list[Any] = []
    while len(got) < n:
        await trio.lowlevel.wait_readable(s)
        try:
            got += d.feed(s.recv(1 << 20))
        except BlockingIOError:
            pass
    return got
