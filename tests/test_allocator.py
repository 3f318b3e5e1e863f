"""The free-space bitmap: all-or-nothing allocation, goal locality, deferred frees,
and a property test against a model set of used blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs.allocator import _WINDOW, Allocator
from fs.errors import NoSpace


def blocks_of(runs: list[tuple[int, int]]) -> list[int]:
    return [s + i for s, c in runs for i in range(c)]


def test_fresh_allocator() -> None:
    a = Allocator(100)
    assert a.free == 100 and a.pending_blocks == 0 and not a.used.any()
    assert a.allocate(0) == [] and a.allocate(-3) == []
    assert a.free == 100


def test_allocate_is_all_or_nothing() -> None:
    a = Allocator(64)
    a.allocate(60)
    used = a.used.copy()
    with pytest.raises(NoSpace, match="4 blocks free, 5 needed"):
        a.allocate(5)
    assert a.free == 4 and (a.used == used).all()
    runs = a.allocate(4)
    assert sorted(blocks_of(runs)) == [60, 61, 62, 63]
    assert a.free == 0
    with pytest.raises(NoSpace):
        a.allocate(1)
    assert a.free == 0 and a.used.all()


def test_goal_locality() -> None:
    a = Allocator(1000)
    assert a.allocate(4, goal=500) == [(500, 4)]
    # continuing a file: the goal is the block after its last extent
    assert a.allocate(3, goal=504) == [(504, 3)]
    # goal taken: the first free block after it
    assert a.allocate(2, goal=502) == [(507, 2)]
    # a goal past the device (or negative) falls back to the cursor
    a2 = Allocator(100)
    assert a2.allocate(2, goal=100) == [(0, 2)]
    assert a2.allocate(2, goal=-1) == [(2, 2)]
    assert a2.allocate(2) == [(4, 2)]


def test_allocation_splits_around_used_blocks_and_wraps() -> None:
    a = Allocator(100)
    a.mark_used(10, 2)
    a.mark_used(14, 1)
    assert a.free == 97
    runs = a.allocate(6, goal=8)
    assert runs == [(8, 2), (12, 2), (15, 2)]
    # near the end: the rest comes from the start of the device
    runs = a.allocate(5, goal=97)
    assert runs == [(97, 3), (0, 2)]
    assert a.free == 97 - 11


def test_allocation_across_scan_windows() -> None:
    n = _WINDOW * 2 + 100
    a = Allocator(n)
    a.mark_used(0, _WINDOW + 50)
    runs = a.allocate(10)
    assert runs == [(_WINDOW + 50, 10)]
    a.mark_used(_WINDOW + 60, n - (_WINDOW + 60) - 3)
    runs = a.allocate(3, goal=0)
    assert runs == [(n - 3, 3)]
    assert a.free == 0
    with pytest.raises(NoSpace):
        a.allocate(1)


def test_mark_used_twice_is_an_error() -> None:
    a = Allocator(50)
    a.mark_used(5, 5)
    with pytest.raises(ValueError, match="owned twice"):
        a.mark_used(9, 2)
    assert a.free == 45


def test_free_later_holds_blocks_until_commit() -> None:
    a = Allocator(16)
    runs = a.allocate(16)
    a.free_later([(4, 4)])
    assert a.free == 0 and a.pending_blocks == 4
    assert a.used[4:8].all()
    with pytest.raises(NoSpace):
        a.allocate(1)  # the freed blocks are not reusable yet
    a.committed()
    assert a.free == 4 and a.pending_blocks == 0 and not a.used[4:8].any()
    assert sorted(blocks_of(a.allocate(4))) == [4, 5, 6, 7]
    a.committed()  # nothing pending: nothing happens
    assert a.free == 0
    assert blocks_of(runs) == list(range(16))


def test_release_now() -> None:
    a = Allocator(32)
    runs = a.allocate(10, goal=3)
    a.release_now(runs)
    assert a.free == 32 and not a.used.any()


# -- property test --------------------------------------------------------------------

NB = 96

ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 40), st.one_of(st.none(), st.integers(-2, NB + 2))),
    st.tuples(st.just("free_later"), st.integers(0, 1000), st.integers(1, 8)),
    st.tuples(st.just("release"), st.integers(0, 1000), st.integers(1, 8)),
    st.tuples(st.just("commit"), st.just(0), st.just(0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, premarked=st.lists(st.tuples(st.integers(0, NB - 1), st.integers(1, 6)),
                                   max_size=5))
def test_allocator_matches_model(ops: list[tuple], premarked: list[tuple[int, int]]) -> None:
    a = Allocator(NB)
    used: set[int] = set()  # owned by someone (allocated or pending release)
    owned: list[int] = []   # allocated and not yet freed, in allocation order
    pending: set[int] = set()
    for s, c in premarked:
        c = min(c, NB - s)
        if used & set(range(s, s + c)):
            with pytest.raises(ValueError):
                a.mark_used(s, c)
            continue
        a.mark_used(s, c)
        used |= set(range(s, s + c))
        owned += range(s, s + c)

    for kind, x, y in ops:
        if kind == "alloc":
            count, goal = x, y
            free = NB - len(used)
            if count > free:
                with pytest.raises(NoSpace):
                    a.allocate(count, goal)
                continue
            runs = a.allocate(count, goal)
            got = blocks_of(runs)
            assert len(got) == count == len(set(got))
            assert all(0 <= b < NB for b in got)
            assert not used & set(got), "allocated a used block"
            assert all(c > 0 for _, c in runs)
            for (s1, c1), (s2, _) in zip(runs, runs[1:]):
                assert s1 + c1 != s2, "adjacent runs not merged"
            if count and goal is not None and 0 <= goal < NB:
                # locality: the first run starts at the first free block at or after
                # the goal (cyclically)
                first_free = next((goal + i) % NB for i in range(NB)
                                  if (goal + i) % NB not in used)
                assert runs[0][0] == first_free
                if all(goal + i < NB and goal + i not in used for i in range(count)):
                    assert runs == [(goal, count)]
            used |= set(got)
            owned += got
        elif kind in ("free_later", "release"):
            if not owned:
                continue
            i = x % len(owned)
            run = owned[i:i + y]
            del owned[i:i + y]
            runs = [(b, 1) for b in run]
            if kind == "free_later":
                a.free_later(runs)
                pending |= set(run)
            else:
                a.release_now(runs)
                used -= set(run)
        else:
            a.committed()
            used -= pending
            pending.clear()
        assert set(np.flatnonzero(a.used).tolist()) == used
        assert a.free == NB - len(used)
        assert a.pending_blocks == len(pending)


def test_relocations_have_their_own_cursor() -> None:
    """Relocations (copy-on-write blocks) continue where the last relocation ended, half
    the device away from where new data goes, and leave the block a growing file
    continues into alone (review of direct4, A2: from the shared cursor each took it)."""
    a = Allocator(1024)
    grow = a.allocate(4)
    assert grow == [(0, 4)]
    cow = [a.allocate(1, relocation=True) for _ in range(3)]
    assert cow == [[(516, 1)], [(517, 1)], [(518, 1)]]  # (the cursor, 4, + 512)
    assert a.allocate(4, 4) == [(4, 4)]  # the growing file's goal: still free
    assert a.allocate(2) == [(8, 2)]  # no goal: the cursor, where new data ended
    assert a.allocate(1, relocation=True) == [(519, 1)]
    assert a.free == 1024 - 14


# -- kept freed blocks (direct5): reachable by relocations only -------------------------

def test_kept_blocks_are_used_and_only_relocations_take_them() -> None:
    """Kept blocks (`keep`) still hold another file's data: they stay used in the map,
    counted apart, and no ordinary allocation gets one, even with the goal on them or
    the map otherwise full; a relocation takes them first (direct5: before, a kept
    block was free in the map and any allocation could get it, review K2's class)."""
    a = Allocator(64)
    runs = a.allocate(8, 0)
    assert runs == [(0, 8)]
    a.keep(runs)  # (as the reaper does, once a durable commit freed them)
    assert a.kept_blocks == 8 and a.free == 56 and a.available == 64
    assert a.used[:8].all()
    got = blocks_of(a.allocate(4, 0))  # the goal on a kept block
    assert not set(got) & set(range(8))
    with pytest.raises(NoSpace):
        a.allocate(53)  # 52 free in the map; the kept ones are not for this
    rest = blocks_of(a.allocate(52, 0))
    assert not set(rest) & set(range(8)) and a.free == 0
    assert a.allocate(3, relocation=True) == [(0, 3)]  # relocations: kept first
    assert a.kept_blocks == 5 and a.free == 0
    with pytest.raises(NoSpace):
        a.allocate(6, relocation=True)
    a.give_back([(1, 2)])  # a relocation that failed: kept again, not freed
    assert a.kept_blocks == 7 and a.free == 0
    assert a.take_kept() == [(1, 2), (3, 5)]  # (to discard: still used until released)
    assert a.kept_blocks == 0 and a.free == 0 and a.used[1:8].all()
    a.release_now([(1, 2), (3, 5)])
    assert a.free == 7 and a.available == 7


kept_ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 30), st.one_of(st.none(), st.integers(0, NB - 1))),
    st.tuples(st.just("relocate"), st.integers(0, 30), st.none()),
    st.tuples(st.just("free_later"), st.integers(0, 1000), st.integers(1, 8)),
    st.tuples(st.just("commit"), st.none(), st.none()),
    st.tuples(st.just("keep"), st.integers(0, 1000), st.integers(1, 8)),
    st.tuples(st.just("give_back"), st.integers(0, 1000), st.integers(1, 8)),
    st.tuples(st.just("take_kept"), st.none(), st.none()),
    st.tuples(st.just("discard"), st.none(), st.none()),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=kept_ops)
def test_kept_blocks_model(ops: list[tuple]) -> None:
    """Random allocate / relocate / free_later / commit / keep / give_back / take_kept /
    discard against a model: `free + kept_blocks + used by files == nblocks` after
    every step, the map's used blocks are the files' and the kept ones, `kept_blocks`
    is exact, and no allocation but a relocation returns a kept block."""
    a = Allocator(NB)
    owned: list[int] = []      # allocated to files (or to a relocation) and not freed
    pending: set[int] = set()  # freed by the open transaction
    kept: set[int] = set()
    taken: list[tuple[int, int]] = []  # take_kept's, being discarded (still used)
    for kind, x, y in ops:
        if kind in ("alloc", "relocate"):
            reloc = kind == "relocate"
            files = len(owned) + len(pending) + sum(c for _s, c in taken)
            free = NB - files - len(kept)
            if x > (free + len(kept) if reloc else free):
                with pytest.raises(NoSpace):
                    a.allocate(x, y, relocation=reloc)
                continue
            got = blocks_of(a.allocate(x, y, relocation=reloc))
            assert len(got) == x == len(set(got))
            assert not set(got) & (set(owned) | pending), "allocated a used block"
            if not reloc:
                assert not set(got) & kept, "an ordinary allocation got a kept block"
            else:  # the kept blocks first
                assert set(got) & kept == set(got) if x <= len(kept) else kept <= set(got)
            kept -= set(got)
            owned += got
        elif kind in ("free_later", "keep", "give_back"):
            if not owned:
                continue
            i = x % len(owned)
            run = owned[i:i + y]
            del owned[i:i + y]
            runs = [(b, 1) for b in run]
            if kind == "free_later":
                a.free_later(runs, recycle=True)
                pending |= set(run)
            elif kind == "keep":
                a.keep(runs)
                kept |= set(run)
            else:
                a.give_back(runs)
                kept |= set(run)
        elif kind == "commit":
            a.committed()
            pending.clear()
        elif kind == "take_kept":
            runs = a.take_kept()
            assert sorted(blocks_of(runs)) == sorted(kept)
            taken += runs
            kept.clear()
        else:  # the discard is over
            a.release_now(taken)
            taken.clear()
        files = len(owned) + len(pending) + sum(c for _s, c in taken)
        assert a.free + a.kept_blocks + files == NB
        assert a.kept_blocks == len(kept)
        in_use = set(owned) | pending | kept | set(blocks_of(taken))
        assert set(np.flatnonzero(a.used).tolist()) == in_use


def test_allocation_against_a_model_of_the_map(monkeypatch) -> None:
    """Seeded random allocations and releases on small maps with small scan windows
    (runs across windows, wrap-around, goals past the end) against a bitmap: each
    allocation takes exactly `count` free blocks, as runs that do not touch each
    other, and the map and the free count stay the model's. (The scan finds a
    window's free runs at once since probe 11's F3.)"""
    import random

    import numpy as np

    from fs import allocator
    from fs.errors import NoSpace
    monkeypatch.setattr(allocator, "_WINDOW", 64)
    for seed in range(400):
        rnd = random.Random(seed)
        n = rnd.randint(1, 400)
        a = Allocator(n)
        model = np.zeros(n, bool)
        held: list[list[tuple[int, int]]] = []
        for _ in range(60):
            if held and rnd.random() < 0.4:
                runs = held.pop(rnd.randrange(len(held)))
                piece = [r for r in runs if rnd.random() < 0.7]
                a.release_now(piece)
                for s, c in piece:
                    model[s:s + c] = False
                continue
            count = rnd.randint(1, 80)
            goal = rnd.choice([None, rnd.randrange(n), n + 5])
            free = int((~model).sum())
            try:
                runs = a.allocate(count, goal)
            except NoSpace:
                assert count > free, seed
                continue
            assert sum(c for _s, c in runs) == count, (seed, runs, count)
            for s, c in runs:
                assert c > 0 and not model[s:s + c].any(), (seed, s, c)
                model[s:s + c] = True
            assert (a.used == model).all() and a.free == int((~model).sum()), seed
            assert all(s1 + c1 != s2 for (s1, c1), (s2, _) in zip(runs, runs[1:])), runs
            held.append(runs)
