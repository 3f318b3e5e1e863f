"""Idle polling of the daemon's event loop (fs/idlepoll.py): when it polls, for how
long, and how it backs off, on trio's MockClock with exact virtual times; the probe of
trio's epoll descriptor in a real loop; and a real mount with the option on and off.

No timed assertions: whether a poll catches a request depends on the machine, so the
mounted tests check contents, errors and that polling ran (or not), not its speed
(scripts/bench_fs.py measures that, on and off in one run).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import REPO, sluice
from fs.idlepoll import (DEFAULT_WINDOW, LOAD_CHECK, MAX_CPU_WAIT, MAX_PAUSE, MAX_WINDOW,
                         MIN_PAUSE, IdlePoll, epoll_ready_probe, parse_window,
                         ThreadCpuWait)

W = 200e-6
STEP = 25e-6


class Requests:
    """A stand-in for the epoll descriptor: ready once the virtual clock reaches `at`;
    every look at it costs STEP of virtual time (as polling costs real time)."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.at: float | None = None
        self.looks = 0

    def ready(self) -> bool:
        self.looks += 1
        if self.at is not None and trio.current_time() >= self.at - 1e-12:
            return True
        self.clock.jump(STEP)
        return False


def sleep(idle: IdlePoll, clock: trio.testing.MockClock, woken_after: float = 1e-4,
          timeout: float = 1.0) -> None:
    """One sleep of the loop (with its poll, if one is due), ended `woken_after` later:
    by I/O if that is before `timeout`, else by the timeout (a timer)."""
    idle.before_io_wait(timeout)
    clock.jump(woken_after)
    idle.after_io_wait(timeout)


def elapsed_in_steps(t0: float) -> float:
    return (trio.current_time() - t0) / STEP


async def test_polls_only_after_a_wakeup_by_io(mock_clock: trio.testing.MockClock) -> None:
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    sleep(idle, mock_clock, woken_after=1.0)  # nothing served yet; a timer woke it
    sleep(idle, mock_clock, woken_after=1.0)  # after a timer: no poll either
    assert req.looks == 0 and idle.polls == 0
    sleep(idle, mock_clock, woken_after=0.3)  # this sleep a request ended
    assert req.looks == 0
    t0 = trio.current_time()
    req.at = t0 + 3 * STEP
    idle.before_io_wait(1.0)
    assert (idle.polls, idle.hits) == (1, 1)
    assert elapsed_in_steps(t0) == pytest.approx(3)
    assert idle.spun == pytest.approx(3 * STEP)


async def test_never_polls_while_tasks_are_runnable(mock_clock: trio.testing.MockClock) -> None:
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    sleep(idle, mock_clock)
    for _ in range(5):
        idle.before_io_wait(0)  # trio's timeout 0: a task is runnable, no sleep
        idle.after_io_wait(0)
    assert req.looks == 0
    idle.before_io_wait(1.0)  # still serving: the busy passes changed nothing
    assert idle.polls == 1


async def test_a_poll_lasts_the_window_at_most_and_never_past_the_timeout(
        mock_clock: trio.testing.MockClock) -> None:
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    sleep(idle, mock_clock)
    t0 = trio.current_time()
    sleep(idle, mock_clock, woken_after=0)
    assert W / STEP <= elapsed_in_steps(t0) < W / STEP + 1
    assert (idle.polls, idle.hits) == (1, 0)
    t0 = trio.current_time()
    idle.before_io_wait(2 * STEP)  # a timer due sooner than the window ends
    assert 2 <= elapsed_in_steps(t0) < 3


async def test_two_misses_pause_polling_and_the_pause_doubles(
        mock_clock: trio.testing.MockClock) -> None:
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    sleep(idle, mock_clock)
    sleep(idle, mock_clock)  # one miss alone changes nothing
    assert (idle.polls, idle.pause) == (1, MIN_PAUSE)
    t_miss = trio.current_time()
    sleep(idle, mock_clock)  # the second in a row: no polls for MIN_PAUSE
    assert (idle.polls, idle.pause) == (2, 2 * MIN_PAUSE)
    looks = req.looks
    sleep(idle, mock_clock)
    assert req.looks == looks and idle.polls == 2  # paused
    mock_clock.jump(t_miss + MIN_PAUSE - trio.current_time())
    sleep(idle, mock_clock)  # the pause is over; a third miss: 2 x MIN_PAUSE off
    assert idle.polls == 3 and idle.pause == 4 * MIN_PAUSE
    # Many misses in a row: the pause grows to MAX_PAUSE and stays there.
    for _ in range(20):
        mock_clock.jump(idle.pause)
        sleep(idle, mock_clock)
    assert idle.polls == 23 and idle.pause == MAX_PAUSE
    assert idle.hits == 0


async def test_catches_halve_the_pause(mock_clock: trio.testing.MockClock) -> None:
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    sleep(idle, mock_clock)
    for _ in range(6):  # six misses: pauses of 1, 2, 4, 8, 16 ms; the next 32 ms
        mock_clock.jump(idle.pause)
        sleep(idle, mock_clock)
    assert idle.pause == 32 * MIN_PAUSE
    mock_clock.jump(idle.pause)
    for n in (16, 8, 4, 2, 1, 1):
        req.at = trio.current_time()  # a request already waiting
        sleep(idle, mock_clock)
        assert idle.pause == n * MIN_PAUSE
    assert idle.hits == 6
    req.at = None  # a catch also cleared the misses: one miss alone changes nothing
    sleep(idle, mock_clock)
    looks = req.looks
    sleep(idle, mock_clock)
    assert req.looks > looks


async def test_no_polls_while_the_loop_thread_waits_for_a_cpu(
        mock_clock: trio.testing.MockClock) -> None:
    """Every LOAD_CHECK the loop thread's wait for a CPU is read; above MAX_CPU_WAIT of
    the interval nothing is polled until the next look finds it below again."""
    req = Requests(mock_clock)
    waited = [0.0]
    idle = IdlePoll(W, req.ready, cpu_wait=lambda: waited[0])
    sleep(idle, mock_clock)
    req.at = trio.current_time()
    sleep(idle, mock_clock)  # the first look: nothing to compare with yet; it polls
    assert (idle.polls, idle.skipped) == (1, 0)
    mock_clock.jump(LOAD_CHECK)
    waited[0] += LOAD_CHECK * MAX_CPU_WAIT * 2  # the thread waited a fifth of the time
    req.at = trio.current_time()
    sleep(idle, mock_clock)
    assert idle.overloaded and (idle.polls, idle.skipped) == (1, 1)
    for _ in range(3):  # until the next look, nothing is polled
        sleep(idle, mock_clock)
    assert (idle.polls, idle.skipped) == (1, 4)
    mock_clock.jump(LOAD_CHECK)
    waited[0] += LOAD_CHECK * MAX_CPU_WAIT / 2  # a twentieth: polling again
    req.at = trio.current_time()
    sleep(idle, mock_clock)
    assert not idle.overloaded and (idle.polls, idle.hits) == (2, 2)


async def test_window_now_follows_the_loops_own_conditions(
        mock_clock: trio.testing.MockClock) -> None:
    """What a connection task that just served a request may poll for its next one
    (kernelshim/server.py `_poll_next`): the window while the loop is serving, nothing
    before the first wake-up by I/O, during a backoff pause, or while overloaded; its
    outcomes count as the loop's polls."""
    req = Requests(mock_clock)
    waited = [0.0]
    idle = IdlePoll(W, req.ready, cpu_wait=lambda: waited[0])
    assert idle.window_now() == 0.0  # not woken by I/O yet: an idle daemon
    sleep(idle, mock_clock)
    assert idle.window_now() == W
    t0 = trio.current_time()
    idle.polled(False, now=t0)
    idle.polled(False, now=t0)  # two misses in a row: paused
    assert idle.window_now() == 0.0
    mock_clock.jump(MIN_PAUSE)
    assert idle.window_now() == W
    idle.polled(True, now=trio.current_time())
    assert idle.hits == 1 and idle.pause == MIN_PAUSE
    mock_clock.jump(LOAD_CHECK)
    idle.window_now()  # a look at the load
    mock_clock.jump(LOAD_CHECK)
    waited[0] += LOAD_CHECK * MAX_CPU_WAIT * 2
    skipped = idle.skipped
    assert idle.window_now() == 0.0 and idle.overloaded and idle.skipped == skipped + 1
    req.at = trio.current_time()
    assert idle.ready()


def test_thread_cpu_wait_counts_up() -> None:
    cpu_wait = ThreadCpuWait.open()
    assert cpu_wait is not None, "no /proc/thread-self/schedstat: the load check is off"
    try:
        a = cpu_wait()
        assert 0 <= a <= cpu_wait()
    finally:
        cpu_wait.close()


def test_window_checked() -> None:
    assert parse_window("0") == 0
    assert parse_window("250") == pytest.approx(250e-6)
    assert parse_window(f"{MAX_WINDOW * 1e6:g}") == pytest.approx(MAX_WINDOW)
    for bad, why in (("-1", "outside"), ("2001", "outside"), ("fast", "not a number")):
        with pytest.raises(ValueError, match=why):
            parse_window(bad)
    with pytest.raises(ValueError):
        IdlePoll(0, lambda: True)
    assert 0 < DEFAULT_WINDOW <= MAX_WINDOW


async def test_probe_sees_what_the_loop_waits_for() -> None:
    """epoll_ready_probe in a real trio loop: ready exactly when a descriptor the loop
    waits on has data, and looking does not take the event from the loop."""
    ready = epoll_ready_probe()
    assert ready is not None, "trio's epoll descriptor not found: idle polling is off"
    a, b = socket.socketpair()
    with a, b:
        got = trio.Event()

        async def reader() -> None:
            await trio.lowlevel.wait_readable(a)
            assert a.recv(1) == b"x"
            got.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not ready()
            b.send(b"x")
            assert ready() and ready()  # looked at twice: still there
            with trio.fail_after(10):
                await got.wait()


async def test_the_loop_serves_with_the_instrument() -> None:
    """The instrument in a real loop with the real probe: a ping-pong over a socket
    pair goes on and every poll is counted."""
    ready = epoll_ready_probe()
    assert ready is not None
    idle = IdlePoll(W, ready)
    trio.lowlevel.add_instrument(idle)
    try:
        a, b = trio.socket.socketpair()
        with a, b:
            async def echo() -> None:
                for _ in range(50):
                    await b.send(await b.recv(1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                for i in range(50):
                    await a.send(bytes([i]))
                    assert await a.recv(1) == bytes([i])
    finally:
        trio.lowlevel.remove_instrument(idle)
    assert idle.hits <= idle.polls


# -- a real mount --------------------------------------------------------------------------

def _untar_and_compare(mnt: Path, tmp_path: Path) -> None:
    src = REPO / "fs"
    archive = tmp_path / "fs.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src.parent), src.name], check=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(mnt)], check=True)
    r = subprocess.run(["diff", "-r", str(src), str(mnt / src.name)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.mounted
@pytest.mark.parametrize("usec", ["250", "0"])
def test_mount_with_idle_polling(volume: Path, mount_factory, tmp_path: Path,
                                 usec: str) -> None:
    m = mount_factory(volume, "--idle-poll", usec)
    _untar_and_compare(m.path, tmp_path)
    assert m.daemon_alive
    m.stop()
    log = m.log.read_text()
    if usec == "0":
        assert "idle polling off" in log and "polls," not in log
    else:
        assert "idle polling on: up to 250 µs" in log
        line = next(ln for ln in log.splitlines() if "polls," in ln)
        polls = int(line.split("µs): ")[1].split(" polls")[0])
        assert polls > 0, line  # the loop went idle after serving, and polled


@pytest.mark.mounted
def test_bad_idle_poll_is_one_line(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    for args, text in ((["--idle-poll", "5000"], "--idle-poll: 5000 µs is outside"),
                       (["--idle-poll", "soon"], "--idle-poll: 'soon' is not a number"),
                       (["-o", "idle_poll=-3"], "idle_poll=-3: -3 µs is outside")):
        r = sluice("mount", str(volume), str(mp), *args, check=False)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.mounted
def test_background_mount_takes_o_idle_poll(volume: Path, tmp_path: Path) -> None:
    """`-o idle_poll=USEC` (fstab's spelling) reaches the detached daemon."""
    from conftest import is_mounted
    mp = tmp_path / "mp"
    mp.mkdir()
    sluice("mount", str(volume), str(mp), "-o", "idle_poll=300")
    try:
        (mp / "f").write_bytes(b"polled")
        assert (mp / "f").read_bytes() == b"polled"
    finally:
        sluice("umount", str(mp))
    assert not is_mounted(mp)
    assert "idle polling on: up to 300 µs" in (volume / "sluice.log").read_text()


async def test_a_connections_own_poll_counts_as_time_spent_polling(
        mock_clock: trio.testing.MockClock) -> None:
    """`polled` ends a poll begun at `now`: the shim's connections poll their own socket
    (kernelshim/server.py `_poll_next`) and report it so; that time is counted in
    `spun` like the loop's own polls (`shim_stats`' idle_spun_ms)."""
    req = Requests(mock_clock)
    idle = IdlePoll(W, req.ready)
    t0 = trio.current_time()
    mock_clock.jump(3 * STEP)
    idle.polled(False, now=t0)
    mock_clock.jump(STEP)
    t1 = trio.current_time()
    mock_clock.jump(2 * STEP)
    idle.polled(True, now=t1)
    assert (idle.polls, idle.hits) == (2, 1)
    assert idle.spun == pytest.approx(5 * STEP)


@pytest.mark.mounted
@pytest.mark.parametrize("usec", ["250", "0"])
def test_shim_stats_say_how_long_the_loop_spent_polling(volume: Path, mount_factory,
                                                        usec: str) -> None:
    """`shim_stats`' `idle_spun_ms`: the daemon loop's time spent polling for a next
    request (what scripts/bench_hostile.py leaves out of the victim's demand on the
    loop). A direct client's request after request makes the loop poll between them;
    with polling off nothing is counted."""
    from kernelshim.client import Client
    m = mount_factory(volume, "--idle-poll", usec)
    with open(m.path / "f", "wb") as f:
        f.write(b"x" * 4096)
    with Client.connect(m.path, shm_size=1 << 16) as c:
        before = c.call("shim_stats")["loop"]["idle_spun_ms"]
        t0 = time.perf_counter()
        with c.open("f") as f:
            for _ in range(300):
                f.stat()
                assert f.pread(4096, 0) == b"x" * 4096
        wall_ms = (time.perf_counter() - t0) * 1e3
        after = c.call("shim_stats")["loop"]["idle_spun_ms"]
    if usec == "0":
        assert before == after == 0.0
    else:
        assert 0.0 < after - before < wall_ms
