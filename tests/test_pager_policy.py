"""Property tests of the pager's invariants under every policy, write-back on and off:
random sequences of reads, writes, discards, hints, advice, bank changes, flushes and
fsyncs, each checked step by step against a model of block contents.

Properties (pager/pool.py):
- frames are conserved and charges equal residency (`check_invariants` after every step);
- reads return the newest data written (a non-discardable dirty page is never lost);
- after `flush()` every block of a non-discardable file holds its newest data on the
  device (dirty data reaches the device before flush returns);
- a discardable dirty page is never written back, except by an fsync of its own file;
- a guarantee is honoured: the policy never picks a victim frame of a principal at or
  below its guarantee for someone else.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pager import check_invariants

from blockdev import BankNode, BlockNo, PrincipalId
from pager import POLICIES, Pager
from pager.replay import memory_device

BS = 512
NB = 48
FILE_BLOCKS = 8
ROOT = PrincipalId(0)
#: a block of a discardable file that was dropped: not checked until written again
LOST = b"<lost>"


def file_of(b: int) -> int:
    return b // FILE_BLOCKS + 1


def data(seed: int, b: int) -> bytes:
    return bytes([(seed * 31 + b) % 251 + 1]) * BS


# A request stays inside one file (the shim passes one file per request).
def _range(draw) -> tuple[int, int]:
    b = draw(st.integers(0, NB - 1))
    n = draw(st.integers(1, FILE_BLOCKS - b % FILE_BLOCKS))
    return b, n


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(["read", "read", "write", "write", "write", "discard",
                                 "hint", "advise", "flush", "fsync", "banks"]))
    who = draw(st.integers(1, 3))
    if kind in ("read", "write", "discard"):
        b, n = _range(draw)
        return (kind, b, n, draw(st.integers(0, 200)), who)
    if kind == "hint":
        return (kind, draw(st.integers(1, NB // FILE_BLOCKS)), draw(st.integers(-2, 2)),
                draw(st.booleans()), draw(st.booleans()))
    if kind == "advise":
        b, n = _range(draw)
        return (kind, b, n, draw(st.sampled_from(["willneed", "dontneed", "priority"])), who)
    if kind == "fsync":
        return (kind, draw(st.integers(1, NB // FILE_BLOCKS)), 0, 0, 0)
    if kind == "banks":
        return (kind, draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                draw(st.sampled_from([None, 3, 5, 8])), draw(st.sampled_from([None, 4, 6])))
    return (kind, 0, 0, 0, 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(POLICIES), writeback=st.booleans(),
       nframes=st.integers(3, 12), steps=st.lists(ops(), max_size=45))
def test_pager_invariants_hold(policy: str, writeback: bool, nframes: int,
                               steps: list[tuple]) -> None:
    trio.run(_run, policy, writeback, nframes, steps, False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(POLICIES), writeback=st.booleans(),
       nframes=st.integers(3, 12),
       steps=st.lists(st.one_of(ops(), st.tuples(st.just("sleep"), st.sampled_from(
           [0.01, 0.3, 1.0, 6.0]), st.just(0), st.just(0), st.just(0))), max_size=45))
def test_pager_invariants_hold_with_background_work(policy: str, writeback: bool,
                                                    nframes: int, steps: list[tuple]) -> None:
    """The same, with `run()`'s background work (write-back aging, the free reserve,
    reclaim requests to a client that complies and one that never answers) running
    between the steps on a mock clock."""
    trio.run(_run, policy, writeback, nframes, steps, True,
             clock=trio.testing.MockClock(autojump_threshold=0))


async def _run(policy: str, writeback: bool, nframes: int, steps: list[tuple],
               background: bool) -> None:
    if not background:
        await _steps(policy, writeback, nframes, steps, None)
        return
    async with trio.open_nursery() as nursery:
        await _steps(policy, writeback, nframes, steps, nursery)
        nursery.cancel_scope.cancel()


async def _steps(policy: str, writeback: bool, nframes: int, steps: list[tuple],
                 nursery: trio.Nursery | None) -> None:
    device = memory_device(NB, block_size=BS)
    model: dict[int, bytes] = {}
    disc_files: set[int] = set()
    hinted = policy == "hinted"

    def device_now(b: int) -> bytes:
        # the backing's bytes (checksums verified by reads elsewhere)
        return device.data.pread(b * BS, BS)

    discarded_now: set[int] = set()

    def on_discarded(file: int) -> None:
        # The file is lost as a whole: the filesystem makes it read as empty, so its
        # blocks are not checked until written again.
        assert hinted and file in disc_files, "only a discardable file may lose data"
        discarded_now.add(file)
        for b in range((file - 1) * FILE_BLOCKS, file * FILE_BLOCKS):
            model[b] = LOST

    p = Pager(device, nframes=nframes, policy=policy, writeback=writeback,
              on_discarded=on_discarded, reclaim_grace=0.5, dirty_expire=2.0)
    if nursery is not None:
        await nursery.start(p.run)

        def complying(n: int, deadline: float) -> None:
            async def release() -> None:
                await trio.sleep(0.1)
                mine = [b for b, f in p._where.items() if p._owner[f] == 1][:n]
                for b in mine:
                    await p.advise(file_of(b), [(b % FILE_BLOCKS, b, 1)],
                                   principal=PrincipalId(1), dontneed=True)
                p.answer_reclaim(PrincipalId(1), len(mine))
            nursery.start_soon(release)
        p.on_reclaim(PrincipalId(1), complying)
        p.on_reclaim(PrincipalId(2), lambda n, d: None)  # never answers
    fsync_of: list[int] = []

    # discardable dirty frames are written back only by an fsync of their file
    orig_run = p._writeback_run

    async def writeback_run(run: list[int], principal=None, **kw) -> int:
        for f in run:
            if hinted and p._disc[f]:
                assert fsync_of and int(p._file[f]) == fsync_of[-1], \
                    "a discardable dirty page was written back"
        return await orig_run(run, principal, **kw)
    p._writeback_run = writeback_run  # type: ignore[method-assign]

    # the policy never picks a protected frame for someone else
    orig_pick = p._pick_victim

    def pick(requester: int, *, strict: bool = True) -> int:
        v = orig_pick(requester, strict=strict)
        if v != -1 and strict and policy != "global-lru":
            owner = int(p._owner[v])
            assert owner == requester or p._acct[owner].resident > p._min.get(owner, 0), \
                f"frame of principal {owner} taken below its guarantee"
        return v
    p._pick_victim = pick  # type: ignore[method-assign]

    def check(got: bytes | bytearray, b: int, n: int, what: str) -> None:
        for i in range(n):
            want = model.get(b + i, bytes(BS))
            if want is not LOST:
                assert got[i * BS:(i + 1) * BS] == want, f"{what}: block {b + i}"

    for kind, a1, a2, a3, a4 in steps:
        if kind == "read":
            b, n, who = a1, a2, a4
            got = await p.read(BlockNo(b), n, principal=PrincipalId(who), file=file_of(b),
                               fblock=b % FILE_BLOCKS)
            check(got, b, n, f"read {b}+{n}")
        elif kind == "write":
            b, n, seed, who = a1, a2, a3, a4
            buf = b"".join(data(seed, b + i) for i in range(n))
            discarded_now.clear()
            await p.write(BlockNo(b), buf, principal=PrincipalId(who), file=file_of(b),
                          fblock=b % FILE_BLOCKS)
            if file_of(b) not in discarded_now:  # (else lost while being written)
                for i in range(n):
                    model[b + i] = data(seed, b + i)
        elif kind == "discard":
            b, n = a1, a2
            await p.discard(BlockNo(b), n, principal=ROOT)
            for i in range(b, b + n):
                model.pop(i, None)
        elif kind == "hint":
            file, prio, disc, seq = a1, a2, a3, a4
            p.set_file_hints(file, priority=prio, discardable=disc, sequential=seq)
            (disc_files.add if disc else disc_files.discard)(file)
        elif kind == "advise":
            b, n, what, who = a1, a2, a3, a4
            await p.advise(file_of(b), [(b % FILE_BLOCKS, b, n)], principal=PrincipalId(who),
                           willneed=what == "willneed", dontneed=what == "dontneed",
                           priority=1 if what == "priority" else None)
        elif kind == "flush":
            await p.flush()
            for b in range(NB):
                if file_of(b) not in disc_files or not hinted:
                    check(device_now(b), b, 1, "after flush")
        elif kind == "fsync":
            file = a1
            fsync_of.append(file)
            try:
                await p.writeback_file(file)
            finally:
                fsync_of.pop()
            for b in range((file - 1) * FILE_BLOCKS, file * FILE_BLOCKS):
                check(device_now(b), b, 1, "after fsync")
        elif kind == "sleep":
            await trio.sleep(a1)
        elif kind == "banks":
            min1, min2, max1, max2 = a1, a2, a3, a4
            min1 = min(min1, max1 if max1 is not None else min1)
            min2 = min(min2, max2 if max2 is not None else min2)
            if min1 + min2 > nframes:
                min2 = max(0, nframes - min1)
            tree = {ROOT: BankNode(ROOT, None, "root"),
                    PrincipalId(1): BankNode(PrincipalId(1), ROOT, "a", cache_min=min1 * BS,
                                             cache_max=None if max1 is None else max1 * BS),
                    PrincipalId(2): BankNode(PrincipalId(2), ROOT, "b", cache_min=min2 * BS,
                                             cache_max=None if max2 is None else max2 * BS)}
            p.check_banks(tree)
            p.configure_banks(tree)
        check_invariants(p)
        assert p.statistics().frames_used <= nframes
        if not writeback:
            assert p.statistics().dirty == 0
    # at the end every block reads as the model says, through the pool and around it
    check(await p.read(BlockNo(0), NB, principal=ROOT), 0, NB, "bypassing read")
    for b in range(0, NB, FILE_BLOCKS):
        check(await p.read(BlockNo(b), FILE_BLOCKS, principal=ROOT), b, FILE_BLOCKS, "read")
    await p.flush()
    for b in range(NB):
        if file_of(b) not in disc_files or not hinted:
            check(device_now(b), b, 1, "after the last flush")
    check_invariants(p)


# -- the dirty discardable count (review of probe5fix, V5) ------------------------------


@st.composite
def disc_ops(draw):
    kind = draw(st.sampled_from(["write", "write", "write", "within", "file_hint",
                                 "range_hint", "forget", "flush", "fsync", "dontneed",
                                 "discard", "read", "sleep"]))
    who = draw(st.integers(1, 3))
    b, n = _range(draw)
    return (kind, b, n, who, draw(st.booleans()), draw(st.integers(0, 200)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(POLICIES), nframes=st.integers(3, 12),
       limited=st.booleans(),
       groups=st.lists(st.lists(disc_ops(), min_size=1, max_size=3), max_size=20))
def test_dirty_discardable_counts_match_a_recount(policy: str, nframes: int, limited: bool,
                                                  groups: list[list[tuple]]) -> None:
    """Each principal's count of dirty discardable frames (`_Acct.disc_dirty`, which a
    limited node's dirty bound leaves out under `hinted`) equals a recount over the
    pool (`check_invariants`) after and between random operations run up to three at
    a time, with write-back on a device that takes time (frames under write-back get
    written again and change dirtier), aging and reclaim running, and every way a
    frame's state, dirtier or discardable flag changes: dirtying, write-back (aging,
    throttling, flush, fsync), file and range hints set and cleared, a file
    forgotten, dontneed, discard, reclaim of clean and dirty discardable frames — and
    the debt-paced count (`_Acct.paced`) the same way: hints cleared over a limited
    principal's dirty discardable frames past its bound, paced frames written back,
    taken over, made discardable again (review of tidy5, R2)."""
    trio.run(_disc_steps, policy, nframes, limited, groups,
             clock=trio.testing.MockClock(autojump_threshold=0))


@st.composite
def paced_ops(draw):
    """`disc_ops` weighted towards what makes debt-paced frames: the limited P(1)
    writing, and files marked discardable, written and cleared (`cycle`: cleared
    unless its flag says to keep the mark)."""
    kind = draw(st.sampled_from(["write", "write", "cycle", "cycle", "within",
                                 "file_hint", "range_hint", "flush", "fsync", "dontneed",
                                 "discard", "sleep", "forget"]))
    who = draw(st.sampled_from([1, 1, 1, 2]))
    b, n = _range(draw)
    return (kind, b, n, who, draw(st.booleans()), draw(st.integers(0, 200)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nframes=st.integers(6, 16),
       groups=st.lists(st.lists(paced_ops(), min_size=1, max_size=3), max_size=24))
def test_debt_paced_counts_match_a_recount(nframes: int, groups: list[list[tuple]]) -> None:
    """Review of tidy5, R2: the same as the test above under `hinted` with P(1)
    limited, the operations weighted so that hints are cleared over P(1)'s dirty
    discardable frames past its bound: each principal's count of debt-paced frames
    (`_Acct.paced`) equals a recount (`check_invariants`), and no frame is both
    paced and discardable, through write-back (aging, throttling, flush, fsync),
    takeover, hints set again, forget, dontneed, discard and reclaim."""
    trio.run(_disc_steps, "hinted", nframes, True, groups,
             clock=trio.testing.MockClock(autojump_threshold=0))


async def _disc_steps(policy: str, nframes: int, limited: bool,
                      groups: list[list[tuple]]) -> None:
    device = memory_device(NB, block_size=BS)
    real_write = device.write

    async def slow_write(*args, **kw):  # (write-back in flight for a while)
        await trio.sleep(0.05)
        return await real_write(*args, **kw)
    device.write = slow_write  # type: ignore[method-assign]
    p = Pager(device, nframes=nframes, policy=policy, writeback=True,
              reclaim_grace=0.5, dirty_expire=0.5)
    if limited:
        p.configure_banks({ROOT: BankNode(ROOT, None, "root"),
                           PrincipalId(1): BankNode(PrincipalId(1), ROOT, "a",
                                                    io_limit_bps=4 * BS)})
        # a bound of 2 frames, under the dirty share of the smallest pools: a hint
        # cleared over P(1)'s dirty discardable frames makes debt-paced ones
        # (review of tidy5, R2), which `check_invariants` recounts too
        p.dirty_limit_seconds = 0.5
    checking = True

    async def checker() -> None:
        while checking:
            check_invariants(p)
            await trio.sleep(0.01)

    async def one(kind: str, b: int, n: int, who: int, flag: bool, seed: int) -> None:
        pr, file, fb = PrincipalId(who), file_of(b), b % FILE_BLOCKS
        if kind == "write":
            buf = b"".join(data(seed, b + i) for i in range(n))
            await p.write(BlockNo(b), buf, principal=pr, file=file, fblock=fb)
        elif kind == "within":
            p.write_within_nowait(BlockNo(b), 8, b"w" * 16, principal=pr, file=file,
                                  fblock=fb)
        elif kind == "file_hint":
            p.set_file_hints(file, discardable=flag)
        elif kind == "cycle":  # marked, written, cleared: debt-paced past the bound
            p.set_file_hints(file, discardable=True)
            buf = b"".join(data(seed, b + i) for i in range(n))
            await p.write(BlockNo(b), buf, principal=pr, file=file, fblock=fb)
            p.set_file_hints(file, discardable=flag)
        elif kind == "range_hint":
            await p.advise(file, [(fb, b, n)], principal=pr, discardable=flag)
        elif kind == "forget":
            p.forget_file(file)
        elif kind == "flush":
            await p.flush()
        elif kind == "fsync":
            await p.writeback_file(file)
        elif kind == "dontneed":
            await p.advise(file, [(fb, b, n)], principal=pr, dontneed=True)
        elif kind == "discard":
            await p.discard(BlockNo(b), n, principal=ROOT)
        elif kind == "read":
            await p.read(BlockNo(b), n, principal=pr, file=file, fblock=fb)
        elif kind == "sleep":
            await trio.sleep(seed / 100)

    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        nursery.start_soon(checker)
        for group in groups:
            async with trio.open_nursery() as ops_:
                for op in group:
                    ops_.start_soon(one, *op)
            check_invariants(p)
        await p.flush()
        check_invariants(p)
        checking = False
        nursery.cancel_scope.cancel()


def test_clearing_the_discardable_hint_keeps_a_limited_tenant_within_its_dirty_bound(
        ) -> None:
    """Review of tidy5, R2: under `hinted` a block written into a discardable frame
    is not held to a limited node's dirty bound (V3) and the bound leaves the dirty
    discardable frames out (V5). A tenant at 4 blocks/s (bound: 8 frames) marks a
    file discardable, dirties 40 of its blocks (held only by its dirty share, 64)
    and clears the hint: before the fix it then held 40 dirty frames a commit
    expedites past its limit, 5x its bound (what hostile probe 5's L2 bound exists
    to prevent). Now the clear returns at once and converts them — ordinary dirty
    data — but the 32 over the bound are debt-paced: a commit writes the 8 within
    the bound (expedited, as any) and leaves the 32 (its file stays among those a
    barrier leaves out), an unlimited tenant's writes and commit do not wait for
    them, and an fsync of the file writes them all, after which they are on the
    device and the file is no longer left out. (The pace itself, on a device that
    keeps limits: tests/test_tidy5_review.py.)"""
    async def main() -> None:
        device = memory_device(256, block_size=BS)
        p = Pager(device, nframes=128, policy="hinted", writeback=True)
        p.configure_banks({ROOT: BankNode(ROOT, None, "root"),
                           PrincipalId(1): BankNode(PrincipalId(1), ROOT, "a",
                                                    io_limit_bps=4 * BS),
                           PrincipalId(2): BankNode(PrincipalId(2), ROOT, "b")})
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run)
            p.set_file_hints(7, discardable=True)
            for i in range(40):
                await p.write(BlockNo(i), data(1, i), principal=PrincipalId(1), file=7,
                              fblock=i)
            t0 = trio.current_time()
            p.set_file_hints(7, discardable=False)
            assert trio.current_time() == t0  # (the clear does not wait for the debt)
            check_invariants(p)
            a = p._acct_of(1)
            bound = int(4 * p.dirty_limit_seconds)
            # what a commit may expedite past the tenant's limit: within its bound
            paced = getattr(a, "paced", 0)  # (none before the fix)
            assert a.dirty - a.disc_dirty - paced <= bound, (a.dirty, a.disc_dirty,
                                                             paced, bound)
            assert (a.dirty, a.disc_dirty, a.paced) == (40, 0, 32)
            assert p.dirty_discardable_files() == {7}  # (a barrier leaves them out)
            # another tenant, unlimited, writes and commits: nothing waits for the debt
            for i in range(8):
                await p.write(BlockNo(100 + i), data(2, i), principal=PrincipalId(2),
                              file=8, fblock=i)
            with p.device.scheduler.expedite_writes():  # (a commit's barrier)
                await p.flush(principal=PrincipalId(2), file=8, by_dirtier=True)
            assert not p.has_dirty(8)
            check_invariants(p)
            assert (a.dirty, a.paced) == (32, 32)  # (the 8 within the bound: written)
            assert p.dirty_discardable_files() == {7}
            # an fsync of the file (Kernel.writeback_file): every frame on the device
            await p.write_back_paced(7)
            assert (a.dirty, a.paced) == (0, 0)
            await p.writeback_file(7, principal=PrincipalId(1))
            check_invariants(p)
            assert (a.dirty, a.paced) == (0, 0)
            assert p.dirty_discardable_files() == set()
            for i in range(40):
                assert device.data.pread(i * BS, BS) == data(1, i), i
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
